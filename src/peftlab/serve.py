"""``peftlab serve``: one base model, many adapters of any kind, requests for different adapters
mixed in one forward.

Four parts, each usable alone:

* :class:`Pool`, the adapters on one model. Loading is :meth:`peftlab.AdapterSet.load` itself (every
  check it makes), plus what serving needs: the adapter fits this server's task and base model,
  and its head is kept aside (:class:`HeadBank`), since every adapter trained its own head while
  the model has one. :meth:`Pool.run` predicts a batch of requests through
  :func:`peftlab.predict.predict_split`, the function of ``peftlab predict``, with each row routed
  to its request's adapter (:meth:`peftlab.AdapterSet.route`). No weight changes between loads,
  so products of weights alone (a fusion's, a Compacter's) are kept from one forward to the next
  (:class:`peftlab.layer.WeightCache`, cleared on every load and unload), and the adapters' small
  per-group products run on one CPU thread (:func:`peftlab.layer.serial_pieces`).
* :class:`Batcher`, dynamic batching: requests wait up to ``max_wait`` seconds for others to share
  their forward, up to ``max_batch`` examples. One worker thread runs every forward and every
  load and unload, so the model is never changed under a running forward.
* :class:`Metrics`, counters and histograms in Prometheus' text format.
* :func:`create_app`, the HTTP API (FastAPI), and :func:`serve`, which runs it with uvicorn.

Requests that can share a forward: those with the same kind of input (single texts or pairs) and,
for causal-LM, the same ``max_new_tokens``. Adapters acting on routed experts (MoE) cannot be
routed per example (:mod:`peftlab.experts`), so their requests are batched only with requests for
the same adapter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.adapter_set import AdapterSet, attach
from peftlab.config import check_value, clip
from peftlab.errors import AdapterLoadError, AdapterNameError, AdapterStateError, PeftlabError, UsageError
from peftlab.layer import AdaptedLayer, WeightCache, cached_weights, serial_pieces
from peftlab.trained import Trained, predict_task

try:  # the [serve] extra; the pool, batcher and metrics work without it
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
except ImportError:  # pragma: no cover - reported by create_app
    FastAPI = Request = RequestValidationError = JSONResponse = PlainTextResponse = None  # type: ignore

TASKS = ("classification", "regression", "causal-lm")
MAX_CHARS = 100_000  # per input: refused before tokenising (a token is rarely under one character)
MAX_BODY = 16 << 20  # bytes of one request body


class ServeError(UsageError):
    """A request the server refuses, with its HTTP status (4xx); the server keeps serving."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def http_status(error: BaseException) -> int:
    """The HTTP status of an error raised while handling a request."""
    if isinstance(error, ServeError):
        return error.status
    if isinstance(error, AdapterStateError):
        return 409  # e.g. unloading a fusion's member
    if isinstance(error, PeftlabError):
        return 422  # a file or value that cannot be used
    return 500


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """Everything ``peftlab serve`` takes; see the CLI help for each field. ``adapters``: (name,
    path) pairs, loaded in order (a fusion after its members)."""

    adapters: tuple[tuple[str, str], ...]
    model: str | None = None  # default: the base model the first adapter's run records
    task: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_length: int | None = None  # default: the first adapter's run's, else 128
    max_new_tokens: int = 32
    threads: int | None = None  # CPU threads of each forward (default: torch's, one per core)
    device: str = "auto"  # see peftlab.train.resolve_device

    def __post_init__(self) -> None:
        if not self.adapters:
            raise UsageError("serve needs at least one --adapter NAME=PATH")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise UsageError(f"--threads {self.threads}: give a number of CPU threads from 1 up")
        if self.max_batch < 1 or self.max_new_tokens < 1 or not 0 <= self.max_wait_ms <= 60_000:
            raise UsageError("--max-batch and --max-new-tokens must be positive, --max-wait-ms "
                             "between 0 and 60000")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port {self.port}: choose a port between 0 and 65535")


