"""The accuracy study: every loss trains the same detector on the offline digits set, each with
its own recipe tuned on the same small grid and budget, over several seeds.

    python examples/compare_losses.py --out examples/study                      # Faster R-CNN and FCOS
    python examples/compare_losses.py --detectors rtdetr --losses ce,brs,rs,mal --timing-iters 0 --out examples/study
    python examples/compare_losses.py --detectors fcos --losses ce,brs --iters 300 --tune-iters 150

Each detector has its protocol (``PROTOCOLS``: budgets and grid), which ``--iters``,
``--tune-iters``, ``--lr-scales`` and ``--clips`` replace for every detector of a call.
For every detector and loss (``ce`` is torchvision's own loss: cross-entropy, focal for the
one-stage detectors):

1. tuning: ``--tune-iters`` iterations on seed 0 for every learning rate (the recipe's, times
   each ``--lr-scales``) at the first clipping norm of ``--clips``. When the best mAP is at the
   grid's largest (or smallest) learning rate, one more grid step beyond it is tried, up to
   ``--extend-edges`` times. Then the other clipping norms (0 for none) at the best learning
   rate. The best mAP of all these runs wins; the same rule for every loss;
2. the study: ``--iters`` iterations for every seed with the chosen setting. With
   ``--tune-iters`` equal to ``--iters`` the tuning runs have the full budget, and seed 0's run
   is the chosen one of them, not trained again: a fairer search for about the same cost;
3. timing: one run of ``--timing-iters`` steps per loss with its chosen setting, not evaluated,
   all of them in one stretch at the end (run the study's last call on an otherwise idle
   machine): the median step's seconds, and the classification loss's milliseconds per step
   from the profiler.

Writes to --out, keeping the rows of the detectors and losses that this call did not name:
``runs.csv`` (one row per run, tuning included), ``summary.csv`` and
``summary.md`` (per detector and loss: mAP, mAP50 and mAP75 as mean ± spread (half the range)
over the seeds, seconds per iteration, loss milliseconds per iteration, the tuned setting; and the
search: every tuning run's mAP by learning rate, the other seeds' at the best) and
``map_curves.png`` (mAP over iterations, one line per run). Each run is
``train_detector.main`` in a directory of its own, reused when it has finished already,
so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_detector  # noqa: E402

DEFAULT_LOSSES = ["ce", "rs", "brs", "bap", "alrp"]
# FCOS is the one-stage detector: on the digits set RetinaNet's focal baseline stayed at 0.09-0.12
# mAP after 1000 iterations at every learning rate tried, FCOS's reached 0.68
DEFAULT_DETECTORS = ["fasterrcnn", "fcos"]


@dataclass(frozen=True)
class Protocol:
    """A detector's study: the seeds' budget, the tuning runs' budget and the tuning grid (the
    learning rates as multiples of the recipe's, searched at the first clipping norm, with up to
    ``extend_edges`` steps past an edge winner; the other norms, 0 for none, tried at the best
    rate)."""

    iters: int
    tune_iters: int
    lr_scales: tuple[float, ...]
    clips: tuple[float, ...]
    extend_edges: int = 1


# the protocol each detector's committed study (examples/study) ran with, so that one call finds
# every detector's runs. RT-DETR: twice the budget, since its own loss needs it to pass 0.3 mAP, and
# the DETR recipe's clipping (docs/detection_detr.md), and two steps past an edge winner, since
# after one step three of its four losses still won at the edge (x4)
PROTOCOLS = {"fasterrcnn": Protocol(1000, 1000, (0.5, 1.0, 2.0), (10.0, 0.0)),
             "fcos": Protocol(1000, 1000, (0.5, 1.0, 2.0), (10.0, 0.0)),
             "rtdetr": Protocol(2000, 2000, (0.5, 1.0, 2.0), (0.1,), extend_edges=2)}
# any other detector's, until it has a study of its own
DEFAULT_PROTOCOL = Protocol(1000, 300, (0.5, 1.0, 2.0), (10.0, 0.0))


def own_protocol(detector: str) -> Protocol:
    """``detector``'s own protocol, as no command line changes it."""
    return PROTOCOLS.get(detector, DEFAULT_PROTOCOL)


