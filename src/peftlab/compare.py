"""``peftlab compare``: every method on the user's model and tasks, measured in one run.

For each method the run records its costs (:mod:`peftlab.measure`: parameters, file size,
training memory, train-step time, inference latency unmerged and merged) and, for each task and
seed, its validation score after training with exactly what ``peftlab train`` does
(:func:`peftlab.train.run_training`: same presets, learning rates, schedule and head).

Fusion follows the AdapterFusion paper's two stages (Pfeiffer et al. 2021, arXiv 2005.00247):
stage 1 is the single-task Pfeiffer adapter of every task (the ``pfeiffer`` runs, trained even if
``pfeiffer`` is not asked for); stage 2, for each target task, loads all tasks' stage-1 adapters
(the target's own and the others') into a fresh model, starts the head from the target's
stage-1 head, and trains only the fusion and the head on the target task with
:func:`peftlab.loop.fit` (the loop of :mod:`peftlab.multitask` too; the recipe of the other
runs: AdamW, 6% warm-up then linear decay, clipping at 1.0) and the paper's learning rate 5e-5,
the loss including the fusion's ``V ≈ I`` penalty. The multi-task
column is the fusion's score minus the stage-1 adapter's on the same task and seed.

Runs go seed by seed (every task and method of seed 0 before seed 1), so a run cut short by
``time_budget`` or by a crash still holds whole seeds; ``report.json`` and ``report.md`` are
rewritten after every run (the plots at the end). A run starts only if the time spent so far plus the expected
duration of that run (the mean of the same method's earlier runs, else of all runs) fits in the
budget; skipped runs are listed in the report, and so is a run whose training diverged (NaN or
infinite loss), which does not stop the others.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import shlex
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from peftlab.data import TaskData, load_task
from peftlab.errors import NonFiniteLossError, UsageError
from peftlab.measure import FULL, FUSION, FUSION_MEMBER_METHOD, Measurement, data_batch, peak_rss_bytes
from peftlab.metrics import TAGS, bootstrap_ci, constant_score, entity_tags, ranks_with_ties, same_labels
from peftlab.tasks import task_for
from peftlab.train import default_lr, method_names, resolve_max_length


def all_methods() -> tuple[str, ...]:
    """What ``compare`` runs by default: every registered preset, AdapterFusion, full fine-tuning."""
    names = method_names()
    return (*names[:-1], FUSION, names[-1])


#: AdapterFusion's learning rate for stage 2 (the paper's setting).
FUSION_LR = 5e-5
#: Metrics a run can be judged by (higher is better).
METRICS = {"classification": ("accuracy", "f1", "matthews"), "regression": ("pearson", "spearman"),
           TAGS: ("f1", "precision", "recall", "accuracy")}
REPORT_JSON = "report.json"


@dataclasses.dataclass
class CompareOptions:
    """Everything ``peftlab compare`` takes. ``data``: task folders (each as for ``peftlab train``;
    the task is named after its folder); ``metrics``: task -> metric to rank by (default:
    accuracy for classification, Pearson for regression); ``time_budget`` in minutes."""

    model: str
    data: tuple[str, ...]
    out: Path
    methods: tuple[str, ...] = dataclasses.field(default_factory=all_methods)
    epochs: float = 3.0
    task_epochs: Mapping[str, float] = dataclasses.field(default_factory=dict)  # task -> its own epochs
    batch_size: int = 16
    max_length: int | None = None  # default: 128, or the model's limit (as peftlab train)
    seeds: tuple[int, ...] = (0,)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    time_budget: float | None = None
    metrics: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fusion_lr: float = FUSION_LR
    lrs: Mapping[str, float] = dataclasses.field(default_factory=dict)
    lr_search: bool = True  # choose each method's rate per task and seed (peftlab.lr_search)
    max_steps: int | None = None  # equal steps for every method (instead of epochs)
    max_minutes: float | None = None  # equal training wall time for every run
    patience: int | None = 3  # early stopping on held-out training data; None: train every step
    pooling: str = "auto"  # the classification head's reading of the backbone (peftlab.heads)
    group_by_length: bool = True
    measure_steps: int = 5
    quiet: bool = False
    resume: bool = False  # continue the run in ``out``: finished (method, task, seed) cells are kept

    def task_names(self) -> list[str]:
        return [Path(d).expanduser().resolve().name for d in self.data]

    def epochs_for(self, task: str) -> float:
        """The passes over ``task``'s training data: the same for every method, so that the
        comparison stays fair, but a task that learns slowly (CoLA) may get more."""
        return self.task_epochs.get(task, self.epochs)

    def command(self) -> str:
        """The ``peftlab compare`` command line that repeats this run."""
        args = ["peftlab", "compare", "--model", self.model, "--data", ",".join(self.data),
                "--methods", ",".join(self.methods), "--out", str(self.out), "--epochs", f"{self.epochs:g}",
                "--batch-size", str(self.batch_size)]
        args += ["--max-length", str(self.max_length)] if self.max_length is not None else []
        args += ["--seeds", ",".join(map(str, self.seeds))]
        for flag, value in (("--max-train-samples", self.max_train_samples),
                            ("--max-eval-samples", self.max_eval_samples),
                            ("--time-budget", self.time_budget)):
            if value is not None:
                args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        for task, metric in self.metrics.items():
            args += ["--metric", f"{task}={metric}"]
        for task, epochs in self.task_epochs.items():
            args += ["--task-epochs", f"{task}={epochs:g}"]
        for method, lr in self.lrs.items():
            args += ["--lr", f"{method}={lr:g}"]
        if self.fusion_lr != FUSION_LR:
            args += ["--fusion-lr", f"{self.fusion_lr:g}"]
        if not self.group_by_length:
            args += ["--no-group-by-length"]
        if not self.lr_search:
            args += ["--no-lr-search"]
        if self.patience != 3:
            args += ["--patience", str(self.patience or 0)]
        if self.pooling != "auto":
            args += ["--pooling", self.pooling]
        for flag, budget in (("--max-steps", self.max_steps), ("--max-minutes", self.max_minutes)):
            if budget is not None:
                args += [flag, f"{budget:g}"]
        return shlex.join(args)

    def check(self) -> None:
        from peftlab.errors import AdapterNameError
        from peftlab.names import check_name
        if not self.data:
            raise UsageError("--data: give at least one task folder")
        names = self.task_names()
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UsageError(f"--data: tasks are named after their folders, and {twice} appear twice; "
                             "give each task its own folder name")
        for n in names:
            try:
                check_name(n)
            except AdapterNameError:
                raise UsageError(f"--data: task folder name {n!r} cannot name an adapter; rename the "
                                 "folder (letters, digits, '_', '+', '-')") from None
        known = all_methods()
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise UsageError(f"--methods: unknown {unknown}; choose from {', '.join(known)}")
        if len(set(self.methods)) != len(self.methods):
            raise UsageError(f"--methods names a method twice: {list(self.methods)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"--seeds: give distinct seeds, got {list(self.seeds)}")
        for flag, v in (("--epochs", self.epochs), ("--fusion-lr", self.fusion_lr)):
            if not (math.isfinite(v) and v > 0):
                raise UsageError(f"{flag} must be positive, got {v}")
        for flag, n in (("--batch-size", self.batch_size), ("--max-train-samples", self.max_train_samples),
                        ("--max-eval-samples", self.max_eval_samples), ("measure_steps", self.measure_steps)):
            if n is not None and n < 1:
                raise UsageError(f"{flag} must be positive, got {n}")
        if self.max_length is not None and self.max_length < 2:
            raise UsageError(f"--max-length must be at least 2, got {self.max_length}")
        for flag, budget in (("--max-steps", self.max_steps), ("--max-minutes", self.max_minutes),
                             ("--patience", self.patience)):
            if budget is not None and not (math.isfinite(budget) and budget > 0):
                raise UsageError(f"{flag} must be positive, got {budget}")
        if self.time_budget is not None and not (math.isfinite(self.time_budget) and self.time_budget > 0):
            raise UsageError(f"--time-budget is in minutes and must be positive, got {self.time_budget}")
        for method, lr in self.lrs.items():
            if method == FUSION:
                raise UsageError("--lr fusion=...: set the fusion's learning rate with --fusion-lr")
            if method not in self.methods:
                raise UsageError(f"--lr names {method!r}, which is not in --methods {list(self.methods)}")
            if not (math.isfinite(lr) and lr > 0):
                raise UsageError(f"--lr {method}={lr}: the learning rate must be positive")
        for flag, given in (("--metric", self.metrics), ("--task-epochs", self.task_epochs)):
            bad = sorted(set(given) - set(names))
            if bad:
                raise UsageError(f"{flag} names tasks {bad} that are not in --data ({names})")
        for task, epochs in self.task_epochs.items():
            if not (math.isfinite(epochs) and epochs > 0):
                raise UsageError(f"--task-epochs {task}={epochs:g}: the epochs must be positive")


def parse_metrics(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["cola=matthews", ...]`` as a dict."""
    return _pairs(items, "--metric", "task=metric, e.g. cola=matthews")


