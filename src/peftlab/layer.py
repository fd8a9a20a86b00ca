"""The wrapped layer: one base projection plus the named adapter pieces that act on it.

Every targeted module is wrapped once, however many adapters use it. A piece is one adapter's part
at one layer and is one of four kinds, applied in this fixed order::

    y = l_out ⊙ base(l_in ⊙ x)            "scale" pieces ((IA)³): vectors folded into the weight
    y = y + Σ s·B·A·(l_in ⊙ x)            "delta" pieces (LoRA): low-rank updates of the weight
    y = post_k(... post_1(y))             "post" pieces (bottleneck, Compacter), in
                                           activation order, each seeing the previous one's output
    y = fusion(y, [z_1 … z_N])            "fusion" pieces: z_n is y with member piece n applied
                                           (see :mod:`peftlab.methods.fusion`; over bottleneck
                                           members the z_n are never formed)

Scale and delta pieces change the linear map itself, so they can be merged into the weight;
post and fusion pieces cannot.

Per-example routing (:meth:`AdapterSet.route`) is a per-thread plan, looked up by the layer in
forward: it splits the batch into groups of examples that use the same pieces here and runs each
group with its own pieces. Being thread-local, two threads can route one model differently.

Products of weights alone (a Compacter's Kronecker sums, a fusion's query-key products) are
computed in every forward, since training changes the weights between forwards. A server that
changes no weight between requests keeps them instead (:class:`WeightCache`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.errors import AdapterStateError

# "sequence": a sequence-level adapter (prompt, prefix tuning; :mod:`peftlab.sequence`) kept in
# the input embeddings' wrapper, which never runs it: the model's pre-hook does.
PieceKind = Literal["scale", "delta", "post", "fusion", "sequence"]


def is_linear_like(module: nn.Module) -> bool:
    """Modules peftlab can wrap: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, (nn.Linear, Conv1D))


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]``; for ``Conv1D`` (stored ``[in, out]``) a transposed view."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


class BaseLayer:
    """What a piece may read of the layer it adapts: the frozen weight as ``[out, in]`` (``[E, out,
    in]`` for routed experts' 3-D parameter) and the bias, both detached. Read-only by contract:
    a piece never writes them (merging goes through :meth:`Piece.merge_into`).

    It holds the module, not its tensors, and reads them on every access, so it follows
    ``model.to(...)``, merges of other adapters, and ``copy.deepcopy`` of the model (the copied
    view points at the copied module). It is a plain object, not a submodule: the base's
    parameters stay registered once, where the model has them."""

    def __init__(self, module: nn.Module, param: str | None = None, transposed: bool = False,
                 bias: str | None = None) -> None:
        self.module = module
        self.param = param  # a 3-D expert parameter of ``module``, by name
        self.transposed = transposed  # that parameter is stored [E, in, out]
        self.bias_name = bias

    @property
    def weight(self) -> torch.Tensor:
        return self.live_weight.detach()

    @property
    def live_weight(self) -> torch.Tensor:
        """:attr:`weight` not detached, for a piece whose output contains ``W·x`` itself (DoRA
        rescales it), so that a trainable base weight gets its whole gradient. Read-only too."""
        if self.param is None:
            return weight_out_in(self.module)
        w = getattr(self.module, self.param)
        return w.transpose(1, 2) if self.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        name = "bias" if self.param is None else self.bias_name
        b = getattr(self.module, name, None) if name else None
        return None if b is None else b.detach()

    @property
    def in_features(self) -> int:
        return self.weight.shape[-1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]


class Piece(nn.Module):
    """One adapter's part at one wrapped layer. Subclasses set ``kind`` and implement the hook
    of that kind: ``scales`` (scale), ``add_delta`` (delta), ``forward(y)`` (post) or
    ``forward(h, z)`` and ``over_bottlenecks(h, members)`` (fusion, with ``members`` naming the
    adapters it fuses)."""

    kind: ClassVar[PieceKind] = "post"
    #: Whether what the piece computes depends on the base weight it adapts (DoRA's norms), so
    #: that merging another adapter into that weight, or out of it, under the piece would change
    #: its output; :meth:`AdapterSet.merge` refuses that while the piece runs unmerged.
    reads_weight: ClassVar[bool] = False

    def scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(l_in over the input features, l_out over the output features); ``None`` = ones."""
        raise NotImplementedError

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` plus this piece's update computed from the layer input ``x``."""
        raise NotImplementedError

    def fused_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """Optional: the frozen projection and this delta in one step, or ``None``."""
        return None

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: int) -> None:
        """Add (sign=1) or remove (sign=-1) this piece from ``weight [out, in]`` in place."""
        raise AdapterStateError(f"{type(self).__name__} cannot be merged into the weights")

    def merge_problem(self) -> str | None:
        """Why merging this piece now could not be undone exactly, or ``None`` when it can."""
        return None

    def projections(self) -> Projections | None:
        """For a post piece that computes ``y + up(f(down(y)))``: its two projections and ``f``,
        so that a fusion can run its members' projections together; ``None`` for other pieces."""
        return None


