"""The localisation experiments of Faster R-CNN: why a rank-based Faster R-CNN localised worse
than the cross-entropy one, and what closes the gap (docs/localisation.md).

    python examples/localisation_experiments.py --list                  # the experiments and their runs
    python examples/localisation_experiments.py --run init_unit         # train what is missing of one
    python examples/localisation_experiments.py --table docs/localisation.md   # the table, from the runs

Each experiment trains ``examples/train_detector.py`` (Faster R-CNN, the digits set, 1000
iterations × batch 4, seed 0, evaluated every 250) for ce and/or brs at the study's best setting
of each loss (ce: LR 0.08, clipping at 10; brs: LR 0.006, no clipping), plus the experiment's own
arguments. Runs live in ``examples/study/localisation/<experiment>/<loss>_seed<seed>_<iters>it``
(their ``metrics.json`` committed) and are reused when finished.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_detector  # noqa: E402

ROOT = Path(__file__).resolve().parent / "study" / "localisation"
# the study's best setting of each loss (before these experiments; CHANGELOG.md)
SETTINGS = {"fasterrcnn": {"ce": ["--lr", "0.08", "--clip", "10"], "brs": ["--lr", "0.006", "--clip", "0"]},
            "fcos": {"ce": ["--lr", "0.01", "--clip", "10"], "brs": ["--lr", "0.004", "--clip", "10"]},
            # RT-DETR: the DETR recipe's clipping; the rate is each experiment's (--lr)
            "rtdetr": {"brs": ["--clip", "0.1"]}}
COMMON = ["--eval-every", "250", "--batch-size", "4", "--image-size", "256", "--num-train", "600", "--num-val", "150"]
NORMAL_INIT = ["--predictor-init", "normal"]
# the example's defaults when the DETR runs were made (torchvision-only options that a DETR ignores)
DETR_DEFAULTS = ("--predictor-init", "normal", "--box-weighting", "uniform", "--eval-every", "500")


@dataclass(frozen=True)
class Experiment:
    name: str
    question: str
    arguments: tuple[str, ...] = ()
    losses: tuple[str, ...] = ("ce", "brs")
    iters: int = 1000
    detector: str = "fasterrcnn"
    seeds: tuple[tuple[str, int], ...] = ()  # (loss, seed) runs beyond every loss's seed 0
    # options the runs recorded before they applied to this detector (the check of the recorded
    # arguments skips them)
    predates: tuple[str, ...] = ()

    def runs(self) -> list[tuple[str, int]]:
        return [(loss, 0) for loss in self.losses] + list(self.seeds)


EXPERIMENTS = [
    Experiment("baseline", "the example as the study trained it"),
    Experiment("box_lr_x8", "(a) the box regressor's step: its layer at 8x the learning rate",
               ("--box-lr-scale", "8"), losses=("brs",)),
    Experiment("width1024", "(b) a 1024-wide box head (torchvision's and mmdet's default)",
               ("--box-head-width", "1024")),
    Experiment("init", "(c) mmdet's predictor init: N(0, 0.01) classification, N(0, 0.001) regression",
               tuple(NORMAL_INIT), seeds=(("ce", 1),)),
    Experiment("init_box_lr_x4", "(c) + (a): init, box layer at 4x", (*NORMAL_INIT, "--box-lr-scale", "4"),
               losses=("brs",)),
    Experiment("init_box_lr_x16", "(c) + (a): init, box layer at 16x", (*NORMAL_INIT, "--box-lr-scale", "16"),
               losses=("brs",)),
    Experiment("init_unit", "init, box loss scaled to 1 instead of the classification loss's value",
               (*NORMAL_INIT, "--box-balance", "unit"), losses=("brs",)),
    Experiment("init_uniform", "init, positives weighted alike in the box loss instead of by their scores",
               (*NORMAL_INIT, "--box-weighting", "uniform"), losses=("brs",)),
    Experiment("init_unit_uniform", "init, box loss scaled to 1 and positives weighted alike",
               (*NORMAL_INIT, "--box-balance", "unit", "--box-weighting", "uniform"), losses=("brs",),
               seeds=(("brs", 1),)),
    Experiment("init_unit_lr_x4", "init, box loss scaled to 1, at twice the study's best rate (LR 0.012)",
               (*NORMAL_INIT, "--box-balance", "unit", "--lr", "0.012"), losses=("brs",)),
    Experiment("init_unit_box_lr_x4", "init, box loss scaled to 1, box layer at 4x",
               (*NORMAL_INIT, "--box-balance", "unit", "--box-lr-scale", "4"), losses=("brs",)),
    Experiment("init_unit_lr_x4_clip", "init, box loss scaled to 1, LR 0.012 clipped at 10 (unclipped it diverged)",
               (*NORMAL_INIT, "--box-balance", "unit", "--lr", "0.012", "--clip", "10"), losses=("brs",)),
    Experiment("fcos_baseline", "FCOS (no RoI head, GIoU for every loss), as the study trained it",
               detector="fcos"),
    Experiment("fcos_unit", "FCOS, the box loss scaled to 1", ("--box-balance", "unit"), losses=("brs",),
               detector="fcos"),
    Experiment("fcos_unit_uniform", "FCOS, the box loss scaled to 1 and positives weighted alike",
               ("--box-balance", "unit", "--box-weighting", "uniform"), losses=("brs",), detector="fcos"),
    Experiment("init_3000it", "(d) with init, 3000 iterations: does the gap close with the budget?",
               (*NORMAL_INIT, "--eval-every", "750"), iters=3000),
    *(Experiment(f"rtdetr_ratio_lr_x{scale}",
                 f"RT-DETR, box terms scaled to their term's ranking loss, LR x{scale} (the study's runs "
                 "before box_balance applied to DETRs: they recorded its torchvision default 'unit', unused)",
                 (*DETR_DEFAULTS, "--box-balance", "classification", "--lr", lr), losses=("brs",), iters=2000,
                 detector="rtdetr", predates=("box_balance",))
      for scale, lr in (("0.5", "0.0001"), ("1", "0.0002"), ("2", "0.0004"))),
    Experiment("rtdetr_matcher_class_x2",
               "RT-DETR at the study's best BRS rate (LR x4), matched with twice the config's class cost, as the "
               "official Co-DETR BRS config matches (4 against its focal baseline's 2)",
               (*DETR_DEFAULTS, "--box-balance", "weights", "--lr", "0.0008", "--matcher-class-scale", "2"),
               losses=("brs",), iters=2000, detector="rtdetr", seeds=(("brs", 1),)),
    Experiment("rtdetr_classification_x2",
               "RT-DETR at the study's best BRS rate (LR x4), every classification term weighted 2 instead of "
               "the config's VFL weight 1, as the official Co-DETR BRS config weighs its ranking loss",
               (*DETR_DEFAULTS, "--box-balance", "weights", "--lr", "0.0008", "--classification-weight", "2"),
               losses=("brs",), iters=2000, detector="rtdetr", seeds=(("brs", 1),)),
]
BY_NAME = {experiment.name: experiment for experiment in EXPERIMENTS}


def run_folder(experiment: Experiment, loss: str, seed: int = 0) -> Path:
    return ROOT / experiment.name / f"{loss}_seed{seed}_{experiment.iters}it"


def run_arguments(experiment: Experiment, loss: str, seed: int = 0) -> list[str]:
    # what an experiment does not set, it ran with the example's defaults then: torchvision's init
    # and RS-R-CNN's box loss
    then = {"--predictor-init": "torchvision", "--box-balance": "classification", "--box-weighting": "score"}
    defaults = [word for option, value in then.items() if option not in experiment.arguments for word in (option, value)]
    return ["--loss", loss, "--iters", str(experiment.iters), "--seed", str(seed), "--detector", experiment.detector,
            *COMMON, *SETTINGS[experiment.detector][loss], *defaults, *experiment.arguments,
            "--out", str(run_folder(experiment, loss, seed))]


def run(experiment: Experiment) -> None:
    """Train the experiment's missing runs (a run resumes from its checkpoint)."""
    for loss, seed in experiment.runs():
        folder = run_folder(experiment, loss, seed)
        if (folder / "metrics.json").exists():
            continue
        resume = ["--checkpoint", str(folder / "checkpoint.pt")] if (folder / "checkpoint.pt").exists() else []
        train_detector.main(run_arguments(experiment, loss, seed) + resume)


