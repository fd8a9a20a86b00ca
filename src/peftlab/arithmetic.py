"""Adapter arithmetic: several trained LoRA (or (IA)³) adapters -> one new adapter.

:meth:`AdapterSet.combine` delegates to :func:`combine`. The result is an ordinary adapter, built
and installed through the same path as :meth:`AdapterSet.add`, so it saves, loads, merges and
exports to peft like any other. The ways, with weights ``w_i``, LoRA factors ``A_i [r, in]``,
``B_i [out, r]``, scales ``s_i`` (α/r) and updates ``ΔW_i = s_i·B_i·A_i``:

- task arithmetic (Ilharco et al. 2022, arXiv 2212.04089): ``ΔW = Σ w_i·ΔW_i``.
- TIES (Yadav et al. 2023, arXiv 2306.01708) on tensors ``T_i``: *trim* each to its
  ``density·numel`` largest magnitudes; *elect* a sign per entry, the sign of ``Σ_i T_i``
  (``majority_sign_method="total"``) or of ``Σ_i sign(T_i)`` ("frequency"), ``+`` on a tie;
  *disjoint mean*: ``Σ_i w_i·T_i·[sign T_i = elected] / max(1, #agreeing)``.
- DARE (Yu et al. 2023, arXiv 2311.03099): keep each entry with probability ``density`` and
  divide the survivors by ``density`` (so the expectation is unchanged), then combine linearly
  (``dare_linear``) or by TIES' sign election and disjoint mean (``dare_ties``).

How each ``how`` applies them to LoRA is HF peft's ``LoraModel.add_weighted_adapter`` exactly
(``peft/tuners/lora/model.py``, ``peft/utils/merge_utils.py``), checked against it in
``tests/test_arithmetic.py``:

=================  =========================================================================
``cat``            exact ``ΔW = Σ w_i·ΔW_i``: ``A = [w_1·s_1·A_1; w_2·s_2·A_2; ...]``,
                   ``B = [B_1, B_2, ...]``, rank ``Σ r_i``.
``linear``         on ``A`` and ``B`` *separately*: ``A = Σ ±√|w_i·s_i|·A_i`` (the weight's sign
                   on ``A`` only), ``B = Σ √|w_i·s_i|·B_i``. Equal ranks required. ``B·A`` then
                   holds cross terms ``B_i·A_j``, so this is *not* ``Σ w_i·ΔW_i`` (peft calls it a
                   rough approximation); exact only for one adapter.
``ties``,          TIES / DARE on ``A`` and on ``B`` separately, with those √-weights; equal ranks.
``dare_linear``,   TIES elects the sign on the *unweighted* trimmed tensors (peft's order: elect,
``dare_ties``      then weight), so a negative weight does not flip the vote.
``svd``            ``ΔW = Σ w_i·ΔW_i`` re-factorised by a truncated SVD: ``B = U_k·diag(S_k)``,
                   ``A = V_kᵀ``, ``k = svd_rank`` (default: the largest source rank). With
                   ``svd_clamp = q``, both are clipped to ``±quantile(concat(B, A), q)``.
``ties_svd``,      TIES / DARE on the full updates ``ΔW_i`` (weights ``w_i``, as in the papers),
``dare_*_svd``     then the SVD above.
=================  =========================================================================

The new LoRA adapter has ``alpha = r`` (scale 1: the sources' scales are inside its factors), the
dropout and targets of the first source. (IA)³ vectors combine with ``linear`` only, as in peft:
``l = Σ w_i·l_i``. DARE draws its masks from ``torch.Generator().manual_seed(seed)`` (``seed=None``:
torch's global generator), one Bernoulli draw per source tensor in peft's order (modules in
model order; per module the ``A``\\ s, then the ``B``\\ s): the masks are those peft draws from a
generator in that state. (peft draws from torch's global generator *after* initialising the new
adapter's layers, which uses it too, so ``torch.manual_seed(seed)`` before its call does not give
the same masks; the tests hand peft's ``random_pruning`` the seeded generator instead.)

Where peftlab deliberately differs from peft, and why:

- The sources must adapt exactly the same sites (peft takes the union and treats a missing
  module as a zero update, which for (IA)³ silently scales that module's activations by ``w_i``).
- ``density`` is required for the TIES/DARE ways and refused for the others (peft's default
  ``None`` crashes inside TIES and is silently ignored elsewhere); one source is combined as asked
  (peft switches any way to ``linear`` for a single adapter).
- The result's scale is exactly 1 also when the first source uses rsLoRA (peft copies
  ``use_rslora`` into the new config with ``lora_alpha = r``, which scales its result by ``√r``).
- Arithmetic runs in float32 at least (float64 sources stay float64), then is cast to the
  sources' dtype; SVD uses the reduced factorisation (``full_matrices=False``: the same truncated
  factors, less memory) on torch's default driver; ``svd_rank`` above a module's
  ``min(out, in)`` pads with zero rank components (peft breaks the layer's shapes there).
- On a fused projection (GPT-2's ``c_attn`` with query+value) the elementwise ways act on ``B``
  as peft sees it in the exported file (zero outside each role's rows and rank block, so TIES'
  ``density`` counts those zeros, as peft's would), which keeps the per-role layout exact. The
  SVD ways factorise each role's rows separately at rank ``k`` (peft factorises the whole module
  at rank ``k``; a per-role factorisation is what the layout can hold, and is never less accurate).
- LoRA on routed experts' 3-D parameters is refused (peft's ``add_weighted_adapter`` refuses
  ``target_parameters`` too, so there is no reference for what TIES' trimming should count).
- The sources' task heads (``extras``) are not combined: heads of different tasks predict
  different things. Save the result with the head you want (``save(..., extras=...)``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from peftlab.config import clip
from peftlab.errors import AdapterNameError, AdapterStateError, ConfigError, PartialTargetWarning
from peftlab.methods.ia3 import IA3, IA3Config
from peftlab.methods.lora import LoRA, LoRAConfig
from peftlab.names import check_name

if TYPE_CHECKING:
    from peftlab.adapter_set import Adapter, AdapterSet

WAYS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties",
        "ties_svd", "dare_linear_svd", "dare_ties_svd")
_SVD = {"svd", "ties_svd", "dare_linear_svd", "dare_ties_svd"}
_RANDOM = {"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"}
_DENSITY = {"ties", "ties_svd"} | _RANDOM
_SIGN = {"ties", "dare_ties", "ties_svd", "dare_ties_svd"}
_SAME_RANK = {"linear", "ties", "dare_linear", "dare_ties"}
SIGN_METHODS = ("total", "frequency")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated ``how`` with its options."""

    how: str
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None


