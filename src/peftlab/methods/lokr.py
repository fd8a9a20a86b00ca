"""LoKr: a Kronecker product of two small factors (LyCORIS, Yeh et al. 2023, arXiv 2309.14859;
as implemented in HF peft's ``LOKR``).

    h = W0·x + ΔW·x,   ΔW = s·(W1 ⊗ W2),   W1 ∈ R^{a×c},  W2 ∈ R^{b×d},   out = a·b,  in = c·d,
    s = α/r   (also when both factors are full matrices, as peft does)

``(a, b) = factorization(out)`` and ``(c, d) = factorization(in)`` (peft's rule, below): two factors
near the square root, the smaller first; with ``decompose_factor = f > 0`` dividing the dimension
the split is ``(f, dim/f)``. ``W2`` is the low-rank product ``W2a·W2b`` (``[b, r]·[r, d]``) when
``r < max(b, d)/2``, a full matrix otherwise; ``W1`` is ``W1a·W1b`` only when ``decompose_both`` and
``r < max(a, c)/2``. Trainable parameters per adapted matrix: ``|W1| + |W2|`` with ``|W1| = a·c``
or ``r·(a + c)``, ``|W2| = b·d`` or ``r·(b + d)`` (bert-base 768×768, r=8: ``24·24 + 8·(32 + 32)
= 1,088``).

Init as peft's (``init_weights=True``): ``W1`` (or ``W1a``) zeros, the other factors Kaiming-uniform
with a=√5, so a new adapter leaves the model unchanged. Mergeable: merging adds ``ΔW`` to ``W0``,
unmerging subtracts it.

Forward never builds ``ΔW``: with ``X = x`` viewed as ``[c, d]``, ``(W1 ⊗ W2)·vec(X) = vec(W1·X·W2ᵀ)``
(row-major), two small matrix products costing ``N·b·c·(a + d)`` multiply-adds for N tokens
instead of peft's ``a·b·c·d·(N + 1)`` (a ``[out, in]`` product per step, then a full GEMM).
Its backward keeps only ``x`` (which the base layer keeps anyway) and the factors, and recomputes
the small intermediates. ``tests/test_loha_lokr.py`` checks it equals ``x·(W1 ⊗ W2)ᵀ``, gradients
included.

Training-time regularisers, as peft (not in the paper): ``rank_dropout`` drops whole output rows
of ``ΔW`` (one draw per forward), rescaling the kept rows only with ``rank_dropout_scale``;
``module_dropout`` skips the whole update with probability p per forward.

Like LoHa (:mod:`peftlab.methods.loha`), LoKr acts on a whole matrix: targets picking some roles of
a fused projection are refused, and adapters on transformers' ``Conv1D`` (GPT-2) cannot be exported
to peft, whose LoKr adapts ``nn.Linear`` only. peft's ``use_effective_conv2d`` and LyCORIS-style
init (``init_weights="lycoris"``) concern convolutions and a fresh adapter's init; peftlab adapts
no convolutions and always starts as peft's default.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError
from peftlab.layer import BaseLayer, Piece
from peftlab.methods import Method, Preset
from peftlab.methods.loha import LycorisPeft, LycorisPiece, check_rank_and_dropouts
from peftlab.sites import Site


@dataclasses.dataclass(frozen=True)
class LoKrConfig(AdapterConfig):
    """``r``: rank of the factors that are low-rank; ``alpha``: scale numerator (``s = α/r``);
    ``decompose_both``: make ``W1`` low-rank too; ``decompose_factor``: split each dimension as
    ``(f, dim/f)`` when f divides it (-1: near the square root); ``rank_dropout`` (rescaled only
    with ``rank_dropout_scale``) and ``module_dropout``: training only; ``targets``: roles or module
    regexes. Defaults are peft's."""

    method = "lokr"
    mergeable = True

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    targets: tuple[str, ...] = ("query", "value")

    def validate(self) -> None:
        check_rank_and_dropouts(self)
        if self.decompose_factor != -1 and self.decompose_factor < 1:
            raise ConfigError(f"decompose_factor must be -1 (near the square root) or a positive "
                              f"integer, got {self.decompose_factor}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Two integers whose product is ``dimension``: ``(factor, dimension/factor)`` when ``factor``
    divides it, else the pair with the smallest sum whose smaller member is at most ``factor``
    (any, for -1), smaller first. LyCORIS' rule, copied by peft; 768 -> (24, 32), 127 -> (1, 127)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n  # as in LyCORIS: the first pair's sum, never updated
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lokr_shapes(config: LoKrConfig, out_features: int, in_features: int) -> dict[str, tuple[int, int]]:
    """The parameters a LoKr of ``config`` has at an ``[out, in]`` matrix, by peft's names."""
    a, b = factorization(out_features, config.decompose_factor)
    c, d = factorization(in_features, config.decompose_factor)
    r = config.r
    shapes: dict[str, tuple[int, int]] = {}
    if config.decompose_both and r < max(a, c) / 2:
        shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
    else:
        shapes["lokr_w1"] = (a, c)
    if r < max(b, d) / 2:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d))
    else:
        shapes["lokr_w2"] = (b, d)
    return shapes