class Projections(NamedTuple):
    """A bottleneck ``y + W_up·f(W_down·y + b_down) + b_up``: ``down [m, d]``, ``down_bias [m]``,
    ``activation`` (a name in :data:`peftlab.methods.bottleneck.ACTIVATIONS`), ``up [d, m]``,
    ``up_bias [d]``."""

    down: torch.Tensor
    down_bias: torch.Tensor
    activation: str
    up: torch.Tensor
    up_bias: torch.Tensor


class _ScaledLinear(torch.autograd.Function):
    """``y = l_out ⊙ (W·(l_in ⊙ x) + b)`` with a frozen ``W``, computed as one GEMM with a scaled
    weight. Backward saves no activation of its own beyond ``x`` (for ``l_in``) and the output
    ``y`` (for ``l_out``); the output is usually saved by the attention that consumes it anyway,
    so keeping it costs nothing. The vectors' gradients use ``y / l_out = W·(l_in ⊙ x) + b``
    and ``Σ x ⊙ ∂x / l_in``, which are exact while no scale is zero.

    A model that changes ``y`` (or ``x``) in place after the forward (Longformer's query) leaves
    nothing to take the scale's gradient from: backward says so and what to do instead.
    Recomputing ``y`` would mean keeping ``x`` for every layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, l_in, l_out):  # type: ignore[override]
        w = _scaled_weight(weight, l_in, l_out)
        b = bias * l_out if bias is not None and l_out is not None else bias
        y = _not_a_view(F.linear(x, w, b))
        ctx.save_for_backward(
            x if l_in is not None and ctx.needs_input_grad[3] else None,
            y if l_out is not None and ctx.needs_input_grad[4] else None,
            weight, l_in, l_out,
        )
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        try:
            x, y, weight, l_in, l_out = ctx.saved_tensors
        except RuntimeError as e:  # autograd's version check on what was saved
            if "modified by an inplace operation" not in str(e):
                raise
            raise AdapterStateError(
                "the model changed the input or output of a layer that (IA)³ scales in place after "
                "the forward, so the scale's gradient cannot be taken from it; scale that module's "
                "input instead (scale_input) if it is the output that changes, or leave the module "
                "out of the targets") from None
        need_x, _, _, need_in, need_out = ctx.needs_input_grad
        # Everything on 2-D, contiguous rows. A key's gradient arrives transposed from the
        # attention: flattening copies it once, as a plain Linear's backward does, after which
        # the product is one GEMM (not a batched one over a broadcast weight) and the vector's
        # gradient one pass (not a product in the transposed layout and a copy of it).
        g2 = g.reshape(-1, g.shape[-1])
        gx = g_in = g_out = None
        if need_x or need_in:
            gx = g2.mm(_scaled_weight(weight, l_in, l_out))
        if need_in:
            g_in = (x.reshape(gx.shape) * gx).sum(0).div_(_nonzero(l_in))
        if need_out:
            g_out = (g2 * y.reshape(g2.shape)).sum(0).div_(_nonzero(l_out))
        return gx.view(*g.shape[:-1], -1) if need_x else None, None, None, g_in, g_out


def _not_a_view(y: torch.Tensor) -> torch.Tensor:
    """``y`` as a tensor of its own: ``F.linear`` returns a 3-D input's output with a bias as a
    view of a 2-D result, and a custom autograd node whose output is a view forbids changing it
    in place (which Longformer does to its query). ``detach`` gives the same storage, no view."""
    return y.detach() if y._base is not None else y


def _scaled_weight(weight: torch.Tensor, l_in: torch.Tensor | None, l_out: torch.Tensor | None):
    if l_out is not None:
        weight = weight * l_out[:, None]
    if l_in is not None:
        weight = weight * l_in
    return weight


def _nonzero(v: torch.Tensor) -> torch.Tensor:
    # A scale of exactly zero has no recoverable gradient; a tiny stand-in keeps it finite.
    tiny = torch.finfo(v.dtype).tiny
    return torch.where(v.abs() < tiny, torch.full_like(v, tiny), v)


def _vectors(scale: tuple[Piece, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The product of the scale pieces' ``l_in`` and of their ``l_out`` (``None``: all ones)."""
    if not scale:
        return None, None
    ins, outs = zip(*(p.scales() for p in scale))
    return (_product([v for v in ins if v is not None]),
            _product([v for v in outs if v is not None]))