def parse_adapter_args(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``NAME=PATH`` arguments as (name, path) pairs; a bare ``PATH`` keeps the adapter's own name."""
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = "", value
        if not path:
            raise UsageError(f"--adapter {value!r}: give NAME=PATH (a run or adapter directory)")
        out.append((name, path))
    return tuple(out)


# ---- each adapter's head ----------------------------------------------------------------------
class HeadBank:
    """Each adapter's extras (its task head, e.g. ``classifier``), kept beside the model.

    :meth:`peftlab.AdapterSet.load` copies an adapter's head into the model's one head module.
    The bank keeps a copy of it per adapter and puts the model's own state back; a forward hook on
    the module then gives every example, inside :meth:`peftlab.AdapterSet.route`, the output of its
    adapter's copy. Examples without a head of their own keep the module's output. The copies are
    separate modules, so the hook never re-enters itself and nothing in the model is swapped."""

    def __init__(self, adapters: AdapterSet) -> None:
        self.adapters = adapters
        # module -> a copy taken before any load, with the model's own state; copied for each
        # adapter (never the live module, which carries the hook and, through it, the whole bank)
        self.templates: dict[str, nn.Module] = {}
        self.copies: dict[str, dict[str, nn.Module]] = {}  # adapter -> module -> its head
        self.hooks: dict[str, Any] = {}

    def remember(self, modules: Sequence[str]) -> None:
        """Copy ``modules`` as the model has them, before a load overwrites them."""
        for name in modules:
            if name not in self.templates:
                with contextlib.suppress(AttributeError):  # a bad name: the load refuses it
                    live = self.adapters.model.get_submodule(name)
                    self.templates[name] = copy.deepcopy(live).eval().requires_grad_(False)

    def keep(self, adapter: str, modules: Sequence[str]) -> None:
        """Copy the heads that loading ``adapter`` put into ``modules``; then :meth:`restore`."""
        copies = {}
        for name in modules:
            live = self.adapters.model.get_submodule(name)
            wrapped = [n for n, m in live.named_modules() if isinstance(m, AdaptedLayer)]
            if wrapped:
                raise ServeError(422, f"the head {name!r} saved with {adapter!r} contains adapted layers "
                                      f"{wrapped[:3]}; a head routed per example must be a plain module")
            copies[name] = copy.deepcopy(self.templates[name])
            copies[name].load_state_dict(live.state_dict())
            if name not in self.hooks:
                self.hooks[name] = live.register_forward_hook(_HeadHook(self, name), with_kwargs=True)
        self.copies[adapter] = copies

    def restore(self, modules: Sequence[str]) -> None:
        """Put the model's own state back into ``modules``."""
        with torch.no_grad():
            for name in modules:
                if name in self.templates:
                    self.adapters.model.get_submodule(name).load_state_dict(self.templates[name].state_dict())

    def drop(self, adapter: str) -> None:
        self.copies.pop(adapter, None)

    def owner(self, names: tuple[str, ...], module: str) -> str | None:
        """The adapter whose head serves an example routed to ``names`` at ``module``."""
        owners = [n for n in names if module in self.copies.get(n, {})]
        if len(owners) > 1:
            raise AdapterStateError(f"adapters {owners} each have a head at {module}; route one of them")
        return owners[0] if owners else None

    def routed(self, module: str, routes: list[tuple[str, ...]], args: tuple[Any, ...],
               kwargs: dict[str, Any], output: Any) -> Any:
        """``output`` with each example's rows recomputed by its adapter's copy of ``module``."""
        groups: dict[str, list[int]] = {}
        for i, names in enumerate(routes):
            owner = self.owner(names, module)
            if owner is not None:
                groups.setdefault(owner, []).append(i)
        if not groups:
            return None
        batch = len(routes)
        if not isinstance(output, torch.Tensor) or output.shape[:1] != (batch,) or not any(
                isinstance(a, torch.Tensor) and a.shape[:1] == (batch,) for a in (*args, *kwargs.values())):
            raise AdapterStateError(f"the head {module} does not keep the batch as the first dimension of "
                                    "its input and output, so it cannot be routed per example")
        out = output.clone()
        for owner, rows in groups.items():
            index = torch.tensor(rows, device=output.device)
            pick = _rows_of(index, batch)
            head = self.copies[owner][module]
            out[index] = head(*map(pick, args), **{k: pick(v) for k, v in kwargs.items()})
        return out


class _HeadHook:
    """Forward hook of one head module: inside a route, each example gets its adapter's head."""

    def __init__(self, bank: HeadBank, module: str) -> None:
        self.bank = bank
        self.module = module

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        routes = self.bank.adapters.current_route()
        return None if routes is None else self.bank.routed(self.module, routes, args, kwargs, output)


def _rows_of(index: torch.Tensor, batch: int) -> Callable[[Any], Any]:
    """Select rows ``index`` of batch-first tensors; other values pass through."""
    def pick(value: Any) -> Any:
        return value.index_select(0, index) if isinstance(value, torch.Tensor) and value.shape[:1] == (
            batch,) else value
    return pick


# ---- the adapters on one model ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Served:
    """One adapter as the server has it."""

    name: str
    method: str
    parameters: int
    file_bytes: int
    path: str
    labels: tuple[str, ...] | None = None
    members: tuple[str, ...] = ()
    solo: bool = False  # acts on routed experts: batched only with requests for itself

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "method": self.method, "parameters": self.parameters,
               "file_bytes": self.file_bytes, "path": self.path}
        if self.labels is not None:
            out["labels"] = list(self.labels)
        if self.members:
            out["members"] = list(self.members)
        return out


