"""The registry of methods: everything the rest of peftlab knows about a method comes from here.

Each method lives in its own module, with the paper's math in the docstring, and ends with one
:class:`Method` (``METHOD = Method(...)``) that describes it completely:

* ``config``: its config class (``config.method`` names it in files, ``config.mergeable``);
* ``build(config, site, base, shared)``: the piece for one site. ``base`` is a read-only view of
  the layer being adapted (:class:`peftlab.layer.BaseLayer`: weight, bias, shapes), so that
  weight-aware methods (DoRA's norms) need nothing special in the wrapped layer;
* ``shared(config, sites)``: optionally one module shared by all the adapter's pieces
  (Compacter's rules);
* ``experts``: whether ``build`` also handles routed experts' 3-D parameters;
* ``presets``: the names the command line, ``compare`` and ``recommend`` know it by, each with its
  ready-made config, default learning rate, quality prior and a few words on what it is;
* ``peft``: how its adapters map to HF peft's files (:class:`peftlab.interop.codec.PeftCodec`),
  or ``None`` when peft has no such format;
* ``sequence(config, model)``: instead of ``build``, for methods that act on the token sequence
  rather than on Linear sites (prompt and prefix tuning): the adapter's one piece for the whole
  model (a :class:`peftlab.sequence.SequencePiece`; see that module for how it attaches);
* ``fold(adapter)``: optionally, the adapter as it is saved (prefix tuning's reparameterisation
  MLP folded away): a config and the pieces holding the tensors to write.

Adding a method is one new file plus one line in :data:`BUILT_IN`. A method defined elsewhere (a
plugin, a test) joins with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from peftlab.config import AdapterConfig
from peftlab.errors import ConfigError, UsageError
from peftlab.interop.codec import PeftCodec
from peftlab.layer import BaseLayer, Piece
from peftlab.sites import Site


@dataclasses.dataclass(frozen=True)
class Preset:
    """A ready-made configuration under a name users type (``--method pfeiffer``).

    ``lr``: the default learning rate (its source is in the method's docstring); ``quality``:
    ``recommend``'s prior, in validation points relative to full fine-tuning, from the papers;
    ``about``: what it is, in a few words, with no comparison to other methods (those are
    computed from measurements)."""

    name: str
    make: Callable[[], AdapterConfig]
    lr: float
    quality: float
    about: str


@dataclasses.dataclass(frozen=True)
class Method:
    """One method; see the module docstring."""

    config: type[AdapterConfig]
    build: Callable[[AdapterConfig, Site, BaseLayer, nn.Module | None], Piece] | None
    presets: tuple[Preset, ...] = ()
    shared: Callable[[AdapterConfig, list[Site]], nn.Module | None] | None = None
    experts: bool = False
    peft: PeftCodec | None = None
    sequence: Callable[[AdapterConfig, nn.Module], Piece] | None = None
    fold: Callable[[Any], tuple[AdapterConfig, dict[str, Piece]]] | None = None

    @property
    def name(self) -> str:
        return self.config.method


#: The built-in methods: the modules under ``peftlab/methods/``, in the order users see them
#: (``peftlab methods``, compare's columns). Adding a method is its file plus its line here.
BUILT_IN = (
    "lora",
    "dora",
    "ia3",
    "bottleneck",
    "compacter",
    "vera",
    "loha",
    "lokr",
    "fusion",
    "prompt",
    "prefix",
)


def _registry() -> dict[str, Method]:
    # Imported here, after Method and Preset exist: each method module imports them from us.
    modules = [importlib.import_module(f"peftlab.methods.{name}") for name in BUILT_IN]
    return {m.METHOD.name: m.METHOD for m in modules}


#: Every known method by name (``config.method``).
REGISTRY: dict[str, Method] = _registry()


def register(method: Method) -> Method:
    """Make ``method`` known everywhere: building, files, the command line, compare, recommend."""
    if not method.name:
        raise ConfigError(f"{method.config.__name__}.method must name the method")
    taken = {p.name for m in REGISTRY.values() if m.name != method.name for p in m.presets}
    clash = sorted(taken & {p.name for p in method.presets})
    if clash:
        raise ConfigError(f"preset name(s) {clash} are taken by another method")
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Forget a method added with :func:`register` (tests, plugins being unloaded)."""
    REGISTRY.pop(name, None)


def method_for(name_or_config: str | AdapterConfig) -> Method:
    """The registered method for a config (or a method name read from a file)."""
    name = name_or_config if isinstance(name_or_config, str) else name_or_config.method
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(REGISTRY)}")
    return REGISTRY[name]


def presets() -> dict[str, tuple[Method, Preset]]:
    """Every preset name users can type, in registry order, with its method."""
    return {p.name: (m, p) for m in REGISTRY.values() for p in m.presets}


def preset(name: str) -> tuple[Method, Preset]:
    """The method and preset called ``name``; :class:`UsageError` listing the names otherwise."""
    known = presets()
    if name not in known:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(known)} "
                         "(or full, for full fine-tuning)")
    return known[name]


def config_class(class_name: str) -> type[AdapterConfig] | None:
    """The registered config class called ``class_name`` (``"LoRAConfig"``), if any."""
    return next((m.config for m in REGISTRY.values() if m.config.__name__ == class_name), None)
