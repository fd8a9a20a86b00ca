"""Finding where an adapter attaches: targets (roles or module-name regexes) -> modules.

A target is a role name from :data:`peftlab.roles.ROLES`, looked up in the model's role map, or
any other string, taken as a regular expression searched in full module names. Every target must
match at least one linear-like module; a target that matches nothing is an error, never a no-op.

The 3-D parameters of routed experts (:mod:`peftlab.experts`) are sites too, named
``<experts module>.<parameter>`` (``model.layers.0.mlp.experts.down_proj``); targets are searched
in these names as well. A set of targets that reaches some but not all of the modules playing a
role in one block (on Qwen2-MoE, ``shared_expert\\.down_proj$`` without the routed experts'
``down_proj``) is reported by :func:`partial_roles`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import torch
from torch import nn

from peftlab.errors import PeftlabError, TargetError
from peftlab.experts import AdaptedExperts, experts_layout
from peftlab.layer import AdaptedLayer, is_linear_like
from peftlab.patterns import compile_pattern
from peftlab.roles import ROLES, RoleMap


@dataclasses.dataclass(frozen=True, eq=False)
class Part:
    """One role at one module; ``index`` lists its output features in a fused module."""

    role: str | None
    index: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """A module an adapter acts on, the parts of it that are targeted, and its block. For a 3-D
    expert parameter, ``module`` is ``<experts module>.<parameter>``, ``num_experts`` its number of
    experts, and the features are those of one expert's matrix."""

    module: str
    parts: tuple[Part, ...]
    block: str
    in_features: int
    out_features: int
    num_experts: int | None = None

    @property
    def out_index(self) -> torch.Tensor | None:
        """All targeted output features (``None``: the whole output)."""
        if len(self.parts) == 1 and self.parts[0].index is None:
            return None
        return torch.cat([p.index for p in self.parts])

    @property
    def roles(self) -> tuple[str | None, ...]:
        return tuple(p.role for p in self.parts)


_BLOCK = re.compile(r"^((?:.*?\.)?\d+)(?:\.|$)")


def block_of(module_name: str) -> str:
    """The transformer block a module belongs to: its path up to the first numbered part."""
    m = _BLOCK.match(module_name)
    return m.group(1) if m else module_name


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every linear-like module, wrapped ones under their original name.
    Adapter internals (which may contain Linear layers themselves) are never listed."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, AdaptedLayer):
                if is_linear_like(child.base):  # (the input embeddings' wrapper is not)
                    yield full, child.base
            elif is_linear_like(child):
                yield full, child
            elif isinstance(child, AdaptedExperts):
                yield from walk(child.base, full)
            else:
                yield from walk(child, full)

    yield from walk(model, "")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """Something a target can name: a linear-like module or a 3-D expert parameter
    (``num_experts`` set; features per expert)."""

    in_features: int
    out_features: int
    num_experts: int | None = None


def candidates(model: nn.Module) -> dict[str, Candidate]:
    """Every linear-like module and 3-D expert parameter by name, in module order (the order of
    :func:`linear_modules`, each experts module's parameters where the module is)."""
    found: dict[str, Candidate] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            base = child.base if isinstance(child, AdaptedLayer) else child
            if is_linear_like(base):
                w = base.weight
                in_f, out_f = (w.shape[1], w.shape[0]) if isinstance(base, nn.Linear) else w.shape
                found[full] = Candidate(in_f, out_f)
                continue
            if isinstance(child, AdaptedLayer):
                continue  # adapter internals (a prefix MLP's Linear layers) are never sites
            layout = experts_layout(child)
            for param, p in layout.items():
                found[f"{full}.{param}"] = Candidate(p.in_features, p.out_features, p.num_experts)
            if not layout:
                walk(child, full)

    walk(model, "")
    return found


def _describe(model: nn.Module, limit: int = 12) -> str:
    shapes = sorted({re.sub(r"(^|\.)\d+(?=\.|$)", r"\1N", n)
                     + (" (3-D expert parameter)" if c.num_experts is not None else "")
                     for n, c in candidates(model).items()})
    more = f" (and {len(shapes) - limit} more)" if len(shapes) > limit else ""
    return ", ".join(shapes[:limit]) + more


