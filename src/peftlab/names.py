"""Adapter names: one rule for every place that takes a name (the API, files, the command line)."""

from __future__ import annotations

import re

from peftlab.errors import AdapterNameError

# No dots: an adapter's pieces live in torch ModuleDicts, whose keys cannot hold one.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+-]{0,99}$")
_RESERVED = {"base", "none", "shared", "extra", "adapters"}


def check_name(name: object) -> str:
    """Adapter names are file- and key-safe: letters, digits, ``_ + -``, at most 100 chars."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise AdapterNameError(
            f"invalid adapter name {name!r}: use 1-100 letters, digits, '_', '+', '-', "
            "starting with a letter or digit (no path separators)"
        )
    if name.lower() in _RESERVED:
        raise AdapterNameError(f"adapter name {name!r} is reserved; pick another")
    return name
