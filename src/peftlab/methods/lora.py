"""LoRA: low-rank adaptation of a frozen projection (Hu et al. 2021, arXiv 2106.09685).

    h = W0·x + s·B·A·dropout(x),   A ∈ R^{r×k}, B ∈ R^{d×r},   s = α/r  (rsLoRA: α/√r)

Init as in the reference code: ``A`` Kaiming-uniform with a=√5, ``B`` zeros, so a new adapter
leaves the model unchanged. Trainable parameters per adapted matrix: ``r·(k + d)``.
Merging adds ``s·B·A`` to ``W0`` (no inference latency); unmerging subtracts it.

On a fused projection (GPT-2's ``c_attn``), each targeted role gets its own ``A`` and ``B`` over
that role's output features only, so ``query``+``value`` on ``c_attn`` cost what they cost on
separate ``q``/``v`` projections. They are stored stacked: ``lora_A`` is ``[parts·r, k]`` and
``lora_B`` is ``[targeted outputs, r]``; the update is computed as one rank ``parts·r`` product.

On a 3-D expert parameter (:mod:`peftlab.experts`) every expert ``e`` gets its own update,
``W_e + s·B_e·A_e``, laid out exactly as HF peft's ``target_parameters`` (``lora.ParamWrapper``), so
parameter counts match peft's and its files map key for key: ``lora_A`` is ``[E·r, in]`` with
``A_e = lora_A[e·r:(e+1)·r]`` and ``lora_B`` is ``[out, r·E]`` with ``B_e = lora_B[:, e::E]`` (rank
index major, expert minor). Trainable parameters: ``E·r·(in + out)``. Like peft, the update is one
rank-r update per expert of the whole targeted rows, also when gate and up of a fused
``gate_up_proj`` are both targeted (one ``B_e`` over both halves, not one per role); dropout is
refused, because an update of the weights cannot see a dropped-out input.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError, TargetError
from peftlab.interop.codec import (
    Expected,
    Fields,
    PeftCodec,
    Shapes,
    Tensors,
    anchored,
    get,
    pattern_value,
    patterns,
)
from peftlab.layer import BaseLayer, Piece, _not_a_view
from peftlab.methods import Method, Preset
from peftlab.sites import Site

if TYPE_CHECKING:
    from peftlab.adapter_set import Adapter


@dataclasses.dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """``r``: rank; ``alpha``: scale numerator; ``dropout`` on the adapter's input;
    ``targets``: roles or module regexes; ``rslora``: scale by α/√r instead of α/r."""

    method = "lora"
    mergeable = True

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")
    rslora: bool = False

    def validate(self) -> None:
        if not 1 <= self.r <= 65536:
            raise ConfigError(f"r must be between 1 and 65536, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRA(Piece):
    """LoRA at one site; see the module docstring."""

    kind = "delta"

    def __init__(self, config: LoRAConfig, site: Site) -> None:
        super().__init__()
        r, parts = config.r, len(site.parts)
        out_index = site.out_index
        self.scaling = config.scaling
        self.dropout = config.dropout
        self.out_features = site.out_features
        self.lora_A = nn.Parameter(torch.empty(parts * r, site.in_features))
        n_out = site.out_features if out_index is None else len(out_index)
        self.lora_B = nn.Parameter(torch.zeros(n_out, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.sliced = out_index is not None
        if self.sliced:
            # Where each row of lora_B goes in the full [out, parts·r] update matrix.
            part = torch.cat([torch.full((len(p.index),), i) for i, p in enumerate(site.parts)])
            self.register_buffer("rows", out_index[:, None].expand(-1, r).contiguous(), False)
            self.register_buffer("cols", part[:, None] * r + torch.arange(r), False)

    def full_B(self) -> torch.Tensor:
        """``B`` as ``[out_features, parts·r]``, zero outside the targeted features."""
        if not self.sliced:
            return self.lora_B
        full = self.lora_B.new_zeros(self.out_features, self.lora_A.shape[0])
        return full.index_put((self.rows, self.cols), self.lora_B)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, True)
        xa = F.linear(x, self.lora_A)
        # One GEMM that also does the add: y + s·(x·Aᵀ)·Bᵀ.
        out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]),
                          self.full_B().t(), alpha=self.scaling)
        return out.view(y.shape)

    def fused_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """``x·Wᵀ + b`` plus this update in one autograd node, for a frozen ``weight [out, in]``;
        ``None`` when adapter dropout is on (the update then sees another input than ``W``)."""
        if self.dropout and self.training:
            return None
        return _LoRALinear.apply(x, weight, bias, self.lora_A, self.full_B(), self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` as ``[out, in]``."""
        return self.full_B() @ self.lora_A * self.scaling

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: int) -> None:
        weight.add_(self.delta_weight().to(weight.dtype), alpha=sign)


