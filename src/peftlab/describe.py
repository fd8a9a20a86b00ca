"""The role -> modules table peftlab will use on a model, to check before training.

``describe_roles(model)`` resolves every role of the model's role map (built-in, inferred from
the structure, or the one given to :func:`peftlab.attach`) into the modules it targets;
``peftlab inspect-model MODEL`` prints it.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from peftlab.errors import TargetError
from peftlab.roles import ROLES, RoleMap, role_map_for
from peftlab.sites import find_sites


@dataclasses.dataclass(frozen=True)
class RoleRow:
    """One role: its modules with block numbers as ``N`` and how many blocks each occurs in,
    the output features it takes of a fused module (``None``: all), and a note."""

    role: str
    modules: tuple[tuple[str, int], ...]
    features: str | None = None
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class RoleTable:
    model_type: str | None
    source: str
    rows: tuple[RoleRow, ...]
    notes: tuple[str, ...] = ()

    def __getitem__(self, role: str) -> RoleRow:
        for row in self.rows:
            if row.role == role:
                return row
        raise KeyError(role)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(row.role for row in self.rows)

    def __str__(self) -> str:
        source = {"built-in": "built-in role map", "inferred": "inferred from the model's structure",
                  "given": "role map given to attach()"}.get(self.source, self.source)
        lines = [f"model_type {self.model_type!r}: roles {source}"]
        if not self.rows:
            lines.append("  (no roles)")
        shown: set[str] = set()
        for row in self.rows:
            for i, (module, blocks) in enumerate(row.modules):
                label = row.role if i == 0 else ""
                where = f"  ({blocks} block{'s' if blocks != 1 else ''})"
                part = f"  features {row.features}" if row.features else ""
                lines.append(f"  {label:<15} {module}{where}{part}")
            if row.note and row.note not in shown:  # fused q/k/v share one note
                shown.add(row.note)
                lines.append(f"  {'':<15} note: {row.note}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def describe_roles(model: nn.Module, role_map: RoleMap | None = None) -> RoleTable:
    """What each role targets on ``model``: with ``role_map``, that map; else the map of the
    model's :class:`~peftlab.AdapterSet` if attached, else the default (built-in or inferred)."""
    if role_map is None:
        attached = model.__dict__.get("_peftlab_adapters")
        role_map = attached.role_map if attached is not None else role_map_for(model)
    rows = []
    for role in sorted(role_map.roles, key=lambda r: ROLES.index(r) if r in ROLES else len(ROLES)):
        try:
            sites = find_sites(model, (role,), role_map)
        except TargetError:
            continue  # a role of the family this model does not have (cross_* on an encoder)
        counts: dict[str, int] = {}
        for site in sites:
            key = re.sub(r"(^|\.)\d+(?=\.)", r"\1N", site.module)
            counts[key] = counts.get(key, 0) + 1
        index = sites[0].out_index
        features = None if index is None else _features(index, sites[0].out_features)
        found = role_map.get(role)
        rows.append(RoleRow(role, tuple(counts.items()), features, found.note if found else None))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return RoleTable(model_type, role_map.source, tuple(rows), tuple(role_map.notes))


def _features(index: torch.Tensor, out: int) -> str:
    """``[a:b] of out`` for a contiguous slice, else how many and that they are interleaved."""
    lo, hi = int(index.min()), int(index.max()) + 1
    if hi - lo == len(index) and bool((index.diff() == 1).all()):
        return f"[{lo}:{hi}] of {out}"
    return f"{len(index)} of {out}, interleaved"
