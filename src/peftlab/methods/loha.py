"""LoHa: a Hadamard product of two low-rank updates (FedPara, Hyeon-Woo et al. 2022, arXiv 2108.06098;
as implemented in LyCORIS and HF peft's ``LOHA``).

    h = W0·x + ΔW·x,   ΔW = s·(W1a·W1b) ⊙ (W2a·W2b),   W1a, W2a ∈ R^{d×r},  W1b, W2b ∈ R^{r×k},
    s = α/r

``ΔW`` can reach rank r² with the parameters of a rank-2r LoRA: trainable parameters per adapted
matrix ``2·r·(k + d)``. Init as peft's (``init_weights=True``): ``W1a``, ``W1b``, ``W2a``
Kaiming-uniform with a=√5, ``W2b`` zeros, so a new adapter leaves the model unchanged (the
paper's own init is He-normal on all four; a zero factor is what makes a fresh adapter a no-op).
Mergeable: merging adds ``ΔW`` to ``W0``, unmerging subtracts it.

Forward computes ``ΔW`` (``[out, in]``) each step and applies it, as peft does. The product's
backward recomputes ``W1a·W1b`` and ``W2a·W2b`` instead of keeping them (the LyCORIS autograd
function), so autograd holds the factors and ``ΔW``, not three ``[out, in]`` matrices.

Training-time regularisers, both as peft (not in the paper):

* ``rank_dropout``: despite the name, drops whole *output rows* of ``ΔW`` with probability p, one
  draw per forward shared by the batch, and rescales the kept rows by 1/(fraction kept) (peft
  always rescales for LoHa; when every row is dropped we keep ``ΔW = 0`` where peft divides by 0);
* ``module_dropout``: skips the whole update with probability p per forward.

LoHa acts on a whole weight matrix. On a fused projection where the targets pick some roles
(GPT-2's ``c_attn`` for query+value) it is refused: target the module by name to adapt all of it.
HF peft's LoHa adapts ``nn.Linear`` only, not transformers' ``Conv1D`` (GPT-2), so LoHa adapters on
``Conv1D`` modules work in peftlab but cannot be exported to peft.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

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
from peftlab.layer import BaseLayer, Piece
from peftlab.methods import Method, Preset
from peftlab.sites import Site

if TYPE_CHECKING:
    from peftlab.adapter_set import Adapter


@dataclasses.dataclass(frozen=True)
class LoHaConfig(AdapterConfig):
    """``r``: rank of each of the two products; ``alpha``: scale numerator (``s = α/r``);
    ``rank_dropout``: drop output rows of ΔW while training; ``module_dropout``: skip the whole
    update while training; ``targets``: roles or module regexes. Defaults are peft's."""

    method = "loha"
    mergeable = True

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")

    def validate(self) -> None:
        check_rank_and_dropouts(self)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def check_rank_and_dropouts(config: Any) -> None:
    """The checks LoHa and LoKr share (``r``, ``rank_dropout``, ``module_dropout``)."""
    if not 1 <= config.r <= 65536:
        raise ConfigError(f"r must be between 1 and 65536, got {config.r}")
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")


def whole_module(site: Site, method: str) -> None:
    """Refuse a site that is part of a fused projection: these updates act on a whole matrix."""
    if site.out_index is not None:
        roles = [r for r in site.roles if r]
        raise TargetError(
            f"{method} updates a whole weight matrix, but targets {roles} select only some output "
            f"features of the fused projection {site.module!r}. Target the module by name to adapt "
            f"all of it, e.g. targets=(r'{re.escape(site.module.rsplit('.', 1)[-1])}$',), or use "
            "LoRA, which adapts each role's slice")