TABLE_START = "<!-- localisation table: generated by examples/localisation_experiments.py --table, do not edit -->"
TABLE_END = "<!-- end of localisation table -->"


def table() -> str:
    """One row per finished run: the experiment, the loss, the seed, COCO AP and the box refinement
    of the validation proposals (``diagnostics.RefinementProbe``) at the last evaluation."""
    lines = ["| experiment | detector | loss | seed | mAP | AP50 | AP75 | refined IoU | refined IoU >= 0.75 | "
             "proposal IoU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for experiment in EXPERIMENTS:
        for loss, seed in experiment.runs():
            path = run_folder(experiment, loss, seed) / "metrics.json"
            if not path.exists():
                continue
            metrics = json.loads(path.read_text())
            row = f"| {experiment.name} | {experiment.detector} | {loss} | {seed} |"
            if metrics.get("diverged_at") is not None:
                lines.append(f"{row} diverged at iteration {metrics['diverged_at']} | | | | | |")
                continue
            final = metrics["evaluations"][-1]
            refinement = " | ".join(f"{final[key]:.3f}" if key in final else "—"  # two-stage detectors only
                                    for key in ("refined_iou", "refined_iou75", "proposal_iou"))
            lines.append(f"{row} {final['mAP']:.3f} | {final['mAP50']:.3f} | {final['mAP75']:.3f} | {refinement} |")
    return "\n".join(lines) + "\n"


def write_table(path: Path) -> None:
    """Replace what stands between the localisation-table markers of ``path`` with :func:`table`."""
    text = path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{path} has no localisation-table markers ({TABLE_START} ... {TABLE_END})")
    before, rest = text.split(TABLE_START, 1)
    path.write_text(f"{before}{TABLE_START}\n{table()}{TABLE_END}{rest.split(TABLE_END, 1)[1]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the experiments and their runs' state")
    parser.add_argument("--run", nargs="+", choices=list(BY_NAME), default=[], help="train these experiments")
    parser.add_argument("--table", type=Path, help="write the table into this markdown page, between its markers")
    args = parser.parse_args(argv)
    for name in args.run:
        run(BY_NAME[name])
    if args.list:
        for experiment in EXPERIMENTS:
            states = [f"{loss} seed {seed}: "
                      f"{'done' if (run_folder(experiment, loss, seed) / 'metrics.json').exists() else 'missing'}"
                      for loss, seed in experiment.runs()]
            print(f"{experiment.name:20s} {experiment.question} ({', '.join(states)})")
    if args.table is not None:
        write_table(args.table)
    elif not args.run and not args.list:
        print(table(), end="")


if __name__ == "__main__":
    main()
