"""VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort, Asano 2023, arXiv 2310.11454).

    h = W0·x + Λ_b·B·Λ_d·A·dropout(x),   Λ_b = diag(b), b ∈ R^{d};   Λ_d = diag(d), d ∈ R^r

``A ∈ R^{r×k_max}`` and ``B ∈ R^{d_max×r}`` are frozen random matrices shared by every adapted
layer of the adapter; a layer of shape ``d×k`` uses their top-left slices ``A[:, :k]`` and
``B[:d, :]`` (``k_max``, ``d_max``: the largest input and output sizes among the adapted layers,
as in HF peft). Only ``b`` and ``d`` train.

Init as in peft (``tuners/vera``): ``A`` then ``B`` drawn Kaiming-uniform (bound ``√(6/fan_in)``,
so ``√(6/k_max)`` for ``A`` and ``√(6/r)`` for ``B``) from one CPU ``torch.Generator`` seeded
with ``projection_seed`` (peft's ``projection_prng_key``); ``d`` = ``d_initial`` (0.1) and
``b`` = 0, so a new adapter leaves the model unchanged. Trainable parameters per adapted matrix:
``r + d`` (the paper's ``L·(d_model + r)``); the projections add ``r·(k_max + d_max)`` frozen
values per adapter. Merging adds ``Λ_b·B·Λ_d·A`` to ``W0`` (no inference latency); unmerging
subtracts it.

Files. With ``save_projection=True`` (peft's default) the projections are stored once per adapter
(``shared.vera_A``, ``shared.vera_B``), so a load is exact on any machine. With ``False`` the file
holds only ``b``, ``d`` and eight sampled values of the projections (``shared.vera_check``); loading
regenerates ``A`` and ``B`` from the seed and refuses the file when those values differ (another
torch build whose generator draws other numbers), so a small file is never silently wrong.

On a fused projection (GPT-2's ``c_attn`` with only query and value targeted) the adapter is VeRA
on the whole module with ``b`` restricted to the targeted output features (zero elsewhere), so it
trains ``r`` plus the targeted features and exports to peft as exactly that. Routed experts' 3-D
parameters are not adapted (the registry refuses: peft's VeRA has no ``target_parameters``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError
from peftlab.interop.codec import Expected, Fields, PeftCodec, Shapes, Tensors, anchored, get
from peftlab.layer import BaseLayer, Piece
from peftlab.methods import Method, Preset
from peftlab.sites import Site

if TYPE_CHECKING:
    from peftlab.adapter_set import Adapter

#: How many values of the projections a file without them keeps, to check a regeneration.
CHECK_VALUES = 8
#: Relative tolerance of that check: a float16/bfloat16 model stores them rounded; another
#: generator gives unrelated values.
CHECK_RTOL = 1e-2


@dataclasses.dataclass(frozen=True)
class VeRAConfig(AdapterConfig):
    """``r``: rows of the shared ``A`` (peft's default 256; VeRA wants far larger ranks than LoRA);
    ``targets``: roles or module regexes; ``dropout`` on the adapter's input; ``d_initial``: the
    start of ``d``; ``projection_seed``: seeds the shared ``A`` and ``B`` (peft's
    ``projection_prng_key``); ``save_projection``: store ``A`` and ``B`` in the file (exact loads
    anywhere) or regenerate them from the seed, checked (smaller files)."""

    method = "vera"
    mergeable = True

    r: int = 256
    targets: tuple[str, ...] = ("query", "value")
    dropout: float = 0.0
    d_initial: float = 0.1
    projection_seed: int = 0
    save_projection: bool = True

    def validate(self) -> None:
        if not 1 <= self.r <= 65536:
            raise ConfigError(f"r must be between 1 and 65536, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.projection_seed < 0:
            raise ConfigError(f"projection_seed must be >= 0, got {self.projection_seed}")


def _kaiming_bound(fan_in: int) -> float:
    # peft's _kaiming_init, operation for operation, so the bound is the same float.
    std = math.sqrt(2) / math.sqrt(fan_in)
    return math.sqrt(3.0) * std


def projections(r: int, in_features: int, out_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [r, in]`` and ``B [out, r]`` exactly as peft draws them for ``projection_prng_key=seed``:
    one CPU generator, ``A`` first, each Kaiming-uniform over its own fan-in, in float32."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.empty(r, in_features, dtype=torch.float32)
    a.uniform_(-_kaiming_bound(in_features), _kaiming_bound(in_features), generator=g)
    b = torch.empty(out_features, r, dtype=torch.float32)
    b.uniform_(-_kaiming_bound(r), _kaiming_bound(r), generator=g)
    return a, b


def _sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:data:`CHECK_VALUES` values spread over ``A`` and ``B``, to recognise a regeneration."""
    flat = torch.cat([a.reshape(-1), b.reshape(-1)])
    return flat[torch.linspace(0, flat.numel() - 1, CHECK_VALUES).long()].clone()


class Projections(nn.Module):
    """The frozen ``A`` and ``B`` shared by all of one adapter's layers. Buffers, not parameters:
    they never train, never count as trainable, and follow ``model.to(...)``. Stored in the file
    when ``save_projection``; otherwise only their check sample is."""

    def __init__(self, config: VeRAConfig, in_features: int, out_features: int) -> None:
        super().__init__()
        a, b = projections(config.r, in_features, out_features, config.projection_seed)
        persistent = config.save_projection
        self.register_buffer("vera_A", a, persistent)
        self.register_buffer("vera_B", b, persistent)
        if not persistent:
            self.register_buffer("vera_check", _sample(a, b))

    def verify_file(self, saved: Mapping[str, torch.Tensor]) -> None:
        """Called by the loaders with the file's tensors of this module (``vera_check``, ...)
        before anything is copied: a file without the projections is only right if this torch
        regenerates the ones it was trained with."""
        if "vera_check" not in saved:
            return
        theirs, ours = saved["vera_check"].double(), self.vera_check.double()
        if not torch.allclose(theirs, ours.to(theirs.device), rtol=CHECK_RTOL, atol=1e-6):
            raise ConfigError(
                "this VeRA adapter was saved without its projections (save_projection=False), and "
                "this torch build regenerates other random projections from its seed than the one "
                "it was trained with, so it would compute something else; load it where it was "
                "trained and save it with save_projection=True")


class VeRA(Piece):
    """VeRA at one site; see the module docstring."""

    kind = "delta"

    def __init__(self, config: VeRAConfig, site: Site, shared: Projections) -> None:
        super().__init__()
        self.shared = shared  # a submodule: its tensors are saved once, as ``shared.vera_A``
        self.dropout = config.dropout
        self.in_features, self.out_features = site.in_features, site.out_features
        index = site.out_index
        self.vera_lambda_b = nn.Parameter(torch.zeros(site.out_features if index is None else len(index)))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), config.d_initial))
        self.sliced = index is not None
        if self.sliced:
            self.register_buffer("index", index, False)

    def full_b(self) -> torch.Tensor:
        """``b`` over every output feature, zero outside the targeted ones of a fused module."""
        if not self.sliced:
            return self.vera_lambda_b
        return self.vera_lambda_b.new_zeros(self.out_features).index_copy(0, self.index, self.vera_lambda_b)

    def scaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Λ_d·A [r, in], Λ_b·B [out, r])``, this layer's slices of the shared projections."""
        a = self.shared.vera_A[:, : self.in_features]
        b = self.shared.vera_B[: self.out_features]
        return self.vera_lambda_d[:, None] * a, self.full_b()[:, None] * b

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, True)
        # The vectors are folded into the small matrices (r·(in + out) products) instead of
        # scaling the [tokens, r] and [tokens, out] activations; the result is the same map.
        da, bb = self.scaled_factors()
        xa = F.linear(x, da)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), bb.t())
        return out.view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """``Λ_b·B·Λ_d·A`` as ``[out, in]``."""
        da, bb = self.scaled_factors()
        return bb @ da

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: int) -> None:
        weight.add_(self.delta_weight().to(weight.dtype), alpha=sign)