def find_sites(model: nn.Module, targets: tuple[str, ...], role_map: RoleMap | None) -> list[Site]:
    """Resolve ``targets`` on ``model`` into sites, in module order."""
    if not targets:
        raise TargetError("no targets given: pass role names (e.g. 'query') or module-name regexes")
    modules = candidates(model)
    config = getattr(model, "config", None)
    found: dict[str, list[Part]] = {}
    for target in targets:
        pattern, select, experts_select = _pattern(model, target, role_map)
        regex = compile_pattern(pattern, "target", TargetError)
        hits = [name for name in modules if regex.search(name)]
        if not hits:
            raise TargetError(
                f"target {target!r} (pattern {pattern!r}) matched no Linear/Conv1D module or expert "
                f"parameter. This model's linear modules: {_describe(model)}"
            )
        for name in hits:
            c = modules[name]
            sel = select if c.num_experts is None else experts_select
            index = sel(config, c.out_features) if sel is not None else None
            found.setdefault(name, []).append(Part(target if target in ROLES else None, index))
    sites = []
    for name, c in modules.items():  # module order, so that stacking and saving are deterministic
        if name not in found:
            continue
        parts = found[name]
        if len(parts) > 1 and all(p.index is None and _whole_fused(role_map, p.role) for p in parts):
            # Roles sharing a fused module whose slices are unknown: act once on all of it.
            parts = parts[:1]
        if len(parts) > 1 and any(p.index is None for p in parts):
            raise TargetError(
                f"module {name!r} is matched by several targets {[p.role for p in parts]}, one of "
                "them covering the whole module; keep one of them"
            )
        sites.append(Site(name, tuple(parts), block_of(name), c.in_features, c.out_features,
                          c.num_experts))
    return sites


def partial_roles(model: nn.Module, sites: list[Site], role_map: RoleMap | None) -> list[str]:
    """One message per role that ``sites`` reach in part only: in some block, some of the modules
    (or expert parameters) playing the role are adapted for it and others are not. On Qwen2-MoE,
    ``shared_expert\\.down_proj$`` adapts the shared expert while the routed experts, which play
    ``ffn_down`` too, stay frozen. Blocks the sites do not reach at all are not partial."""
    if role_map is None:
        return []
    names = list(candidates(model))
    covered = {(s.module, p.role) for s in sites for p in s.parts}
    notes = []
    for role in ROLES:
        r = role_map.get(role)
        if r is None:
            continue
        try:
            regex = compile_pattern(r.pattern, "role", TargetError)
        except PeftlabError:
            continue  # a broken pattern of an untargeted role in a user's map is not ours to report
        blocks: dict[str, list[str]] = {}
        for n in names:
            if regex.search(n):
                blocks.setdefault(block_of(n), []).append(n)
        reached, missed = [], []
        for players in blocks.values():
            hit = [n for n in players if (n, None) in covered or (n, role) in covered]
            if hit and len(hit) < len(players):
                reached += hit
                missed += [n for n in players if n not in hit]
        if missed:
            notes.append(
                f"role {role!r} is reached only in part: {len(missed)} module(s) playing it in the "
                f"same blocks as adapted ones stay frozen, e.g. {missed[0]!r} while {reached[0]!r} "
                f"is adapted. Target the role {role!r} to adapt all of them, or add a target for "
                "the rest")
    return notes


def _whole_fused(role_map: RoleMap | None, role: str | None) -> bool:
    found = role_map.get(role) if role_map is not None and role is not None else None
    return found is not None and found.whole_fused


def _pattern(model: nn.Module, target: str, role_map: RoleMap | None):
    if target not in ROLES:
        return target, None, None
    role = role_map.get(target) if role_map is not None else None
    if role is None and (role_map is None or role_map.source == "inferred"):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        known = sorted(role_map.roles) if role_map is not None else []
        notes = "".join(f"; {n}" for n in role_map.notes) if role_map is not None else ""
        raise TargetError(
            f"peftlab has no built-in role map for this model (model_type={model_type!r}) and did "
            f"not find role {target!r} in its structure (roles found: {known}{notes}). Pass "
            "module-name regexes as targets instead, e.g. targets=(r'attn\\.q_proj$',), or "
            "attach(model, role_map=RoleMap({...})). "
            f"This model's linear modules: {_describe(model)}"
        )
    if role is None:
        known = sorted(r for r in role_map.roles)
        raise TargetError(f"this model family has no role {target!r}; its roles are {known}")
    return role.pattern, role.select, role.experts_select