class LycorisPiece(Piece):
    """What LoHa and LoKr pieces share: a ``delta`` piece whose update is ``ΔW·x`` with peft's
    training-time rank and module dropout. Subclasses implement :meth:`delta_weight` and
    :meth:`apply_delta` (``ΔW·x`` without the dropouts)."""

    kind = "delta"
    #: peft divides the kept rows by the fraction kept (LoHa always; LoKr if rank_dropout_scale).
    rescale_rank_dropout: bool = True

    def __init__(self, config: Any, site: Site, base: BaseLayer) -> None:
        super().__init__()
        whole_module(site, type(self).__name__)
        self.scaling = config.alpha / config.r
        self.rank_dropout = config.rank_dropout
        self.module_dropout = config.module_dropout
        self.out_features = site.out_features
        # peft's LyCORIS layers adapt nn.Linear only; the export needs to know.
        self.conv1d = isinstance(base.module, Conv1D)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def apply_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔW·x`` over the last dimension of ``x``."""
        return F.linear(x, self.delta_weight())

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout and float(torch.rand(1)) <= self.module_dropout:
            return y  # peft keeps the update when rand > p
        delta = self.apply_delta(x)
        if self.training and self.rank_dropout:
            # Dropping row i of ΔW is dropping output feature i of ΔW·x.
            keep = (torch.rand(self.out_features, device=delta.device) > self.rank_dropout).to(delta.dtype)
            if self.rescale_rank_dropout and keep.any():
                keep = keep / keep.mean()
            delta = delta * keep
        return y + delta.to(y.dtype)

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: int) -> None:
        weight.add_(self.delta_weight().to(weight.dtype), alpha=sign)


class LoHa(LycorisPiece):
    """LoHa at one site; see the module docstring. Parameters are named as in peft's files."""

    def __init__(self, config: LoHaConfig, site: Site, base: BaseLayer) -> None:
        super().__init__(config, site, base)
        r, d, k = config.r, site.out_features, site.in_features
        self.hada_w1_a = nn.Parameter(torch.empty(d, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, k))
        self.hada_w2_a = nn.Parameter(torch.empty(d, r))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, k))
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """``s·(W1a·W1b) ⊙ (W2a·W2b)`` as ``[out, in]``."""
        return _Hadamard.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b,
                               self.scaling)


class _Hadamard(torch.autograd.Function):
    """``s·(A1·B1) ⊙ (A2·B2)``, saving the four factors only and recomputing the two products in
    backward (LyCORIS' ``HadaWeight``): two ``[out, in]`` matrices less per layer held for backward."""

    @staticmethod
    def forward(ctx, a1, b1, a2, b2, s):  # type: ignore[override]
        ctx.save_for_backward(a1, b1, a2, b2)
        ctx.s = s
        return (a1 @ b1).mul_(a2 @ b2).mul_(s)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        a1, b1, a2, b2 = ctx.saved_tensors
        g = g * ctx.s
        t = g * (a2 @ b2)
        grad_a1, grad_b1 = t @ b1.t(), a1.t() @ t
        t = g * (a1 @ b1)
        grad_a2, grad_b2 = t @ b2.t(), a2.t() @ t
        return grad_a1, grad_b1, grad_a2, grad_b2, None


def build(config: LoHaConfig, site: Site, base: BaseLayer, shared: nn.Module | None = None) -> Piece:
    return LoHa(config, site, base)


