"""AdapterFusion over adapters of any kind (Pfeiffer et al. 2021, arXiv 2005.00247, §3.2).

At every module where its members act, a fusion mixes the members' versions of the module's
output with an attention whose query is the output without them::

    h   = the module's output without the members (the base, plus any other active adapter)
    z_n = h + Δ_n, member n's version of it:
            post piece (bottleneck, Compacter):  z_n = piece(h)
            delta piece (LoRA):                  z_n = h + s·B·A·x
            scale piece ((IA)³):                 z_n = the output with the member's vectors applied
            member with no piece at this module: z_n = h
    s_n = softmax_n( (Q·h + b_Q)ᵀ (K·z_n) / T )
    o   = Σ_n s_n · V·z_n                      (the module's new output)

``Q``, ``K``, ``V`` are ``d × d``, one set per module. Where the residual goes: each member's own
skip connection is inside ``z_n`` (``z_n = h + Δ_n``) and the fusion adds none of its own; the
transformer block's skip connection and LayerNorm come after the module, as without adapters.
With ``V = I``, ``o = h + Σ_n s_n·Δ_n``, and a single member gives back ``z_1`` exactly.

Computed in the cheaper, equal form: ``(Q·h)ᵀ(K·z_n) = (Kᵀ·Q·h)ᵀ z_n`` and
``Σ_n s_n·V·z_n = V·(Σ_n s_n·z_n)``, so a token costs three ``d × d`` products whatever the number
of members (the literal form costs ``1 + 2·N``). A key bias would add the same number to every
member's score and cancel in the softmax, so ``K`` has none; nor has ``V`` (as in the paper's
reference code). Parameters per module: ``3·d² + d``.

Init: ``Q`` and ``K`` ~ N(0, 0.02²) (BERT's init, the reference code's choice), ``b_Q`` = 0;
``V`` = identity + N(0, value_noise²). Train with ``adapters.fusion_penalty(name)`` added to the
loss: ``value_identity_penalty · Σ_modules ‖V − I‖²`` (the paper's regulariser, weight 0.01),
which keeps ``V`` near the identity so the members' outputs keep their meaning.

The fusion acts at every module where some member acts; if no module has all members, the
members have nothing to fuse and adding the fusion is an error. Members stay frozen while the
fusion trains; an active fusion runs its members itself, so they are not applied again on their
own. Fusions are not mergeable.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError
from peftlab.layer import BaseLayer, Piece
from peftlab.methods import Method
from peftlab.sites import Site

QUERY_KEY_STD = 0.02


@dataclasses.dataclass(frozen=True)
class FusionConfig(AdapterConfig):
    """``temperature``: ``T`` of the softmax over members; ``value_identity_penalty``: weight of
    ``Σ ‖V − I‖²`` in :meth:`AdapterSet.fusion_penalty`; ``value_noise``: std of the noise added
    to the identity ``V`` at init (0: exactly the identity)."""

    method = "fusion"
    mergeable = False

    temperature: float = 1.0
    value_identity_penalty: float = 0.01
    value_noise: float = 1e-6

    def validate(self) -> None:
        if not 1e-3 <= self.temperature <= 1e3:
            raise ConfigError(f"temperature must be between 0.001 and 1000, got {self.temperature}")
        if self.value_identity_penalty < 0:
            raise ConfigError(f"value_identity_penalty must be >= 0, got {self.value_identity_penalty}")
        if not 0 <= self.value_noise <= 1:
            raise ConfigError(f"value_noise must be between 0 and 1, got {self.value_noise}")


class Fusion(Piece):
    """The fusion at one module; see the module docstring. ``members`` names the fused adapters
    (set by :meth:`AdapterSet.add_fusion`); ``last_weights`` is the mean attention each member got
    in the latest forward, over all of its tokens."""

    kind = "fusion"

    def __init__(self, config: FusionConfig, site: Site) -> None:
        super().__init__()
        d = site.out_features
        self.temperature = config.temperature
        self.members: tuple[str, ...] = ()
        self.last_weights: torch.Tensor | None = None
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        nn.init.normal_(self.query.weight, std=QUERY_KEY_STD)
        nn.init.zeros_(self.query.bias)
        nn.init.normal_(self.key.weight, std=QUERY_KEY_STD)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(d) + config.value_noise * torch.randn(d, d))

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``h [..., d]`` the output without the members, ``z [..., N, d]`` theirs."""
        k_q = self.query(h) @ self.key.weight  # Kᵀ·q, as a row vector: q·(K·z_n) = (Kᵀ·q)·z_n
        scores = (z @ k_q.unsqueeze(-1)).squeeze(-1) / self.temperature
        s = torch.softmax(scores, dim=-1)  # [..., N]
        self.last_weights = s.detach().reshape(-1, s.shape[-1]).mean(0)
        return self.value((s.unsqueeze(-2) @ z).squeeze(-2))

    def penalty(self) -> torch.Tensor:
        """``‖V − I‖²`` of this module."""
        v = self.value.weight
        return (v - torch.eye(v.shape[0], device=v.device, dtype=v.dtype)).pow(2).sum()


def build(config: FusionConfig, site: Site, base: BaseLayer, shared: nn.Module | None = None) -> Fusion:
    return Fusion(config, site)


#: Built by :meth:`AdapterSet.add_fusion` over member adapters; no preset of its own (``compare``
#: and ``recommend`` name it ``fusion`` and give it Pfeiffer members).
METHOD = Method(FusionConfig, build)