def protocol(args, detector: str) -> Protocol:
    """``detector``'s protocol, with what the command line sets (``--iters``, ``--tune-iters``,
    ``--lr-scales``, ``--clips``, ``--extend-edges``) in place of its own for every detector of
    the call."""
    own = own_protocol(detector)
    given = {name: value for name, value in (("iters", args.iters), ("tune_iters", args.tune_iters),
                                             ("lr_scales", args.lr_scales), ("clips", args.clips),
                                             ("extend_edges", args.extend_edges))
             if value is not None}
    return replace(own, **{name: tuple(value) if isinstance(value, list) else value for name, value in given.items()})


def _run_argv(args, detector: str, loss: str, seed: int, iters: int, lr: float, clip: float,
              out: Path) -> list[str]:
    return ["--detector", detector, "--loss", loss, "--seed", str(seed), "--iters", str(iters),
            "--lr", repr(lr), "--clip", repr(clip), "--eval-every", str(max(1, iters // 4)),
            "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
            "--num-train", str(args.num_train), "--num-val", str(args.num_val), "--data", str(args.data),
            "--device", args.device, "--out", str(out)]


def run_once(args, detector: str, loss: str, seed: int, iters: int, lr: float, clip: float, out: Path,
             evaluate: bool = True) -> dict:
    """One training run (reused if its metrics exist); its summary. ``evaluate=False``: a timing
    run, never evaluated."""
    metrics, checkpoint = out / "metrics.json", out / "checkpoint.pt"
    if metrics.exists():
        return json.loads(metrics.read_text())
    if args.no_train:
        raise FileNotFoundError(f"{out}: this run has not finished (--no-train trains nothing)")
    # an interrupted run goes on from its last evaluation (the batch order restarts there)
    resume = ["--checkpoint", str(checkpoint)] if checkpoint.exists() else []
    return train_detector.main([*_run_argv(args, detector, loss, seed, iters, lr, clip, out), *resume,
                                     *([] if evaluate else ["--no-eval"]), *args.extra])


def evaluated_again(out: Path) -> Path:
    """Where ``with_map75`` keeps the evaluation of a run's final checkpoint."""
    return out / "evaluated_again"


def with_map75(args, detector: str, loss: str, seed: int, out: Path, result: dict) -> dict:
    """``result`` with its mAP75. Runs trained before the example reported it get it from their
    final checkpoint, evaluated again once (kept in ``out/evaluated_again``, without the copy of
    the checkpoint); that evaluation must give the run's own mAP, or the checkpoint is not the
    model the run scored."""
    if "mAP75" in result:
        return result
    if result.get("diverged_at") is not None:
        return {**result, "mAP75": 0.0}
    again = evaluated_again(out)
    if not (again / "metrics.json").exists():
        train_detector.main([*_run_argv(args, detector, loss, seed, result["iterations"], result["lr"],
                                             result["clip"] or 0.0, again),
                                  "--checkpoint", str(out / "checkpoint.pt"), *args.extra, "--timing-repeats", "0"])
        (again / "checkpoint.pt").unlink()
    scores = json.loads((again / "metrics.json").read_text())
    if abs(scores["mAP"] - result["mAP"]) > 1e-9:
        raise RuntimeError(f"{out}: its checkpoint evaluated again gives mAP {scores['mAP']}, the run gave "
                           f"{result['mAP']}; not the same model")
    return {**result, "mAP75": scores["mAP75"]}


# The run folders' names hold everything a run depends on, so that a resumed study never reuses a
# run made with other settings; search_table finds the runs by the same names.
def tune_folder(args, detector: str, loss: str, scale, clip, plan: Protocol | None = None) -> Path:
    """A tuning run's folder, under ``plan`` (the call's protocol for ``detector`` by default)."""
    tune_iters = (plan or protocol(args, detector)).tune_iters
    return args.out / detector / loss / f"tune_{tune_iters}it_lr{scale}_clip{clip}"


def seed_folder(args, detector: str, loss: str, seed: int, lr: float, clip) -> Path:
    return args.out / detector / loss / f"seed{seed}_{protocol(args, detector).iters}it_lr{lr:.4g}_clip{clip}"


def _ranking(score: tuple) -> tuple:
    """Order of tuning runs (mAP, scale, clip): the best mAP; on a tie (e.g. runs that all
    diverged, scored 0) the smaller learning rate, then clipping."""
    mAP, scale, clip = score
    return mAP, -scale, clip != 0


def recipe_lr(detector: str, loss: str, batch_size: int) -> float:
    return train_detector.lr_per_16(detector, loss) * batch_size / 16


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if values else float("nan")


def study(args) -> tuple[list[dict], list[dict]]:
    jobs = [(d, loss) for d in args.detectors for loss in args.losses]

    def tuning_runs(detector: str) -> int:  # before any edge extension
        plan = protocol(args, detector)
        return len(plan.lr_scales) + len(plan.clips) - 1

    total = sum((tuning_runs(d) if tuning_runs(d) > 1 else 0) + len(args.seeds) + (args.timing_iters > 0)
                for d, _ in jobs)
    runs, summary = [], []
    with tqdm(total=total, desc="study", unit="run") as bar:
        for detector, loss in jobs:
            plan = protocol(args, detector)
            # the learning rates at the first clipping norm, then the other norms at the best rate
            grid = [(scale, plan.clips[0]) for scale in plan.lr_scales]
            base_lr = recipe_lr(detector, loss, args.batch_size)
            best = (grid[0][0] * base_lr, grid[0][1])
            tuned = {}  # (lr, clip) -> the tuning run's folder and result
            if tuning_runs(detector) > 1:
                scores = []  # (mAP, scale, clip)

                def tune(scale, clip):
                    bar.set_postfix_str(f"tune {detector} {loss} lr x{scale:g} clip {clip}")
                    out = tune_folder(args, detector, loss, scale, clip)
                    result = run_once(args, detector, loss, 0, plan.tune_iters, scale * base_lr, clip, out)
                    runs.append(_row("tune", detector, loss, 0, result))
                    scores.append((result["mAP"], scale, clip))
                    tuned[(scale * base_lr, clip)] = out, result
                    bar.update()

                for scale, clip in grid:
                    tune(scale, clip)
                # a best learning rate on the grid's edge says the optimum may lie beyond it: every
                # loss gets the same number of steps further out, so none is tuned further than another
                for _ in range(plan.extend_edges):
                    _, scale, clip = max(scores, key=_ranking)
                    tried = sorted({s for _, s, c in scores if c == clip})
                    if len(tried) < 2 or tried[0] < scale < tried[-1]:
                        break
                    step = tried[-1] / tried[-2] if scale == tried[-1] else tried[0] / tried[1]
                    bar.total += 1
                    tune(scale * step, clip)
                _, scale, _ = max(scores, key=_ranking)
                for clip in plan.clips[1:]:
                    tune(scale, clip)
                _, scale, clip = max(scores, key=_ranking)
                best = (scale * base_lr, clip)
            results, folders = [], []
            for seed in args.seeds:
                bar.set_postfix_str(f"{detector} {loss} seed {seed}")
                out = seed_folder(args, detector, loss, seed, *best)
                if seed == 0 and plan.tune_iters == plan.iters and best in tuned:
                    # the chosen tuning run is this run: same seed, budget and setting
                    out, result = tuned[best]
                else:
                    result = run_once(args, detector, loss, seed, plan.iters, *best, out)
                result = with_map75(args, detector, loss, seed, out, result)
                runs.append(_row("study", detector, loss, seed, result))
                results.append(result)
                folders.append(out)
                bar.update()
            summary.append(_summary(args, detector, loss, best, results, folders))
    if args.timing_iters > 0:
        # every loss timed in one stretch, after the accuracy runs, so that the step times compare
        # losses under the same load (the accuracy runs may share the machine or be paused)
        for s in summary:
            bar.set_postfix_str(f"time {s['detector']} {s['loss']}")
            out = args.out / s["detector"] / s["loss"] / f"timing_{args.timing_iters}it_lr{s['lr']:.4g}_clip{s['clip']}"
            result = run_once(args, s["detector"], s["loss"], 0, args.timing_iters, s["lr"], s["clip"], out,
                              evaluate=False)
            runs.append(_row("timing", s["detector"], s["loss"], 0, result))
            s.update(_timing(result["seconds_per_iteration"], result["classification_loss_ms_per_iteration"]))
            bar.update()
    return runs, summary


def _row(phase, detector, loss, seed, result) -> dict:
    return {"phase": phase, "detector": detector, "loss": loss, "seed": seed, "iterations": result["iterations"],
            "lr": result["lr"], "clip": result["clip"], "mAP": result["mAP"], "mAP50": result["mAP50"],
            "mAP75": result.get("mAP75"), "seconds_per_iteration": result["seconds_per_iteration"],
            "loss_ms_per_iteration": result["classification_loss_ms_per_iteration"],
            "curve": json.dumps([(e["iteration"], e["mAP"]) for e in result["evaluations"]])}


def _summary(args, detector, loss, best, results, folders) -> dict:
    """One row of summary.csv: means and spreads over the seeds' runs, and the runs' folders
    (relative to --out, ``;``-separated), from which every number of the row follows."""
    maps, map50s, map75s = ([r[key] for r in results] for key in ("mAP", "mAP50", "mAP75"))
    step = statistics.mean(r["seconds_per_iteration"] for r in results)
    loss_ms = [r["classification_loss_ms_per_iteration"] for r in results
               if r["classification_loss_ms_per_iteration"] is not None]
    return {"detector": detector, "loss": loss, "iters": results[0]["iterations"], "seeds": len(results),
            "lr": best[0], "clip": best[1], "map": statistics.mean(maps), "map_spread": spread(maps),
            "map50": statistics.mean(map50s), "map50_spread": spread(map50s), "map75": statistics.mean(map75s),
            "map75_spread": spread(map75s), **_timing(step, statistics.mean(loss_ms) if loss_ms else None),
            "runs": ";".join(folder.relative_to(args.out).as_posix() for folder in folders)}


def _timing(step: float, loss_ms: float | None) -> dict:
    loss_ms = float("nan") if loss_ms is None else loss_ms
    return {"seconds_per_iteration": step, "loss_ms_per_iteration": loss_ms,
            "loss_share": loss_ms / 1e3 / step if step else float("nan")}


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        # every row's columns, in the order they first appear (rows written before a column existed lack it)
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)), restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown(summary: list[dict], args) -> str:
    """summary.csv's rows (as read back, strings) as a markdown table."""
    lines = [f"Batch {args.batch_size}, {args.image_size} px digits; mAP as mean ± half the range over the seeds; "
             "s / iter: the median step of the loss's timing run where the study made one (`--timing-iters`), "
             "else averaged over the seeds' runs.", "",
             "| detector | loss | iterations | seeds | mAP | mAP50 | mAP75 | s / iter | loss ms / iter (share) | LR "
             "| clip |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        number = {key: float(s[key]) for key in ("map", "map_spread", "map50", "map50_spread", "map75", "map75_spread",
                                                 "seconds_per_iteration", "loss_ms_per_iteration", "loss_share", "lr")}
        clip = float(s["clip"] or 0)  # 0 or empty: no clipping
        lines.append(f"| {s['detector']} | {s['loss']} | {s['iters']} | {s['seeds']} | "
                     f"{number['map']:.3f} ± {number['map_spread']:.3f} | "
                     f"{number['map50']:.3f} ± {number['map50_spread']:.3f} | "
                     f"{number['map75']:.3f} ± {number['map75_spread']:.3f} | "
                     f"{number['seconds_per_iteration']:.2f} | "
                     f"{number['loss_ms_per_iteration']:.1f} ({100 * number['loss_share']:.1f} %) | "
                     f"{number['lr']:.4g} | {f'{clip:g}' if clip else 'none'} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detectors = sorted({r["detector"] for r in runs})
    fig, axes = plt.subplots(1, len(detectors), figsize=(6 * len(detectors), 4), squeeze=False)
    for axis, detector in zip(axes[0], detectors):
        for index, loss in enumerate(dict.fromkeys(r["loss"] for r in runs if r["detector"] == detector)):
            seeds = [r for r in runs if r["phase"] == "study" and r["detector"] == detector and r["loss"] == loss]
            for r in seeds:  # one line per seed, the loss named once
                steps, maps = zip(*json.loads(r["curve"]))
                axis.plot(steps, maps, "o-", color=f"C{index}", alpha=0.8, label=loss if r is seeds[0] else None)
        axis.set(title=detector, xlabel="iteration", ylabel="COCO box mAP")
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", type=lambda s: s.split(","), default=DEFAULT_DETECTORS)
    parser.add_argument("--losses", type=lambda s: s.split(","), default=DEFAULT_LOSSES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    # the next five: each detector's own protocol (PROTOCOLS) unless given, then for every detector
    parser.add_argument("--iters", type=int, help="the seeds' budget (Faster R-CNN and FCOS 1000, RT-DETR 2000)")
    parser.add_argument("--tune-iters", type=int, help="the tuning runs' budget (the same as --iters)")
    parser.add_argument("--lr-scales", type=float, nargs="+",
                        help="tuning grid: multiples of the recipe's learning rate (0.5 1 2)")
    parser.add_argument("--clips", type=float, nargs="+",
                        help="tuning grid: gradient clipping norms, 0 is none; the learning rates are searched at "
                             "the first, the others are tried at the best learning rate (Faster R-CNN and FCOS: "
                             "10 0; RT-DETR: 0.1)")
    parser.add_argument("--extend-edges", type=int,
                        help="when the best learning rate is the grid's largest (smallest), try one more "
                             "grid step above (below) it, up to this many times (Faster R-CNN and FCOS: 1; "
                             "RT-DETR: 2)")
    parser.add_argument("--timing-iters", type=int, default=30,
                        help="after the study, a run of this many steps per loss, not evaluated, gives the table's "
                             "step and loss times (the median step); 0: take them from the study's runs")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=150)
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache" / "brl_triton" / "digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/compare_losses"))
    parser.add_argument("--no-train", action="store_true",
                        help="train nothing: write the tables from the finished runs in --out, or fail on a missing one")
    parser.add_argument("--table", type=Path,
                        help="also write the study table into this markdown file, between its study-table markers")
    parser.add_argument("--progress", action="store_true",
                        help="print the finished runs of the study in --out as a table, and train nothing")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="passed on to train_detector.py (after everything else)")
    args = parser.parse_args(argv)
    unknown = set(args.losses) - set(train_detector.RECIPES)
    if unknown:
        parser.error(f"--losses: unknown {sorted(unknown)}; choose from {list(train_detector.RECIPES)}")
    return args


