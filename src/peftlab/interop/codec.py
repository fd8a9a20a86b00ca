"""How one method's adapters map to HF peft's files: the :class:`PeftCodec` a method registers.

:mod:`peftlab.interop.peft` does everything that is the same for every method: reading and
checking the files, the module names (``target_modules``, ``target_parameters``), the
``modules_to_save`` heads, and writing atomically. A codec does only what is the method's own: its
config fields, its tensors per module, and the config that reproduces a peft file.

Tensor keys in a codec are ``<module key><suffix>``, without peft's ``base_model.model.`` prefix;
``<module key>`` is the site's module name, or for a routed experts' 3-D parameter the key peft
gives its wrapper (see :mod:`peftlab.interop.peft`). Tensors of the whole adapter (VeRA's shared
projections) keep their full peft key, listed in :attr:`PeftCodec.shared_keys`.

This module is a leaf (no AdapterSet, no files), so that method modules can import it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from peftlab.config import AdapterConfig, check_value, clip
from peftlab.errors import ConfigError
from peftlab.patterns import compile_pattern

if TYPE_CHECKING:
    from peftlab.adapter_set import Adapter
    from peftlab.layer import Piece

#: Shapes of the adapted modules by site name: ``(out, in)``, or ``(out, in, E)`` for an expert
#: parameter.
Shapes = Mapping[str, tuple[int, ...]]
#: A peft config's fields, and tensors by key.
Fields = dict[str, Any]
Tensors = dict[str, torch.Tensor]
#: The shape each tensor key must have.
Expected = dict[str, tuple[int, ...]]


class PeftCodec:
    """One method's side of peft's format. Subclasses set the class attributes and implement
    :meth:`export`, :meth:`config` and :meth:`load`."""

    #: peft's ``peft_type`` for these adapters.
    peft_type: ClassVar[str]
    #: Config keys this codec reads, or that do not change what the adapter computes. Any other
    #: key in a file must be empty (None, false, {}, []), or the import refuses the file: a set
    #: value is a peft feature that would otherwise be dropped silently.
    config_keys: ClassVar[frozenset[str]]
    #: The endings of one module's tensor keys (``".lora_A.weight"``).
    suffixes: ClassVar[tuple[str, ...]]
    #: Whether peft's format reaches routed experts' 3-D parameters (``target_parameters``).
    target_parameters: ClassVar[bool] = False
    #: Whether peft's config of this type has ``fan_in_fan_out`` (its LyCORIS configs do not, and
    #: peft warns about a key its config lacks).
    fan_in_fan_out: ClassVar[bool] = True
    #: Full keys of tensors that belong to the whole adapter, not to one module, and that peft
    #: writes outside ``base_model.model.`` (VeRA's shared projections, ``base_model.vera_A``).
    #: They pass through unprefixed: :meth:`export` returns them under these keys, :meth:`config`
    #: lists those the file must hold in its expected shapes, and :meth:`load` gets them under
    #: these keys. The import refuses any other key outside ``base_model.model.``.
    shared_keys: ClassVar[tuple[str, ...]] = ()
    #: A prompt-learning type (prompt, prefix tuning): tensors are keyed by the file's own names
    #: (``prompt_embeddings``), not by module; the codec implements :meth:`sequence_config` and
    #: :meth:`load_sequence` instead of :meth:`config` and :meth:`load`.
    sequence: ClassVar[bool] = False

    def sequence_config(self, data: Mapping[str, Any], model: Any,
                        tensor_shapes: Shapes) -> tuple[AdapterConfig, Expected]:
        """For a :attr:`sequence` codec: the config reproducing the file on ``model``, and the
        expected shape of each of the file's own tensors."""
        raise NotImplementedError

    def load_sequence(self, piece: Piece, tensors: Mapping[str, torch.Tensor],
                      data: Mapping[str, Any]) -> None:
        """For a :attr:`sequence` codec: copy the file's tensors (checked against
        :meth:`sequence_config`'s shapes) into the new piece; ``data``: the file's config."""
        raise NotImplementedError

    def accepts(self, data: Mapping[str, Any]) -> bool:
        """Whether this codec reads the peft config ``data`` (DoRA and LoRA share ``LORA``)."""
        return data.get("peft_type") == self.peft_type

    def export(self, adapter: Adapter, keys: Mapping[str, str]) -> tuple[Fields, Tensors]:
        """peft config fields (``peft_type`` included) and tensors of ``adapter``; ``keys`` maps
        expert sites to their peft module keys (other sites are their own key). Raises
        :class:`ConfigError` for what peft cannot express."""
        raise NotImplementedError

    def config(self, data: Mapping[str, Any], modules: list[str], shapes: Shapes,
               keys: Mapping[str, str], tensor_shapes: Shapes) -> tuple[AdapterConfig, Expected]:
        """The config acting exactly on ``modules`` (site names, model order) as the file does,
        and the expected shape of each tensor key. ``tensor_shapes``: the file's keys and shapes."""
        raise NotImplementedError

    def load(self, pieces: Mapping[str, Piece], tensors: Mapping[str, torch.Tensor],
             keys: Mapping[str, str]) -> None:
        """Copy the file's tensors (checked against :meth:`config`'s shapes) into new pieces."""
        raise NotImplementedError


# ---- small validated readers of peft config values ------------------------------------------------
def get(data: Mapping[str, Any], key: str, tp: type, default: Any) -> Any:
    """``data[key]`` checked to be a ``tp`` (``default`` when missing or null)."""
    value = data.get(key)
    return default if value is None else check_value(key, value, tp)


def patterns(data: Mapping[str, Any], key: str, tp: type) -> dict[re.Pattern[str], Any]:
    """Each key of the object ``data[key]`` as the regex peft matches it with (the end of a module
    name, after a dot), with its value checked to be a ``tp``."""
    found = data.get(key) or {}
    if not isinstance(found, dict):
        raise ConfigError(f"{key} must be an object of module pattern -> value")
    # Non-capturing, so that the key's own \1, \2 keep their groups; compiled here, so that a key
    # valid alone but not inside the suffix rule ("(?i)query") fails as a ConfigError.
    return {regex(rf"(?:.*\.)?(?:{regex(k, key).pattern})$", key):
            check_value(f"{key}[{clip(repr(k))}]", v, tp) for k, v in found.items()}


def pattern_value(rules: dict[re.Pattern[str], Any], module: str, default: Any) -> Any:
    """peft's rule: the first key that matches the end of the name (after a dot) wins."""
    return next((value for rule, value in rules.items() if rule.match(module)), default)


def regex(pattern: str, what: str) -> re.Pattern[str]:
    return compile_pattern(pattern, what, ConfigError)


def anchored(modules: list[str]) -> tuple[str, ...]:
    """Targets matching exactly these module names."""
    return tuple(f"^{re.escape(m)}$" for m in modules)
