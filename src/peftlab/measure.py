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
  :func:`peftlab.loop.step`) after one warm-up step; throughput is ``batch / median``.
* **inference latency**: the median no-grad forward of the adapted model, unmerged, and merged
  when the method can merge, over the base model's median forward.

Each method is timed as ratios to the base model's no-grad forward, timed right next to it (a
base forward before each train step; forwards alternating with the base's), so that a change in
the machine's load cancels; the seconds reported are those ratios times the base forward's
median over the whole run. One method is measured at a time, on its own copy of the model (the
copies share the frozen tensors), and the copy is freed before the next: the memory a profile
needs is the base model's plus one method's.
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
from typing import Any

import torch
from torch import nn

from peftlab.loop import adapter_loss, step

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


def data_batch(rows: Sequence[dict[str, Any]], tokenizer: Any, batch_size: int,
               length: int) -> dict[str, torch.Tensor]:
    """``batch_size`` rows (repeated if too few) tokenised and padded to exactly ``length``."""
    rows = [rows[i % len(rows)] for i in range(batch_size)]
    texts = [r["text"] for r in rows]
    pairs = [r.get("text_pair") for r in rows]
    enc = tokenizer(texts, *([pairs] if pairs[0] is not None else []), truncation=True,
                    max_length=length, padding="max_length", return_tensors="pt")
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = [r["label"] for r in rows]
    batch["labels"] = torch.tensor(labels, dtype=torch.float if isinstance(labels[0], float) else torch.long)
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
@dataclasses.dataclass
class _Setup:
    """One method ready to train on its own copy of the model, and what is known of it so far."""

    method: str
    model: nn.Module
    name: str | None
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    counts: dict[str, Any]
    saved_bytes: int
    times: list[float] = dataclasses.field(default_factory=list)
    cuda_extra: int = 0  # CUDA: the most a step allocated above what was there before it


