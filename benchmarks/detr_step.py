"""The ranking loss's share of a DETR training step, at the published model size.

    python -m benchmarks.detr_step                       # RT-DETR-R50 size, batch 2 at 640 px, on the CPU
    python -m benchmarks.detr_step --out benchmarks/figures/detr_step

transformers' ``RTDetrForObjectDetection`` at its config defaults (ResNet-50-vd backbone, 256
channels, 300 queries, 6 decoder layers, 100 denoising queries; random weights: the cost does
not depend on them) and 80 classes, converted to each ``--losses`` (``vfl``: the model's own
loss). One training step (forward, backward, AdamW step) on random images with ``--objects``
random boxes each, after a warm-up step. The profiler gives the time in the classification loss,
forward and backward: brl_triton's ``RankingLossFunction`` (its backward node shares the prefix),
or VFL's ``binary_cross_entropy_with_logits``, and how often the step calls it: 13 terms, the 6
decoder layers, the encoder's top-k and 6 denoising layers.

Writes ``detr_step.csv`` and ``detr_step.md`` to ``--out`` (with a progress bar over the losses).
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "detr_step"
# profiler event names of the classification losses: brl_triton's, and VFL's BCE forward and backward
CLASSIFICATION_EVENTS = {
    "ranking": ("RankingLossFunction",),
    "vfl": ("aten::binary_cross_entropy_with_logits", "BinaryCrossEntropyWithLogitsBackward"),
}


def random_batch(batch: int, size: int, objects: int, classes: int, seed: int = 0):
    """Images in [0, 1] and transformers' labels: ``class_labels`` and normalised cxcywh ``boxes``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator)
    labels = []
    for _ in range(batch):
        centre = torch.rand(objects, 2, generator=generator) * 0.6 + 0.2
        extent = torch.rand(objects, 2, generator=generator) * 0.3 + 0.05
        labels.append({"class_labels": torch.randint(0, classes, (objects,), generator=generator),
                       "boxes": torch.cat([centre, extent], dim=1)})
    return images, labels


def measure(loss: str, args) -> dict:
    """One profiled training step of the model with ``loss``: step seconds, classification-loss
    milliseconds and calls."""
    import transformers
    from torch.profiler import ProfilerActivity, profile

    from brl_triton.detection import convert_to_rank_based

    torch.manual_seed(0)
    model = transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(num_labels=args.classes))
    if loss != "vfl":
        convert_to_rank_based(model, loss)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images, labels = random_batch(args.batch, args.size, args.objects, args.classes)

    def step():
        outputs = model(pixel_values=images, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        outputs.loss.backward()
        optimizer.step()
        return outputs

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        outputs = step()
        seconds = time.perf_counter() - started
    names = CLASSIFICATION_EVENTS["vfl" if loss == "vfl" else "ranking"]
    events = [e for e in prof.key_averages() if e.key.split(": ")[-1].startswith(names)]
    loss_ms = sum(e.cpu_time_total for e in events) / 1e3
    forward_calls = sum(e.count for e in events if e.key.split(": ")[-1] == names[0])
    terms = sum(1 for name in outputs.loss_dict if name.startswith(f"loss_{loss}"))
    return {"loss": loss, "batch": args.batch, "image_size": args.size, "objects_per_image": args.objects,
            "classes": args.classes, "queries": model.config.num_queries, "decoder_layers": model.config.decoder_layers,
            "classification_terms": terms, "loss_calls": forward_calls, "step_s": seconds, "loss_ms": loss_ms,
            "loss_share": loss_ms / 1e3 / seconds}


def markdown(rows: list, environment: str) -> str:
    lines = [f"One RT-DETR-R50 training step (forward, backward, AdamW), CPU: {environment}.", "",
             "| loss | batch × px | classification terms | loss calls | step s | classification loss ms | share of the step |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['loss']} | {r['batch']} × {r['image_size']} | {r['classification_terms']} | {r['loss_calls']} | "
              f"{r['step_s']:.2f} | {r['loss_ms']:.1f} | {r['loss_share']:.2%} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", type=lambda s: s.split(","), default=["vfl", "brs", "rs"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--objects", type=int, default=7, help="objects per image (COCO averages about 7)")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    environment = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    rows = [measure(loss, args) for loss in tqdm(args.losses, desc="detr step", unit="loss")]
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "detr_step.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "detr_step.md").write_text(markdown(rows, environment))
    print(markdown(rows, environment))
    return rows


if __name__ == "__main__":
    main()
