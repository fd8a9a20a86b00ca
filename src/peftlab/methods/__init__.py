"""The registry of methods: config class -> how to build one piece per site.

Each method lives in its own module with the paper's math in the docstring. A method is plain
data: its config class, a function building the piece for one site, and optionally a function
building a module shared by all of the adapter's pieces (Compacter's rules). ``experts`` says
whether ``build`` also handles the 3-D parameters of routed experts (sites with ``num_experts``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError
from peftlab.layer import Piece
from peftlab.methods import bottleneck, compacter, fusion, ia3, lora
from peftlab.sites import Site


@dataclasses.dataclass(frozen=True)
class Method:
    """How one method turns its config and a site into a piece."""

    config: type[AdapterConfig]
    build: Callable[[AdapterConfig, Site, nn.Module | None], Piece]
    shared: Callable[[AdapterConfig, list[Site]], nn.Module | None] | None = None
    experts: bool = False


METHODS: dict[str, Method] = {
    "lora": Method(lora.LoRAConfig, lora.build, experts=True),
    "ia3": Method(ia3.IA3Config, ia3.build, experts=True),
    "bottleneck": Method(bottleneck.BottleneckConfig, bottleneck.build),
    "compacter": Method(compacter.CompacterConfig, compacter.build, compacter.make_shared),
    "fusion": Method(fusion.FusionConfig, fusion.build),  # built by AdapterSet.add_fusion
}


def method_for(name_or_config: str | AdapterConfig) -> Method:
    """The registered method for a config (or a method name read from a file)."""
    name = name_or_config if isinstance(name_or_config, str) else name_or_config.method
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]