def _setup(base: nn.Module, method: str, batch: dict[str, torch.Tensor], heads: Sequence[str],
           members: int, device: torch.device) -> _Setup:
    """Copy, prepare, count, and take the warm-up step (which also collects the saved tensors)."""
    model = _copy(base, share_frozen=method != FULL, heads=heads).to(device)
    name, params = prepare(model, method, heads, members)
    head_ids = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
    counts: dict[str, Any] = {
        "trainable_parameters": sum(p.numel() for p in params if method == FULL or id(p) not in head_ids),
        "head_parameters": 0 if method == FULL else sum(p.numel() for p in params if id(p) in head_ids),
        "weight_bytes": tensor_bytes(list(model.parameters())),
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
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    saved = SavedBytes(model)

    def loss_saving() -> torch.Tensor:  # the forward pass, with what it saves for backward counted
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            return adapter_loss(model, name, batch)

    # The warm-up step: allocates the optimizer state, pays for lazy set-up.
    step(loss_saving, params, optimizer)
    return _Setup(method, model, name, params, optimizer, counts, saved.total)


def _copy(base: nn.Module, share_frozen: bool, heads: Sequence[str] = ()) -> nn.Module:
    """A copy of ``base`` to train one method on. With ``share_frozen`` every tensor but the
    heads' is the base's own (an adapter method never changes them, and the measurement never
    merges), so eight methods cost one model's weights rather than eight."""
    if not share_frozen:
        return copy.deepcopy(base)
    own = {id(p) for h in heads for p in base.get_submodule(h).parameters()}
    memo: dict[int, Any] = {id(t): t for t in (*base.parameters(), *base.buffers()) if id(t) not in own}
    return copy.deepcopy(base, memo)


def _step(s: _Setup, batch: dict[str, torch.Tensor], device: torch.device) -> None:
    """One timed training step (and, on CUDA, the memory it took above what was allocated): the
    update of :func:`peftlab.loop.step` that training makes. Not :func:`peftlab.loop.fit`: steps
    are timed one at a time, each after a base forward, with no schedule or data loading."""
    cuda = device.type == "cuda"
    if cuda:
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    loss_of = functools.partial(adapter_loss, s.model, s.name, batch)
    s.times.append(timed(lambda: step(loss_of, s.params, s.optimizer), device))
    if cuda:
        s.cuda_extra = max(s.cuda_extra, torch.cuda.max_memory_allocated(device) - before)


@torch.no_grad()
def _latencies(models: dict[str, nn.Module], base: nn.Module, inputs: dict[str, torch.Tensor],
               rounds: int, device: torch.device, min_sample: float = 0.02) -> tuple[dict[str, float], float]:
    """Each model's no-grad forward over the base model's, and the base's median forward.

    Each round times the base, every model in turn, then the base again; a model's ratio for
    the round is over the mean of the two base times, and the result is the median over
    rounds, so that load that changes between rounds cancels. A sample repeats the forward
    until it lasts ``min_sample`` seconds: one forward of a small model is too short to time."""
    for m in (*models.values(), base):  # warm-up: first calls pay for lazy initialisation
        m.eval()(**inputs)
    once = min(timed(lambda: base(**inputs), device) for _ in range(3))
    repeat = max(1, min(1000, math.ceil(min_sample / max(once, 1e-6))))

    def sample(net: nn.Module) -> float:
        return timed(lambda: [net(**inputs) for _ in range(repeat)], device) / repeat

    ratios: dict[str, list[float]] = {k: [] for k in models}
    base_times = []
    for _ in range(max(rounds, 1)):
        first = sample(base)
        mine = {k: sample(m) for k, m in models.items()}
        last = sample(base)
        base_times += [first, last]
        for k, t in mine.items():
            ratios[k].append(2 * t / (first + last))
    return {k: statistics.median(r) for k, r in ratios.items()}, statistics.median(base_times)


def measure_methods(base: nn.Module, methods: Sequence[str], batch: dict[str, torch.Tensor],
                    heads: Sequence[str] = (), *, members: int = 2, steps: int = 5, forwards: int = 7,
                    device: str | torch.device | None = None,
                    on_done: Callable[[Measurement], None] | None = None) -> dict[str, Measurement]:
    """Measure ``methods`` on copies of ``base`` (a model with a task head, e.g. from
    :func:`peftlab.train.load_model`; it is not changed) with ``batch`` (inputs and labels of a
    fixed shape); ``heads``: the head modules trained along; a fusion fuses ``members`` fresh
    Pfeiffer adapters. ``device`` defaults to CUDA when available.

    Each method is timed against the base model's forward, one method at a time (see the module
    docstring). ``on_done`` is called with each result at the end."""
    if not methods:
        return {}
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base_eval = _copy(base, share_frozen=True).to(device).eval()
    base_bytes = tensor_bytes(list(base.parameters()))
    if cuda:
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            base_eval(**inputs)
        base_footprint = torch.cuda.max_memory_allocated(device) - before + base_bytes
    else:
        base_footprint = base_bytes  # a no-grad forward frees its activations layer by layer

    pending = []
    for method in methods:
        pending.append(_measure_one(base, base_eval, method, batch, inputs, heads, members, steps,
                                    forwards, device))
        gc.collect()  # the copy holds reference cycles (model <-> AdapterSet): free it now
    # Train steps were timed against base forwards taken between them; their median over the
    # whole run turns each method's ratio back into seconds.
    base_fwd = statistics.median(t for p in pending for t in p.base_times)
    out = {}
    for p in pending:
        out[p.method] = _measurement(p, batch, base_bytes, base_footprint, base_fwd,
                                     members if p.method == FUSION else 0, cuda)
        if on_done is not None:
            on_done(out[p.method])
    if cuda:
        torch.cuda.empty_cache()
    return out


def _measurement(p: _Timed, batch: dict[str, torch.Tensor], base_bytes: int, base_footprint: int,
                 base_fwd: float, members: int, cuda: bool) -> Measurement:
    c = p.counts
    state = 2 * c["trainable_bytes"]  # the AdamW moments
    if cuda:
        train_memory = c["weight_bytes"] + state + p.cuda_extra
    else:
        train_memory = c["weight_bytes"] + p.saved_bytes + state + c["trainable_bytes"]  # + gradients
    step_seconds = p.step_ratio * base_fwd
    return Measurement(
        method=p.method, trainable_parameters=c["trainable_parameters"],
        head_parameters=c["head_parameters"], base_parameters=c["base_parameters"],
        base_bytes=base_bytes, file_bytes=c["file_bytes"], weight_bytes=c["weight_bytes"],
        train_memory_bytes=int(train_memory), memory_increase_bytes=int(train_memory - base_footprint),
        step_seconds=step_seconds, examples_per_second=len(batch["input_ids"]) / step_seconds,
        latency_ratio=p.latency, merged_latency_ratio=p.merged_latency,
        mergeable=bool(c["mergeable"]), base_forward_seconds=base_fwd,
        batch_size=len(batch["input_ids"]), length=int(batch["input_ids"].shape[1]),
        memory_source="cuda peak" if cuda else "autograd accounting", members=members)


@dataclasses.dataclass(frozen=True)
class _Timed:
    """What :func:`_measure_one` keeps of a method once its model copy is gone."""

    method: str
    counts: dict[str, Any]
    saved_bytes: int
    cuda_extra: int
    step_ratio: float  # median train step over the base forward timed just before it
    latency: float
    merged_latency: float | None
    base_times: list[float]


def _measure_one(base: nn.Module, base_eval: nn.Module, method: str, batch: dict[str, torch.Tensor],
                 inputs: dict[str, torch.Tensor], heads: Sequence[str], members: int, steps: int,
                 forwards: int, device: torch.device) -> _Timed:
    """One method on its own copy of the model: steps, each right after a base forward, then its
    forwards between base forwards (:func:`_latencies`), merged too where it can merge. Only this
    copy is alive while it is measured, so a profile needs one method's memory, not all of them;
    the ratios to the base, timed next to each other, carry no drift of the machine's load."""
    s = _setup(base, method, batch, heads, members, device)
    ratios, base_times = [], []
    with torch.no_grad():
        base_eval(**inputs)  # warm-up
    for _ in range(max(steps, 1)):
        with torch.no_grad():
            base_times.append(timed(lambda: base_eval(**inputs), device))
        _step(s, batch, device)
        ratios.append(s.times[-1] / base_times[-1])
    s.optimizer.state.clear()  # inference is timed without the training state around
    s.model.eval()
    latency, fwd = _latencies({method: s.model}, base_eval, inputs, forwards, device)
    merged = None
    if s.counts["mergeable"] and s.name is not None:
        from peftlab.adapter_set import attach

        # A merged adapter runs no piece: its layers take exactly the path of layers with no
        # active adapter, timed here without merging (the copies share the base weights).
        attach(s.model).activate()
        merged = _latencies({method: s.model}, base_eval, inputs, forwards, device)[0][method]
    return _Timed(method, s.counts, s.saved_bytes, s.cuda_extra, statistics.median(ratios),
                  latency[method], merged, [*base_times, fwd])


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
