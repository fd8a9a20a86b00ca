"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

The adapted weight is split into a magnitude per output feature and a direction, and LoRA
updates the direction::

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_r          (‖·‖_r: L2 norm of each row of [out, in])
    h  = W'·x + b = c ⊙ (W0·x + s·B·A·x) + b,        c = m / ‖W0 + s·B·A‖_r  ∈ R^out

(the paper's "column norm" is this row norm in its [in, out] notation; peft takes
``linalg.norm(W, dim=1)`` of [out, in]). ``A``, ``B``, ``s`` are LoRA's (:mod:`.lora`). Init as
in the paper and peft: ``A`` Kaiming-uniform, ``B`` zeros, ``m = ‖W0‖_r``, so ``c = 1`` and a new
adapter leaves the model unchanged. Trainable parameters per adapted matrix: ``r·(in + out) +
out``, LoRA's plus one magnitude per output feature (peft's count for the same config).

The norm is a constant in backward (detached, paper §4.3), as in peft: it saves the memory of
differentiating through it at a negligible quality cost. The bias is not rescaled (peft adds
``(c − 1)·(h − b)``, not ``(c − 1)·h``).

**Norm without forming W0 + s·B·A.** Row by row,
``‖W0 + s·B·A‖² = ‖W0‖² + 2s·Σ(W0·Aᵀ ⊙ B) + s²·Σ(B·(A·Aᵀ) ⊙ B)``: one ``[out, r]`` product
``W0·Aᵀ`` (O(out·in·r), the FLOPs of forming ``B·A``), ``A·Aᵀ`` ([r, r]) and one read of ``W0``
for ``‖W0‖²``, so no [out, in] temporary is allocated (on a 4096² LLaMA projection that is
64 MB per layer and step that peft's ``W0 + s·lora_weight`` allocates). It is exact algebra,
recomputed from the live weight every forward (no cached ‖W0‖, which a merge of another adapter
or ``model.to`` would make stale). It loses precision only where the row nearly vanishes
(``s·B·A ≈ −W0``), which training does not approach; the sum is clamped at 0 before the root.

**One autograd node (the fast path).** When DoRA is the only piece running on a frozen
Linear/Conv1D, ``fused_linear`` computes ``c ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b`` in one node
(:class:`_DoRALinear`): one GEMM over ``x`` for ``W0`` (the layer's own; peft reuses it too when
dropout is off, at the price of several elementwise passes that autograd records), the rank-r
update added in place, and ``c`` applied where it costs least: folded into the rows of ``W0`` and
``B`` ([out, in], so the GEMMs apply it and add the bias) when the batch has at least ``in``
tokens, as in training; onto the [tokens, out] output otherwise.
Backward saves ``x`` and ``x·Aᵀ`` as LoRA does, and keeps the output ``h``, which the attention
that consumes it saves anyway; ``∂m`` uses ``W0·x + s·B·A·x = (h − b)/c``, exact while no ``c``
is 0 (a model that scales ``h`` in place, as Longformer does its query, gets it recomputed).
Everything else uses plain autograd (:meth:`DoRA.add_delta`), which needs ``W0·x`` of its own:
another GEMM. That is the case with adapter dropout while training, where peft also rescales
``W0·dropout(x)`` (not the layer's ``W0·x``) and we do the same, with other adapters on the
layer (DoRA then rescales ``W0·x`` of the weight alone, not what the others add), with a
trainable base weight (which then gets its gradient through the rescaling too; before
``train()`` freezes the base this includes inference), and under autocast.

**Merge** is ``W ← c ⊙ (W + s·B·A)`` with ``c`` from the weight before the merge, kept to
unmerge: ``W ← W / c − s·B·A`` (as peft does), exact up to float rounding. A magnitude of 0 (or a
row of ``W0 + s·B·A`` that is 0) would erase the row for good, so such an adapter is not merged.
The norm is taken of the weight as the layer holds it, so while a DoRA runs unmerged no other
adapter is merged into (or out of) that weight (:meth:`AdapterSet.merge` refuses).

On a fused projection (GPT-2's ``c_attn`` with query+value) A and B are LoRA's per-role ones and
``m`` covers the targeted features only (``c = 1`` elsewhere); peft's format holds it as a DoRA of
the whole module whose untargeted features keep ``m = ‖W0‖``. Routed experts' 3-D parameters
are refused (peft's DoRA does not reach them either). Per-example routing (``route``) works, also
where peft refuses ``adapter_names`` with DoRA.

Defaults are peft's ``LoraConfig(use_dora=True)``: ``r=8``, ``alpha=8``, no dropout, query and
value (peftlab's LoRA preset uses ``alpha=16``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import TargetError
from peftlab.interop.codec import Expected, Fields, Shapes, Tensors
from peftlab.layer import BaseLayer, Piece, _not_a_view
from peftlab.methods import Method, Preset
from peftlab.methods.lora import LoRA, LoRAConfig, LoRAPeft
from peftlab.sites import Site

if TYPE_CHECKING:
    from peftlab.adapter_set import Adapter


@dataclasses.dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """``r``: rank; ``alpha``: scale numerator (s = α/r); ``dropout`` on the update's input;
    ``targets``: roles or module regexes; ``rslora``: s = α/√r. Defaults are peft's."""

    method = "dora"
    mergeable = True

    alpha: float = 8.0


def row_norms(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """``‖W + s·B·A‖`` of each row of ``weight [out, in]`` without forming ``W + s·B·A`` (see the
    module docstring) and without gradient; summed in float32 at least (bf16 weights lose too
    much in the three-term sum otherwise)."""
    with torch.no_grad():
        acc = torch.promote_types(weight.dtype, torch.float32)
        w2 = torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()
        a, b = A.to(acc), B.to(acc)
        cross = ((weight @ A.t()).to(acc) * b).sum(1)
        own = ((b @ (a @ a.t())) * b).sum(1)
        return (w2 + (2 * s) * cross + (s * s) * own).clamp_min(0).sqrt()


class DoRA(LoRA):
    """DoRA at one Linear site; see the module docstring. ``lora_A``/``lora_B`` are LoRA's,
    ``magnitude`` is ``m`` over the targeted output features."""

    kind = "delta"
    reads_weight = True

    def __init__(self, config: DoRAConfig, site: Site, base: BaseLayer) -> None:
        super().__init__(config, site)
        self.base = base  # a plain object: the base's tensors stay registered where the model has them
        index = site.out_index
        if index is not None:
            self.register_buffer("index", index, False)
        # m = ‖W0 + s·B·A‖ with B = 0, by the norm forward uses, so that c = m/‖·‖ is exactly 1.
        norms = row_norms(base.weight, self.lora_A.detach(), self.full_B().detach(), self.scaling)
        self.magnitude = nn.Parameter(norms if index is None else norms[index])
        # c at the time of the merge, to unmerge with (the weight then holds the merge)
        self.register_buffer("merged_factor", None, False)

    def factor(self) -> torch.Tensor:
        """``c = m / ‖W0 + s·B·A‖`` over all output features (1 on untargeted ones), with the
        gradient to ``m`` only (the norm is detached)."""
        norms = row_norms(self.base.weight, self.lora_A.detach(), self.full_B().detach(), self.scaling)
        if self.sliced:
            norms = norms[self.index]
        # A zero norm (an all-zero row) gives c = 0 rather than NaN: the row then stays 0.
        c = self.magnitude / norms.clamp_min(torch.finfo(norms.dtype).tiny).to(self.magnitude.dtype)
        if not self.sliced:
            return c
        return torch.ones(self.out_features, dtype=c.dtype, device=c.device).index_copy(0, self.index, c)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + (c − 1)·W0·x' + c·s·B·A·x'`` with ``x' = dropout(x)``, exactly peft's (which also
        rescales ``W0·dropout(x)`` when dropout is on, not the layer's ``W0·x``)."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, True)
        c = self.factor().to(y.dtype)
        wx = F.linear(x, self.base.live_weight)
        update = F.linear(F.linear(x, self.lora_A), self.full_B()) * self.scaling
        return y + (c - 1) * wx + c * update

    def fused_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """``c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`` in one autograd node for a frozen ``weight``;
        ``None`` while adapter dropout is on (peft's dropout path needs ``W·dropout(x)``)."""
        if self.dropout and self.training:
            return None
        return _DoRALinear.apply(x, weight, bias, self.lora_A, self.full_B(), self.scaling,
                                 self.factor().to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        """``W' − W0`` as ``[out, in]`` (for inspection; merging uses :meth:`merge_into`)."""
        w = self.base.weight
        return self.factor().to(w.dtype)[:, None] * (w + super().delta_weight()) - w

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: int) -> None:
        update = super().delta_weight().to(weight.dtype)
        if sign > 0:
            c = self.factor().detach().to(weight.dtype)
            weight.add_(update).mul_(c[:, None])
            self.merged_factor = c
        else:
            weight.div_(self.merged_factor[:, None]).sub_(update)
            self.merged_factor = None

    def merge_problem(self) -> str | None:
        c = self.factor().detach()
        if bool((c == 0).any()) or not bool(torch.isfinite(c).all()):
            return ("some output features have a magnitude of 0 (or a zero row of W + s·B·A), so "
                    "merging would erase those rows of the weight for good")
        return None


class _DoRALinear(torch.autograd.Function):
    """``h = c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`` with ``W`` frozen and ``c`` (from ``m``, the norm
    detached) an input of this node. Saves LoRA's ``x`` and ``x·Aᵀ`` and keeps the output ``h``
    (whose storage the consumer saves anyway): ``∂c = Σ g ⊙ (h − b) / c``, or ``Σ g ⊙ (x·Wᵀ +
    s·(x·Aᵀ)·Bᵀ)`` recomputed when the model changed ``h`` in place; the other gradients are
    LoRA's with ``g`` replaced by ``g ⊙ c``.

    ``c`` goes where it is cheapest: into the rows of ``W`` and ``B`` (``c ⊙ W`` is [out, in])
    when the batch has at least ``in`` tokens, so that the GEMMs apply it and add the bias, and
    no pass over the [tokens, out] activations or their gradient is added to LoRA's; onto the
    output (and ``g``) otherwise, for small batches and wide inputs."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, s, c):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        xa = F.linear(x2, A)
        ctx.fold = x2.shape[0] >= x2.shape[1]
        if ctx.fold:
            h = F.linear(x, weight * c[:, None], bias)
            h.view(-1, h.shape[-1]).addmm_(xa, (B * c[:, None]).t(), alpha=s)
        else:
            h = F.linear(x, weight)
            h2 = h.view(-1, h.shape[-1])  # a view, so the in-place steps below write ``h``
            h2.addmm_(xa, B.t(), alpha=s).mul_(c)
            if bias is not None:
                h2.add_(bias)
        h = _not_a_view(h)
        ctx.save_for_backward(x, xa, weight, bias, A, B, c)
        ctx.s = s
        # The output, for ∂c, kept as an alias rather than saved: a model that scales it in place
        # (Longformer's query) would make a saved output fail backward; backward then sees the
        # alias's version moved and recomputes instead. (Detached: no reference cycle to this node.)
        ctx.out = h.detach() if ctx.needs_input_grad[6] else None
        ctx.out_version = h._version
        return h

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, xa, weight, bias, A, B, c = ctx.saved_tensors
        out, ctx.out = ctx.out, None  # freed now, not when the graph goes (a retained graph recomputes)
        need_x, _, need_bias, need_A, need_B, _, need_c = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.fold:  # g·(c ⊙ W) and g·(c ⊙ B): c scales the small matrices, not g
            gw, w, b = g2, weight * c[:, None], B * c[:, None]
        else:
            gw, w, b = g2 * c, weight, B
        gb = (gw @ b).mul_(ctx.s)  # ∂(x·Aᵀ), scaled
        grad_x = grad_bias = grad_A = grad_B = grad_c = None
        if need_x:
            grad_x = (gw @ w).addmm_(gb, A).view(x.shape)
        if need_A:
            grad_A = gb.t() @ x.reshape(-1, x.shape[-1])
        if need_B:
            grad_B = (xa.t() @ gw).t().mul_(c[:, None] * ctx.s if ctx.fold else ctx.s)
        if need_c and out is not None and out._version == ctx.out_version:
            z = out.reshape(-1, out.shape[-1])  # c ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b
            z = (z - bias) if bias is not None else z.clone()
            tiny = torch.finfo(c.dtype).tiny
            grad_c = z.mul_(g2).sum(0) / torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
        elif need_c:  # the output was changed in place: x·Wᵀ + s·(x·Aᵀ)·Bᵀ once more
            z = F.linear(x.reshape(-1, x.shape[-1]), weight).addmm_(xa, B.t(), alpha=ctx.s)
            grad_c = z.mul_(g2).sum(0)
        if need_bias:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, None, grad_c


def build(config: DoRAConfig, site: Site, base: BaseLayer, shared: nn.Module | None = None) -> Piece:
    if site.num_experts is not None:  # the registry refuses these first (experts=False)
        raise TargetError(f"DoRA does not adapt routed experts' 3-D parameters ({site.module})")
    return DoRA(config, site, base)


# ---- peft's format ----------------------------------------------------------------------------
class DoRAPeft(LoRAPeft):
    """peft's ``LORA`` with ``use_dora``: LoRA's tensors plus ``<module>.lora_magnitude_vector``
    ``[out]``. A DoRA on part of a fused projection is exported as one over the whole module,
    whose untargeted features get ``m = ‖W0‖`` (and B = 0), so that they stay as they are."""

    config_keys = LoRAPeft.config_keys | {"use_dora"}
    suffixes = (*LoRAPeft.suffixes, ".lora_magnitude_vector")
    target_parameters = False  # peft refuses DoRA on target_parameters
    config_type = DoRAConfig

    def accepts(self, data: Mapping[str, Any]) -> bool:
        return data.get("peft_type") == self.peft_type and bool(data.get("use_dora"))

    def export(self, adapter: Adapter, keys: Mapping[str, str]) -> tuple[Fields, Tensors]:
        fields, tensors = super().export(adapter, keys)
        fields["use_dora"] = True
        for module, piece in adapter.pieces.items():
            assert isinstance(piece, DoRA)
            m = piece.magnitude.detach()
            if piece.sliced:
                full = torch.linalg.vector_norm(piece.base.weight, dim=1).to(m.dtype)
                m = full.index_copy(0, piece.index, m)
            tensors[keys.get(module, module) + self.suffixes[2]] = m
        return fields, tensors

    def config(self, data: Mapping[str, Any], modules: list[str], shapes: Shapes,
               keys: Mapping[str, str], tensor_shapes: Shapes) -> tuple[LoRAConfig, Expected]:
        config, expected = super().config(data, modules, shapes, keys, tensor_shapes)
        for m in modules:
            expected[keys[m] + self.suffixes[2]] = (shapes[m][0],)
        return config, expected

    def load(self, pieces: Mapping[str, Piece], tensors: Mapping[str, torch.Tensor],
             keys: Mapping[str, str]) -> None:
        super().load(pieces, tensors, keys)
        with torch.no_grad():
            for module, piece in pieces.items():
                piece.magnitude.copy_(tensors[keys[module] + self.suffixes[2]])


METHOD = Method(
    DoRAConfig, build, peft=DoRAPeft(),
    # lr: the paper (arXiv 2402.09353) gives no rate for encoder classification; DoRA trains
    # LoRA's A and B, plus m, which starts at ‖W0‖ and so moves relatively little, so it gets
    # LoRA's default: AdapterHub's best LoRA rate (arXiv 2311.11077).
    # quality: the paper reports gains over LoRA (+3.7 points on LLaMA-7B commonsense), but
    # peft's own MetaMathQA benchmark (Llama-3.2-3B) did not reproduce one (DoRA 46.9 vs LoRA
    # 47.8), so the prior is LoRA's (-0.3) until measured.
    presets=(Preset("dora", DoRAConfig, lr=5e-4, quality=-0.3,
                    about="low-rank update of the direction plus a learned magnitude per output, "
                          "mergeable"),),
)