def parse_lrs(items: list[str] | tuple[str, ...]) -> dict[str, float]:
    """``["full=5e-5", ...]`` as a dict of learning rates per method."""
    return _numbers(items, "--lr", "method=rate", "5e-5")


def parse_task_epochs(items: list[str] | tuple[str, ...]) -> dict[str, float]:
    """``["cola=10", ...]`` as a dict of epochs per task."""
    return _numbers(items, "--task-epochs", "task=epochs", "10")


def _numbers(items: list[str] | tuple[str, ...], flag: str, form: str, example: str) -> dict[str, float]:
    out = {}
    for key, text in _pairs(items, flag, f"{form}, e.g. {form.split('=')[0]}={example}").items():
        try:
            out[key] = float(text)
        except ValueError:
            raise UsageError(f"{flag} {key}={text}: {form.split('=')[1]} must be a number, e.g. "
                             f"{key}={example}") from None
    return out


def _pairs(items: list[str] | tuple[str, ...], flag: str, form: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise UsageError(f"{flag} {item!r}: write it as {form}")
        out[key.strip()] = value.strip()
    return out


# ---- the run ----------------------------------------------------------------------------------
class _Budget:
    """Seconds spent, and whether a run of a given method is expected to fit in the budget."""

    def __init__(self, minutes: float | None) -> None:
        self.start = time.perf_counter()
        self.limit = None if minutes is None else minutes * 60.0
        self.durations: dict[str, list[float]] = {}

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, method: str) -> bool:
        if self.limit is None:
            return True
        same = self.durations.get(method)
        every = [d for ds in self.durations.values() for d in ds]
        expected = statistics.mean(same) if same else (statistics.mean(every) if every else 0.0)
        return self.elapsed + expected <= self.limit

    def record(self, method: str, seconds: float) -> None:
        self.durations.setdefault(method, []).append(seconds)


