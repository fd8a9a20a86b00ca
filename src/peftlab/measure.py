"""What a method costs on one model: parameters, file size, training memory, step time, latency.

Shared by ``peftlab compare``, ``peftlab recommend`` and the benchmarks. Everything is measured
in the calling process, on one batch of fixed shape (``batch × length``), so that the methods of
one run are measured alike:

* **parameters**: the adapter's own tensors (the task head is counted apart); full fine-tuning
  trains every weight.
* **file size**: the adapter saved without its head (what each extra task adds on disk); for full
  fine-tuning, the bytes of every weight (a full copy of the model per task).
* **training memory**: on CUDA, the method's weights and AdamW moments plus the most the
  allocator's peak rose during one of its train steps (activations, gradients, temporaries).
  On CPU, the process RSS is useless for comparing
  methods (its high-water mark never goes down), so memory is *accounted*: the weights, plus the
  bytes autograd keeps for backward (:class:`SavedBytes`, distinct storages, weights excluded),
  plus gradients and the two AdamW moments of the trainable tensors. That is what lives at the
  peak of a step, exactly and repeatably; allocator overheads and short-lived temporaries are not
  in it. ``memory_increase`` is the part above the base model's inference footprint (its weights
  on CPU; its peak during a no-grad forward on CUDA).
* **train step**: median wall time of full AdamW steps (forward, backward, clipping, update:
  :func:`peftlab.loop.step`) after one warm-up step; throughput is ``batch / median``. The
  optimizers run at a learning rate of 0 (:data:`PROFILE_LR`): the update costs what training's
  does, and moves nothing.
* **inference latency**: the median no-grad forward of the adapted model, unmerged, over the
  base model's. Merged: a merged adapter's layers run exactly the path of layers with no active
  adapter, so one timing of the model with none active (not merged: it shares the weights) is
  every mergeable method's. Full fine-tuning's model runs the base model's own code: its ratio
  is 1 and is not timed.

Every timing is a ratio to a base-model forward timed right before it, so that a change in the
machine's load cancels; the seconds reported are those ratios times the base forward's median
over the whole run. Full fine-tuning is timed first, in rounds of its own; then the adapter
methods in rounds, every method once per round (a base forward, its forward, its step), the
order rotating each round. The methods share the weights: full fine-tuning trains the caller's
tensors themselves, and the adapter methods are all attached to one copy of the model's modules
over those tensors. A profile's memory is therefore the model's, full fine-tuning's gradients
and AdamW moments while it is timed (freed before the adapters are added), and the adapters'
own small tensors, never a copy of the weights. The model is left as it was: weights, their
``requires_grad`` flags and gradients (tested).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.loop import adapter_loss, step

if TYPE_CHECKING:
    from peftlab.data import Split

#: Methods measured by :func:`measure_method`, besides the adapter presets of ``peftlab.train``.
FULL = "full"
FUSION = "fusion"
#: What fusion members are in measurements (and in ``peftlab compare``): the AdapterFusion
#: paper's Pfeiffer adapters.
FUSION_MEMBER_METHOD = "pfeiffer"


class SavedBytes:
    """Bytes of the distinct non-parameter storages autograd saves for backward, collected by
    ``torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)`` around a forward."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.params:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One method's costs on one model and batch shape; see the module docstring."""

    method: str
    trainable_parameters: int  # the adapter's own (every weight for full fine-tuning)
    head_parameters: int  # trained along (the task head), counted apart
    base_parameters: int
    base_bytes: int  # the base model's weights
    file_bytes: int  # per task on disk, head excluded
    weight_bytes: int  # the adapted model's weights in memory
    train_memory_bytes: int
    memory_increase_bytes: int  # over the base model's inference footprint
    step_seconds: float  # median train step
    examples_per_second: float
    latency_ratio: float  # unmerged forward / base forward
    merged_latency_ratio: float | None  # None: the method cannot merge
    mergeable: bool
    base_forward_seconds: float
    batch_size: int
    length: int
    memory_source: str  # "autograd accounting" (CPU) or "cuda peak"
    members: int = 0  # fusion: how many adapters it fuses

    @property
    def percent_of_base(self) -> float:
        return 100.0 * self.trainable_parameters / self.base_parameters

    @property
    def deploy_latency_ratio(self) -> float:
        """Inference cost as served: merged where possible (full fine-tuning is a plain model)."""
        return self.merged_latency_ratio if self.merged_latency_ratio is not None else self.latency_ratio

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["percent_of_base"] = self.percent_of_base
        d["deploy_latency_ratio"] = self.deploy_latency_ratio
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---- small measuring tools --------------------------------------------------------------------
def tensor_bytes(tensors: Iterator[torch.Tensor] | Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def adapter_file_bytes(adapters: Any, name: str) -> int:
    """Bytes on disk of adapter ``name`` saved without its head (config and weights)."""
    with tempfile.TemporaryDirectory(prefix="peftlab-size-") as tmp:
        path = adapters.save(name, Path(tmp) / "adapter", extras=())
        return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with the device's queued work finished on both ends."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def synthetic_batch(vocab_size: int, batch_size: int, length: int, num_labels: int = 2,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids of fixed shape (for profiling without data)."""
    g = torch.Generator().manual_seed(seed)
    low = min(1000, max(vocab_size // 4, 1))
    ids = torch.randint(low, vocab_size, (batch_size, length), generator=g)
    labels = (torch.rand(batch_size, generator=g) * 5 if num_labels == 1
              else torch.randint(0, max(num_labels, 2), (batch_size,), generator=g))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def data_batch(split: Split, task: str, tokenizer: Any, batch_size: int,
               length: int) -> dict[str, torch.Tensor]:
    """``batch_size`` examples of ``split`` (repeated if too few), tokenised for ``task`` as
    training does and padded to exactly ``length`` tokens (per-token labels with -100)."""
    from peftlab.data import tokenize
    from peftlab.train import collator

    rows = split.rows
    index = [i % len(rows) for i in range(batch_size)]
    picked = rows.take(index) if hasattr(rows, "take") else [rows[i] for i in index]
    encoded, _ = tokenize(dataclasses.replace(split, rows=picked), tokenizer, task, length)
    batch = dict(collator(tokenizer, task)(list(encoded)))
    pad = {"input_ids": tokenizer.pad_token_id or 0, "labels": -100}
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for key, value in batch.items():
        if value.dim() == 2 and value.shape[1] < length:
            widths = (length - value.shape[1], 0) if left else (0, length - value.shape[1])
            batch[key] = torch.nn.functional.pad(value, widths, value=pad.get(key, 0))
    return batch


# ---- setting a method up ----------------------------------------------------------------------
def prepare(model: nn.Module, method: str, heads: Sequence[str] = (), members: int = 2,
            config: Any = None) -> tuple[str | None, list[nn.Parameter]]:
    """Make ``model`` ready to train ``method`` (an adapter preset of :mod:`peftlab.train`,
    ``full`` or ``fusion``); ``config`` overrides the preset. A fusion gets ``members`` fresh
    Pfeiffer adapters. Returns the adapter's name (``None`` for full fine-tuning) and the
    trainable parameters, heads included."""
    from peftlab.adapter_set import attach
    from peftlab.train import method_config

    if method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        return None, list(model.parameters())
    adapters = attach(model)
    if method == FUSION:
        if members < 1:
            raise ValueError(f"a fusion needs at least one member, got {members}")
        names = [f"member{i}" for i in range(members)]
        for n in names:
            adapters.add(n, method_config(FUSION_MEMBER_METHOD))
        adapters.add_fusion(FUSION, names, config)
        name = FUSION
    else:
        name = method
        adapters.add(name, config if config is not None else method_config(method))
    adapters.activate(name)
    return name, adapters.train(name, extras=tuple(heads))


# ---- the measurement --------------------------------------------------------------------------
#: The profile's optimizers move nothing: every tensor of the update is computed (the step costs
#: what training's does; torch's AdamW has no shortcut for a zero rate), but ``p - 0 · update``
#: is ``p`` exactly, so the methods can train on the caller's own tensors, shared, with no copy.
PROFILE_LR = 0.0


@dataclasses.dataclass
class _Setup:
    """One method ready to train, and its timings so far. Adapter methods share one model (the
    work model, every adapter attached); full fine-tuning trains the plain model itself."""

    method: str
    model: nn.Module
    name: str | None
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    counts: dict[str, Any]
    saved_bytes: int
    step_ratios: list[float] = dataclasses.field(default_factory=list)  # step / base forward
    forward_ratios: list[float] = dataclasses.field(default_factory=list)  # forward / base forward
    cuda_extra: int = 0  # CUDA: the most a step allocated above what was there before it

    def arm(self, train: bool) -> None:
        """Make the model this method's: its adapter alone active, exactly its tensors trainable
        (the other methods share them and set them their way), in training or eval mode."""
        mine = {id(p) for p in self.params}
        if self.name is not None:
            from peftlab.adapter_set import attach

            attach(self.model).activate(self.name)
        for p in self.model.parameters():
            p.requires_grad_(id(p) in mine)
        self.model.train(train)


def _counts(model: nn.Module, method: str, name: str | None, params: list[nn.Parameter],
            heads: Sequence[str], weight_bytes: int) -> dict[str, Any]:
    """Parameter counts and sizes: exact, from the tensors (file size from a save)."""
    head_ids = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
    counts: dict[str, Any] = {
        "trainable_parameters": sum(p.numel() for p in params if method == FULL or id(p) not in head_ids),
        "head_parameters": 0 if method == FULL else sum(p.numel() for p in params if id(p) in head_ids),
        "weight_bytes": weight_bytes,
        "trainable_bytes": tensor_bytes(params),
    }
    if name is None:
        counts.update(base_parameters=sum(p.numel() for p in model.parameters()), mergeable=False,
                      file_bytes=tensor_bytes(list(model.state_dict().values())))
    else:
        from peftlab.adapter_set import attach

        adapters = attach(model)
        counts.update(base_parameters=adapters.base_parameters(),
                      file_bytes=adapter_file_bytes(adapters, name),
                      mergeable=bool(adapters.config(name).mergeable))
    return counts


def _setup(model: nn.Module, method: str, batch: dict[str, torch.Tensor], heads: Sequence[str],
           members: int, base_bytes: int) -> _Setup:
    """Add ``method`` to ``model`` (the work model; the plain one for full fine-tuning), count
    it, and take the warm-up step, which also collects the tensors saved for backward."""
    before = tensor_bytes(list(model.parameters()))
    name, params = prepare(model, method, heads, members)
    # The weights of a model with this method alone: the base's plus what the method added
    # (a fusion's members included), whatever other methods the work model holds.
    weight_bytes = base_bytes + tensor_bytes(list(model.parameters())) - before
    counts = _counts(model, method, name, params, heads, weight_bytes)
    optimizer = torch.optim.AdamW(params, lr=PROFILE_LR, weight_decay=0.0)
    s = _Setup(method, model, name, params, optimizer, counts, 0)
    s.arm(train=True)
    saved = SavedBytes(model)

    def loss_saving() -> torch.Tensor:  # the forward pass, with what it saves for backward counted
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            return adapter_loss(model, name, batch)

    # The warm-up step: allocates the optimizer state, pays for lazy set-up.
    step(loss_saving, params, optimizer)
    s.saved_bytes = saved.total
    return s


def _shared_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base``'s modules over ``base``'s own tensors (parameters and buffers): adapters
    attached to it leave ``base`` as it was, and it costs no weights. Nothing it trains moves
    (:data:`PROFILE_LR`)."""
    memo: dict[int, Any] = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo)


class _Untouched:
    """Gives the tensors of ``model`` back their ``requires_grad`` flags and gradients on exit:
    the profile sets both on tensors it shares with the caller's model."""

    def __init__(self, model: nn.Module) -> None:
        self.state = [(p, p.requires_grad, p.grad) for p in model.parameters()]

    def __enter__(self) -> _Untouched:
        return self

    def __exit__(self, *exc: object) -> None:
        for p, flag, grad in self.state:
            p.requires_grad_(flag)
            p.grad = grad


def _step(s: _Setup, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """One timed training step (and, on CUDA, the memory it took above what was allocated): the
    update of :func:`peftlab.loop.step` that training makes. Not :func:`peftlab.loop.fit`: steps
    are timed one at a time, each next to a base forward, with no schedule or data loading."""
    cuda = device.type == "cuda"
    s.arm(train=True)
    if cuda:
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    loss_of = functools.partial(adapter_loss, s.model, s.name, batch)
    seconds = timed(lambda: step(loss_of, s.params, s.optimizer), device)
    if cuda:
        s.cuda_extra = max(s.cuda_extra, torch.cuda.max_memory_allocated(device) - before)
    return seconds


class _Forwards:
    """No-grad forwards timed alike: each sample repeats the forward until it lasts
    ``min_sample`` seconds (one forward of a small model is too short to time)."""

    def __init__(self, base: nn.Module, inputs: dict[str, torch.Tensor], device: torch.device,
                 min_sample: float = 0.02) -> None:
        self.base, self.inputs, self.device = base, inputs, device
        self.repeat = 1
        once = min(self.time(base) for _ in range(2))
        self.repeat = max(1, min(1000, math.ceil(min_sample / max(once, 1e-6))))
        self.base_times: list[float] = []

    @torch.no_grad()
    def time(self, model: nn.Module) -> float:
        model.eval()
        return timed(lambda: [model(**self.inputs) for _ in range(self.repeat)], self.device) / self.repeat

    def of_base(self) -> float:
        t = self.time(self.base)
        self.base_times.append(t)
        return t


def _round(setups: Sequence[_Setup], forwards: _Forwards, batch: dict[str, torch.Tensor],
           device: torch.device, work: nn.Module | None) -> float | None:
    """One round: for each method a base forward, then the method's forward and train step, both
    as ratios to that base forward. ``work``: the work model with no adapter active, the path a
    merged adapter's layers take, timed the same way (its ratio is returned)."""
    for s in setups:
        base = forwards.of_base()
        if s.name is not None:  # full fine-tuning's model is the base's own code: its ratio is 1
            s.arm(train=False)
            s.forward_ratios.append(forwards.time(s.model) / base)
        s.step_ratios.append(_step(s, batch, device) / base)
    if work is None:
        return None
    from peftlab.adapter_set import attach

    attach(work).activate()
    base = forwards.of_base()
    return forwards.time(work) / base


def measure_methods(base: nn.Module, methods: Sequence[str], batch: dict[str, torch.Tensor],
                    heads: Sequence[str] = (), *, members: int = 2, steps: int = 3,
                    device: str | torch.device | None = None,
                    on_done: Callable[[Measurement], None] | None = None) -> dict[str, Measurement]:
    """Measure ``methods`` on ``base`` (a model with a task head, e.g. from
    :func:`peftlab.train.load_model`; it is left as it was, but on ``device``) with ``batch``
    (inputs and labels of a fixed shape); ``heads``: the head modules trained along; a fusion
    fuses ``members`` fresh Pfeiffer adapters. ``device`` defaults to CUDA when available.

    After each method's warm-up step, ``steps`` rounds time every method in turn (the order
    rotating each round), each forward and step as a ratio to a base forward timed right before
    it (see the module docstring). ``on_done`` is called with each result at the end."""
    methods = list(dict.fromkeys(methods))  # each once: they share one model
    if not methods:
        return {}
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    base.to(device)  # the profile's models are copies of its modules over its very tensors
    with _Untouched(base):
        run, results = _measure(base, methods, batch, heads, members, max(steps, 1), device)
    out = {}
    for method in methods:
        out[method] = _measurement(method, run, results[method], members if method == FUSION else 0)
        if on_done is not None:
            on_done(out[method])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


@dataclasses.dataclass(frozen=True)
class _Timed:
    """What the run keeps of a method once the models are gone."""

    counts: dict[str, Any]
    saved_bytes: int
    cuda_extra: int
    step_ratio: float  # median train step over the base forward timed right before it
    latency: float  # median forward over the same base forward (1: full fine-tuning's is the base's)


def _measure(base: nn.Module, methods: Sequence[str], batch: dict[str, torch.Tensor],
             heads: Sequence[str], members: int, rounds: int,
             device: torch.device) -> tuple[dict[str, Any], dict[str, _Timed]]:
    """The run behind :func:`measure_methods`: what holds for every method (base forward,
    merged path, base footprint) and each method's own results.

    Full fine-tuning is set up and timed first, in rounds of its own, and its optimizer state is
    freed before any adapter is added: its gradients and two AdamW moments (three times the
    weights) are then never in the heap beside the adapters' many small tensors, which fragment
    it. MiniLM-L6 at 8 × 64 (measured under load): peak RSS 1.05 GB this way, 1.18 GB with full
    fine-tuning in the adapters' rounds."""
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = _shared_copy(base)  # the base forward's model, and full fine-tuning's
    base_bytes = tensor_bytes(list(base.parameters()))
    run: dict[str, Any] = {"base_bytes": base_bytes, "batch": batch, "cuda": device.type == "cuda",
                           "base_footprint": _footprint(plain, inputs, base_bytes, device)}
    forwards = _Forwards(plain, inputs, device)
    results = {}
    if FULL in methods:
        full = _setup(plain, FULL, batch, heads, members, base_bytes)
        _rounds([full], forwards, batch, device, rounds)
        results[FULL] = _result(full)
        del full
    adapters = [m for m in methods if m != FULL]
    if adapters:
        work = _shared_copy(base)
        setups = [_setup(work, m, batch, heads, members, base_bytes) for m in adapters]
        mergeable = any(s.counts["mergeable"] for s in setups)
        merged = _rounds(setups, forwards, batch, device, rounds, work if mergeable else None)
        run["merged"] = statistics.median(merged) if merged else None
        results.update((s.method, _result(s)) for s in setups)
        del setups, work
        gc.collect()  # the work model holds reference cycles (model <-> AdapterSet): free it now
    # Ratios were timed against base forwards right before them; the median base forward over
    # the whole run turns them back into seconds.
    run["base_forward"] = statistics.median(forwards.base_times)
    return run, results


def _rounds(setups: list[_Setup], forwards: _Forwards, batch: dict[str, torch.Tensor],
            device: torch.device, rounds: int, merged_path: nn.Module | None = None) -> list[float]:
    """``rounds`` rounds over ``setups`` (:func:`_round`), the order rotating so that no method
    always follows the same one; the merged path's ratios."""
    merged = []
    for r in range(rounds):
        k = r % len(setups)
        ratio = _round(setups[k:] + setups[:k], forwards, batch, device, merged_path)
        if ratio is not None:
            merged.append(ratio)
    return merged


def _result(s: _Setup) -> _Timed:
    s.optimizer.state.clear()
    return _Timed(s.counts, s.saved_bytes, s.cuda_extra, statistics.median(s.step_ratios),
                  statistics.median(s.forward_ratios) if s.forward_ratios else 1.0)


def _footprint(plain: nn.Module, inputs: dict[str, torch.Tensor], base_bytes: int,
               device: torch.device) -> int:
    """The base model's inference footprint: its weights, plus on CUDA the peak of a no-grad
    forward (on CPU a no-grad forward frees its activations layer by layer)."""
    if device.type != "cuda":
        return base_bytes
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        plain.eval()(**inputs)
    return torch.cuda.max_memory_allocated(device) - before + base_bytes


def _measurement(method: str, run: dict[str, Any], t: _Timed, members: int) -> Measurement:
    c = t.counts
    state = 2 * c["trainable_bytes"]  # the AdamW moments
    if run["cuda"]:
        train_memory = c["weight_bytes"] + state + t.cuda_extra
    else:
        train_memory = c["weight_bytes"] + t.saved_bytes + state + c["trainable_bytes"]  # + gradients
    batch = run["batch"]
    base_fwd = run["base_forward"]
    step_seconds = t.step_ratio * base_fwd
    return Measurement(
        method=method, trainable_parameters=c["trainable_parameters"],
        head_parameters=c["head_parameters"], base_parameters=c["base_parameters"],
        base_bytes=run["base_bytes"], file_bytes=c["file_bytes"], weight_bytes=c["weight_bytes"],
        train_memory_bytes=int(train_memory),
        memory_increase_bytes=int(train_memory - run["base_footprint"]),
        step_seconds=step_seconds, examples_per_second=len(batch["input_ids"]) / step_seconds,
        latency_ratio=t.latency, merged_latency_ratio=run.get("merged") if c["mergeable"] else None,
        mergeable=bool(c["mergeable"]), base_forward_seconds=base_fwd,
        batch_size=len(batch["input_ids"]), length=int(batch["input_ids"].shape[1]),
        memory_source="cuda peak" if run["cuda"] else "autograd accounting", members=members)


def measure_method(base: nn.Module, method: str, batch: dict[str, torch.Tensor],
                   heads: Sequence[str] = (), **kwargs: Any) -> Measurement:
    """:func:`measure_methods` for one method."""
    return measure_methods(base, [method], batch, heads, **kwargs)[method]


def peak_rss_bytes() -> int | None:
    """The process's resident-set high-water mark (Linux/macOS), for the record."""
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except (ImportError, OSError):
        return None