def progress(args) -> str:
    """A markdown table of the runs that have finished so far (a study takes many CPU-hours),
    without training anything. mAP75 is "—" for a run made before the example reported it and
    not yet evaluated again (``with_map75``)."""
    lines = ["| detector | loss | run | LR | clip | mAP | mAP50 | mAP75 | mAP at each evaluation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for detector in args.detectors:
        for loss in args.losses:
            finished = [(path.parent, json.loads(path.read_text()))
                        for path in (args.out / detector / loss).glob("*/metrics.json")]
            for folder, r in sorted(finished, key=lambda item: (item[0].name.split("_")[0], item[1]["lr"],
                                                               item[1]["clip"] or 0)):
                if r["mAP"] is None:  # a timing run
                    continue
                again = evaluated_again(folder) / "metrics.json"
                map75 = r.get("mAP75", json.loads(again.read_text())["mAP75"] if again.exists() else None)
                curve = " / ".join(f"{e['mAP']:.3f}" for e in r["evaluations"])
                lines.append(f"| {detector} | {loss} | {folder.name.split('_')[0]} | {r['lr']:.4g} | "
                             f"{r['clip'] or 'none'} | {r['mAP']:.3f} | {r['mAP50']:.3f} | "
                             f"{'—' if map75 is None else f'{map75:.3f}'} | {curve} |")
    return "\n".join(lines) + "\n"


def _setting(run_folder: str) -> tuple[float, float]:
    """(LR value in the folder's name, clip): ``tune_300it_lr2.0_clip10.0`` -> (2.0, 10.0)."""
    lr, clip = run_folder.split("_lr", 1)[1].split("_clip", 1)
    return float(lr), float(clip)


def seed_of(folder: str) -> int:
    """The seed of a run folder's name; a tuning run (``tune_...``) is seed 0's."""
    name = Path(folder).name
    return 0 if name.startswith("tune_") else int(name.split("_")[0].removeprefix("seed"))


def search_table(args, summary_rows: list[dict] | None = None) -> str:
    """The search at a glance, from the finished runs in --out: per detector and loss (those of
    ``summary_rows``, with each row's own seed runs; every ``--detectors`` with every
    ``--losses`` and ``--seeds`` by default), the tuning runs' mAP at each multiple of the
    recipe's learning rate (at the detector's first clipping norm), then one column per other norm
    (its run at the best learning rate, whose multiple it gives), the best in bold; the other
    seeds' mAP at the best, and the mean ± half the range over all seeds."""
    if summary_rows is None:
        pairs = {(detector, loss): None for detector in args.detectors for loss in args.losses}
    else:
        pairs = {(row["detector"], row["loss"]): row["runs"].split(";") for row in summary_rows}
    rows = []
    for (detector, loss), seed_runs in pairs.items():
        # a row this call did not make keeps its own protocol, not the command line's
        made_now = detector in args.detectors and loss in args.losses
        plan = protocol(args, detector) if made_now else own_protocol(detector)
        # this study's tuning runs: its budget and clipping norms (the learning rates include edge steps)
        pattern = tune_folder(args, detector, loss, "*", "*", plan)
        tuned = {setting: json.loads(path.read_text())["mAP"]
                 for path in pattern.parent.glob(f"{pattern.name}/metrics.json")
                 if (setting := _setting(path.parent.name))[1] in plan.clips}
        if not tuned:
            continue
        best = max(tuned, key=lambda setting: _ranking((tuned[setting], *setting)))
        if seed_runs is None:  # the seeds of the command line, where they have run at the best
            lr = best[0] * recipe_lr(detector, loss, args.batch_size)
            seed_runs = [str(seed_folder(args, detector, loss, seed, lr, best[1]).relative_to(args.out))
                         for seed in args.seeds]
            if plan.tune_iters == plan.iters and 0 in args.seeds:
                seed_runs[args.seeds.index(0)] = str(tune_folder(args, detector, loss, *best).relative_to(args.out))
        seeds = {seed_of(run): json.loads(path.read_text())["mAP"] for run in seed_runs
                 if (path := args.out / run / "metrics.json").exists()}
        rows.append((detector, loss, plan, tuned, best, seeds))
    if not rows:
        return ""
    # one column per multiple of the rate (each detector's at its first norm), one per other norm
    scales = sorted({scale for _, _, plan, tuned, _, _ in rows for scale, clip in tuned if clip == plan.clips[0]})
    other_clips = list(dict.fromkeys(clip for _, _, plan, tuned, _, _ in rows for clip in plan.clips[1:]
                                     if any(c == clip for _, c in tuned)))
    names = ([f"LR × {scale:g}" for scale in scales]
             + [("no clipping" if clip == 0 else f"clip {clip:g}") + " at the best LR" for clip in other_clips])

    def cell(settings, tuned, best, with_scale=False):
        found = [s for s in settings if s in tuned]
        if not found:
            return ""
        text = f"{tuned[found[0]]:.3f}" + (f" (× {found[0][0]:g})" if with_scale else "")
        return f"**{text}**" if found[0] == best else text

    lines = [f"| detector | loss | {' | '.join(names)} | other seeds at the best | mean ± half range |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for detector, loss, plan, tuned, best, seeds in rows:
        cells = ([cell([(scale, plan.clips[0])], tuned, best) for scale in scales]
                 + [cell([s for s in tuned if s[1] == clip and clip in plan.clips[1:]], tuned, best, with_scale=True)
                    for clip in other_clips])
        others = ", ".join(f"{seeds[s]:.3f} (seed {s})" for s in sorted(seeds) if s != 0) or "—"
        values = list(seeds.values())
        mean = f"{statistics.mean(values):.3f} ± {spread(values):.3f} ({len(values)} seeds)" if len(values) > 1 else "—"
        lines.append(f"| {detector} | {loss} | {' | '.join(cells)} | {others} | {mean} |")
    return "\n".join(lines) + "\n"


def merged(written: list[dict], new: list[dict]) -> list[dict]:
    """The rows of a file ``written`` by earlier calls with this call's ``new`` rows in place of
    theirs for every (detector, loss) this call ran, so that a call for one detector or loss keeps
    the others' rows; pairs in the order they first appear."""
    pairs = {(row["detector"], row["loss"]): None for row in [*written, *new]}
    ran = {(row["detector"], row["loss"]) for row in new}
    return [row for pair in pairs for row in (new if pair in ran else written)
            if (row["detector"], row["loss"]) == pair]


def write_merged(new: list[dict], path: Path) -> list[dict]:
    """Merge ``new`` into the CSV at ``path`` (``merged``); the file's rows as read back."""
    written = read_summary(path) if path.exists() else []
    write_csv(merged(written, new), path)
    return read_summary(path)


def main(argv=None):
    args = parse_args(argv)
    if args.progress:
        print(progress(args) + "\n" + search_table(args), end="")
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    runs, summary = study(args)
    # the files hold every detector and loss studied in --out, not only this call's
    all_runs = write_merged(runs, args.out / "runs.csv")
    all_summary = write_merged(summary, args.out / "summary.csv")
    # each row's own seeds: a call for some losses keeps the others' rows, with their seeds
    search = search_table(args, all_summary)
    (args.out / "summary.md").write_text(markdown(all_summary, args)
                                         + (f"\nThe search (tuning runs' mAP):\n\n{search}" if search else ""))
    plot(all_runs, args.out / "map_curves.png")
    if args.table is not None:
        write_table(args.table, study_table(read_summary(args.out / "summary.csv")))
    print((args.out / "summary.md").read_text())
    return summary


TABLE_START = "<!-- study table: generated by examples/compare_losses.py --table, do not edit -->"
TABLE_END = "<!-- end of study table -->"
DETECTOR_NAMES = {"fasterrcnn": "Faster R-CNN", "fcos": "FCOS", "retinanet": "RetinaNet", "maskrcnn": "Mask R-CNN",
                  "rtdetr": "RT-DETR", "dfine": "D-FINE"}


def read_summary(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def own_loss_label(detector: str) -> str:
    """What ``ce`` (the detector's own loss) is for ``detector``."""
    if detector in train_detector.ONE_STAGE:
        return "focal"
    return "vfl" if detector in train_detector.DETRS else "ce"


# the product's claim: a detector trained with BRS is at most this far below its own loss (mAP)
GOAL_MARGIN = 0.01


def goal_lines(rows: list[dict]) -> list[str]:
    """Per detector of summary.csv's rows, whether BRS's mAP (mean over its seeds) reaches the
    detector's own loss's minus ``GOAL_MARGIN``, in words."""
    maps = {(row["detector"], row["loss"]): float(row["map"]) for row in rows}
    lines = []
    for detector in dict.fromkeys(row["detector"] for row in rows):
        name, own = DETECTOR_NAMES.get(detector, detector), own_loss_label(detector)
        goal = f"BRS ≥ {own} − {100 * GOAL_MARGIN:g} AP"
        if (detector, "ce") not in maps or (detector, "brs") not in maps:
            missing = "brs" if (detector, "ce") in maps else own
            lines.append(f"- {name}: the goal {goal} is not measured yet (no {missing} row).")
            continue
        brs, baseline = maps[(detector, "brs")], maps[(detector, "ce")]
        verdict = "met" if brs >= baseline - GOAL_MARGIN else "NOT met"
        lines.append(f"- {name}: the goal {goal} is {verdict}: BRS {brs:.3f}, {own} {baseline:.3f} "
                     f"({100 * (brs - baseline):+.1f} AP).")
    return lines


def study_table(rows: list[dict]) -> str:
    """The study's results as a markdown table, from the rows of summary.csv: each loss at its
    tuned setting, mAP as mean ± half the range over the seeds, and the runs it comes from; then
    whether each detector meets the goal (``goal_lines``)."""
    lines = ["| detector | loss | iterations | seeds | mAP | mAP50 | mAP75 | LR | clip | runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        label = own_loss_label(row["detector"]) if row["loss"] == "ce" else row["loss"]
        clip = float(row["clip"] or 0)  # 0 or empty: no clipping
        lines.append(f"| {DETECTOR_NAMES.get(row['detector'], row['detector'])} | {label} | {row['iters']} | "
                     f"{row['seeds']} | {float(row['map']):.3f} ± {float(row['map_spread']):.3f} | "
                     f"{float(row['map50']):.3f} | {float(row['map75']):.3f} | {float(row['lr']):.4g} | "
                     f"{f'{clip:g}' if clip else 'none'} | {len(row['runs'].split(';'))} |")
    return "\n".join([*lines, "", *goal_lines(rows)]) + "\n"


def write_table(path: Path, table: str) -> None:
    """Replace what stands between the study-table markers of ``path`` with ``table``."""
    text = path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{path} has no study-table markers ({TABLE_START} ... {TABLE_END})")
    before, rest = text.split(TABLE_START, 1)
    after = rest.split(TABLE_END, 1)[1]
    path.write_text(f"{before}{TABLE_START}\n{table}{TABLE_END}{after}")


if __name__ == "__main__":
    main()