def make_shared(config: VeRAConfig, sites: list[Site]) -> Projections:
    # peft sizes A and B by the largest input and output among the adapted modules (whole modules,
    # also where only part of a fused one is targeted), so its files and ours have the same shapes.
    return Projections(config, max(s.in_features for s in sites), max(s.out_features for s in sites))


def build(config: VeRAConfig, site: Site, base: BaseLayer, shared: nn.Module | None = None) -> VeRA:
    if not isinstance(shared, Projections):
        raise ConfigError("a VeRA piece needs its adapter's shared Projections")
    return VeRA(config, site, shared)


# ---- peft's format ----------------------------------------------------------------------------
A_KEY, B_KEY = "base_model.vera_A", "base_model.vera_B"


class VeRAPeft(PeftCodec):
    """peft's ``VERA``: ``<module>.vera_lambda_b [out]`` and ``<module>.vera_lambda_d [r]``, and,
    with ``save_projection`` (its default), the shared projections once, as ``base_model.vera_A
    [r, in_max]`` and ``base_model.vera_B [out_max, r]``. Without them peft regenerates the
    projections from ``projection_prng_key``, as :func:`projections` does (tested against peft).
    On a fused projection ``b`` is exported full length, zero on the untargeted features."""

    peft_type = "VERA"
    config_keys = frozenset({
        "r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "bias",
        "init_weights", "layers_to_transform", "layers_pattern",
    })
    suffixes = (".vera_lambda_b", ".vera_lambda_d")
    shared_keys = (A_KEY, B_KEY)

    def export(self, adapter: Adapter, keys: Mapping[str, str]) -> tuple[Fields, Tensors]:
        config = adapter.config
        assert isinstance(config, VeRAConfig) and isinstance(adapter.shared, Projections)
        tensors: dict[str, torch.Tensor] = {}
        for module, piece in adapter.pieces.items():
            tensors[module + self.suffixes[0]] = piece.full_b()
            tensors[module + self.suffixes[1]] = piece.vera_lambda_d
        if config.save_projection:
            tensors[A_KEY], tensors[B_KEY] = adapter.shared.vera_A, adapter.shared.vera_B
        fields = {
            "peft_type": "VERA", "r": config.r, "projection_prng_key": config.projection_seed,
            "save_projection": config.save_projection, "vera_dropout": config.dropout,
            "d_initial": config.d_initial, "bias": "none", "init_weights": True,
        }
        return fields, tensors

    def config(self, data: Mapping[str, Any], modules: list[str], shapes: Shapes,
               keys: Mapping[str, str], tensor_shapes: Shapes) -> tuple[VeRAConfig, Expected]:
        r = get(data, "r", int, 256)
        save = get(data, "save_projection", bool, True)
        config = VeRAConfig(
            r=r, targets=anchored(modules), dropout=get(data, "vera_dropout", float, 0.0),
            d_initial=get(data, "d_initial", float, 0.1),
            projection_seed=get(data, "projection_prng_key", int, 0), save_projection=save)
        if not save and any(k in tensor_shapes for k in self.shared_keys):
            # peft would ignore them and regenerate; which of the two the adapter was trained with
            # cannot be told, so neither is guessed.
            raise ConfigError("it holds vera_A/vera_B but says save_projection=false; set "
                              "save_projection to true in adapter_config.json to use the stored ones")
        expected: Expected = {}
        for m in modules:
            out_f, _ = shapes[m]
            expected[keys[m] + self.suffixes[0]] = (out_f,)
            expected[keys[m] + self.suffixes[1]] = (r,)
        if save:
            expected[A_KEY] = (r, max(shapes[m][1] for m in modules))
            expected[B_KEY] = (max(shapes[m][0] for m in modules), r)
        return config, expected

    def load(self, pieces: Mapping[str, Piece], tensors: Mapping[str, torch.Tensor],
             keys: Mapping[str, str]) -> None:
        with torch.no_grad():
            for module, piece in pieces.items():
                b = tensors[keys[module] + self.suffixes[0]]
                piece.vera_lambda_b.copy_(b[piece.index] if piece.sliced else b)
                piece.vera_lambda_d.copy_(tensors[keys[module] + self.suffixes[1]])
            if A_KEY in tensors:
                shared = next(iter(pieces.values())).shared
                shared.vera_A.copy_(tensors[A_KEY])
                shared.vera_B.copy_(tensors[B_KEY])


METHOD = Method(
    VeRAConfig, build, shared=make_shared, peft=VeRAPeft(),
    # lr: the VeRA paper's RoBERTa-base GLUE setup (its appendix: 4e-3 for SST-2, MRPC and RTE,
    # up to 1e-2 elsewhere). quality: in the paper's RoBERTa-base GLUE table VeRA averages about
    # full fine-tuning's score and ~1.4 points below LoRA in the same runs; the prior sits below
    # LoRA's (-0.3), between the two readings.
    presets=(Preset("vera", VeRAConfig, lr=4e-3, quality=-1.0,
                    about="trainable scaling vectors on shared frozen random low-rank matrices, mergeable"),),
)
