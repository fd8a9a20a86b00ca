"""Typed errors that users can catch. Every message says what was wrong and what to do."""

from __future__ import annotations

from pathlib import Path


class PeftlabError(Exception):
    """Base class of every error peftlab raises on purpose."""


class TargetError(PeftlabError, ValueError):
    """A role or module pattern matched nothing, or the architecture is unknown."""


class ConfigError(PeftlabError, ValueError):
    """A config value or a config file is invalid."""


class AdapterNameError(PeftlabError, ValueError):
    """An adapter name is invalid, unknown, or already taken."""


class PartialTargetWarning(UserWarning):
    """An adapter's targets reach only part of a role in some block (on Qwen2-MoE, the shared
    expert's ``down_proj`` but not the routed experts'); also listed in ``summary()``."""


class AdapterStateError(PeftlabError, RuntimeError):
    """The operation does not fit the adapter's state (merged twice, not active, ...)."""


class AdapterLoadError(PeftlabError, ValueError):
    """An adapter directory could not be loaded; the model was left untouched."""


class AdapterSaveError(PeftlabError, OSError):
    """An adapter could not be saved; nothing at the destination was changed."""


class DataError(PeftlabError, ValueError):
    """A dataset folder, file or row is unusable; the message says where and what to do."""


class UsageError(PeftlabError, ValueError):
    """A command-line argument or output directory is unusable; nothing was written."""


class NonFiniteLossError(PeftlabError, FloatingPointError):
    """Training diverged: the loss or a trainable parameter became NaN or infinite."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint: Path | None = None