def _rows_scaled(t: torch.Tensor, rows: torch.Tensor, vectors: list[torch.Tensor | None]) -> torch.Tensor:
    """``t`` with each example's features multiplied by the vector of its group (``rows``: each
    example's group; a ``None`` vector: ones)."""
    if all(v is None for v in vectors):
        return t
    ones = t.new_ones(t.shape[-1])
    table = torch.stack([ones if v is None else v.to(t.dtype) for v in vectors])
    return t * table.index_select(0, rows).view(t.shape[0], *(1,) * (t.dim() - 2), t.shape[-1])


def _product(vectors: list[torch.Tensor]) -> torch.Tensor | None:
    out = None
    for v in vectors:
        out = v if out is None else out * v
    return out


class AdaptedLayer(nn.Module):
    """A linear-like ``base`` module and the adapter pieces that act on it, by adapter name."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []  # merge order, so that unmerge can go in reverse
        self._scale: tuple[Piece, ...] = ()
        self._delta: tuple[Piece, ...] = ()
        self._post: tuple[Piece, ...] = ()
        self._fusion: tuple[tuple[Piece, tuple[Piece | None, ...]], ...] = ()

    # Model code sometimes reads a projection's weight directly (T5 checks ``wo.weight.dtype``).
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return weight_out_in(self.base).shape[1]

    @property
    def out_features(self) -> int:
        return weight_out_in(self.base).shape[0]

    def set_active(self, names: tuple[str, ...]) -> None:
        """Run these adapters (in this order) in forward; merged ones are already in the weight."""
        self._scale, self._delta, self._post, self._fusion = self.resolve(names)

    def resolve(self, names: tuple[str, ...]) -> Active:
        """The pieces that run here when ``names`` are active. Members of an active fusion run
        inside it only; a member with no piece here is ``None`` (its output is the input)."""
        live = [self.adapters[n] for n in names if n in self.adapters and n not in self.merged]
        if not live:
            return Active()
        fused = {self.adapters[m] for p in live if p.kind == "fusion" for m in p.members
                 if m in self.adapters}
        pieces = [p for p in live if p not in fused]
        return Active(
            tuple(p for p in pieces if p.kind == "scale"),
            tuple(p for p in pieces if p.kind == "delta"),
            tuple(p for p in pieces if p.kind == "post"),
            tuple((p, tuple(self.adapters[m] if m in self.adapters else None for m in p.members))
                  for p in pieces if p.kind == "fusion"),
        )

    @property
    def active_pieces(self) -> tuple[Piece, ...]:
        return self._scale + self._delta + self._post + tuple(f for f, _ in self._fusion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = getattr(_ROUTES, "plans", {}).get(id(self))
        if plan is not None:
            return self._routed(x, plan)
        return self._run(x, self._scale, self._delta, self._post, self._fusion)

    def _run(self, x, scale, delta, post, fusion) -> torch.Tensor:
        l_in, l_out = _vectors(scale)
        if scale:
            y = self._scaled(x, l_in, l_out)
        else:
            # One LoRA alone on a frozen projection: base and update in one autograd node.
            y = (delta[0].fused_linear(x, weight_out_in(self.base), self.base.bias)
                 if len(delta) == 1 and not fusion and self._fast_path() else None)
            if y is not None:
                return self._post_pieces(y, post)
            y = self.base(x)
        return self._after_base(y, x, l_in, l_out, delta, post, fusion)

    def _after_base(self, y, x, l_in, l_out, delta, post, fusion) -> torch.Tensor:
        """The delta, post and fusion pieces on ``y``, the (scaled) base output for input ``x``
        (on one CPU thread inside :func:`serial_pieces`)."""
        serial = (delta or post or fusion) and getattr(_PIECES, "serial", False)
        threads = torch.get_num_threads() if serial else 1
        if threads == 1:
            return self._pieces(y, x, l_in, l_out, delta, post, fusion)
        torch.set_num_threads(1)
        try:
            return self._pieces(y, x, l_in, l_out, delta, post, fusion)
        finally:
            torch.set_num_threads(threads)

    def _pieces(self, y, x, l_in, l_out, delta, post, fusion) -> torch.Tensor:
        base_out = y
        if delta:
            xs = x if l_in is None else x * l_in
            for p in delta:
                y = p.add_delta(y, xs)
        y = self._post_pieces(y, post)
        for f, members in fusion:
            fused = f.over_bottlenecks(y, members)  # the members' outputs never formed
            if fused is None:
                z = [self._member_output(m, y, x, l_in, l_out, base_out) for m in members]
                fused = f(y, torch.stack(z, dim=-2))
            y = fused
        return y

    def _member_output(self, m: Piece | None, h, x, l_in, l_out, base_out) -> torch.Tensor:
        """``h`` with the fusion member ``m`` applied (``h`` itself when it has no piece here)."""
        if m is None:
            return h
        if m.kind == "post":
            return m(h)
        if m.kind == "delta":
            return m.add_delta(h, x if l_in is None else x * l_in)
        m_in, m_out = m.scales()  # the member's vectors join the active ones
        scaled = self._scaled(x, _product([v for v in (l_in, m_in) if v is not None]),
                              _product([v for v in (l_out, m_out) if v is not None]))
        # h + (what the member changes); when nothing else changed the output, exactly ``scaled``
        return scaled if h is base_out else h + (scaled - base_out)

    def plan_route(self, entries: list[tuple[str, ...]], device: torch.device,
                   indexes: dict[Any, Any] | None = None) -> RoutePlan:
        """Group the examples (one tuple of adapter names each) by the pieces they run here.
        ``indexes``: index tensors already made for other layers, by grouping (many layers group a
        batch alike), to reuse and add to."""
        pieces = {names: self.resolve(names) for names in dict.fromkeys(entries)}
        groups: dict[Active, list[int]] = {}
        for i, names in enumerate(entries):
            groups.setdefault(pieces[names], []).append(i)
        if len(groups) == 1:
            return RoutePlan(len(entries), ((None, next(iter(groups))),), None)
        key = (tuple(map(tuple, groups.values())), device)
        made = None if indexes is None else indexes.get(key)
        if made is None:
            rows = [0] * len(entries)
            for g, ix in enumerate(groups.values()):
                for i in ix:
                    rows[i] = g
            made = ([torch.tensor(ix, device=device) for ix in groups.values()],
                    torch.tensor(rows, device=device))
            if indexes is not None:
                indexes[key] = made
        return RoutePlan(len(entries), tuple(zip(made[0], groups)), made[1])

    def _routed(self, x: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
        """The batch through its groups' pieces. The frozen projection runs once for the whole
        batch, with each example's (IA)³ input vector applied to its rows of ``x``; the rest (the
        output vector, delta, post and fusion pieces) runs group by group on the group's rows,
        which are then written over the base output's. A mixed batch so costs one large product
        plus the small pieces of each group that has any here, not one product per group."""
        if x.shape[0] != plan.batch:
            raise AdapterStateError(
                f"routing was set for {plan.batch} examples, but a layer got a batch of "
                f"{x.shape[0]} (the model must keep the batch as the first dimension)")
        if plan.rows is None:
            return self._run(x, *plan.groups[0][1])
        vectors = [_vectors(active.scale) for _, active in plan.groups]
        y = self.base(_rows_scaled(x, plan.rows, [l_in for l_in, _ in vectors]))
        changed = []
        for (ix, active), (l_in, l_out) in zip(plan.groups, vectors):
            if l_out is None and not (active.delta or active.post or active.fusion):
                continue  # nothing more to do here: these rows keep the base output
            y_g = y.index_select(0, ix)
            x_g = x.index_select(0, ix) if active.delta or active.fusion else None
            changed.append((ix, self._after_base(y_g if l_out is None else y_g * l_out, x_g, l_in, l_out,
                                                 active.delta, active.post, active.fusion)))
        dtype = functools.reduce(torch.promote_types, [out.dtype for _, out in changed], y.dtype)
        # Written in place unless autograd may need y as it is (or the pieces promoted the dtype).
        out = y if dtype == y.dtype and not torch.is_grad_enabled() else y.to(dtype, copy=True)
        for ix, rows in changed:
            out.index_copy_(0, ix, rows.to(dtype))
        return out

    @staticmethod
    def _post_pieces(y: torch.Tensor, post: tuple[Piece, ...]) -> torch.Tensor:
        for p in post:
            y = p(y)
        return y

    def _fast_path(self) -> bool:
        """Whether the custom autograd functions apply: a frozen Linear/Conv1D, no autocast
        (they compute in the input's dtype)."""
        return (is_linear_like(self.base) and not self.base.weight.requires_grad
                and not torch.is_autocast_enabled(self.base.weight.device.type))

    def _scaled(self, x, l_in, l_out):
        if self._fast_path():
            return _ScaledLinear.apply(x, weight_out_in(self.base), self.base.bias, l_in, l_out)
        y = self.base(x if l_in is None else x * l_in)  # trainable or unusual base: plain autograd
        return y if l_out is None else y * l_out

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (see :meth:`AdapterSet.merge`)."""
        with torch.no_grad():
            self.adapters[name].merge_into(weight_out_in(self.base), self.base.bias, +1)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        """Undo :meth:`merge`; only the most recently merged adapter of this layer can go."""
        if name not in self.merged:
            raise AdapterStateError(f"adapter {name!r} is not merged at this layer")
        if self.merged[-1] != name:
            raise AdapterStateError(
                f"adapter {name!r} must be unmerged after {self.merged[self.merged.index(name) + 1:]}"
                " (unmerge in the reverse order of merging)"
            )
        with torch.no_grad():
            self.adapters[name].merge_into(weight_out_in(self.base), self.base.bias, -1)
        self.merged.pop()


class Active(NamedTuple):
    """The pieces a layer runs, by kind; fusions come with their members' pieces here."""

    scale: tuple[Piece, ...] = ()
    delta: tuple[Piece, ...] = ()
    post: tuple[Piece, ...] = ()
    fusion: tuple[tuple[Piece, tuple[Piece | None, ...]], ...] = ()


class RoutePlan(NamedTuple):
    """One layer's routing: groups of examples (index tensors; ``None``: all of them) and the
    pieces each runs; ``rows`` gives each example's group (``None`` when there is one group)."""

    batch: int
    groups: tuple[tuple[torch.Tensor | None, Active], ...]
    rows: torch.Tensor | None


_ROUTES = threading.local()


@contextlib.contextmanager
def routing(plans: dict[int, RoutePlan]) -> Iterator[None]:
    """Route this thread's forwards through ``plans`` (by ``id`` of the layer) while inside."""
    with _for_this_thread(_ROUTES, "plans", {**getattr(_ROUTES, "plans", {}), **plans}, {}):
        yield


@contextlib.contextmanager
def _for_this_thread(store: threading.local, name: str, value: Any, default: Any) -> Iterator[None]:
    """``store.name`` is ``value`` on this thread while inside, and what it was (or ``default``)
    after."""
    previous = getattr(store, name, default)
    setattr(store, name, value)
    try:
        yield
    finally:
        setattr(store, name, previous)


class WeightCache:
    """Products of weights alone, kept between forwards while :func:`cached_weights` is active
    and no gradient is recorded. The owner promises to :meth:`clear` it whenever a weight changes
    (``peftlab serve`` does on every load and unload); as a second guard an entry is recomputed
    when any weight it was made from was replaced or changed in place (its version counter)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, Any], tuple[tuple[torch.Tensor, ...], tuple[int, ...], Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, key: tuple[int, Any], sources: tuple[torch.Tensor, ...], compute: Callable[[], Any]) -> Any:
        versions = tuple(t._version for t in sources)
        hit = self._entries.get(key)
        if (hit is not None and len(hit[0]) == len(sources)
                and all(a is b for a, b in zip(hit[0], sources)) and hit[1] == versions):
            return hit[2]
        value = compute()
        self._entries[key] = (sources, versions, value)
        return value


_WEIGHTS = threading.local()
_PIECES = threading.local()


@contextlib.contextmanager
def serial_pieces() -> Iterator[None]:
    """Run the adapter pieces of this thread's forwards (the small products after each frozen
    projection) on one CPU thread while inside; the frozen projections keep torch's threads.
    Split over threads, a product of a few rows costs more CPU than it saves, a mixed batch runs
    many of them, and a server shares its cores with the HTTP side (benchmarks/RESULTS.md,
    session 8). It sets torch's thread count around the pieces, which for MKL is process-wide:
    meant for a process whose forwards run on one thread, as ``peftlab serve``'s do."""
    with _for_this_thread(_PIECES, "serial", True, False):
        yield


@contextlib.contextmanager
def cached_weights(cache: WeightCache) -> Iterator[None]:
    """Let this thread's forwards keep weight products in ``cache`` while inside."""
    with _for_this_thread(_WEIGHTS, "cache", cache, None):
        yield


def weight_product(owner: nn.Module, key: Any, sources: Iterable[torch.Tensor],
                   compute: Callable[[], Any]) -> Any:
    """``compute()``, which must depend on the tensors ``sources`` alone: computed afresh, or
    kept in the active :class:`WeightCache` under ``(owner, key)`` while gradients are off."""
    cache = getattr(_WEIGHTS, "cache", None)
    if cache is None or torch.is_grad_enabled():
        return compute()
    return cache.get((id(owner), key), tuple(sources), compute)
