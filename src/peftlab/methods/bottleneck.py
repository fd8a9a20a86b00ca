"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751; Pfeiffer et al., arXiv 2005.00247).

A small residual MLP on the OUTPUT of a projection, before the block's skip connection and
LayerNorm::

    h ← h + W_up·f(W_down·h + b_down) + b_up,   W_down ∈ R^{m×d}, W_up ∈ R^{d×m},   m = d // reduction

Parameters per adapted module: ``2·m·d + m + d``. Presets:

- :meth:`BottleneckConfig.houlsby`: after the attention output and after the FFN (two per block),
  Swish, reduction 16. Houlsby also trained the LayerNorms; do that with
  ``adapters.train(name, extras=("LayerNorm",))`` (BERT-family names; ``extras`` takes any module
  name or dotted suffix, and the modules are saved with the adapter).
- :meth:`BottleneckConfig.pfeiffer`: after the FFN only, ReLU, reduction 16 (the adapter that
  AdapterFusion fuses).

Init: ``W_down`` ~ N(0, 0.01²) truncated at two standard deviations (Houlsby's scale), ``W_up``
and both biases zero, so a new adapter is exactly the identity and the model's outputs are
unchanged. The price is that ``W_down`` gets no gradient on the very first step (it reaches
``W_down`` through ``W_up``); ``W_up`` does, so both train from the second step on, as with
LoRA's zero ``B``. Houlsby's small-normal ``W_up`` would instead start near, not at, the identity.

Several adapters at one module stack in activation order: each sees the previous one's output.
Bottleneck adapters are nonlinear and cannot be merged into the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError, TargetError
from peftlab.layer import BaseLayer, Piece, Projections
from peftlab.methods import Method, Preset
from peftlab.sites import Site

Activation = Literal["relu", "gelu", "gelu_tanh", "swish", "silu", "tanh"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

HOULSBY_PLACEMENT = ("attn_out", "ffn_down")
PFEIFFER_PLACEMENT = ("ffn_down",)


@dataclasses.dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """``placement``: roles or module regexes whose output is adapted; ``reduction``: the
    bottleneck is ``out_features // reduction``; ``activation``: the nonlinearity ``f``."""

    method = "bottleneck"
    mergeable = False

    placement: tuple[str, ...] = HOULSBY_PLACEMENT
    reduction: int = 16
    activation: Activation = "swish"

    @property
    def targets(self) -> tuple[str, ...]:
        """Where the adapter attaches (what :func:`peftlab.sites.find_sites` resolves)."""
        return self.placement

    def validate(self) -> None:
        if not 1 <= self.reduction <= 65536:
            raise ConfigError(f"reduction must be between 1 and 65536, got {self.reduction}")

    @classmethod
    def houlsby(cls, **changes: Any) -> BottleneckConfig:
        """Two adapters per block (attention output and FFN output), Swish, reduction 16."""
        return cls(**{"placement": HOULSBY_PLACEMENT, "reduction": 16, "activation": "swish",
                      **changes})

    @classmethod
    def pfeiffer(cls, **changes: Any) -> BottleneckConfig:
        """One adapter per block, after the FFN, ReLU, reduction 16."""
        return cls(**{"placement": PFEIFFER_PLACEMENT, "reduction": 16, "activation": "relu",
                      **changes})


def bottleneck_size(site: Site, reduction: int) -> int:
    """``out_features // reduction`` at ``site``; post adapters need the whole output."""
    if site.out_index is not None:
        raise TargetError(f"{site.module} is a fused projection and an adapter on its output would "
                          f"see other roles' features too; target a separate projection instead")
    size = site.out_features // reduction
    if size < 1:
        raise ConfigError(f"reduction {reduction} leaves no bottleneck at {site.module} "
                          f"({site.out_features} features); use a reduction <= {site.out_features}")
    return size


class Bottleneck(Piece):
    """A bottleneck adapter on one module's output; see the module docstring."""

    kind = "post"

    def __init__(self, config: BottleneckConfig, site: Site) -> None:
        super().__init__()
        size = bottleneck_size(site, config.reduction)
        self.activation = config.activation
        self.down = nn.Linear(site.out_features, size)
        self.up = nn.Linear(size, site.out_features)
        nn.init.trunc_normal_(self.down.weight, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(ACTIVATIONS[self.activation](self.down(y)))

    def projections(self) -> Projections:
        return Projections(self.down.weight, self.down.bias, self.activation, self.up.weight, self.up.bias)


def build(config: BottleneckConfig, site: Site, base: BaseLayer,
          shared: nn.Module | None = None) -> Bottleneck:
    return Bottleneck(config, site)


METHOD = Method(
    BottleneckConfig, build,
    # lr: the upper end of Houlsby et al.'s 1e-4..1e-3 grid, for short runs. quality: -0.4 points
    # against full fine-tuning (Houlsby et al.; AdapterHub's library paper: +0.8).
    presets=(
        Preset("houlsby", BottleneckConfig.houlsby, lr=1e-3, quality=-0.4,
               about="bottleneck adapters after attention and FFN, not mergeable"),
        Preset("pfeiffer", BottleneckConfig.pfeiffer, lr=1e-3, quality=-0.4,
               about="one bottleneck adapter per block, the usual fusion member"),
    ),
)
