"""GLUE-small: ``peftlab compare`` on the packaged MiniLM-L6 over five GLUE tasks.

Every method (LoRA, (IA)3, Houlsby, Pfeiffer, Compacter, Compacter++), full fine-tuning and
AdapterFusion, on SST-2, MRPC, RTE, CoLA and STS-B from ``../shared/data`` (JSONL, see its
README), at most 2,000 training examples per task, max length 128, seeds 0, 1, 2. CoLA is judged
by Matthews correlation and STS-B by Pearson correlation, as GLUE does; the others by accuracy
(every metric is in ``report.json``). Afterwards ``targets.md`` checks the report against the
issue's targets: every method's average within 1.0 point of full fine-tuning, Fusion above
single-task Pfeiffer on RTE and MRPC, and the everyday run in under 20 minutes; it also prints each
task's constant-prediction score, since a short budget can leave a task unlearned. ``--full-from``
adds a second full fine-tuning baseline (e.g. at another ``--lr``) and ``--targets-only`` rewrites
``targets.md`` from an existing report without training.

    python benchmarks/glue_small.py                         # the full run (hours on 2 cores)
    python benchmarks/glue_small.py --preset everyday       # 3 tasks x 5 methods x 1 seed x 1,000
    python benchmarks/glue_small.py --preset smoke          # 2 tasks x 2 methods x 64 examples
    python benchmarks/glue_small.py --tasks rte,mrpc --methods pfeiffer,fusion --seeds 0,1
    python benchmarks/glue_small.py --task-epochs cola=10 --out DIR  # CoLA learns nothing in 3
    python benchmarks/glue_small.py --methods full --lr full=1e-4 --epochs 1 --out /tmp/full
    python benchmarks/glue_small.py --epochs 1 --out DIR --targets-only --full-from /tmp/full

Writes ``report.md``, ``report.json``, the plots, ``runs/`` and ``targets.md`` to ``--out``
(default ``benchmarks/results/glue_small[_<preset>]``; it must be new or empty, unless
``--resume`` continues the comparison there: the full run takes several sessions of
``--time-budget 150 --resume``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
TASKS = ("sst2", "mrpc", "rte", "cola", "stsb")
METRICS = {"cola": "matthews"}  # GLUE's metric; the others keep accuracy (STS-B: Pearson)
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"tasks": TASKS, "methods": "lora,ia3,houlsby,pfeiffer,compacter,compacter++,fusion,full",
             "seeds": "0,1,2", "max_train_samples": 2000, "epochs": 3.0},
    # The speed target: 3 tasks x 5 methods x 1 seed at <= 1,000 examples, < 20 min.
    "everyday": {"tasks": ("sst2", "mrpc", "rte"), "methods": "lora,ia3,pfeiffer,compacter++,full",
                 "seeds": "0", "max_train_samples": 1000, "epochs": 1.0},
    "smoke": {"tasks": ("sst2", "rte"), "methods": "lora,ia3", "seeds": "0", "max_train_samples": 64,
              "epochs": 1.0, "max_eval_samples": 64},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--tasks", help="comma list (default: the preset's)")
    ap.add_argument("--methods", help="comma list (default: the preset's)")
    ap.add_argument("--seeds", help="comma list (default: the preset's)")
    ap.add_argument("--max-train-samples", type=int)
    ap.add_argument("--max-eval-samples", type=int)
    ap.add_argument("--epochs", type=float)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--task-epochs", action="append", default=[],
                    help="task=epochs, a task's own budget for every method (e.g. cola=10); repeatable")
    ap.add_argument("--fusion-lr", type=float, default=5e-5)
    ap.add_argument("--lr", action="append", default=[],
                    help="method=rate (default: the method's); repeatable")
    ap.add_argument("--time-budget", type=float, help="minutes (per invocation; see --resume)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the comparison in --out: finished runs are kept (same arguments)")
    ap.add_argument("--no-lr-search", dest="lr_search", action="store_false",
                    help="train at the default rates (default: each rate chosen on held-out training data)")
    ap.add_argument("--patience", type=int, default=3,
                    help="early stopping on held-out training data, in evaluations; 0: off")
    ap.add_argument("--max-steps", type=int, help="equal budget in steps (instead of epochs)")
    ap.add_argument("--max-minutes", type=float, help="equal budget in training minutes per run")
    ap.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                    help="plain random batches (default: batches of similar length)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--targets-only", action="store_true",
                    help="no training: rewrite targets.md from the report already in --out")
    ap.add_argument("--full-from", type=Path, metavar="DIR",
                    help="another run's report dir (e.g. full fine-tuning at another --lr): its full "
                         "fine-tuning scores are a second baseline in targets.md")
    args = ap.parse_args()
    preset = PRESETS[args.preset]

    import torch

    from peftlab.cli import demo_model_dir
    from peftlab.compare import CompareOptions, load_report, parse_lrs, parse_task_epochs, run_compare
    from peftlab.errors import PeftlabError

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",") if args.tasks else list(preset["tasks"])
    missing = [t for t in tasks if not (args.data_dir / t).is_dir()]
    if missing:
        print(f"error: no task folders {missing} in {args.data_dir}; pass --data-dir", file=sys.stderr)
        return 2
    name = "glue_small" if args.preset == "full" else f"glue_small_{args.preset}"
    out = args.out or HERE / "results" / name
    command = shlex.join(["python", "benchmarks/glue_small.py", *sys.argv[1:]])
    other = load_report(args.full_from) if args.full_from else None
    if args.targets_only:
        report = load_report(out)
        (out / "targets.md").write_text(targets(report, command, report["wall_seconds"], args.preset, other))
        print(f"targets: {out / 'targets.md'}")
        return 0
    try:
        lrs, task_epochs = parse_lrs(args.lr), parse_task_epochs(args.task_epochs)
    except PeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts = CompareOptions(
        model=str(demo_model_dir()), data=tuple(str(args.data_dir / t) for t in tasks), out=out,
        methods=tuple((args.methods or preset["methods"]).split(",")),
        epochs=args.epochs or preset["epochs"], task_epochs=task_epochs, batch_size=args.batch_size,
        max_length=args.max_length,
        seeds=tuple(int(s) for s in (args.seeds or preset["seeds"]).split(",")),
        max_train_samples=args.max_train_samples or preset["max_train_samples"],
        max_eval_samples=args.max_eval_samples or preset.get("max_eval_samples"),
        time_budget=args.time_budget, metrics={t: m for t, m in METRICS.items() if t in tasks},
        fusion_lr=args.fusion_lr, lrs=lrs, group_by_length=args.group_by_length,
        lr_search=args.lr_search, patience=args.patience or None, max_steps=args.max_steps,
        max_minutes=args.max_minutes, resume=args.resume)
    started = time.perf_counter()
    try:
        report = run_compare(opts)
    except PeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    (out / "targets.md").write_text(targets(report, command, seconds, args.preset, other))
    print(f"wall time {seconds / 60:.1f} min; targets: {out / 'targets.md'}")
    return 0


def trivial_scores(report: dict[str, Any]) -> dict[str, float]:
    """Each task's score of a constant prediction on its validation split (the majority class's
    share for accuracy, 0 for correlations): the report's own, else computed from the labels."""
    from peftlab.data import load_task
    from peftlab.metrics import constant_score

    out = dict(report.get("summary", {}).get("constant", {}))
    for task, info in report["tasks"].items():
        if task not in out and info["task"] == "classification":
            data = load_task(info["data"], splits=("validation",),
                             max_samples={"validation": report["settings"]["max_eval_samples"]})
            labels = np.array([r["label"] for r in data["validation"].rows])
            out[task] = constant_score("classification", info["metric"], labels, max(2, info["num_labels"]))
        elif task not in out:
            out[task] = 0.0
    return out


