"""(IA)³: learned vectors that rescale activations (Liu et al. 2022, arXiv 2205.05638, §3.3).

    attention:  softmax(Q·(l_k ⊙ K)ᵀ/√d_k)·(l_v ⊙ V)       -> rescale the key/value OUTPUTS
    FFN:        (l_ff ⊙ γ(W1·x))·W2                       -> rescale the INPUT of the down projection

All vectors start at ones, so a new adapter leaves the model unchanged. Parameters per block:
``d_k + d_v + d_ff`` (55,296 on bert-base). Mergeable: ``l ⊙ (W·x + b) = (diag(l)·W)·x + l ⊙ b``
and ``W·(l ⊙ a) = (W·diag(l))·a``; unmerging divides by ``l``, so a vector with a zero is never
merged (the erased weights could not come back).

We follow the paper: the FFN vector scales the activation *after* the nonlinearity (the down
projection's input). AdapterHub scales the up projection's output, before the nonlinearity.
On a fused qkv projection only the key and value features are rescaled.

On a 3-D expert parameter (:mod:`peftlab.experts`, e.g. the routed experts' ``down_proj``) each
expert gets its own vector, ``ia3_l [E, n]``: ``W_e' = W_e·diag(l_e)`` when scaling the input (the
paper's ``l_ff`` after the nonlinearity, per expert), ``diag(l_e)·W_e`` (and ``l_e ⊙ b_e``) when
scaling the output. Parameters: ``E·ffn`` per MoE ``down_proj``. HF peft's (IA)³ cannot target
parameters, so these adapters cannot be exported to peft.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError, TargetError
from peftlab.interop.codec import Expected, Fields, PeftCodec, Shapes, Tensors, anchored, regex
from peftlab.layer import BaseLayer, Piece
from peftlab.methods import Method, Preset
from peftlab.patterns import compile_pattern
from peftlab.roles import ROLES
from peftlab.sites import Site

if TYPE_CHECKING:
    from peftlab.adapter_set import Adapter


@dataclasses.dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """``targets``: roles or module regexes; ``scale_input``: the subset (roles or regexes)
    whose input is rescaled instead of their output (the FFN down projection)."""

    method = "ia3"
    mergeable = True

    targets: tuple[str, ...] = ("key", "value", "ffn_down")
    scale_input: tuple[str, ...] = ("ffn_down",)

    def validate(self) -> None:
        for entry in self.scale_input:
            if entry not in ROLES:
                compile_pattern(entry, "IA3Config.scale_input", ConfigError)


class IA3(Piece):
    """(IA)³ at one site: one vector over the input or over the targeted output features; on a
    3-D expert parameter (``[E, out, in]``) one such vector per expert, stored as ``[E, n]``."""

    kind = "scale"

    def __init__(self, site: Site, scale_input: bool) -> None:
        super().__init__()
        index = site.out_index
        if scale_input and index is not None:
            raise TargetError(f"(IA)³ cannot rescale the input of fused module {site.module!r}")
        self.scale_input = scale_input
        self.out_features = site.out_features
        n = site.in_features if scale_input else (site.out_features if index is None else len(index))
        experts = () if site.num_experts is None else (site.num_experts,)
        self.ia3_l = nn.Parameter(torch.ones(*experts, n))
        self.sliced = index is not None
        if self.sliced:
            self.register_buffer("index", index, False)

    def _full(self, v: torch.Tensor, fill: float) -> torch.Tensor:
        """``v`` over every output feature (``fill`` outside the targeted ones)."""
        if not self.sliced:
            return v
        return v.new_full((*v.shape[:-1], self.out_features), fill).index_copy(-1, self.index, v)

    def scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(l_in, None)`` or ``(None, l_out)``; with a leading expert dimension on experts."""
        return (self.ia3_l, None) if self.scale_input else (None, self._full(self.ia3_l, 1.0))

    def merge_problem(self) -> str | None:
        # Unmerging divides by l: a zero (or a subnormal, whose inverse overflows) erases the
        # weights it scales for good.
        zeros = int((self.ia3_l.abs() < torch.finfo(self.ia3_l.dtype).tiny).sum())
        if zeros:
            return (f"{zeros} (IA)³ scale(s) are 0, which would erase those weights for good "
                    "(unmerge divides by the scale); keep this adapter unmerged")
        return None

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: int) -> None:
        """Scale ``weight [..., out, in]`` in place (and the bias ``[..., out]`` with the output)."""
        v = (self.ia3_l if sign > 0 else 1.0 / self.ia3_l).to(weight.dtype)
        if self.scale_input:
            weight.mul_(v.unsqueeze(-2))
            return
        v = self._full(v, 1.0)
        weight.mul_(v.unsqueeze(-1))
        if bias is not None:
            bias.mul_(v)