def _load_tasks(opts: CompareOptions) -> dict[str, dict[str, Any]]:
    tasks: dict[str, dict[str, Any]] = {}
    for name, folder in zip(opts.task_names(), opts.data):
        data = load_task(folder, max_samples={"train": opts.max_train_samples,
                                              "validation": opts.max_eval_samples})
        if data.task not in METRICS:
            raise UsageError(f"--data {folder}: compare needs classification, regression or token-"
                             f"classification labels, not {data.task} data")
        metric = opts.metrics.get(name, task_for(data.task).primary)
        judged_by = METRICS[data.task]
        if data.task == TAGS and not entity_tags(data.labels or ()):
            judged_by = ("f1", "accuracy")  # tags that mark no entities are judged word by word
        if metric not in judged_by:
            raise UsageError(f"--metric {name}={metric}: this {data.task} task is judged by one of "
                             f"{', '.join(judged_by)}")
        tasks[name] = {"folder": str(Path(folder).expanduser().resolve()), "data": data, "metric": metric}
    return tasks


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not empty; choose a new or empty directory, "
                         "or pass --resume to continue the comparison in it")


def _previous_report(opts: CompareOptions, out: Path) -> dict[str, Any] | None:
    """With ``--resume``, the report of the interrupted run in ``out`` (checked to be the same
    comparison); ``None`` for a new run, whose ``out`` must be new or empty."""
    if not (opts.resume and (out / REPORT_JSON).is_file()):
        _check_out(out)
        return None
    try:
        report = load_report(out)
    except ValueError as e:
        raise UsageError(f"--resume: {out / REPORT_JSON} is not readable JSON ({e}); start a new "
                         "comparison in another --out") from None
    if _identity(report.get("command", "")) != _identity(opts.command()):
        raise UsageError(f"--resume: {out} holds another comparison; its command was\n  "
                         f"{report.get('command')}\nrun that with --resume (any --time-budget), or "
                         "choose another --out")
    # Cells skipped for time or for missing stage-1 adapters get another chance; diverged ones
    # would diverge again (same seed, same data) and stay skipped.
    report["skipped"] = [k for k in report["skipped"] if str(k["reason"]).startswith("diverged")]
    return report


def _identity(command: str) -> list[str]:
    """What makes two compare commands the same comparison: all but the time budget, which each
    resumed run may set anew."""
    args = shlex.split(command)
    if "--time-budget" in args:
        i = args.index("--time-budget")
        del args[i:i + 2]
    return args


Cell = tuple[int, str, str]  # (seed, task, method)


def _pending(plan: list[Cell], report: dict[str, Any], out: Path) -> list[Cell]:
    """The cells of ``plan`` still to run. A cell's folder left by a run that was killed before
    it finished is removed, so that the cell runs again from scratch."""
    done = {(r["seed"], r["task"], r["method"]) for r in report["runs"]}
    done |= {(k["seed"], k["task"], k["method"]) for k in report["skipped"]}
    pending = [cell for cell in plan if cell not in done]
    for seed, task, method in pending:
        shutil.rmtree(_run_dir(out, seed, task, method), ignore_errors=True)
    return pending