@dataclasses.dataclass
class Job:
    """One request: ``inputs`` (texts, or (text, pair) tuples) for ``adapter``."""

    adapter: str | None
    inputs: list[tuple[str, str | None]]
    max_new_tokens: int = 32
    future: Future = dataclasses.field(default_factory=Future)
    arrived: float = dataclasses.field(default_factory=time.monotonic)


def _trained(path: str | Path) -> Trained:
    """What a path given to the server holds (a run or adapter directory): the record that
    ``peftlab predict`` reads (its task, labels, base model and pooling)."""
    trained = Trained(Path(path))
    if trained.adapter is None:
        raise UsageError(f"{path} holds a fully fine-tuned model; serve loads adapters on one base model")
    return trained


class Pool:
    """The adapters on one base model, served for one task; see the module docstring. Every
    method that changes the model (:meth:`load`, :meth:`unload`) or runs it (:meth:`run`) must be
    called from one thread at a time: the :class:`Batcher`'s worker."""

    def __init__(self, model: nn.Module, tokenizer: Any, task: str, max_length: int = 128,
                 max_new_tokens: int = 32, max_batch: int = 32) -> None:
        from peftlab.io import fingerprint

        if task not in TASKS:
            raise UsageError(f"task {task!r}: serve takes {', '.join(TASKS)}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.task = task
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.max_batch = max_batch
        self.adapters = attach(model)
        self.heads = HeadBank(self.adapters)
        self.served: dict[str, Served] = {}
        self.weights = WeightCache()
        self.base = fingerprint(model, self.adapters)["shape_sha256"]

    @classmethod
    def open(cls, options: ServeOptions) -> Pool:
        """The base model of ``options`` with its adapters loaded; bad input raises UsageError."""
        from peftlab.train import load_model, resolve_device, resolve_max_length

        device = resolve_device(options.device)
        first = _trained(options.adapters[0][1])
        task, num_labels = _task_of(first, options.task)
        labels = first.labels() if task == "classification" else None
        model, tokenizer, _ = load_model(first.base_model(options.model), task, num_labels or 0,
                                         first.pooling(), labels)
        length = resolve_max_length(options.max_length or first.run.get("max_length"), model)
        pool = cls(model.to(device), tokenizer, task, length, options.max_new_tokens, options.max_batch)
        for name, path in options.adapters:
            pool.load(path, name or None)
        return pool

    # -- loading and unloading
    def load(self, path: str | Path, name: str | None = None) -> Served:
        """Load the adapter at ``path`` (run or adapter directory) as ``name`` (default: its own)."""
        from peftlab.io import read_config

        trained = _trained(path)
        if name is not None:
            _check_name(name)
        self._check_fits(trained)
        self.weights.clear()
        extras = _extras_named(read_config(trained.adapter))
        self.heads.remember(extras)
        try:
            loaded = self.adapters.load(trained.adapter, name)  # every check AdapterSet.load makes
            try:
                served = self._admit(loaded, trained, path)
            except BaseException:
                self.adapters.remove(loaded)
                self.heads.drop(loaded)
                raise
        except AdapterLoadError as e:
            raise ServeError(409 if "already attached" in str(e) else 422, str(e)) from None
        finally:
            self.heads.restore(extras)
        self.served[served.name] = served
        return served

    def _check_fits(self, trained: Trained) -> None:
        """The adapter's run (where recorded) was for this task, on this base model."""
        recorded = trained.run.get("task")
        if recorded and recorded != self.task:
            raise ServeError(422, f"{trained.adapter} was trained for {recorded}; this server serves "
                                  f"{self.task} (start another server for it)")
        base = trained.config.get("base_model")
        sha = base.get("shape_sha256") if isinstance(base, dict) else None
        if sha is not None and sha != self.base:
            raise ServeError(422, f"{trained.adapter} was trained on a different base model (parameter "
                                  "shapes differ); serve it with the base model it was trained on")

    def _admit(self, name: str, trained: Trained, path: str | Path) -> Served:
        """Keep the head that loading ``name`` brought (a head task needs one) and describe it."""
        from peftlab.io import WEIGHTS_FILE

        adapter = self.adapters[name]
        if self.task != "causal-lm" and not adapter.extras:
            raise ServeError(422, f"{trained.adapter} has no head saved with it; a {self.task} server "
                                  "needs each adapter's trained head (save with extras=(...))")
        self.heads.keep(name, adapter.extras)
        labels = trained.labels() if self.task == "classification" else None
        members = adapter.members
        solo = any(s.num_experts is not None for s in adapter.sites) or any(
            self.served[m].solo for m in members if m in self.served)
        return Served(name, adapter.config.method, adapter.num_parameters(),
                      (trained.adapter / WEIGHTS_FILE).stat().st_size, str(path),
                      tuple(labels) if labels is not None else None, members, solo)

    def unload(self, name: str) -> None:
        """Remove adapter ``name``; a fusion's member stays until the fusion is unloaded."""
        if name not in self.served:
            raise ServeError(404, f"no adapter named {clip(repr(name))}; adapters: {list(self.served)}")
        self.adapters.remove(name)  # refuses a fusion's member (AdapterStateError: 409)
        self.weights.clear()
        self.heads.drop(name)
        del self.served[name]

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in list(self.served.values())]

    # -- requests
    def job(self, body: Any) -> Job:
        """A request (``{"adapter": name | null, "inputs": [...], "max_new_tokens": n}``, as JSON
        reads it) checked for what can be checked before it runs: form, sizes, the adapter."""
        fields = _fields(body, {"adapter": str | None, "inputs": Any, "max_new_tokens": int | None})
        adapter, inputs = fields.get("adapter"), fields.get("inputs")
        if adapter is None and self.task != "causal-lm":
            raise ServeError(422, f"name an adapter: a {self.task} server's head is trained with each "
                                  f"adapter (adapters: {list(self.served)})")
        if adapter is not None and adapter not in self.served:
            raise ServeError(404, f"no adapter named {clip(repr(adapter))}; adapters: {list(self.served)}")
        if not isinstance(inputs, list) or not inputs:
            raise ServeError(422, "inputs must be a non-empty list of texts")
        if len(inputs) > self.max_batch:
            raise ServeError(413, f"{len(inputs)} inputs in one request; this server takes at most "
                                  f"{self.max_batch} (--max-batch): split the request")
        rows = [self._input(i, value) for i, value in enumerate(inputs)]
        if len({pair is None for _, pair in rows}) > 1:
            raise ServeError(422, "inputs mix single texts and pairs; send them in separate requests")
        max_new_tokens = fields.get("max_new_tokens")
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ServeError(422, f"max_new_tokens must be between 1 and {self.max_new_tokens} "
                                  "(--max-new-tokens)")
        return Job(adapter, rows, max_new_tokens)

    def _input(self, i: int, value: Any) -> tuple[str, str | None]:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, (list, tuple)) or len(texts) not in (1, 2) or not all(
                isinstance(t, str) for t in texts):
            raise ServeError(422, f"inputs[{i}] must be a text or a [text, pair] list of two texts")
        if len(texts) == 2 and self.task == "causal-lm":
            raise ServeError(422, f"inputs[{i}] is a pair; causal-LM generation takes single texts")
        if any(not t.strip() for t in texts):
            raise ServeError(422, f"inputs[{i}] is empty")
        if any(len(t) > MAX_CHARS for t in texts):
            raise ServeError(413, f"inputs[{i}] has more than {MAX_CHARS} characters")
        return texts[0], texts[1] if len(texts) == 2 else None

    def key(self, job: Job) -> Hashable:
        """Jobs with equal keys can share a forward (see the module docstring)."""
        served = self.served.get(job.adapter) if job.adapter is not None else None
        solo = job.adapter if served is not None and served.solo else None
        return (job.inputs[0][1] is None, job.max_new_tokens if self.task == "causal-lm" else 0, solo)

    def run(self, jobs: Sequence[Job]) -> list[list[dict[str, Any]] | BaseException]:
        """Predictions for each job (or the error that refuses it), all in one
        :func:`~peftlab.predict.predict_split` call with each row routed to its job's adapter."""
        from peftlab.data import Split
        from peftlab.predict import RowRouting, predict_split

        outcomes: list[list[dict[str, Any]] | BaseException] = [self._problem(j) or [] for j in jobs]
        good = [j for j, o in zip(jobs, outcomes) if not isinstance(o, BaseException)]
        if not good:
            return outcomes
        rows = [{"text": text, "text_pair": pair} for j in good for text, pair in j.inputs]
        routing = RowRouting([j.adapter for j in good for _ in j.inputs],
                             {n: s.labels for n, s in self.served.items()})
        split = Split("request", Path("request"), rows)
        with cached_weights(self.weights), serial_pieces():
            predictions = predict_split(self.model, self.tokenizer, self.task, split, None, len(rows),
                                        self.max_length, good[0].max_new_tokens, routing=routing)
        start = 0
        for i, job in enumerate(jobs):
            if not isinstance(outcomes[i], BaseException):
                outcomes[i] = predictions[start:start + len(job.inputs)]
                start += len(job.inputs)
        return outcomes

    def _problem(self, job: Job) -> ServeError | None:
        """Why ``job`` cannot run now: its adapter was unloaded meanwhile, or an input is longer
        than ``max_length`` tokens (where ``peftlab predict`` would cut it)."""
        if job.adapter is not None and job.adapter not in self.served:
            return ServeError(404, f"adapter {job.adapter!r} was unloaded; adapters: {list(self.served)}")
        texts = [t for t, _ in job.inputs]
        pairs = [p for _, p in job.inputs] if job.inputs[0][1] is not None else None
        lengths = [len(ids) for ids in self.tokenizer(texts, *([pairs] if pairs else []), truncation=False,
                                                      verbose=False)["input_ids"]]
        long = [(i, n) for i, n in enumerate(lengths) if n > self.max_length]
        if long:
            i, n = long[0]
            return ServeError(413, f"inputs[{i}] has {n} tokens; this server takes at most "
                                   f"{self.max_length} (--max-length)")
        return None