def is_input_scaled(config: IA3Config, site: Site) -> bool:
    """Whether ``site`` is one of ``config.scale_input`` (by role, or by regex on its name)."""
    for entry in config.scale_input:
        if entry in site.roles or (entry not in ROLES and re.search(entry, site.module)):
            return True
    return False


def build(config: IA3Config, site: Site, base: BaseLayer, shared: nn.Module | None = None) -> IA3:
    return IA3(site, is_input_scaled(config, site))


# ---- peft's format ----------------------------------------------------------------------------
class IA3Peft(PeftCodec):
    """peft's ``IA3``: ``<module>.ia3_l``, ``[out, 1]`` rescaling the output, or ``[1, in]``
    rescaling the input for modules in ``feedforward_modules``. On a fused projection the vector
    is exported full length, ones on the untargeted features. Import builds targets from the
    module names in the file, so the adapter acts exactly where the file says whatever defaults
    peft used (its BERT default also rescales ``attention.output.dense``)."""

    peft_type = "IA3"
    config_keys = frozenset({"feedforward_modules", "init_ia3_weights"})
    suffixes = (".ia3_l",)

    def export(self, adapter: Adapter, keys: Mapping[str, str]) -> tuple[Fields, Tensors]:
        tensors: dict[str, torch.Tensor] = {}
        feedforward = []
        for module, piece in adapter.pieces.items():
            l_in, l_out = piece.scales()  # l_out is full length, ones on untargeted fused features
            if l_in is not None:
                feedforward.append(module)
                tensors[module + self.suffixes[0]] = l_in.reshape(1, -1)
            else:
                tensors[module + self.suffixes[0]] = l_out.reshape(-1, 1)
        return {"peft_type": "IA3", "feedforward_modules": feedforward, "init_ia3_weights": True}, tensors

    def config(self, data: Mapping[str, Any], modules: list[str], shapes: Shapes,
               keys: Mapping[str, str], tensor_shapes: Shapes) -> tuple[IA3Config, Expected]:
        rule = data.get("feedforward_modules")
        if not (rule is None or isinstance(rule, str)
                or (isinstance(rule, list) and all(isinstance(x, str) for x in rule))):
            raise ConfigError("feedforward_modules must be a list of names or a regex string")
        expected, scale_input = {}, []
        for m in modules:
            out_f, in_f = shapes[m]
            key = m + self.suffixes[0]
            if rule is None:  # peft would use its per-architecture default; the shapes say what it was
                feedforward = tensor_shapes[key] == (1, in_f) and (in_f, out_f) != (1, 1)
            elif isinstance(rule, str):
                feedforward = regex(rule, "feedforward_modules").fullmatch(m) is not None
            else:
                feedforward = any(m.endswith(k) for k in rule)  # peft: plain suffix, no dot needed
            expected[key] = (1, in_f) if feedforward else (out_f, 1)
            if feedforward:
                scale_input.append(m)
        return IA3Config(targets=anchored(modules), scale_input=anchored(scale_input)), expected

    def load(self, pieces: Mapping[str, Piece], tensors: Mapping[str, torch.Tensor],
             keys: Mapping[str, str]) -> None:
        with torch.no_grad():
            for module, piece in pieces.items():
                piece.ia3_l.copy_(tensors[module + self.suffixes[0]].reshape(-1))


METHOD = Method(
    IA3Config, build, experts=True, peft=IA3Peft(),
    # lr: the T-Few recipe (arXiv 2205.05638); 3e-3 to 5e-3 is usual for encoders. quality: -1.4
    # points against full fine-tuning in AdapterHub's library paper (arXiv 2311.11077).
    presets=(Preset("ia3", IA3Config, lr=3e-3, quality=-1.5,
                    about="learned vectors rescaling activations, mergeable"),),
)
