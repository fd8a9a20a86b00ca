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

Computed in cheaper, equal forms (the literal form costs ``1 + 2·N`` products of ``d × d`` per
token). Two identities hold for any members: ``Σ_n s_n·V·z_n = V·(Σ_n s_n·z_n)``, and, since
``Σ_n s_n = 1`` and every ``z_n = h + Δ_n``, a term common to all members' scores cancels in the
softmax, so ``s_n = softmax_n((Q·h + b_Q)ᵀ K·Δ_n / T)``. For members of any kind the scores are
taken as ``(Kᵀ·(Q·h + b_Q))ᵀ z_n``: three ``d × d`` products per token whatever ``N``.

When the members here are bottleneck adapters (Pfeiffer, Houlsby, Compacter: ``Δ_n = U_n·f(D_n·h
+ c_n) + u_n``, ``D_n`` of ``m_n × d``) and there are at least two, the fusion never forms the
members' outputs (:meth:`Fusion.over_bottlenecks`):

- the members share their input ``h``, so their down projections run as one product with the
  stacked ``[D_1; …; D_N]`` (``M = Σ m_n`` rows): ``a = f(D·h + c)``;
- ``K·Δ_n = (K·U_n)·a_n + K·u_n``, and ``K·U_n`` has rank ``m_n``. With ``W = [U_1 … U_N | u_1 …
  u_N]`` (``d × (M + N)``) the products ``P = Wᵀ·Kᵀ·Q`` and ``p = Wᵀ·Kᵀ·b_Q`` are formed once per
  forward from the weights (``(M + N)·d²``), and then, per token, ``r = P·h + p`` gives every
  score: ``s_n ∝ exp((r_{block n} · a_n + r_{M+n}) / T)``. Neither ``Q·h`` nor any key is
  computed per token;
- ``Σ_n s_n·z_n = h + W·[s_1·a_1; …; s_N·a_N; s_1; …; s_N]``: one product, and the members'
  up projections happen only there, weighted.

A token then costs ``d² + 3·(M + N)·d`` (the ``V`` product and three thin ones) instead of
``3·d² + 2·M·d``: with MiniLM's ``d = 384`` and three Pfeiffer members (``M = 72``), 0.46× the
multiply-adds, and nothing of size ``N × d`` per token is kept for backward. Outputs and
gradients equal the literal formula up to float rounding (tests/test_fusion.py checks both
against a literal implementation in float64). One member, or members of other kinds (LoRA,
(IA)³), take the general form above; a member absent at a module counts as ``Δ_n = 0`` in both.
A key bias would add the same number to every member's score and cancel in the softmax, so ``K``
has none; nor has ``V`` (as in the paper's reference code). Parameters per module: ``3·d² + d``.

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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError
from peftlab.layer import BaseLayer, Piece, Projections, weight_product
from peftlab.methods import Method
from peftlab.methods.bottleneck import ACTIVATIONS
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
        s = self._attention(scores)
        return self.value((s.unsqueeze(-2) @ z).squeeze(-2))

    def over_bottlenecks(self, h: torch.Tensor, members: tuple[Piece | None, ...]) -> torch.Tensor | None:
        """The output for ``h [..., d]`` from the members' bottleneck activations (see the module
        docstring), or ``None`` unless there are two or more members and each is a bottleneck
        adapter or absent here."""
        if len(members) < 2:  # one member: s = 1, and the literal form is exact and as cheap
            return None
        parts: list[Projections | None] = []
        for member in members:
            parts.append(None if member is None else member.projections())
            if member is not None and parts[-1] is None:
                return None
        if all(p is None for p in parts):
            return None
        sources = (t for m in (self, *members) if m is not None for t in m.parameters())  # read if kept
        weights = weight_product(self, tuple(map(id, members)), sources,
                                 lambda: self._bottleneck_weights(parts))
        flat = h.reshape(-1, h.shape[-1])
        a = _activate(F.linear(flat, weights.down, weights.down_bias), [p for p in parts if p is not None])
        r = F.linear(flat, weights.query, weights.query_bias)  # [t, M+N]: qᵀ·K·w_j
        m = a.shape[-1]
        scores = torch.addmm(r[:, m:], r[:, :m] * a, weights.block) / self.temperature
        s = self._attention(scores)
        weighted = torch.cat([a * (s @ weights.block.t()), s], 1)
        mixed = torch.addmm(flat, weighted, weights.up.t())  # Σ_n s_n·z_n
        return self.value(mixed).view(h.shape)

    def _bottleneck_weights(self, parts: list[Projections | None]) -> _BottleneckWeights:
        """What :meth:`over_bottlenecks` computes from the weights alone, for members ``parts``."""
        present = [p for p in parts if p is not None]
        absent = present[0].up_bias.new_zeros(present[0].up_bias.shape[-1])  # Δ_n = 0
        w = torch.cat([p.up for p in present]
                      + [torch.stack([absent if p is None else p.up_bias for p in parts], 1)], 1)  # [d, M+N]
        kw = self.key.weight @ w
        return _BottleneckWeights(
            _cat([p.down for p in present], 0), _cat([p.down_bias for p in present], 0),
            kw.t() @ self.query.weight, self.query.bias @ kw, w,
            _blocks([0 if p is None else p.down.shape[0] for p in parts], w))

    def _attention(self, scores: torch.Tensor) -> torch.Tensor:
        """``s [..., N]``, the softmax over members; records :attr:`last_weights`."""
        s = torch.softmax(scores, dim=-1)
        self.last_weights = s.detach().reshape(-1, s.shape[-1]).mean(0)
        return s

    def penalty(self) -> torch.Tensor:
        """``‖V − I‖²`` of this module."""
        v = self.value.weight
        return (v - torch.eye(v.shape[0], device=v.device, dtype=v.dtype)).pow(2).sum()


class _BottleneckWeights(NamedTuple):
    """The members' stacked down projections ``down [M, d]`` and ``down_bias [M]``; ``query [M+N,
    d]`` and ``query_bias [M+N]`` (``P`` and ``p``: ``r = P·h + p``); ``up`` (``W``, ``[d, M+N]``);
    ``block [M, N]``, which member each bottleneck row belongs to."""

    down: torch.Tensor
    down_bias: torch.Tensor
    query: torch.Tensor
    query_bias: torch.Tensor
    up: torch.Tensor
    block: torch.Tensor


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _activate(a: torch.Tensor, parts: list[Projections]) -> torch.Tensor:
    """Each member's activation on its own block of the stacked pre-activations ``a [t, M]``."""
    names = {p.activation for p in parts}
    if len(names) == 1:
        return ACTIVATIONS[names.pop()](a)
    blocks = a.split([p.down.shape[0] for p in parts], dim=-1)
    return torch.cat([ACTIVATIONS[p.activation](b) for p, b in zip(parts, blocks)], -1)


def _blocks(sizes: list[int], like: torch.Tensor) -> torch.Tensor:
    """``[Σ sizes, N]``: 1 where row ``i`` of the stacked bottleneck belongs to member ``n``."""
    member = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return F.one_hot(member, len(sizes)).to(device=like.device, dtype=like.dtype)


def build(config: FusionConfig, site: Site, base: BaseLayer, shared: nn.Module | None = None) -> Fusion:
    return Fusion(config, site)


#: Built by :meth:`AdapterSet.add_fusion` over member adapters; no preset of its own (``compare``
#: and ``recommend`` name it ``fusion`` and give it Pfeiffer members).
METHOD = Method(FusionConfig, build)
