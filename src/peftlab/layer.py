"""The wrapped layer: one base projection plus the named adapter pieces that act on it.

Every targeted module is wrapped once, however many adapters use it. A piece is one adapter's part
at one layer and is one of three kinds, applied in this fixed order::

    y = l_out ⊙ base(l_in ⊙ x)            "scale" pieces ((IA)³): vectors folded into the weight
    y = y + Σ s·B·A·(l_in ⊙ x)            "delta" pieces (LoRA): low-rank updates of the weight
    y = post_k(... post_1(y))             "post" pieces (bottleneck, Compacter, fusion), in
                                           activation order, each seeing the previous one's output

Scale and delta pieces change the linear map itself, so they can be merged into the weight;
post pieces cannot.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.errors import AdapterStateError

PieceKind = Literal["scale", "delta", "post"]


def is_linear_like(module: nn.Module) -> bool:
    """Modules peftlab can wrap: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, (nn.Linear, Conv1D))


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]``; for ``Conv1D`` (stored ``[in, out]``) a transposed view."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


class Piece(nn.Module):
    """One adapter's part at one wrapped layer. Subclasses set ``kind`` and implement the hook
    of that kind: ``scales`` (scale), ``add_delta`` (delta) or ``forward`` (post)."""

    kind: ClassVar[PieceKind] = "post"

    def scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(l_in over the input features, l_out over the output features); ``None`` = ones."""
        raise NotImplementedError

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` plus this piece's update computed from the layer input ``x``."""
        raise NotImplementedError

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: int) -> None:
        """Add (sign=1) or remove (sign=-1) this piece from ``weight [out, in]`` in place."""
        raise AdapterStateError(f"{type(self).__name__} cannot be merged into the weights")


class _ScaledLinear(torch.autograd.Function):
    """``y = l_out ⊙ (W·(l_in ⊙ x) + b)`` with a frozen ``W``, computed as one GEMM with a scaled
    weight. Backward saves no activation of its own beyond ``x`` (for ``l_in``) and the output
    ``y`` (for ``l_out``); the output is usually saved by the attention that consumes it anyway,
    so keeping it costs nothing. The vectors' gradients use ``y / l_out = W·(l_in ⊙ x) + b``
    and ``Σ x ⊙ ∂x / l_in``, which are exact while no scale is zero."""

    @staticmethod
    def forward(ctx, x, weight, bias, l_in, l_out):  # type: ignore[override]
        w = _scaled_weight(weight, l_in, l_out)
        b = bias * l_out if bias is not None and l_out is not None else bias
        y = F.linear(x, w, b)
        ctx.save_for_backward(
            x if l_in is not None and ctx.needs_input_grad[3] else None,
            y if l_out is not None and ctx.needs_input_grad[4] else None,
            weight, l_in, l_out,
        )
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, y, weight, l_in, l_out = ctx.saved_tensors
        need_x, _, _, need_in, need_out = ctx.needs_input_grad
        gx = g_in = g_out = None
        if need_x or need_in:
            gx = g.matmul(_scaled_weight(weight, l_in, l_out))
        if need_in:
            g_in = (x * gx).reshape(-1, x.shape[-1]).sum(0) / _nonzero(l_in)
        if need_out:
            g_out = (g * y).reshape(-1, y.shape[-1]).sum(0) / _nonzero(l_out)
        return gx if need_x else None, None, None, g_in, g_out


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
        pieces = [self.adapters[n] for n in names if n in self.adapters and n not in self.merged]
        self._scale = tuple(p for p in pieces if p.kind == "scale")
        self._delta = tuple(p for p in pieces if p.kind == "delta")
        self._post = tuple(p for p in pieces if p.kind == "post")

    @property
    def active_pieces(self) -> tuple[Piece, ...]:
        return self._scale + self._delta + self._post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l_in = l_out = None
        if self._scale:
            ins, outs = zip(*(p.scales() for p in self._scale))
            l_in = _product([v for v in ins if v is not None])
            l_out = _product([v for v in outs if v is not None])
            y = self._scaled(x, l_in, l_out)
        else:
            y = self.base(x)
        if self._delta:
            xs = x if l_in is None else x * l_in
            for p in self._delta:
                y = p.add_delta(y, xs)
        for p in self._post:
            y = p(y)
        return y

    def _scaled(self, x, l_in, l_out):
        weight = weight_out_in(self.base)
        if is_linear_like(self.base) and not weight.requires_grad:
            return _ScaledLinear.apply(x, weight, self.base.bias, l_in, l_out)
        y = self.base(x if l_in is None else x * l_in)  # trainable or unusual base: plain autograd
        return y if l_out is None else y * l_out

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (see :meth:`AdapterSet.merge`)."""
        with torch.no_grad():
            self.adapters[name].merge_into(weight_out_in(self.base), self.base.bias, +1)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        """Undo :meth:`merge`; only the most recently merged adapter of this layer can go."""
        if not self.merged or self.merged[-1] != name:
            raise AdapterStateError(
                f"adapter {name!r} must be unmerged after {self.merged[self.merged.index(name) + 1:]}"
                " (unmerge in the reverse order of merging)"
            )
        with torch.no_grad():
            self.adapters[name].merge_into(weight_out_in(self.base), self.base.bias, -1)
        self.merged.pop()