# ---- peft's format ----------------------------------------------------------------------------
class LycorisPeft(PeftCodec):
    """peft's LyCORIS formats (``LOHA``, ``LOKR``): each piece's parameters under its own name,
    ``<module>.<parameter>``, with one ``r`` and ``alpha`` (``rank_pattern``/``alpha_pattern``
    override them for modules whose name ends in a match of their key; an adapter whose modules
    end up with different pairs cannot be one peftlab adapter and is refused). Subclasses give
    the config class, the fields beyond r/alpha/dropouts, and the shapes a config gives a module."""

    config_class: ClassVar[type[AdapterConfig]]
    fan_in_fan_out = False
    #: Our config fields written and read under the same name in peft's config.
    extra_fields: ClassVar[tuple[str, ...]] = ()

    def shapes(self, config: Any, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """Each parameter's shape at a module of this size."""
        raise NotImplementedError

    def export(self, adapter: Adapter, keys: Mapping[str, str]) -> tuple[Fields, Tensors]:
        config = adapter.config
        conv1d = [m for m, p in adapter.pieces.items() if p.conv1d]
        if conv1d:
            raise ConfigError(
                f"{config.method} adapter acts on transformers Conv1D modules ({conv1d[0]}, ...), "
                f"which peft's {self.peft_type} cannot adapt (it takes nn.Linear only); keep it in "
                "peftlab's format (save), or merge it into the weights")
        tensors = {f"{keys.get(m, m)}.{name}": t for m, piece in adapter.pieces.items()
                   for name, t in piece.named_parameters()}
        fields = {
            "peft_type": self.peft_type, "r": config.r, "alpha": _tidy(config.alpha),
            "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout,
            **{f: getattr(config, f) for f in self.extra_fields},
            "init_weights": True, "use_effective_conv2d": False, "rank_pattern": {}, "alpha_pattern": {},
        }
        return fields, tensors

    def config(self, data: Mapping[str, Any], modules: list[str], shapes: Shapes,
               keys: Mapping[str, str], tensor_shapes: Shapes) -> tuple[AdapterConfig, Expected]:
        r = get(data, "r", int, 8)
        alpha = get(data, "alpha", float, 8.0)
        rank_rules = patterns(data, "rank_pattern", int)
        alpha_rules = patterns(data, "alpha_pattern", float)
        pairs = sorted({(pattern_value(rank_rules, m, r), pattern_value(alpha_rules, m, alpha))
                        for m in modules})
        if len(pairs) > 1:
            raise ConfigError(
                f"its modules have different (rank, alpha) pairs {pairs} through rank_pattern/"
                f"alpha_pattern; a peftlab {self.peft_type} adapter has one rank and one alpha, so it "
                "cannot be imported as one adapter")
        hints = typing.get_type_hints(self.config_class)
        defaults = self.config_class()
        extra = {f: get(data, f, hints[f], getattr(defaults, f)) for f in self.extra_fields}
        config = self.config_class(
            r=pairs[0][0], alpha=pairs[0][1], targets=anchored(modules),
            rank_dropout=get(data, "rank_dropout", float, 0.0),
            module_dropout=get(data, "module_dropout", float, 0.0), **extra)
        expected = {f"{keys[m]}.{name}": shape for m in modules
                    for name, shape in self.shapes(config, *shapes[m][:2]).items()}
        return config, expected

    def load(self, pieces: Mapping[str, Piece], tensors: Mapping[str, torch.Tensor],
             keys: Mapping[str, str]) -> None:
        with torch.no_grad():
            for module, piece in pieces.items():
                for name, p in piece.named_parameters():
                    p.copy_(tensors[f"{keys[module]}.{name}"])


class LoHaPeft(LycorisPeft):
    """peft's ``LOHA``: ``<module>.hada_w1_a [out, r]``, ``hada_w1_b [r, in]``, ``hada_w2_a``,
    ``hada_w2_b``, scaled by ``alpha/r``. ``use_effective_conv2d`` only matters for convolutions,
    which peftlab does not adapt; files with their ``hada_t1``/``hada_t2`` are refused."""

    peft_type = "LOHA"
    config_class = LoHaConfig
    config_keys = frozenset({
        "r", "alpha", "rank_dropout", "module_dropout", "init_weights", "use_effective_conv2d",
        "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
    })
    suffixes = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")

    def shapes(self, config: Any, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        r = config.r
        return {"hada_w1_a": (out_features, r), "hada_w1_b": (r, in_features),
                "hada_w2_a": (out_features, r), "hada_w2_b": (r, in_features)}


def _tidy(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


METHOD = Method(
    LoHaConfig, build, peft=LoHaPeft(),
    # lr: neither FedPara (trained from scratch) nor LyCORIS (Stable Diffusion) gives a rate for
    # fine-tuning text models; LyCORIS' guidelines (docs/Guidelines.md) train LoHa at LoRA's
    # rates, so LoRA's 5e-4 (AdapterHub, arXiv 2311.11077). quality: no GLUE result exists in
    # either paper; LoRA's prior (-0.3) minus 0.5 for the missing evidence.
    presets=(Preset("loha", LoHaConfig, lr=5e-4, quality=-0.8,
                    about="Hadamard product of two low-rank updates, mergeable"),),
)
