"""Finding where an adapter attaches: targets (roles or module-name regexes) -> modules.

A target is a role name from :data:`peftlab.roles.ROLES`, looked up in the model's role map, or
any other string, taken as a regular expression searched in full module names. Every target must
match at least one linear-like module; a target that matches nothing is an error, never a no-op.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import torch
from torch import nn

from peftlab.errors import TargetError
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
    """A module an adapter acts on, the parts of it that are targeted, and its block."""

    module: str
    parts: tuple[Part, ...]
    block: str
    in_features: int
    out_features: int

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
                yield full, child.base
            elif is_linear_like(child):
                yield full, child
            else:
                yield from walk(child, full)

    yield from walk(model, "")


def _describe(model: nn.Module, limit: int = 12) -> str:
    shapes = sorted({re.sub(r"(^|\.)\d+(?=\.|$)", r"\1N", n) for n, _ in linear_modules(model)})
    more = f" (and {len(shapes) - limit} more)" if len(shapes) > limit else ""
    return ", ".join(shapes[:limit]) + more


def find_sites(model: nn.Module, targets: tuple[str, ...], role_map: RoleMap | None) -> list[Site]:
    """Resolve ``targets`` on ``model`` into sites, in module order."""
    if not targets:
        raise TargetError("no targets given: pass role names (e.g. 'query') or module-name regexes")
    modules = dict(linear_modules(model))
    config = getattr(model, "config", None)
    found: dict[str, list[Part]] = {}
    for target in targets:
        pattern, select = _pattern(model, target, role_map)
        regex = compile_pattern(pattern, "target", TargetError)
        hits = [name for name in modules if regex.search(name)]
        if not hits:
            raise TargetError(
                f"target {target!r} (pattern {pattern!r}) matched no Linear/Conv1D module. "
                f"This model's linear modules: {_describe(model)}"
            )
        for name in hits:
            out = _out_features(modules[name])
            index = select(config, out) if select is not None else None
            found.setdefault(name, []).append(Part(target if target in ROLES else None, index))
    sites = []
    for name in modules:  # module order, so that stacking and saving are deterministic
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
        w = modules[name].weight
        in_f, out_f = (w.shape[0], w.shape[1]) if not isinstance(modules[name], nn.Linear) else (
            w.shape[1], w.shape[0])
        sites.append(Site(name, tuple(parts), block_of(name), in_f, out_f))
    return sites


def _whole_fused(role_map: RoleMap | None, role: str | None) -> bool:
    found = role_map.get(role) if role_map is not None and role is not None else None
    return found is not None and found.whole_fused


def _out_features(module: nn.Module) -> int:
    w = module.weight
    return w.shape[0] if isinstance(module, nn.Linear) else w.shape[1]


def _pattern(model: nn.Module, target: str, role_map: RoleMap | None):
    if target not in ROLES:
        return target, None
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
    return role.pattern, role.select