class LoKr(LycorisPiece):
    """LoKr at one site; see the module docstring. Parameters are named as in peft's files."""

    def __init__(self, config: LoKrConfig, site: Site, base: BaseLayer) -> None:
        super().__init__(config, site, base)
        self.rescale_rank_dropout = config.rank_dropout_scale
        for name, shape in lokr_shapes(config, site.out_features, site.in_features).items():
            p = nn.Parameter(torch.empty(shape))
            # peft: W1 (or W1a) starts at zero, so ΔW = 0; every other factor Kaiming-uniform.
            if name in ("lokr_w1", "lokr_w1_a"):
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            self.register_parameter(name, p)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W1 [a, c], W2 [b, d])``, low-rank ones multiplied out (they are small)."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        """``s·(W1 ⊗ W2)`` as ``[out, in]``."""
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scaling

    def apply_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s·(W1 ⊗ W2)·x`` as ``vec(W1·X·W2ᵀ)`` with ``X = x`` viewed as ``[c, d]``."""
        w1, w2 = self.factors()
        return _KronLinear.apply(x, w1, w2, self.scaling)


class _KronLinear(torch.autograd.Function):
    """``y = vec(s·W1·X·W2ᵀ)`` for ``X = x`` viewed as ``[N, c, d]``. Backward saves ``x`` (which the
    base layer keeps anyway) and the small factors only, and recomputes the ``[N, c, b]`` and
    ``[N, a, d]`` intermediates: plain autograd would keep one of them per adapted layer, an extra
    activation about the size of the layer's output."""

    @staticmethod
    def forward(ctx, x, w1, w2, s):  # type: ignore[override]
        (a, c), (b, d) = w1.shape, w2.shape
        xs = x.reshape(-1, c, d)
        t = torch.einsum("ncd,bd->ncb", xs, w2)
        y = torch.einsum("ac,ncb->nab", w1 * s, t)
        ctx.save_for_backward(x, w1, w2)
        ctx.s = s
        return y.reshape(*x.shape[:-1], a * b)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_w2, _ = ctx.needs_input_grad
        (a, c), (b, d) = w1.shape, w2.shape
        # Under autocast the forward ran in lower precision and backward does not: one dtype for
        # all (autograd casts each gradient back to its input's dtype).
        dtype = torch.promote_types(g.dtype, w1.dtype)
        w1, w2 = w1.to(dtype), w2.to(dtype)
        s, w1s = ctx.s, w1 * ctx.s
        gs = g.reshape(-1, a, b).to(dtype)
        xs = x.reshape(-1, c, d).to(dtype)
        grad_x = grad_w1 = grad_w2 = None
        if need_x:  # ∂X[n] = s·W1ᵀ·G[n]·W2
            grad_x = torch.einsum("ac,nad->ncd", w1s, torch.einsum("nab,bd->nad", gs, w2)).reshape(x.shape)
        if need_w1:  # ∂W1 = s·Σ_n G[n]·(X[n]·W2ᵀ)ᵀ
            grad_w1 = torch.einsum("nab,ncb->ac", gs, torch.einsum("ncd,bd->ncb", xs, w2)) * s
        if need_w2:  # ∂W2 = Σ_n G[n]ᵀ·(s·W1·X[n])
            grad_w2 = torch.einsum("nab,nad->bd", gs, torch.einsum("ac,ncd->nad", w1s, xs))
        return grad_x, grad_w1, grad_w2, None


def build(config: LoKrConfig, site: Site, base: BaseLayer, shared: nn.Module | None = None) -> Piece:
    return LoKr(config, site, base)


class LoKrPeft(LycorisPeft):
    """peft's ``LOKR``: ``<module>.lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, and ``lokr_w2`` or
    ``lokr_w2_a``/``lokr_w2_b`` (which ones follow from r, ``decompose_both`` and
    ``decompose_factor``, so the shapes are checked against what the config gives), scaled by
    ``alpha/r``. Files with ``lokr_t2`` (effective Conv2d) are refused."""

    peft_type = "LOKR"
    config_class = LoKrConfig
    extra_fields = ("decompose_both", "decompose_factor", "rank_dropout_scale")
    config_keys = frozenset({
        "r", "alpha", "rank_dropout", "module_dropout", "init_weights", "use_effective_conv2d",
        "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", *extra_fields,
    })
    suffixes = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b")

    def shapes(self, config: Any, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return dict(lokr_shapes(config, out_features, in_features))


METHOD = Method(
    LoKrConfig, build, peft=LoKrPeft(),
    # lr: the LyCORIS paper tunes Stable Diffusion only; its guidelines (docs/Guidelines.md) train
    # LoKr at LoRA-like rates, so LoRA's 5e-4 (AdapterHub, arXiv 2311.11077). quality: no GLUE
    # result in the LyCORIS paper; KronA (Edalati et al., arXiv 2212.10650), the same Kronecker
    # update, reports GLUE close to full fine-tuning on T5-base; LoRA's prior minus 0.5 for the
    # thinner evidence.
    presets=(Preset("lokr", LoKrConfig, lr=5e-4, quality=-0.8,
                    about="Kronecker product of two small factors, mergeable"),),
)