def targets(report: dict[str, Any], command: str, seconds: float, preset: str,
            other: dict[str, Any] | None = None, title: str = "GLUE-small targets") -> str:
    """The issue's targets against this report, with the numbers; ``other``: a second report whose
    full fine-tuning is another baseline (same tasks)."""
    scores = report["summary"]["scores"]
    trivial = trivial_scores(report)
    lines = [f"# {title}", "", "```", command, "```", "",
             f"Wall time: {seconds / 60:.1f} min ({report['machine'].get('torch_threads')} torch threads, "
             f"{report['machine'].get('cpu_count')} CPUs). Equivalent: `{report['command']}`.", ""]
    lines.append("A constant prediction scores " + ", ".join(f"{t} {100 * v:.1f}" for t, v in trivial.items())
                 + " (majority class for accuracy; 0 for correlations); scores near these mean "
                 + "the budget was too small for the task.")
    lines.append("")
    baselines = [(report, "in this run")]
    if other is not None:
        baselines.append((other, f"from `{other['command']}`"))
    for source, where in baselines:
        full = source["summary"]["scores"].get("full", {}).get("average")
        if full is None or list(source["tasks"]) != list(report["tasks"]):
            lines.append(f"Average vs full fine-tuning {where}: not measured (missing, incomplete or "
                         "other tasks).")
            continue
        lr = source["settings"].get("learning_rates", {}).get("full")
        lines.append(f"Full fine-tuning {where} (lr {format(lr, 'g') if isinstance(lr, float) else lr}): "
                     f"average {100 * full:.1f}.")
        for method, s in scores.items():
            if method == "full" or s.get("average") is None:
                continue
            gap = 100 * (s["average"] - full)
            lines.append(f"- {method}: average {100 * s['average']:.1f} ({gap:+.1f}): "
                         + ("within 1.0 point: met" if gap >= -1.0 else "more than 1.0 below: MISSED"))
        lines.append("")
    for task, paper in (("rte", "71.0 -> 76.8"), ("mrpc", "85.2 -> 90.3")):
        pf = scores.get("pfeiffer", {}).get("tasks", {}).get(task)
        fu = scores.get("fusion", {}).get("tasks", {}).get(task)
        if pf and fu:
            gain = 100 * (fu["mean"] - pf["mean"])
            floor = trivial.get(task)
            weak = floor is not None and max(pf["mean"], fu["mean"]) <= floor + 0.02
            lines.append(f"- Fusion vs single-task Pfeiffer on {task}: {100 * pf['mean']:.1f} -> "
                         f"{100 * fu['mean']:.1f} ({gain:+.1f}; paper, BERT-base: {paper}): "
                         + ("met" if gain > 0 else "MISSED")
                         + (f" — but both are within 2 points of the trivial predictor ({100 * floor:.1f}): "
                            "no evidence either way" if weak else "")
                         + _significance(report["summary"].get("fusion_gain_ci95", {}).get(task)))
        else:
            lines.append(f"- Fusion vs single-task Pfeiffer on {task}: not measured")
    lines += _above_constant_lines(report["summary"].get("above_constant", {}))
    if preset == "everyday":
        lines.append(f"- Everyday run under 20 minutes: {seconds / 60:.1f} min: "
                     + ("met" if seconds < 20 * 60 else "MISSED"))
    if report.get("skipped"):
        lines.append(f"\n{len(report['skipped'])} run(s) skipped; see report.md.")
    return "\n".join(lines) + "\n"