class _LoRALinear(torch.autograd.Function):
    """``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` with ``W`` frozen. Same saved tensors as plain autograd
    (``x`` and the rank-r ``x·Aᵀ``), fewer passes over the activations: the update is added in
    place, the input gradient of ``W`` and of the update share one buffer, and ``∂B`` is taken
    as ``((x·Aᵀ)ᵀ·g)ᵀ``, which is several times faster on CPU than ``gᵀ·(x·Aᵀ)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, s):  # type: ignore[override]
        xa = F.linear(x.reshape(-1, x.shape[-1]), A)
        y = F.linear(x, weight, bias)
        # The update goes in through a 2-D view, and ``y`` itself is returned, never a view: an
        # output that is a view would make models that scale it in place (Longformer's query) fail.
        y.view(-1, y.shape[-1]).addmm_(xa, B.t(), alpha=s)
        ctx.save_for_backward(x, xa, weight, A, B)
        ctx.s = s
        return _not_a_view(y)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, xa, weight, A, B = ctx.saved_tensors
        need_x, _, _, need_A, need_B, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gb = (g2 @ B).mul_(ctx.s)  # ∂(x·Aᵀ), scaled
        grad_x = grad_A = grad_B = None
        if need_x:
            grad_x = (g2 @ weight).addmm_(gb, A).view(x.shape)
        if need_A:
            grad_A = gb.t() @ x.reshape(-1, x.shape[-1])
        if need_B:
            grad_B = (xa.t() @ g2).t().mul_(ctx.s)
        return grad_x, None, None, grad_A, grad_B, None


class ExpertLoRA(Piece):
    """LoRA on a 3-D expert parameter, one rank-r update per expert; see the module docstring."""

    kind = "delta"

    def __init__(self, config: LoRAConfig, site: Site) -> None:
        super().__init__()
        if config.dropout:
            raise ConfigError(
                f"LoRA dropout acts on a layer's input, which an update of the routed experts' "
                f"weights ({site.module}) cannot see (peft refuses it too); use dropout=0 when "
                "targets reach routed experts")
        assert site.num_experts is not None
        e, r = site.num_experts, config.r
        index = _rows(site)
        self.num_experts, self.rank, self.scaling = e, r, config.scaling
        self.out_features = site.out_features
        self.lora_A = nn.Parameter(torch.empty(e * r, site.in_features))
        self.lora_B = nn.Parameter(torch.zeros(site.out_features if index is None else len(index), r * e))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft: over the whole [E·r, in]
        self.sliced = index is not None
        if self.sliced:
            self.register_buffer("index", index, False)

    def full_B(self) -> torch.Tensor:
        """``lora_B`` as ``[out, r·E]``, zero on the rows of an untargeted fused part."""
        if not self.sliced:
            return self.lora_B
        return self.lora_B.new_zeros(self.out_features, self.lora_B.shape[1]).index_copy(
            0, self.index, self.lora_B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A [E, r, in], B [E, out, r], s)`` with ``ΔW_e = s·B[e]·A[e]``."""
        e = self.num_experts
        a = self.lora_A.view(e, self.rank, -1)
        b = self.full_B().view(self.out_features, self.rank, e).permute(2, 0, 1)
        return a, b, self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``s·B_e·A_e`` for every expert, as ``[E, out, in]``."""
        a, b, s = self.factors()
        return torch.bmm(b, a) * s

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: int) -> None:
        """Add or remove the update on ``weight [E, out, in]`` (a view of the stored parameter)."""
        weight.add_(self.delta_weight().to(weight.dtype), alpha=sign)


def _rows(site: Site) -> torch.Tensor | None:
    """The targeted rows of each expert's matrix; ``None`` when the targets cover all of them (gate
    and up of a fused ``gate_up_proj``), which is then one update over the whole parameter."""
    index = site.out_index
    if index is None:
        return None
    if len(index) != len(set(index.tolist())):
        raise TargetError(f"targets {list(site.roles)} select some rows of {site.module} twice")
    return None if len(index) == site.out_features else index.sort().values


def build(config: LoRAConfig, site: Site, base: BaseLayer, shared: nn.Module | None = None) -> Piece:
    return LoRA(config, site) if site.num_experts is None else ExpertLoRA(config, site)


# ---- peft's format ----------------------------------------------------------------------------
class LoRAPeft(PeftCodec):
    """peft's ``LORA``: ``<module>.lora_A.weight [r, in]`` and ``<module>.lora_B.weight [out, r]``,
    scaled by ``lora_alpha/r`` (``use_rslora``: ``lora_alpha/√r``); ``rank_pattern`` and
    ``alpha_pattern`` override both for modules whose name ends in a match of their key.

    A LoRA on a fused projection (GPT-2's ``c_attn`` with query+value) is exported as what it is,
    one rank ``parts·r`` update of the whole module whose ``B`` is zero outside the targeted
    features, with the alpha that keeps its scale (through the patterns where ranks differ)."""

    peft_type = "LORA"
    config_keys = frozenset({
        "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "bias",
        "init_lora_weights", "layers_to_transform", "layers_pattern", "megatron_core",
        "qalora_group_size", "loftq_config", "eva_config", "ensure_weight_tying", "runtime_config",
        "target_parameters",
    })
    suffixes = (".lora_A.weight", ".lora_B.weight")
    target_parameters = True
    #: The config an import builds (DoRA's codec reuses this one with its own).
    config_type: ClassVar[type[LoRAConfig]] = LoRAConfig

    def accepts(self, data: Mapping[str, Any]) -> bool:
        return super().accepts(data) and not data.get("use_dora")

    def export(self, adapter: Adapter, keys: Mapping[str, str]) -> tuple[Fields, Tensors]:
        config = adapter.config
        assert isinstance(config, LoRAConfig)
        tensors: dict[str, torch.Tensor] = {}
        rank_alpha: dict[str, tuple[int, float]] = {}
        for module, piece in adapter.pieces.items():
            lora_a, lora_b = piece.lora_A, piece.full_B()
            # parts·r on a fused projection; r per expert on expert parameters (lora_A is [E·r, in])
            rank = getattr(piece, "rank", lora_a.shape[0])
            # peft scales by alpha/rank (rsLoRA alpha/√rank): this alpha keeps our scale exactly.
            alpha = config.scaling * (math.sqrt(rank) if config.rslora else rank)
            rank_alpha[module] = (rank, _tidy(alpha))
            key = keys.get(module, module)
            tensors[key + self.suffixes[0]] = lora_a
            tensors[key + self.suffixes[1]] = lora_b
        (r, alpha), _ = Counter(rank_alpha.values()).most_common(1)[0]
        fields = {
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": config.dropout,
            "use_rslora": config.rslora, "bias": "none", "use_dora": False, "init_lora_weights": True,
            # peft looks these keys up as regexes matching the end of the module name.
            "rank_pattern": {re.escape(m): ra for m, (ra, _) in rank_alpha.items() if ra != r},
            "alpha_pattern": {re.escape(m): al for m, (_, al) in rank_alpha.items() if al != alpha},
        }
        return fields, tensors

    def config(self, data: Mapping[str, Any], modules: list[str], shapes: Shapes,
               keys: Mapping[str, str], tensor_shapes: Shapes) -> tuple[LoRAConfig, Expected]:
        r = get(data, "r", int, 8)
        alpha = get(data, "lora_alpha", float, 8.0)
        rank_rules = patterns(data, "rank_pattern", int)
        alpha_rules = patterns(data, "alpha_pattern", float)
        per_module = {m: (pattern_value(rank_rules, m, r), pattern_value(alpha_rules, m, alpha))
                      for m in modules}
        distinct = sorted(set(per_module.values()))
        if len(distinct) > 1:
            raise ConfigError(
                f"its modules have different (rank, alpha) pairs {distinct} through rank_pattern/"
                "alpha_pattern; a peftlab LoRA adapter has one rank and one alpha, so it cannot be "
                "imported as one adapter")
        rank, alpha = distinct[0]
        config = self.config_type(r=rank, alpha=alpha, dropout=get(data, "lora_dropout", float, 0.0),
                            targets=anchored(modules), rslora=get(data, "use_rslora", bool, False))
        expected = {}
        for m in modules:
            out_f, in_f, *experts = shapes[m]  # expert parameters: r per expert, [E·r, in], [out, r·E]
            n = rank * experts[0] if experts else rank
            expected[keys[m] + self.suffixes[0]] = (n, in_f)
            expected[keys[m] + self.suffixes[1]] = (out_f, n)
        return config, expected

    def load(self, pieces: Mapping[str, Piece], tensors: Mapping[str, torch.Tensor],
             keys: Mapping[str, str]) -> None:
        with torch.no_grad():
            for module, piece in pieces.items():
                piece.lora_A.copy_(tensors[keys[module] + self.suffixes[0]])
                piece.lora_B.copy_(tensors[keys[module] + self.suffixes[1]])


def _tidy(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


METHOD = Method(
    LoRAConfig, build, experts=True, peft=LoRAPeft(),
    # lr: the best LoRA rate in AdapterHub's library paper (arXiv 2311.11077). quality: within
    # ±0.8 points of full fine-tuning on GLUE (LoRA paper; He et al. 2022: SST-2 -0.4).
    presets=(Preset("lora", LoRAConfig, lr=5e-4, quality=-0.3,
                    about="general-purpose low-rank weight update, mergeable"),),
)