def _new_report(opts: CompareOptions, tasks: dict[str, dict[str, Any]], stage1: list[str]) -> dict[str, Any]:
    names = list(tasks)
    return {
        "peftlab_compare": 1, "command": opts.command(), "model": opts.model,
        "tasks": {n: {"data": t["folder"], "task": t["data"].task, "num_labels": t["data"].num_labels,
                      "labels": None if t["data"].labels is None else list(t["data"].labels),
                      "metric": t["metric"], "train_examples": len(t["data"]["train"]),
                      "eval_examples": len(t["data"]["validation"])} for n, t in tasks.items()},
        "methods": list(opts.methods), "settings": {
            "epochs": opts.epochs, "task_epochs": dict(opts.task_epochs), "batch_size": opts.batch_size,
            "max_length": opts.max_length,
            "seeds": list(opts.seeds), "max_train_samples": opts.max_train_samples,
            "max_eval_samples": opts.max_eval_samples, "time_budget_minutes": opts.time_budget,
            "fusion_lr": opts.fusion_lr, "fusion_members": FUSION_MEMBER_METHOD,
            "group_by_length": opts.group_by_length, "patience": opts.patience, "pooling": opts.pooling,
            "max_steps": opts.max_steps, "max_minutes": opts.max_minutes,
            "learning_rates": {m: opts.lrs.get(m, "auto" if opts.lr_search else default_lr(m))
                               for m in stage1},
            "measured_on": names[0]},
        "machine": machine_info(), "versions": versions(), "measurements": {}, "runs": [],
        "fusion": {}, "skipped": [], "wall_seconds": 0.0,
    }


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    import os

    info: dict[str, Any] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return info


def versions() -> dict[str, str]:
    import numpy
    import transformers

    import peftlab

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__,
            "peftlab": peftlab.__version__}