def _above_constant_lines(above: dict[str, dict[str, bool]]) -> list[str]:
    """The target "every method clearly above the constant prediction on every task where full
    fine-tuning is" (clearly: the whole 95% interval above it), task by task."""
    lines = []
    for task, methods in above.items():
        if "full" not in methods:
            continue
        below = [m for m, up in methods.items() if not up]
        if not methods["full"]:
            up = [m for m, clear in methods.items() if clear]
            lines.append(f"- Above the constant prediction on {task}: full fine-tuning is not clearly "
                         f"above it, so no target here (clearly above: {', '.join(up) or 'none'})")
        else:
            lines.append(f"- Above the constant prediction on {task}, where full fine-tuning is: "
                         + (f"MISSED by {', '.join(below)}" if below else "every method: met"))
    return lines


def _significance(paired: dict[str, Any] | None) -> str:
    """``; paired 95% interval [-1.2, +2.5] points: not significant`` (empty when not measured)."""
    if not paired or any(v != v for v in paired["ci95"]):
        return ""
    low, high = (100 * v for v in paired["ci95"])
    return (f"; paired 95% interval of the gain [{low:+.1f}, {high:+.1f}] points over {paired['seeds']} "
            f"seed(s): {'significant' if paired['significant'] else 'not significant'}")


if __name__ == "__main__":
    raise SystemExit(main())