def _task_of(trained: Trained, asked: str) -> tuple[str, int | None]:
    """The task and head size to serve, as ``peftlab predict`` decides them for the first adapter."""
    task, num_labels = predict_task(trained, asked)
    if task == "classification" and not num_labels:
        labels = trained.labels()
        if labels is None:
            raise UsageError(f"{trained.adapter} records no class names; pass --task and serve adapters "
                             "saved by peftlab train")
        num_labels = len(labels)
    return task, 1 if task == "regression" else num_labels


def _extras_named(config: dict[str, Any]) -> tuple[str, ...]:
    try:
        return tuple(check_value("extras", config.get("extras", []), tuple[str, ...]))
    except PeftlabError:
        return ()  # AdapterSet.load refuses the file with its own message


def _check_name(name: str) -> None:
    from peftlab.names import check_name

    try:
        check_name(name)
    except AdapterNameError as e:
        raise ServeError(422, str(e)) from None


# ---- dynamic batching -------------------------------------------------------------------------
class Batcher:
    """Collects jobs for up to ``max_wait`` seconds after the oldest one arrived (or until
    ``max_batch`` examples that can share a forward are waiting) and runs them together with
    ``run(jobs)`` on one worker thread; ``call(fn)`` runs ``fn`` on that thread between batches.
    A job whose future was cancelled before its batch formed is dropped; a job that fails does
    not fail the others."""

    def __init__(self, run: Callable[[list[Job]], Sequence[Any]], key: Callable[[Job], Hashable],
                 max_batch: int = 32, max_wait: float = 0.005, metrics: Metrics | None = None) -> None:
        self.run = run
        self.key = key
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.metrics = metrics
        self._jobs: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="peftlab-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch running, then refuse what is left (503)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            left = [j.future for j in self._jobs] + [f for _, f in self._calls]
            self._jobs.clear()
            self._calls.clear()
        for future in left:
            if future.set_running_or_notify_cancel():
                future.set_exception(ServeError(503, "the server is shutting down"))

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._stopping:
                raise ServeError(503, "the server is shutting down")
            self._jobs.append(job)
            self._cond.notify_all()
        return job.future

    def call(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise ServeError(503, "the server is shutting down")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    def _loop(self) -> None:
        while True:
            work = self._next()
            if work is None:
                return
            if isinstance(work, tuple):
                _settle(work[1], work[0])
            else:
                self._run_batch(work)

    def _next(self) -> list[Job] | tuple[Callable[[], Any], Future] | None:
        with self._cond:
            while True:
                if self._calls:
                    return self._calls.popleft()
                if self._stopping:
                    return None
                if not self._jobs:
                    self._cond.wait()
                    continue
                batch, full = self._compatible()
                remaining = self._jobs[0].arrived + self.max_wait - time.monotonic()
                if full or remaining <= 0:
                    taken = {id(j) for j in batch}
                    self._jobs = collections.deque(j for j in self._jobs if id(j) not in taken)
                    return batch
                self._cond.wait(remaining)

    def _compatible(self) -> tuple[list[Job], bool]:
        """The oldest job and those after it that can share its forward, in arrival order, up to
        ``max_batch`` examples; and whether the batch is full."""
        key = self.key(self._jobs[0])
        batch, size = [], 0
        for job in self._jobs:
            if self.key(job) != key:
                continue
            if size + len(job.inputs) > self.max_batch:
                return batch, True
            batch.append(job)
            size += len(job.inputs)
        return batch, size >= self.max_batch

    def _run_batch(self, jobs: list[Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # a cancelled job drops out
        if not live:
            return
        start = time.perf_counter()
        try:
            outcomes: Sequence[Any] = self.run(live)
        except Exception as e:  # an unexpected failure fails this batch only; the worker goes on
            outcomes = [e] * len(live)
        for job, outcome in zip(live, outcomes):
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        if self.metrics is not None:
            self.metrics.batch(sum(len(j.inputs) for j in live), time.perf_counter() - start)


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except Exception as e:
        future.set_exception(e)


# ---- metrics ----------------------------------------------------------------------------------
class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_number(self.total)}",
                f"{name}_count {self.count}"]
        return out


class Metrics:
    """What ``GET /metrics`` reports, in Prometheus' text format (version 0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()  # (endpoint, status)
        self.examples: collections.Counter[str] = collections.Counter()  # adapter -> examples predicted
        self.per_adapter: collections.Counter[str] = collections.Counter()  # adapter -> requests answered
        self.latency = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram((1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def request(self, endpoint: str, status: int, seconds: float | None = None,
                adapter: str | None = None, examples: int = 0) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None:
                self.latency.observe(seconds)
            if status == 200 and examples:
                self.per_adapter[adapter or ""] += 1
                self.examples[adapter or ""] += examples

    def batch(self, examples: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(examples)
            self.batch_seconds.observe(seconds)

    def render(self, adapters: int, waiting: int) -> str:
        with self._lock:
            lines = ["# HELP peftlab_requests_total HTTP requests answered, by endpoint and status.",
                     "# TYPE peftlab_requests_total counter"]
            lines += [f'peftlab_requests_total{{endpoint="{_label(e)}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP peftlab_adapter_requests_total Predict requests answered, by adapter.",
                      "# TYPE peftlab_adapter_requests_total counter"]
            lines += [f'peftlab_adapter_requests_total{{adapter="{_label(a)}"}} {n}'
                      for a, n in sorted(self.per_adapter.items())]
            lines += ["# HELP peftlab_examples_total Inputs predicted, by adapter.",
                      "# TYPE peftlab_examples_total counter"]
            lines += [f'peftlab_examples_total{{adapter="{_label(a)}"}} {n}'
                      for a, n in sorted(self.examples.items())]
            lines += self.latency.lines("peftlab_request_seconds", "Predict latency, request in to answer.")
            lines += self.batch_size.lines("peftlab_batch_size", "Examples per forward (dynamic batching).")
            lines += self.batch_seconds.lines("peftlab_batch_seconds", "Time to run one batch.")
            lines += ["# HELP peftlab_adapters Adapters loaded.", "# TYPE peftlab_adapters gauge",
                      f"peftlab_adapters {adapters}",
                      "# HELP peftlab_queue_jobs Requests waiting for a batch.",
                      "# TYPE peftlab_queue_jobs gauge", f"peftlab_queue_jobs {waiting}"]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---- the HTTP API -----------------------------------------------------------------------------
class Server:
    """A :class:`Pool` behind a :class:`Batcher`, with :class:`Metrics`: what the app serves."""

    def __init__(self, pool: Pool, max_wait: float = 0.005) -> None:
        self.pool = pool
        self.metrics = Metrics()
        self.batcher = Batcher(pool.run, pool.key, pool.max_batch, max_wait, self.metrics)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        self.batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.batcher.stop)

    async def on_worker(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread, between batches (changes to the model go there)."""
        return await asyncio.wrap_future(self.batcher.call(fn))


def create_app(server: Server) -> FastAPI:
    """The HTTP API over ``server``: ``POST /v1/predict``, ``GET/POST /v1/adapters``,
    ``DELETE /v1/adapters/{name}``, ``GET /health``, ``GET /metrics``."""
    if FastAPI is None:
        raise UsageError("peftlab serve needs FastAPI and uvicorn: pip install 'peftlab[serve]'")
    app = FastAPI(title="peftlab serve", lifespan=server.lifespan)
    api = _Api(server)
    app.add_exception_handler(RequestValidationError, api.invalid)
    app.add_exception_handler(PeftlabError, api.refused)
    app.add_api_route("/v1/predict", api.predict, methods=["POST"])
    app.add_api_route("/v1/adapters", api.list_adapters, methods=["GET"])
    app.add_api_route("/v1/adapters", api.load_adapter, methods=["POST"], status_code=201)
    app.add_api_route("/v1/adapters/{name}", api.unload_adapter, methods=["DELETE"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.metrics, methods=["GET"])
    return app


class _Api:
    """The endpoints, as methods over one :class:`Server`. Bodies are read as JSON and checked by
    :meth:`Pool.job` (with :func:`peftlab.config.check_value`), the checks a library caller gets."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.pool = server.pool

    async def predict(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            job = self.pool.job(await _json(request))
            outputs = await asyncio.wrap_future(self.server.batcher.submit(job))
        except PeftlabError as e:
            self.server.metrics.request("predict", http_status(e), time.perf_counter() - start)
            raise
        self.server.metrics.request("predict", 200, time.perf_counter() - start, job.adapter, len(job.inputs))
        # A JSONResponse as is: FastAPI's encoder would walk every score of every output again.
        return JSONResponse({"adapter": job.adapter, "task": self.pool.task, "outputs": outputs})

    async def list_adapters(self) -> dict[str, Any]:
        self.server.metrics.request("adapters", 200)
        return {"task": self.pool.task, "adapters": self.pool.describe()}

    async def load_adapter(self, request: Request) -> dict[str, Any]:
        try:
            path, name = _load_body(await _json(request))
        except PeftlabError as e:
            self.server.metrics.request("load", http_status(e))
            raise
        served = await self._change("load", lambda: self.pool.load(path, name))
        return served.describe()

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        await self._change("unload", lambda: self.pool.unload(name))
        return {"unloaded": name}

    async def _change(self, endpoint: str, fn: Callable[[], Any]) -> Any:
        try:
            result = await self.server.on_worker(fn)
        except PeftlabError as e:
            self.server.metrics.request(endpoint, http_status(e))
            raise
        self.server.metrics.request(endpoint, 200)
        return result

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "task": self.pool.task, "adapters": len(self.pool.served),
                "waiting": self.server.batcher.waiting, "threads": torch.get_num_threads()}

    async def metrics(self) -> Any:
        text = self.server.metrics.render(len(self.pool.served), self.server.batcher.waiting)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def refused(self, request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(error).split())}, status_code=http_status(error))

    async def invalid(self, request: Request, error: Exception) -> JSONResponse:
        """FastAPI's own checks (e.g. of path parameters), as one line."""
        problems = getattr(error, "errors", list)()
        text = "; ".join(f"{'.'.join(map(str, p.get('loc', ())))}: {p.get('msg', 'invalid')}"
                         for p in problems[:5])
        return JSONResponse({"error": f"invalid request: {clip(text, 500)}"}, status_code=422)


async def _json(request: Request) -> Any:
    """The request body as JSON, refused past :data:`MAX_BODY` bytes before it is all read."""
    too_large = ServeError(413, f"the request body is larger than {MAX_BODY} bytes")
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise too_large
    try:
        return json.loads(body)
    except ValueError:  # bad JSON or bad UTF-8
        raise ServeError(400, "the request body is not valid JSON") from None


def _load_body(body: Any) -> tuple[str, str | None]:
    """``{"path": ..., "name": ...}`` of ``POST /v1/adapters``."""
    fields = _fields(body, {"path": str, "name": str | None})
    if "path" not in fields:
        raise ServeError(422, "give the adapter's path: {\"path\": \"runs/sst2\", \"name\": \"sst2\"}")
    return fields["path"], fields.get("name")


def _fields(body: Any, types: dict[str, Any]) -> dict[str, Any]:
    """The fields of a JSON object body, each checked against ``types`` (no others allowed)."""
    if not isinstance(body, dict):
        raise ServeError(422, "the request body must be a JSON object")
    unknown = [k for k in body if k not in types]
    if unknown:
        raise ServeError(422, f"unknown field(s) {clip(str(unknown))}; expected {list(types)}")
    try:
        return {k: v if types[k] is Any else check_value(k, v, types[k]) for k, v in body.items()}
    except PeftlabError as e:
        raise ServeError(422, str(e)) from None


# ---- running it -------------------------------------------------------------------------------
def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on, before the model is loaded."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # as uvicorn binds: connections of a killed server left in TIME_WAIT do not block a restart
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another "
                             "--port or --host") from None


def serve(options: ServeOptions, ready: Callable[[str], None] | None = None) -> None:
    """Load the model and adapters of ``options`` and serve them until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise UsageError("peftlab serve needs FastAPI and uvicorn: pip install 'peftlab[serve]'") from None
    check_port_free(options.host, options.port)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    server = Server(Pool.open(options), options.max_wait_ms / 1000)
    if ready is not None:
        ready(f"serving {len(server.pool.served)} adapters ({server.pool.task}) on "
              f"http://{options.host}:{options.port}")
    uvicorn.run(create_app(server), host=options.host, port=options.port, log_level="warning")