# ---- the merge functions, on a list of same-shaped tensors ------------------------------------
def _stack_weighted(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``w_i·T_i`` stacked on a new first dimension."""
    stacked = torch.stack(list(tensors))
    return stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``Σ w_i·T_i`` (arXiv 2212.04089)."""
    return _stack_weighted(tensors, weights).sum(0)


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density·numel)`` largest magnitudes set to 0 (TIES' trim; ties
    broken as ``torch.topk`` does, like peft). ``density >= 1`` keeps everything."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * mask.view(t.shape)


def drop_and_rescale(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, divide the kept ones by it."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def elected_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Where each ``T_i`` agrees with the elected sign: that of ``Σ_i T_i`` ("total") or of
    ``Σ_i sign(T_i)`` ("frequency"); a tie elects ``+``. Zeros never agree."""
    signs = stacked.sign()
    mass = stacked.sum(0) if method == "total" else signs.sum(0)
    return signs == torch.where(mass >= 0, 1.0, -1.0).to(signs.dtype)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """The mean over the sources that agree with the elected sign (0 where none does)."""
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties_merge(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
               sign_method: str) -> torch.Tensor:
    """TIES (arXiv 2306.01708): trim, elect the sign on the unweighted trimmed tensors, weighted
    disjoint mean."""
    stacked = torch.stack([trim(t, density) for t in tensors])
    agree = elected_sign_mask(stacked, sign_method)
    return disjoint_mean(stacked * weights.view(-1, *([1] * (stacked.dim() - 1))), agree)


def dare_linear(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """DARE (arXiv 2311.03099) then ``Σ w_i·T_i``."""
    return task_arithmetic([drop_and_rescale(t, density, generator) for t in tensors], weights)


def dare_ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
              sign_method: str, generator: torch.Generator | None) -> torch.Tensor:
    """DARE then TIES' sign election and disjoint mean (no magnitude trim)."""
    stacked = torch.stack([drop_and_rescale(t, density, generator) for t in tensors])
    agree = elected_sign_mask(stacked, sign_method)
    return disjoint_mean(stacked * weights.view(-1, *([1] * (stacked.dim() - 1))), agree)


def merger(recipe: Recipe, generator: torch.Generator | None
           ) -> Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The elementwise merge of ``recipe.how`` (the part before ``_svd``) as ``f(tensors, w)``."""
    base = recipe.how.removesuffix("_svd")
    density, sign = recipe.density or 1.0, recipe.majority_sign_method
    if base in ("linear", "svd"):
        return task_arithmetic
    if base == "ties":
        return lambda ts, w: ties_merge(ts, w, density, sign)
    if base == "dare_linear":
        return lambda ts, w: dare_linear(ts, w, density, generator)
    if base == "dare_ties":
        return lambda ts, w: dare_ties(ts, w, density, sign, generator)
    raise ConfigError(f"no elementwise merge for how={recipe.how!r}")  # pragma: no cover


def truncated_svd(delta: torch.Tensor, rank: int, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B [out, rank], A [rank, in])`` with ``B·A`` the best rank-``rank`` approximation of
    ``delta``; zero components pad a ``rank`` above ``min(out, in)``. ``clamp`` as peft's
    ``svd_clamp``: both clipped to ``±quantile(concat(B, A), clamp)``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b, a = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    missing = rank - b.shape[1]
    if missing > 0:
        b = torch.cat([b, b.new_zeros(b.shape[0], missing)], 1)
        a = torch.cat([a, a.new_zeros(missing, a.shape[1])], 0)
    return b, a


# ---- validation -------------------------------------------------------------------------------
def check_recipe(how: object, weights: object, n_sources: int, density: object = None,
                 majority_sign_method: object = None, seed: object = None, svd_rank: object = None,
                 svd_clamp: object = None) -> Recipe:
    """Every option checked against ``how``; a :class:`ConfigError` names the first problem."""
    if not isinstance(how, str) or how not in WAYS:
        raise ConfigError(f"how={clip(repr(how))} is not a way to combine adapters; choose one of "
                          f"{', '.join(WAYS)}")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ConfigError(f"weights must be a list of numbers, one per source, got {clip(repr(weights))}")
    if len(weights) != n_sources:
        raise ConfigError(f"{len(weights)} weight(s) for {n_sources} source adapter(s); give one each")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"weights must be finite numbers, got {clip(repr(w))}")

    def only_for(value: object, option: str, ways: set[str]) -> None:
        if value is not None and how not in ways:
            raise ConfigError(f"{option} does not apply to how={how!r}; it is for {', '.join(sorted(ways))}")

    only_for(density, "density", _DENSITY)
    only_for(majority_sign_method, "majority_sign_method", _SIGN)
    only_for(seed, "seed", _RANDOM)
    only_for(svd_rank, "svd_rank", _SVD)
    only_for(svd_clamp, "svd_clamp", _SVD)
    if how in _DENSITY:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"how={how!r} needs density in (0, 1], the fraction of entries kept "
                              f"(the TIES paper keeps 0.2), got {clip(repr(density))}")
    if majority_sign_method is not None and majority_sign_method not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method must be one of {SIGN_METHODS}, got "
                          f"{clip(repr(majority_sign_method))}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ConfigError(f"seed must be a non-negative integer, got {clip(repr(seed))}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int)
                                 or not 1 <= svd_rank <= 65536):
        raise ConfigError(f"svd_rank must be an integer in [1, 65536], got {clip(repr(svd_rank))}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 < svd_clamp <= 1):
        raise ConfigError(f"svd_clamp is a quantile in (0, 1], got {clip(repr(svd_clamp))}")
    return Recipe(how, tuple(float(w) for w in weights),  # type: ignore[union-attr]
                  None if density is None else float(density),  # type: ignore[arg-type]
                  str(majority_sign_method or "total"), seed,  # type: ignore[arg-type]
                  svd_rank, None if svd_clamp is None else float(svd_clamp))  # type: ignore[arg-type]


def _site_key(site) -> tuple:
    parts = tuple((p.role, None if p.index is None else tuple(p.index.tolist())) for p in site.parts)
    return (site.module, parts, site.num_experts)


def check_sources(adapters: AdapterSet, new_name: str, sources: object, recipe: Recipe) -> list[Adapter]:
    """The source adapters, checked: distinct, plain LoRA or (IA)³ of one kind, unmerged, on the
    same sites, with what ``recipe.how`` needs of their ranks."""
    check_name(new_name)
    if new_name in adapters:
        raise AdapterNameError(f"an adapter named {new_name!r} exists; remove it or pick another")
    if isinstance(sources, str) or not isinstance(sources, Sequence) or not sources:
        raise ConfigError(f"sources must be a non-empty list of adapter names, got {clip(repr(sources))}")
    if len(set(sources)) != len(sources):
        raise AdapterNameError(f"an adapter is named twice in {list(sources)}")
    found = [adapters[n] for n in sources]  # AdapterNameError for an unknown one
    for name, a in zip(sources, found):
        if a.members:
            raise ConfigError(f"{name!r} is a fusion; only LoRA and (IA)³ adapters can be combined")
        if not isinstance(a.config, (LoRAConfig, IA3Config)):
            raise ConfigError(f"{name!r} is a {a.config.method} adapter; only LoRA and (IA)³ adapters "
                              "can be combined (the others add a nonlinear module, no weight update)")
        if a.merged:
            raise AdapterStateError(f"adapter {name!r} is merged into the weights; unmerge it before "
                                    "combining it (the combined adapter would count it twice)")
    methods = {a.config.method for a in found}
    if len(methods) > 1:
        raise ConfigError(f"the sources mix methods {sorted(methods)}; combine adapters of one method")
    first = found[0]
    for name, a in zip(sources[1:], found[1:]):
        if [_site_key(s) for s in a.sites] != [_site_key(s) for s in first.sites]:
            mine, theirs = {s.module for s in first.sites}, {s.module for s in a.sites}
            diff = sorted(mine ^ theirs)[:3] or ["the same modules, but other roles of a fused one"]
            raise ConfigError(f"{sources[0]!r} and {name!r} adapt different sites ({clip(str(diff))}); "
                              "combined adapters must act on the same modules")
    if isinstance(first.config, IA3Config):
        if recipe.how != "linear":
            raise ConfigError(f"(IA)³ adapters combine with how='linear' only (l = Σ w_i·l_i, as in peft); "
                              f"got how={recipe.how!r}")
        for name, a in zip(sources[1:], found[1:]):
            if [p.scale_input for p in a.pieces.values()] != [p.scale_input for p in first.pieces.values()]:
                raise ConfigError(f"{sources[0]!r} and {name!r} scale the input at different modules "
                                  "(scale_input); their vectors cannot be added")
        return found
    experts = [s.module for s in first.sites if s.num_experts is not None]
    if experts:
        raise ConfigError(f"LoRA on routed experts' 3-D parameters ({experts[0]}, ...) cannot be combined "
                          "yet (peft's add_weighted_adapter refuses target_parameters too); combine "
                          "adapters on Linear modules")
    ranks = [a.config.r for a in found]  # type: ignore[attr-defined]
    if recipe.how in _SAME_RANK and len(set(ranks)) > 1:
        raise ConfigError(f"how={recipe.how!r} combines the A and B factors entry by entry, so the "
                          f"ranks must be equal; got {dict(zip(sources, ranks))}. Use 'cat' or 'svd'")
    return found


# ---- combining --------------------------------------------------------------------------------
def combine(adapters: AdapterSet, new_name: str, sources: Sequence[str], weights: Sequence[float],
            how: str = "linear", *, density: float | None = None, majority_sign_method: str | None = None,
            seed: int | None = None, svd_rank: int | None = None, svd_clamp: float | None = None) -> str:
    """Add adapter ``new_name`` combining ``sources`` with ``weights`` (see the module docstring);
    everything is checked and computed before the model changes. Returns ``new_name``; the new
    adapter is inactive, like one from :meth:`AdapterSet.add`."""
    if isinstance(sources, str) or not isinstance(sources, Sequence):
        raise ConfigError(f"sources must be a list of adapter names, got {clip(repr(sources))}")
    recipe = check_recipe(how, weights, len(sources), density, majority_sign_method, seed, svd_rank,
                          svd_clamp)
    found = check_sources(adapters, new_name, sources, recipe)
    generator = None if recipe.seed is None else torch.Generator().manual_seed(recipe.seed)
    first = found[0].config
    if isinstance(first, IA3Config):
        config: LoRAConfig | IA3Config = first
    else:
        assert isinstance(first, LoRAConfig)
        ranks = [a.config.r for a in found]  # type: ignore[attr-defined]
        rank = (sum(ranks) if recipe.how == "cat" else (recipe.svd_rank or max(ranks))
                if recipe.how in _SVD else ranks[0])
        if rank > 65536:
            raise ConfigError(f"how='cat' gives rank {rank}, above LoRA's limit of 65536")
        config = LoRAConfig(r=rank, alpha=float(rank), dropout=first.dropout, targets=first.targets)
    with warnings.catch_warnings():
        # The sources were built on these targets and warned already.
        warnings.simplefilter("ignore", PartialTargetWarning)
        built = adapters.build(config)
    if [_site_key(s) for s in built.sites] != [_site_key(s) for s in found[0].sites]:
        raise ConfigError(f"the targets of {sources[0]!r} no longer resolve to its sites on this model; "
                          "cannot build the combined adapter there")  # pragma: no cover - defensive
    with torch.no_grad():
        for module, piece in built.pieces.items():
            olds = [a.pieces[module] for a in found]
            if isinstance(piece, IA3):
                _fill_ia3(piece, olds, recipe)  # type: ignore[arg-type]
            else:
                assert isinstance(piece, LoRA)
                _fill_lora(piece, olds, recipe, generator)  # type: ignore[arg-type]
    adapters.install(new_name, built)
    return new_name


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _fill_ia3(piece: IA3, olds: list[IA3], recipe: Recipe) -> None:
    """``l = Σ w_i·l_i`` over the targeted features (an untargeted feature of a fused module stays
    at 1, where peft's full-length vectors would give it ``Σ w_i``)."""
    dtype = _work_dtype(olds[0].ia3_l)
    w = torch.tensor(recipe.weights, dtype=dtype, device=piece.ia3_l.device)
    piece.ia3_l.copy_(task_arithmetic([o.ia3_l.to(dtype) for o in olds], w))


def _gather_B(piece: LoRA, full: torch.Tensor) -> torch.Tensor:
    """``lora_B`` of ``piece`` from a full ``[out, parts·r]`` matrix (inverse of ``full_B``)."""
    return full[piece.rows, piece.cols] if piece.sliced else full


def _fill_lora(piece: LoRA, olds: list[LoRA], recipe: Recipe, generator: torch.Generator | None) -> None:
    dtype = _work_dtype(olds[0].lora_A)
    weights = recipe.weights
    As = [o.lora_A.to(dtype) for o in olds]
    Bs = [o.full_B().to(dtype) for o in olds]  # as peft sees them: zero outside a fused part's block
    scales = [o.scaling for o in olds]
    dev = piece.lora_A.device
    if recipe.how == "cat":
        parts = piece.lora_A.shape[0] // piece.lora_B.shape[1]
        # peft stacks the sources' ranks; here each role's rank block of the new adapter stacks the
        # sources' blocks of that role, which is the same ΔW with the rank index reordered.
        a_blocks, b_blocks = [], []
        for p in range(parts):
            for a, b, w, s in zip(As, Bs, weights, scales):
                r = a.shape[0] // parts
                a_blocks.append(a[p * r:(p + 1) * r] * w * s)
                b_blocks.append(b[:, p * r:(p + 1) * r])
        piece.lora_A.copy_(torch.cat(a_blocks, 0))
        piece.lora_B.copy_(_gather_B(piece, torch.cat(b_blocks, 1)))
    elif recipe.how in _SVD:
        w = torch.tensor(weights, dtype=dtype, device=dev)
        deltas = [b @ a * s for a, b, s in zip(As, Bs, scales)]  # peft's get_delta_weight
        delta = merger(recipe, generator)(deltas, w)
        _factorise_per_part(piece, delta, recipe)
    else:
        # peft: the weight's magnitude split as √ over A and B, its sign on A only.
        signed = [math.sqrt(abs(w * s)) * (1 if w * s >= 0 else -1) for w, s in zip(weights, scales)]
        wa = torch.tensor(signed, dtype=dtype, device=dev)
        wb = torch.tensor([math.sqrt(abs(w * s)) for w, s in zip(weights, scales)], dtype=dtype, device=dev)
        merge = merger(recipe, generator)
        new_a = merge(As, wa)  # peft's draw order: every A, then every B
        new_b = merge(Bs, wb)
        piece.lora_A.copy_(new_a)
        piece.lora_B.copy_(_gather_B(piece, new_b))


def _factorise_per_part(piece: LoRA, delta: torch.Tensor, recipe: Recipe) -> None:
    """Each targeted role's rows of ``delta`` as its own rank-r block of ``piece``."""
    r = piece.lora_B.shape[1]
    index = _part_rows(piece, delta.shape[0])
    start = 0
    for p, rows in enumerate(index):
        b, a = truncated_svd(delta if rows is None else delta[rows], r, recipe.svd_clamp)
        piece.lora_A[p * r:(p + 1) * r].copy_(a)
        n = b.shape[0]
        piece.lora_B[start:start + n].copy_(b)
        start += n


def _part_rows(piece: LoRA, out: int) -> list[torch.Tensor | None]:
    """The output rows of each part of ``piece`` (``[None]``: one part over every row)."""
    if not piece.sliced:
        return [None]
    parts = piece.lora_A.shape[0] // piece.lora_B.shape[1]
    r = piece.lora_B.shape[1]
    part_of_row = piece.cols[:, 0] // r  # lora_B's rows run part by part (Site.out_index order)
    rows = piece.rows[:, 0]
    return [rows[part_of_row == p] for p in range(parts)]