def run_compare(opts: CompareOptions, console: Console | None = None,
                on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the comparison; writes ``report.json``, ``report.md`` and the plots to ``opts.out``
    (after every run) and returns the report. Bad input raises :class:`UsageError` before
    anything is written.

    The report holds ``command`` (the CLI line that repeats the run), ``tasks``, ``settings``,
    ``machine``, ``versions``, ``measurements`` (method -> :class:`Measurement` fields),
    ``runs`` (one per task, method and seed: score, all metrics, timing, run directory),
    ``fusion`` (target -> seed -> attention per module and member), ``skipped``, ``summary``
    (:func:`summarize`), ``wall_seconds`` and ``peak_rss_bytes``."""
    from peftlab import report as reporting

    console = console or Console(stderr=True)
    opts.check()
    out = Path(opts.out)
    previous = _previous_report(opts, out)
    tasks = _load_tasks(opts)
    names = list(tasks)
    fusion = FUSION in opts.methods and len(names) >= 2
    singles = [m for m in opts.methods if m != FUSION]
    stage1 = singles + ([FUSION_MEMBER_METHOD] if fusion and FUSION_MEMBER_METHOD not in singles else [])
    base, tokenizer, heads = _load_base(opts, tasks[names[0]]["data"])

    out.mkdir(parents=True, exist_ok=True)
    report = previous if previous is not None else _new_report(opts, tasks, stage1)
    # The command repeats what was asked; the runs use the length that follows from it.
    opts = dataclasses.replace(opts, max_length=resolve_max_length(opts.max_length, base))
    report["settings"]["max_length"] = opts.max_length
    if FUSION in opts.methods and not fusion:
        report["skipped"].append({"method": FUSION, "task": None, "seed": None, "reason": (
            "fusion needs at least 2 tasks to fuse (give several --data folders)")})
    plan = _pending(_plan(opts.seeds, names, stage1, fusion), report, out)
    measured = [m for m in opts.methods if (m != FUSION or fusion) and m not in report["measurements"]]
    comparison = _Comparison(opts, tasks, out, console, report, on_update)
    with comparison.progress:
        comparison.job = comparison.progress.add_task("measuring", total=len(measured) + len(plan))
        if measured:
            comparison.measure(base, tokenizer, heads, measured)
        del base
        comparison.save()
        for cell in plan:
            comparison.run_cell(*cell)
    comparison.save(plots=True)
    if not opts.quiet:
        Console().print(reporting.terminal_table(report))
        console.print(f"report: {out / 'report.md'} ({comparison.budget.elapsed / 60:.1f} min)")
    return report


def _load_base(opts: CompareOptions, first: TaskData) -> tuple[nn.Module, Any, list[str]]:
    """The model, tokenizer and head names that the measurements use (with the first task's
    head), checked against ``--max-length`` before anything is written."""
    from peftlab.train import load_model

    base, tokenizer, heads = load_model(opts.model, first.task, first.num_labels, opts.pooling)
    resolve_max_length(opts.max_length, base)
    return base, tokenizer, heads


def _plan(seeds: Sequence[int], names: list[str], stage1: list[str], fusion: bool) -> list[Cell]:
    """Every cell in the order they run: per seed, each task's single methods, then the fusions
    (which need every task's stage-1 adapter of that seed)."""
    plan: list[Cell] = []
    for seed in seeds:
        plan += [(seed, t, m) for t in names for m in stage1]
        plan += [(seed, t, FUSION) for t in names] if fusion else []
    return plan


class _Comparison:
    """A comparison under way: the report it fills (saved after every step), its time budget and
    its progress bar."""

    def __init__(self, opts: CompareOptions, tasks: dict[str, dict[str, Any]], out: Path, console: Console,
                 report: dict[str, Any], on_update: Callable[[dict[str, Any]], None] | None) -> None:
        self.opts, self.tasks, self.out, self.console = opts, tasks, out, console
        self.report, self.on_update = report, on_update
        self.budget = _Budget(opts.time_budget)
        self.earlier_seconds = report["wall_seconds"]  # of the runs this one resumes
        self.progress = _progress(console, opts.quiet)
        self.job: Any = None
        self.warned: set[str] = set()  # tasks whose truncation was reported

    def save(self, plots: bool = False) -> None:
        from peftlab import report as reporting

        self.report["wall_seconds"] = self.earlier_seconds + self.budget.elapsed
        self.report["peak_rss_bytes"] = peak_rss_bytes()
        self.report["summary"] = summarize(self.report)
        reporting.write_report(self.out, self.report, plots=plots)
        if self.on_update is not None:
            self.on_update(self.report)

    def say(self, message: str) -> None:
        if not self.opts.quiet:
            self.progress.console.print(message)

    def measure(self, base: nn.Module, tokenizer: Any, heads: list[str], methods: list[str]) -> None:
        """Step time, memory and sizes of ``methods`` on a batch of the first task."""
        from peftlab.measure import measure_methods

        def done(m: Measurement) -> None:
            self.report["measurements"][m.method] = m.to_dict()
            self.say(f"measured {m.method}: {m.trainable_parameters:,} params, step "
                     f"{m.step_seconds * 1e3:.0f} ms, train memory {m.train_memory_bytes / 2**20:.0f} MiB")
            self.progress.advance(self.job)

        first = next(iter(self.tasks.values()))["data"]
        batch = data_batch(first["train"], first.task, tokenizer, self.opts.batch_size, self.opts.max_length)
        measure_methods(base, methods, batch, heads, members=len(self.tasks), steps=self.opts.measure_steps,
                        on_done=done)

    def run_cell(self, seed: int, task: str, method: str) -> None:
        """Train and evaluate one cell and add it to the report, or record why it was skipped."""
        self.progress.update(self.job, description=f"seed {seed} · {task} · {method}")
        reason = self._cannot_run(seed, method)
        if reason is not None:
            self.report["skipped"].append({"method": method, "task": task, "seed": seed, "reason": reason})
            self.progress.advance(self.job)
            return
        started = time.perf_counter()
        try:
            if method == FUSION:
                run = _fusion_run(self.opts, self.tasks, task, seed, self.out, self.console)
            else:
                run = _single_run(self.opts, self.tasks, task, method, seed, self.out, self.console)
        except NonFiniteLossError as e:  # one diverged run should not end a long comparison
            self.report["skipped"].append({"method": method, "task": task, "seed": seed,
                                           "reason": f"diverged: {e}"})
            self.say(f"[red]seed {seed} · {task} · {method} diverged[/]: {e}")
        else:
            self._add(run, seed, task, method, time.perf_counter() - started)
        self.progress.advance(self.job)
        self.save()

    def _cannot_run(self, seed: int, method: str) -> str | None:
        if not self.budget.fits(method):
            return f"time budget of {self.opts.time_budget:g} min reached"
        if method == FUSION:
            runs = self.report["runs"]
            done = {(r["task"], r["seed"]) for r in runs if r["method"] == FUSION_MEMBER_METHOD}
            lacking = [t for t in self.tasks if (t, seed) not in done]
            if lacking:
                return f"stage-1 {FUSION_MEMBER_METHOD} adapters missing for {lacking}"
        return None

    def _add(self, run: dict[str, Any], seed: int, task: str, method: str, seconds: float) -> None:
        if method == FUSION:
            self.report["fusion"].setdefault(task, {})[str(seed)] = run.pop("fusion_weights")
        elif run.get("truncated", 0) and task not in self.warned:
            self.warned.add(task)
            self.say(f"[yellow]warning:[/] {run['truncated']} {task} training examples are longer than "
                     f"--max-length {self.opts.max_length} and were truncated")
        self.budget.record(method, seconds)
        run["wall_seconds"] = seconds
        self.report["runs"].append(run)
        self.say(f"seed {seed} · {task} · {method}: {self.tasks[task]['metric']} {_pct(run['score'])} "
                 f"({seconds:.0f} s)")


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def _progress(console: Console, quiet: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]compare[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=quiet)


def _run_dir(out: Path, seed: int, task: str, method: str) -> Path:
    return out / "runs" / f"seed{seed}" / task / method


def _single_run(opts: CompareOptions, tasks: dict[str, dict[str, Any]], task: str, method: str,
                seed: int, out: Path, console: Console) -> dict[str, Any]:
    from peftlab.lr_search import search_lr
    from peftlab.train import CHECKPOINTS, MODEL_DIR, TrainOptions, run_training

    t = tasks[task]
    folder = _run_dir(out, seed, task, method)
    train_opts = TrainOptions(
        model=opts.model, data=t["folder"], method=method, out=folder, epochs=opts.epochs_for(task),
        batch_size=opts.batch_size, max_length=opts.max_length, seed=seed,
        max_train_samples=opts.max_train_samples, max_eval_samples=opts.max_eval_samples,
        lr=opts.lrs.get(method), group_by_length=opts.group_by_length, name=method, checkpoints=False,
        max_steps=opts.max_steps, max_minutes=opts.max_minutes, patience=opts.patience,
        select_metric=t["metric"], pooling=opts.pooling, quiet=True)
    search = None
    if opts.lr_search and method not in opts.lrs:
        search = search_lr(train_opts, t["data"], default_lr(method), metric=t["metric"])
        train_opts = dataclasses.replace(train_opts, lr=search.lr)
    result = run_training(train_opts, console, data=t["data"])
    # Full model copies and early stopping's checkpoints fill disks fast; the scores are the point.
    shutil.rmtree(folder / CHECKPOINTS, ignore_errors=True)
    if method == FULL:
        shutil.rmtree(folder / MODEL_DIR, ignore_errors=True)
    record = _record(task, method, seed, t["metric"], result["eval"], result["timing"]["train_seconds"],
                     result["steps"], result["train_examples"], opts.epochs_for(task), folder)
    record["truncated"] = result["truncated"]["train"]
    record["lr"] = result["lr"]
    record["lr_search"] = None if search is None else search.to_dict()
    record["planned_steps"], record["best_step"] = result["planned_steps"], result["best_step"]
    return record


def _record(task: str, method: str, seed: int, metric: str, metrics: dict[str, float], seconds: float,
            steps: int, examples: int, epochs: float, folder: Path) -> dict[str, Any]:
    score = metrics.get(metric)
    return {"task": task, "method": method, "seed": seed, "metric": metric,
            "score": float(score) if score is not None else math.nan, "metrics": metrics,
            "train_seconds": seconds, "steps": steps,
            "train_examples_per_second": examples * epochs / seconds if seconds > 0 else math.nan,
            "run_dir": str(folder)}


# ---- fusion (stage 2) -------------------------------------------------------------------------
def _fusion_run(opts: CompareOptions, tasks: dict[str, dict[str, Any]], target: str, seed: int,
                out: Path, console: Console) -> dict[str, Any]:
    """Stage 2 for ``target``: a fusion over every task's stage-1 Pfeiffer adapter, trained with
    the target's head on the target's data; its record, with the mean attention per module."""
    from transformers import set_seed

    from peftlab.data import tokenize
    from peftlab.io import write_atomic
    from peftlab.loop import fit
    from peftlab.train import ADAPTER_DIR, collator, evaluate_with_predictions, json_bytes, write_predictions

    data: TaskData = tasks[target]["data"]
    set_seed(seed)
    model, tokenizer, heads, adapters, name = _fusion_model(opts, data, list(tasks), target, seed, out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    train_set, _ = tokenize(data["train"], tokenizer, data.task, opts.max_length)
    eval_set, _ = tokenize(data["validation"], tokenizer, data.task, opts.max_length)
    eval_set = eval_set.by_length()
    collate = collator(tokenizer, data.task)
    loader = _train_loader(opts, train_set, collate, seed)
    total = max(1, math.ceil(len(loader) * opts.epochs_for(target)))
    started = time.perf_counter()
    try:
        step = len(fit(model, name, loader, total, opts.fusion_lr, extras=heads))
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"fusion {e} ({target}, seed {seed})", e.step) from None
    seconds = time.perf_counter() - started
    metrics, predictions, labels = evaluate_with_predictions(model, eval_set, collate, data.task,
                                                             batch_size=max(opts.batch_size, 32))
    weights = _mean_fusion_weights(model, adapters, name, eval_set, collate, device)
    folder = _run_dir(out, seed, target, FUSION)
    folder.mkdir(parents=True, exist_ok=True)
    write_predictions(folder, predictions, labels)
    adapters.save(name, folder / ADAPTER_DIR)
    record = _record(target, FUSION, seed, tasks[target]["metric"], metrics, seconds, step,
                     len(train_set), opts.epochs_for(target), folder)
    record["members"] = list(tasks)
    record["lr"] = opts.fusion_lr
    write_atomic(folder / "metrics.json", json_bytes(record))
    record["fusion_weights"] = weights
    return record


def _fusion_model(opts: CompareOptions, data: TaskData, members: list[str], target: str, seed: int,
                  out: Path) -> tuple[Any, Any, tuple[str, ...], Any, str]:
    """The base model with each member task's stage-1 adapter loaded and a new fusion over them:
    (model, tokenizer, head modules, adapters, the fusion's name)."""
    from peftlab.adapter_set import attach
    from peftlab.train import ADAPTER_DIR, load_model

    model, tokenizer, heads = load_model(opts.model, data.task, data.num_labels, opts.pooling)
    adapters = attach(model)
    for task in members:
        path = _run_dir(out, seed, task, FUSION_MEMBER_METHOD) / ADAPTER_DIR
        # The target's head comes along (the fusion's head starts from it); other tasks' heads
        # may not fit this model's.
        adapters.load(path, name=task, with_extras=task == target)
    name = f"{FUSION}-{target}"
    adapters.add_fusion(name, members)
    return model, tokenizer, heads, adapters, name


def _train_loader(opts: CompareOptions, train_set: Any, collate: Any, seed: int) -> Any:
    """Shuffled training batches, of similar lengths unless ``--no-group-by-length``."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    sampler = (LengthGroupedSampler(opts.batch_size, lengths=train_set.lengths(), generator=generator)
               if opts.group_by_length else torch.utils.data.RandomSampler(train_set, generator=generator))
    return torch.utils.data.DataLoader(train_set, batch_size=opts.batch_size, sampler=sampler,
                                       collate_fn=collate)


@torch.no_grad()
def _mean_fusion_weights(model: Any, adapters: Any, name: str, dataset: Any, collate: Any,
                         device: torch.device, max_batches: int = 8) -> dict[str, Any]:
    """The fusion's attention over its members, per module, averaged over validation batches."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, collate_fn=collate)
    total = None
    n = 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        model(**{k: v.to(device) for k, v in batch.items()})
        w = adapters.fusion_weights(name).float().cpu()
        total = w if total is None else total + w
        n += 1
    assert total is not None
    return {"modules": [s.module for s in adapters[name].sites], "members": list(adapters[name].members),
            "weights": (total / n).tolist()}


# ---- aggregation ------------------------------------------------------------------------------
def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Per method and task: ``score`` (mean over seeds), ``std``, ``n``, ``ci95`` (a bootstrap
    interval over validation examples and seeds, :func:`peftlab.metrics.bootstrap_ci`), ``lr``,
    ``steps`` and ``rank`` (ties wherever intervals overlap); each method's average over tasks
    (only when it has every task); fusion minus its stage-1 adapter per task, with a paired
    interval (``fusion_gain_ci95``); and, per task, whether the ranking found any significant
    difference."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in report["runs"]:
        runs.setdefault(r["method"], {}).setdefault(r["task"], []).append(r)
    tasks = list(report["tasks"])
    previous = report.get("summary", {}).get("scores", {})
    scores: dict[str, Any] = {}
    for method, per_task in runs.items():
        cells = {t: _cell(report, method, t, rs, previous.get(method, {}).get("tasks", {}).get(t))
                 for t, rs in per_task.items()}
        complete = all(t in cells for t in tasks)
        scores[method] = {"tasks": cells,
                          "average": statistics.mean(cells[t]["mean"] for t in tasks) if complete else None}
    significant, constant, learned = {}, {}, {}
    for task in tasks:
        intervals = {m: tuple(s["tasks"][task]["ci95"]) for m, s in scores.items() if task in s["tasks"]}
        ranks = ranks_with_ties(intervals)
        for m, rank in ranks.items():
            scores[m]["tasks"][task]["rank"] = rank
        significant[task] = len(set(ranks.values())) > 1
        level = _constant_level(report, task)
        if level is not None:
            constant[task] = level
            learned[task] = {m: bool(iv[0] > level) for m, iv in intervals.items()}
    gains, gain_intervals = {}, {}
    single = scores.get(FUSION_MEMBER_METHOD, {}).get("tasks", {})
    for task, cell in scores.get(FUSION, {}).get("tasks", {}).items():
        if task in single:
            gains[task] = cell["mean"] - single[task]["mean"]
            gain_intervals[task] = _gain_interval(
                report, task, runs[FUSION][task], runs[FUSION_MEMBER_METHOD][task],
                report.get("summary", {}).get("fusion_gain_ci95", {}).get(task))
    return {"scores": scores, "fusion_gain": gains, "fusion_gain_ci95": gain_intervals,
            "significant_difference": significant, "constant": constant, "above_constant": learned,
            "fusion_gain_mean": statistics.mean(gains.values()) if gains else None}


def _gain_interval(report: dict[str, Any], task: str, fused: list[dict[str, Any]],
                   single: list[dict[str, Any]], previous: dict[str, Any] | None) -> dict[str, Any]:
    """The fusion's gain over its single-task adapter on ``task``: a paired bootstrap interval over
    the seeds both have (and the validation examples), and whether it excludes 0."""
    from peftlab.train import PREDICTIONS_FILE, read_predictions

    by_seed = {r["seed"]: r["run_dir"] for r in single}
    pairs = sorted((r["run_dir"], by_seed[r["seed"]]) for r in fused if r["seed"] in by_seed)
    dirs = [list(p) for p in pairs]
    if previous and previous.get("runs") == dirs:
        return previous
    found = [(read_predictions(Path(a)), read_predictions(Path(b))) for a, b in pairs
             if (Path(a) / PREDICTIONS_FILE).is_file() and (Path(b) / PREDICTIONS_FILE).is_file()]
    info = report["tasks"][task]
    # Predictions are saved in the eval set's order (longest first), the same for every run of a
    # task. Earlier runs were saved in the order of transformers' length-grouped eval sampler,
    # shuffled by the seed; those cannot be paired and get no interval.
    same = all(same_labels(f[1], s[1]) for f, s in found)
    ci = (bootstrap_ci(info["task"], fused[0]["metric"], [f for f, _ in found], info["num_labels"] or None,
                       against=[s for _, s in found], names=info.get("labels"))
          if found and len(found) == len(pairs) and same else (math.nan, math.nan))
    return {"ci95": list(ci), "significant": bool(ci[0] > 0 or ci[1] < 0), "seeds": len(pairs), "runs": dirs}


def _constant_level(report: dict[str, Any], task: str) -> float | None:
    """The task's constant-prediction score, from the validation labels a run saved."""
    from peftlab.train import PREDICTIONS_FILE, read_predictions

    info = report["tasks"][task]
    for r in report["runs"]:
        if r["task"] == task and (Path(r["run_dir"]) / PREDICTIONS_FILE).is_file():
            _, labels = read_predictions(Path(r["run_dir"]))
            return constant_score(info["task"], r["metric"], labels, max(2, info["num_labels"]),
                                  info.get("labels"))
    return None


def _cell(report: dict[str, Any], method: str, task: str, runs: list[dict[str, Any]],
          previous: dict[str, Any] | None) -> dict[str, Any]:
    """One method's numbers on one task; the interval is reused while its runs are the same."""
    from peftlab.train import PREDICTIONS_FILE, read_predictions

    cell = _stats([r["score"] for r in runs])
    cell["score"] = cell["mean"]
    cell["steps"] = statistics.mean(r["steps"] for r in runs)
    rates = sorted({r["lr"] for r in runs})
    cell["lr"] = rates[0] if len(rates) == 1 else rates  # several: each seed chose its own
    dirs = sorted(r["run_dir"] for r in runs)
    if previous and previous.get("interval_runs") == dirs and "ci95" in previous:
        cell["ci95"] = previous["ci95"]
    else:
        found = [read_predictions(Path(d)) for d in dirs if (Path(d) / PREDICTIONS_FILE).is_file()]
        info = report["tasks"][task]
        ci = (bootstrap_ci(info["task"], runs[0]["metric"], found, info["num_labels"] or None,
                           names=info.get("labels"))
              if len(found) == len(dirs) else (math.nan, math.nan))
        cell["ci95"] = list(ci)
    cell["interval_runs"] = dirs
    return cell


def _stats(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": statistics.mean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "n": len(finite)}


def load_report(out: Path) -> dict[str, Any]:
    """A compare report read back from its directory (e.g. to redraw the plots)."""
    import json

    return json.loads((Path(out) / REPORT_JSON).read_text())
