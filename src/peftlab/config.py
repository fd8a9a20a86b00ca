"""Frozen dataclass configs that round-trip to JSON with strict validation.

Every method config derives from :class:`AdapterConfig`. ``from_dict`` rejects unknown keys and
wrong types, so a config read from an untrusted file fails with a :class:`ConfigError` naming the
field instead of failing later inside a layer.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, ClassVar, TypeVar

from peftlab.errors import ConfigError

C = TypeVar("C", bound="AdapterConfig")

_MAX_INT = 1 << 31
_MAX_FLOAT = sys.float_info.max


def clip(text: str, limit: int = 200) -> str:
    """``text`` with its middle cut out if longer than ``limit``: error messages quote values read
    from untrusted files, which may be megabytes long."""
    if len(text) <= limit:
        return text
    return f"{text[:limit * 2 // 3]}...<{len(text) - limit} characters cut>...{text[-limit // 3:]}"


def check_value(name: str, value: Any, tp: Any, text: bool = False) -> Any:
    """``value`` checked against the annotation ``tp`` and returned in canonical form; anything
    else raises :class:`ConfigError` naming ``name``. peftlab's one check of untrusted values:
    config fields, fields read from adapter files (peftlab's and peft's) and, with ``text``,
    command-line text (``--set r=16``), which is first read as the type asks (:func:`_from_text`)."""
    if text and isinstance(value, str):
        value = _from_text(value, tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return check_value(name, value, arm, text)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: got {clip(repr(value))}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(check_value(f"{name}[{i}]", v, item_tp, text) for i, v in enumerate(value))
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name}: must be one of {typing.get_args(tp)}, got {clip(repr(value))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {clip(repr(value))}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > _MAX_INT:
            raise ConfigError(f"{name}: expected an integer below 2**31, got {clip(repr(value))}")
        return value
    if tp is float:
        # abs() <= max also refuses NaN, and ints too large for a float (where isfinite raises)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= _MAX_FLOAT:
            raise ConfigError(f"{name}: expected a finite number, got {clip(repr(value))}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or len(value) > 4096:
            raise ConfigError(f"{name}: expected a string, got {type(value).__name__}")
        return value
    raise ConfigError(f"{name}: unsupported field type {tp!r}")  # pragma: no cover


def _from_text(text: str, tp: Any) -> Any:
    """Command-line ``text`` read as the JSON value ``tp`` asks for: a number, true/false (also
    yes/no, on/off, 1/0), none, a Literal choice in any case, or a comma-separated list. Text that
    does not read as the type is returned unchanged, for :func:`check_value` to refuse."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in typing.get_args(tp)
        return None if optional and text.strip().lower() in ("none", "null", "") else text
    if origin is tuple:
        return [part.strip() for part in text.split(",") if part.strip()]
    if origin is typing.Literal:
        return next((c for c in typing.get_args(tp) if str(c).lower() == text.lower()), text)
    words = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}
    if tp is bool:
        return words.get(text.lower(), text)
    try:
        return int(text) if tp is int else float(text) if tp is float else text
    except ValueError:
        return text


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Base of all method configs. ``method`` names the file under ``peftlab/methods/``."""

    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    #: Why adapters of a method that is not mergeable cannot be folded into the weights.
    unmergeable_because: ClassVar[str] = "they add a nonlinear module"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Check value ranges; subclasses raise :class:`ConfigError`."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Any) -> C:
        """Build from a dict, rejecting unknown keys and wrong types with :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {clip(str(unknown))}; "
                              f"known: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, tuple) else v
