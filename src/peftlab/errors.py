"""Typed errors that users can catch. Every message says what was wrong and what to do."""

from __future__ import annotations


class PeftlabError(Exception):
    """Base class of every error peftlab raises on purpose."""


class TargetError(PeftlabError, ValueError):
    """A role or module pattern matched nothing, or the architecture is unknown."""


class ConfigError(PeftlabError, ValueError):
    """A config value or a config file is invalid."""


class AdapterNameError(PeftlabError, ValueError):
    """An adapter name is invalid, unknown, or already taken."""


class AdapterStateError(PeftlabError, RuntimeError):
    """The operation does not fit the adapter's state (merged twice, not active, ...)."""


class AdapterLoadError(PeftlabError, ValueError):
    """An adapter directory could not be loaded; the model was left untouched."""


class AdapterSaveError(PeftlabError, OSError):
    """An adapter could not be saved; nothing at the destination was changed."""
