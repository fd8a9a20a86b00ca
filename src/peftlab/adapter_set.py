"""AdapterSet: the named adapters on one model, which of them run, which train, merging, files.

The model stays a plain ``nn.Module``: adapters live inside :class:`AdaptedLayer` wrappers that
replace the targeted projections, and the set itself is a plain attribute of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab import ties
from peftlab.config import AdapterConfig
from peftlab.errors import (
    AdapterNameError,
    AdapterStateError,
    ConfigError,
    PartialTargetWarning,
    TargetError,
)
from peftlab.experts import AdaptedExperts, AdaptedParameter, experts_layout
from peftlab.layer import AdaptedLayer, BaseLayer, Piece, routing
from peftlab.methods import REGISTRY, method_for
from peftlab.names import check_name
from peftlab.roles import RoleMap, role_map_for
from peftlab.sequence import SequenceHooks, current_routes, input_embeddings, sequence_routing
from peftlab.sites import Site, find_sites, partial_roles

_ATTR = "_peftlab_adapters"


@dataclasses.dataclass
class Adapter:
    """One named adapter: its config, its sites, its pieces by module, extra trained modules,
    for a fusion the adapters it fuses, and ``notes`` on its placement (roles it reaches in part)."""

    config: AdapterConfig
    sites: list[Site]
    pieces: dict[str, Piece]
    shared: nn.Module | None = None
    extras: tuple[str, ...] = ()
    merged: bool = False
    members: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for piece in self.pieces.values():
            for p in piece.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    name: str
    method: str
    parameters: int
    percent: float
    sites: int
    active: bool
    merged: bool
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Summary:
    """Per-adapter trainable parameters and their share of the base model; ``notes`` say where
    the roles came from when they were inferred, and which roles cover a whole fused module."""

    base_parameters: int
    rows: tuple[SummaryRow, ...]
    notes: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> SummaryRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def __str__(self) -> str:
        lines = [f"{'adapter':<20} {'method':<12} {'params':>12} {'% base':>8} {'sites':>6}  state",
                 "-" * 70]
        for r in self.rows:
            state = "merged" if r.merged else ("active" if r.active else "")
            lines.append(f"{r.name:<20} {r.method:<12} {r.parameters:>12,} {r.percent:>8.4f} "
                         f"{r.sites:>6}  {state}")
        lines.append(f"base model parameters: {self.base_parameters:,}")
        lines += [f"note ({r.name}): {note}" for r in self.rows for note in r.notes]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class AdapterSet:
    """The adapters attached to one model. Get it with :func:`peftlab.attach`."""

    def __init__(self, model: nn.Module, role_map: RoleMap | None = None) -> None:
        self.model = model
        self.role_map = role_map if role_map is not None else role_map_for(model)
        self._adapters: dict[str, Adapter] = {}
        self._active: tuple[str, ...] = ()
        self._untied: dict[str, ties.Untied] = {}  # module -> its tie, undone for a merge
        self._sequence: SequenceHooks | None = None  # hooks of sequence-level adapters, while any

    # ---- inspection -------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    @property
    def active(self) -> tuple[str, ...]:
        return self._active

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __getitem__(self, name: str) -> Adapter:
        if name not in self._adapters:
            raise AdapterNameError(f"no adapter named {name!r}; adapters: {list(self._adapters)}")
        return self._adapters[name]

    def config(self, name: str) -> AdapterConfig:
        return self[name].config

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The adapter's own trainable tensors (shared ones once)."""
        return self[name].parameters()

    def base_parameters(self) -> int:
        """Parameters of the model without any adapter."""
        own = {id(p) for a in self._adapters.values() for p in a.parameters()}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in own)

    def summary(self) -> Summary:
        base = self.base_parameters()
        rows = tuple(
            SummaryRow(n, a.config.method, a.num_parameters(), 100.0 * a.num_parameters() / base,
                       len(a.sites), n in self._active, a.merged, a.notes)
            for n, a in self._adapters.items()
        )
        return Summary(base, rows, self._notes())

    def _notes(self) -> tuple[str, ...]:
        """Remarks on the roles the adapters use: inferred, or a whole fused module."""
        used = [(n, r) for n, a in self._adapters.items() for s in a.sites for r in s.roles if r]
        if not used:
            return ()
        notes = []
        if self.role_map is not None and self.role_map.source == "inferred":
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            notes.append(f"roles inferred from the model's structure (no built-in map for "
                         f"model_type {model_type!r}); check them with peftlab.describe_roles(model)")
        for name, role in used:
            found = self.role_map.get(role) if self.role_map is not None else None
            if found is not None and found.note:
                notes.append(f"{name}: {found.note}")
        return tuple(dict.fromkeys(notes))

    def layers(self) -> Iterator[tuple[str, AdaptedLayer | AdaptedParameter]]:
        """Every wrapped module: Linear layers and adapted 3-D expert parameters."""
        for name, module in self.model.named_modules():
            if isinstance(module, (AdaptedLayer, AdaptedParameter)):
                yield name, module

    # ---- adding and removing ----------------------------------------------------------------
    def add(self, name: str, config: AdapterConfig) -> None:
        """Add adapter ``name`` built from ``config``. It is inactive until :meth:`activate`."""
        check_name(name)
        if name in self._adapters:
            raise AdapterNameError(f"an adapter named {name!r} exists; remove it or pick another")
        self.install(name, self.build(config))

    def add_fusion(self, name: str, members: Sequence[str], config: AdapterConfig | None = None) -> None:
        """Add fusion ``name`` of the adapters ``members``, of any kinds (see
        :mod:`peftlab.methods.fusion`; ``config`` defaults to ``FusionConfig()``). Activating it
        runs the members through it; ``train(name)`` trains the fusion only."""
        from peftlab.methods.fusion import FusionConfig

        check_name(name)
        if name in self._adapters:
            raise AdapterNameError(f"an adapter named {name!r} exists; remove it or pick another")
        if isinstance(members, str) or not members:
            raise ConfigError(f"members must be a non-empty list of adapter names, got {members!r}")
        config = FusionConfig() if config is None else config
        if not isinstance(config, FusionConfig):
            raise ConfigError(f"add_fusion needs a FusionConfig, got {type(config).__name__}")
        self.install(name, self.build(config, tuple(members)))

    def combine(self, new_name: str, sources: Sequence[str], weights: Sequence[float],
                how: str = "linear", *, density: float | None = None,
                majority_sign_method: str | None = None, seed: int | None = None,
                svd_rank: int | None = None, svd_clamp: float | None = None) -> str:
        """Add ``new_name``, an ordinary LoRA (or (IA)³) adapter combining ``sources`` with
        ``weights``: ``how`` is linear, cat, svd, ties, dare_linear, dare_ties (or ties_svd,
        dare_linear_svd, dare_ties_svd), as HF peft's ``add_weighted_adapter`` defines them; see
        :mod:`peftlab.arithmetic`. Checked fully before the model changes; returns the name."""
        from peftlab.arithmetic import combine

        return combine(self, new_name, sources, weights, how, density=density,
                       majority_sign_method=majority_sign_method, seed=seed, svd_rank=svd_rank,
                       svd_clamp=svd_clamp)

    def build(self, config: AdapterConfig, members: tuple[str, ...] = ()) -> Adapter:
        """Everything an adapter needs, built and checked without touching the model; then
        :meth:`install` puts it in. Loaders fill the built pieces' tensors in between, so that a
        file that does not fit is refused with the model unchanged."""
        method = method_for(config)
        if method.sequence is not None:
            return self._build_sequence(config, method.sequence)
        if (config.method == "fusion") != bool(members):
            raise ConfigError("a fusion needs member adapters: use add_fusion(name, members)"
                              if members == () else f"a {config.method} adapter has no members")
        sites = self._fusion_sites(members) if members else find_sites(
            self.model, config.targets, self.role_map)
        experts = [s.module for s in sites if s.num_experts is not None]
        if experts and not method.experts:
            raise TargetError(
                f"{config.method} adapters act on a layer's activations, which routed experts' 3-D "
                f"parameters do not have ({experts[0]}{' ...' if len(experts) > 1 else ''}); only "
                f"{', '.join(n for n, m in REGISTRY.items() if m.experts)} adapt them. Target the "
                "shared expert or attention instead")
        notes = () if members else tuple(partial_roles(self.model, sites, self.role_map))
        for note in notes:
            warnings.warn(f"targets ({', '.join(config.targets)}): {note}", PartialTargetWarning,
                          stacklevel=3)
        shared = method.shared(config, sites) if method.shared else None
        pieces = {}
        for site in sites:
            base = self._base_layer(site.module)
            piece = method.build(config, site, base, shared)
            weight = base.weight
            pieces[site.module] = piece.to(device=weight.device, dtype=weight.dtype)
            if members:
                piece.members = members
        return Adapter(config, sites, pieces, shared, members=members, notes=notes)

    def _build_sequence(self, config: AdapterConfig, make: Any) -> Adapter:
        """A sequence-level adapter (:mod:`peftlab.sequence`): no sites; its one piece is kept in
        the input embeddings' wrapper, which leaves the embeddings' output as it is."""
        module_name, module = input_embeddings(self.model)
        piece = make(config, self.model)
        weight = (module.base if isinstance(module, AdaptedLayer) else module).weight
        return Adapter(config, [], {module_name: piece.to(device=weight.device)})

    def _fusion_sites(self, members: tuple[str, ...]) -> list[Site]:
        """Every site of any member, in module order; at least one must be common to all."""
        if len(set(members)) != len(members):
            raise AdapterNameError(f"an adapter is named twice in {list(members)}")
        for m in members:
            if self[m].members:
                raise ConfigError(f"{m!r} is a fusion; a fusion's members must be plain adapters")
            if self[m].merged:
                raise AdapterStateError(f"adapter {m!r} is merged; unmerge it before fusing it")
        common = set.intersection(*({s.module for s in self[m].sites} for m in members))
        if not common:
            raise TargetError(f"adapters {list(members)} act on no common module, so there is "
                              "nothing to fuse; place them at the same modules (e.g. 'ffn_down')")
        sites = {s.module: s for m in members for s in self[m].sites}
        order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        return sorted(sites.values(), key=lambda s: order[s.module])

    def install(self, name: str, adapter: Adapter) -> None:
        """Put an adapter made by :meth:`build` into the model under ``name`` (inactive)."""
        check_name(name)
        if name in self._adapters:
            raise AdapterNameError(f"an adapter named {name!r} exists; remove it or pick another")
        for module_name, piece in adapter.pieces.items():
            layer = self._wrap(module_name)
            layer.adapters[name] = piece
            # A new piece is in training mode (nn.Module's default); it must follow the model it
            # joins, or an adapter added to a model in eval mode would run its dropout at inference.
            piece.train(layer.training)
        self._adapters[name] = adapter
        if self._sequence is None and self._has_sequence():
            self._sequence = SequenceHooks(self)
        self._refresh()

    def remove(self, name: str) -> None:
        """Delete an adapter; layers left without adapters get their original module back."""
        adapter = self[name]
        if adapter.merged:
            raise AdapterStateError(f"adapter {name!r} is merged; unmerge it before removing it")
        self._refuse_if_fused(name, "removing")
        for module_name in adapter.pieces:
            layer = self._layer(module_name)
            del layer.adapters[name]
            if len(layer.adapters) == 0:
                self._unwrap(module_name, layer)
        del self._adapters[name]
        self._active = tuple(n for n in self._active if n != name)
        if self._sequence is not None and not self._has_sequence():
            self._sequence.remove()
            self._sequence = None
        self._refresh()

    def _has_sequence(self) -> bool:
        return any(p.kind == "sequence" for a in self._adapters.values() for p in a.pieces.values())

    # ---- running and training ---------------------------------------------------------------
    def activate(self, *names: str) -> None:
        """Run these adapters in forward, in this order; ``activate()`` gives the plain model.
        Merged adapters are part of the weights and must stay active until unmerged."""
        for n in names:
            self[n]
        if len(set(names)) != len(names):
            raise AdapterNameError(f"an adapter is named twice in {names}")
        dropped = [n for n, a in self._adapters.items() if a.merged and n not in names]
        if dropped:
            raise AdapterStateError(f"adapters {dropped} are merged into the weights; unmerge "
                                    "them before deactivating them")
        self._active = tuple(names)
        self._refresh()

    def _refresh(self) -> None:
        for _, layer in self.layers():
            layer.set_active(self._active)

    def train(self, name: str, extras: tuple[str, ...] | str = ()) -> list[nn.Parameter]:
        """Freeze the whole model except adapter ``name`` and its *extras*: the modules named in
        ``extras`` (e.g. ``("classifier",)``: a module name or a dotted suffix of one), trained
        along with the adapter and saved with it (peft calls them ``modules_to_save``). Returns
        the trainable parameters."""
        adapter = self[name]
        if name not in self._active:
            raise AdapterStateError(f"adapter {name!r} is not active; call activate({name!r}) first")
        if adapter.merged:
            raise AdapterStateError(f"adapter {name!r} is merged; unmerge it before training")
        extras = self.resolve_modules((extras,) if isinstance(extras, str) else tuple(extras))
        for p in self.model.parameters():
            p.requires_grad_(False)
        trainable = adapter.parameters()
        for module_name in extras:
            trainable += list(self.model.get_submodule(module_name).parameters())
        for p in trainable:
            p.requires_grad_(True)
        adapter.extras = extras
        return trainable

    def resolve_modules(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Full module names for names given in full or as a dotted suffix (``"classifier"``)."""
        modules = dict(self.model.named_modules())
        out: list[str] = []
        for want in names:
            hits = [n for n in modules if n == want or n.endswith("." + want)]
            if not hits:
                raise TargetError(f"no module named {want!r} to train along; top-level modules: "
                                  f"{[n for n, _ in self.model.named_children()]}")
            out += [h for h in hits if h not in out]
        return tuple(out)

    def _refuse_if_fused(self, name: str, doing: str) -> None:
        fusions = [n for n, a in self._adapters.items() if name in a.members]
        if fusions:
            raise AdapterStateError(f"adapter {name!r} is a member of fusion(s) {fusions}; remove "
                                    f"them before {doing} it")

    # ---- fusions and routing ----------------------------------------------------------------
    def _fusion(self, name: str) -> Adapter:
        if not self[name].members:
            raise AdapterNameError(f"adapter {name!r} is a {self[name].config.method} adapter, not a fusion")
        return self[name]

    def fusion_weights(self, name: str) -> torch.Tensor:
        """The mean attention each module of fusion ``name`` gave each member in the latest
        forward that ran it, as ``[modules, members]`` (modules in ``self[name].sites`` order)."""
        rows = [p.last_weights for p in self._fusion(name).pieces.values()]
        if any(r is None for r in rows):
            raise AdapterStateError(f"fusion {name!r} has not run yet; run the model with it first")
        return torch.stack(rows)  # type: ignore[arg-type]

    def fusion_penalty(self, name: str) -> torch.Tensor:
        """``value_identity_penalty · Σ ‖V − I‖²`` over fusion ``name``: add it to the loss."""
        adapter = self._fusion(name)
        total = torch.stack([p.penalty() for p in adapter.pieces.values()]).sum()
        return adapter.config.value_identity_penalty * total  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def route(self, entries: Sequence[str | Sequence[str] | None]) -> Iterator[None]:
        """Inside, example ``i`` of every batch runs with adapter ``entries[i]`` active (``None``:
        the base model; a tuple: several, as in :meth:`activate`) instead of :attr:`active`.
        Only the calling thread is routed. Do not add or remove adapters inside."""
        if isinstance(entries, str) or not entries:
            raise AdapterStateError("route takes a list with one adapter name (or None) per example")
        routes = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries]
        for names in set(routes):
            for n in names:
                self[n]
            if len(set(names)) != len(names):
                raise AdapterNameError(f"an adapter is named twice in {names}")
        merged = [n for n, a in self._adapters.items() if a.merged]
        if merged:
            raise AdapterStateError(f"adapters {merged} are merged into the weights, so every "
                                    "example would use them; unmerge them before routing")
        indexes: dict[Any, Any] = {}
        with routing({id(layer): layer.plan_route(routes, layer.weight.device, indexes)
                      for _, layer in self.layers()}), sequence_routing(self, routes):
            yield

    def current_route(self) -> list[tuple[str, ...]] | None:
        """Inside :meth:`route` on this thread, the adapters of each example (a tuple each, ``()``
        for the base model); else ``None``. Modules outside the adapters read it to follow the
        route (``peftlab serve`` gives each example its adapter's head this way)."""
        return current_routes(self)

    # ---- merging ----------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        """Fold an active mergeable adapter (LoRA, (IA)³, VeRA) into the base weights (no inference cost)."""
        adapter = self[name]
        if not adapter.config.mergeable:
            raise AdapterStateError(
                f"{adapter.config.method} adapters cannot be merged into the weights "
                f"({adapter.config.unmergeable_because}); mergeable methods: "
                f"{', '.join(n for n, m in REGISTRY.items() if m.config.mergeable)}")
        if adapter.merged:
            raise AdapterStateError(f"adapter {name!r} is already merged")
        self._refuse_if_fused(name, "merging")
        if name not in self._active:
            raise AdapterStateError(f"adapter {name!r} is not active; activate it before merging")
        for module_name, piece in adapter.pieces.items():
            layer = self._layer(module_name)
            clash = [n for n, p in layer.adapters.items() if n != name and n in self._active
                     and n not in layer.merged and p.kind in ("scale", "delta") and p.kind != piece.kind]
            if clash:
                raise AdapterStateError(
                    f"cannot merge {name!r}: at {module_name} it composes with active unmerged "
                    f"adapter(s) {clash}; merge or deactivate them first")
            problem = piece.merge_problem()
            if problem:
                raise AdapterStateError(f"cannot merge {name!r} at {module_name}: {problem}")
        self._refuse_under_weight_readers(name, adapter, "merge")
        self._untie_for_merge(adapter)
        for module_name in adapter.pieces:
            self._layer(module_name).merge(name)
        adapter.merged = True
        self._refresh()

    def _refuse_under_weight_readers(self, name: str, adapter: Adapter, doing: str) -> None:
        """Refuse to change a weight that an active, unmerged piece computes from (DoRA's norm
        of the weight it adapts): its output would change with the merge, so the merged model
        would not compute what the unmerged one did."""
        for module_name in adapter.pieces:
            layer = self._layer(module_name)
            readers = [n for n, p in layer.adapters.items() if n != name and n in self._active
                       and n not in layer.merged and p.reads_weight]
            if readers:
                raise AdapterStateError(
                    f"cannot {doing} {name!r}: at {module_name}, active adapter(s) {readers} compute "
                    f"from the weight {name!r} would change (DoRA's norm); "
                    + ("merge them first, or deactivate them" if doing == "merge" else
                       "deactivate them first"))

    def _untie_for_merge(self, adapter: Adapter) -> None:
        """Give each layer about to take the merge its own weight where it is tied to the input
        embeddings (see :mod:`peftlab.ties`); every layer is checked before any is changed."""
        shared = ties.shared_parameters(self.model)
        if not shared:
            return
        linear = [m for m in adapter.pieces if isinstance(self._layer(m), AdaptedLayer)]  # experts never tie
        todo = [m for m in linear if m not in self._untied and ties.check_untie(
            self.model, m, self._layer(m), self._layer(m).base, shared)]
        for module_name in todo:
            self._untied[module_name] = ties.untie(self.model, self._layer(module_name).base)

    def unmerge(self, name: str) -> None:
        """Take a merged adapter back out of the weights."""
        adapter = self[name]
        if not adapter.merged:
            raise AdapterStateError(f"adapter {name!r} is not merged")
        for module_name in adapter.pieces:
            merged = self._layer(module_name).merged
            if merged[-1] != name:
                raise AdapterStateError(f"unmerge {merged[merged.index(name) + 1:]} before {name!r}"
                                        " (reverse order of merging)")
        self._refuse_under_weight_readers(name, adapter, "unmerge")
        for module_name in adapter.pieces:
            layer = self._layer(module_name)
            layer.unmerge(name)
            if not layer.merged and module_name in self._untied:
                ties.retie(self.model, self._untied.pop(module_name))
        adapter.merged = False
        self._refresh()

    # ---- files ------------------------------------------------------------------------------
    def save(self, name: str, path: str | Path, extras: tuple[str, ...] | None = None) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` to directory ``path``
        atomically. ``extras`` (default: the extras given to :meth:`train`) are saved too."""
        from peftlab.io import save_adapter

        return save_adapter(self, name, Path(path), extras)

    def load(self, path: str | Path, name: str | None = None, with_extras: bool = True) -> str:
        """Load an adapter directory (validated fully before the model changes); returns its name.
        ``with_extras=False`` leaves out the modules saved with it (e.g. another task's head)."""
        from peftlab.io import load_adapter

        return load_adapter(self, Path(path), name, with_extras)

    def export_peft(self, name: str, path: str | Path) -> Path:
        """Write a LoRA, (IA)³ or VeRA adapter in HF peft's format."""
        from peftlab.interop.peft import export_peft

        return export_peft(self, name, Path(path))

    def import_peft(self, path: str | Path, name: str) -> str:
        """Load a LoRA, (IA)³ or VeRA adapter saved by HF peft's ``save_pretrained``."""
        from peftlab.interop.peft import import_peft

        return import_peft(self, Path(path), name)

    # ---- module plumbing --------------------------------------------------------------------
    def _layer(self, module_name: str) -> AdaptedLayer | AdaptedParameter:
        layer = self.model.get_submodule(module_name)
        assert isinstance(layer, (AdaptedLayer, AdaptedParameter))
        return layer

    def _base_layer(self, module_name: str) -> BaseLayer:
        """A read-only view of the frozen layer at a site: a module, or an expert parameter
        (``<experts>.<param>``)."""
        experts, param = self._experts_of(module_name)
        if experts is not None:
            base = experts.base if isinstance(experts, AdaptedExperts) else experts
            layout = experts_layout(base)[param]
            return BaseLayer(base, param, layout.transposed, layout.bias)
        module = self.model.get_submodule(module_name)
        return BaseLayer(module.base if isinstance(module, AdaptedLayer) else module)

    def _experts_of(self, module_name: str) -> tuple[nn.Module | None, str]:
        """(the experts module, parameter name) when ``module_name`` names a 3-D expert parameter."""
        parent, _, param = module_name.rpartition(".")
        module = self.model.get_submodule(parent) if parent else self.model
        return (module, param) if param in experts_layout(module) else (None, param)

    def _wrap(self, module_name: str) -> AdaptedLayer | AdaptedParameter:
        experts, param = self._experts_of(module_name)
        if experts is not None:
            if not isinstance(experts, AdaptedExperts):
                experts = AdaptedExperts(experts).train(experts.training)  # follows what it wraps
                self._set_module(module_name.rpartition(".")[0], experts)
            return experts.adapt(param)
        module = self.model.get_submodule(module_name)
        if isinstance(module, AdaptedLayer):
            return module
        layer = AdaptedLayer(module)
        layer.train(module.training)  # the wrapper follows the mode of what it wraps
        self._set_module(module_name, layer)
        return layer

    def _unwrap(self, module_name: str, layer: AdaptedLayer | AdaptedParameter) -> None:
        """Put back the original module of a layer that has no adapters left."""
        if isinstance(layer, AdaptedLayer):
            self._set_module(module_name, layer.base)
            return
        parent, _, param = module_name.rpartition(".")
        experts = self.model.get_submodule(parent)
        assert isinstance(experts, AdaptedExperts)
        experts.release(param)
        if not any(experts.parameter_layers()):
            self._set_module(parent, experts.base)

    def _set_module(self, module_name: str, module: nn.Module) -> None:
        parent, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def plain_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` of the wrapped model keyed as the plain model: ``<layer>.base.<p>`` ->
        ``<layer>.<p>``, adapter tensors left out."""
        layers = [name + "." for name, _ in self._wrappers()]
        out = {}
        for key, value in state_dict.items():
            layer = next((p for p in layers if key.startswith(p)), None)
            if layer is None:
                out[key] = value
            elif key.startswith(layer + "base."):
                out[layer + key[len(layer) + 5:]] = value
        return out

    def _wrappers(self) -> list[tuple[str, AdaptedLayer | AdaptedExperts]]:
        """The modules peftlab put in the model's tree in place of the originals."""
        return [(n, m) for n, m in self.model.named_modules()
                if isinstance(m, (AdaptedLayer, AdaptedExperts))]

    def _unwrap_all(self) -> None:
        for name, module in self._wrappers():
            self._set_module(name, module.base)


def attached(model: nn.Module) -> AdapterSet | None:
    """The model's :class:`AdapterSet` if :func:`attach` was called on it, else ``None``."""
    return model.__dict__.get(_ATTR)


def attach(model: nn.Module, role_map: RoleMap | None = None) -> AdapterSet:
    """The model's :class:`AdapterSet`, created on first call; the same object afterwards.
    ``role_map`` says where the roles are for a model peftlab has no built-in map for.

    While attached, the model's ``save_pretrained`` writes the plain model (original module
    names, merged adapters in the weights) and refuses while an adapter is not merged, since
    ``from_pretrained`` could not load the wrapped layout."""
    existing = attached(model)
    if existing is not None:
        if role_map is not None and role_map is not existing.role_map:
            raise AdapterStateError("this model is attached with another role map; detach first")
        return existing
    adapters = AdapterSet(model, role_map)
    object.__setattr__(model, _ATTR, adapters)
    if callable(getattr(model, "save_pretrained", None)):
        object.__setattr__(model, "save_pretrained", types.MethodType(_save_pretrained, model))
    return adapters


def _save_pretrained(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` of an attached model: the plain model with merged adapters, never the
    wrapped layout (``query.base.weight``) that ``from_pretrained`` would silently re-initialise."""
    adapters: AdapterSet = model.__dict__[_ATTR]
    unmerged = [n for n in adapters.names if not adapters[n].merged]
    if unmerged:
        raise AdapterStateError(
            f"model.save_pretrained would drop the unmerged adapter(s) {unmerged}. Save an adapter "
            "with adapters.save(name, dir); or merge it and save the model; or "
            "peftlab.detach(model, keep_merged=True) first. For HF Trainer checkpoints, use "
            "trainer = peftlab.adapter_checkpoints(trainer)")
    if kwargs.get("state_dict") is not None:
        kwargs["state_dict"] = adapters.plain_state_dict(kwargs["state_dict"])
    wrappers = adapters._wrappers()
    adapters._unwrap_all()
    try:
        return type(model).save_pretrained(model, *args, **kwargs)
    finally:
        for name, wrapper in wrappers:
            adapters._set_module(name, wrapper)


def detach(model: nn.Module, keep_merged: bool = False) -> nn.Module:
    """Remove every adapter and wrapper; the model's modules and state dict are the original.
    With merged adapters, pass ``keep_merged=True`` to keep them in the weights
    (merge-and-unload); otherwise this refuses."""
    adapters = attached(model)
    if adapters is None:
        return model
    merged = [n for n in adapters.names if adapters[n].merged]
    if merged and not keep_merged:
        raise AdapterStateError(f"adapters {merged} are merged into the weights; unmerge them, or "
                                "pass keep_merged=True to keep them there")
    adapters._unwrap_all()
    if adapters._sequence is not None:
        adapters._sequence.remove()
        adapters._sequence = None
    del model.__dict__[_ATTR]
    model.__dict__.pop("save_pretrained", None)
    return model
