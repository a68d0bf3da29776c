"""The exception hierarchy.

Every error looptrace raises on purpose derives from :class:`LooptraceError`, and its message says
what went wrong and what to do about it. Catch ``LooptraceError`` to handle all of them.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorruptFileError",
    "LoaderError",
    "LooptraceError",
    "LossError",
    "MemoryBudgetError",
    "MissingExtraError",
    "SpecMismatchError",
    "StepError",
    "StorageError",
    "TiedParameterError",
    "UnsupportedLayerError",
    "VerificationError",
]


class LooptraceError(Exception):
    """Base class of every error looptrace raises deliberately."""


class ConfigError(LooptraceError, ValueError):
    """An option or combination of options is invalid."""


class StepError(LooptraceError):
    """Loop steps were not observed as declared (step module never ran, ran too often, ...)."""


class UnsupportedLayerError(LooptraceError):
    """A body parameter has no layer rule and no usable exact fallback."""


class TiedParameterError(LooptraceError):
    """A body parameter is shared with a module outside the body."""


class LossError(LooptraceError, ValueError):
    """``loss_fn`` returned something other than a finite per-example float vector."""


class LoaderError(LooptraceError):
    """The data loader cannot give rows in dataset order, or its batches are inconsistent."""


class CheckpointError(LooptraceError):
    """A checkpoint does not fit the model, lacks a learning rate, or cannot be loaded safely."""


class SpecMismatchError(LooptraceError):
    """Features computed with different sketch specs, models or checkpoints were combined."""


class MemoryBudgetError(LooptraceError, MemoryError):
    """The requested computation would need more memory than allowed; the estimate is in the message."""


class VerificationError(LooptraceError):
    """The captured per-step gradients do not add up to autograd's gradient (a silent-wrong guard)."""


class CorruptFileError(LooptraceError):
    """A file looptrace wrote was found truncated, corrupted, or not in looptrace's format."""


class MissingExtraError(LooptraceError, ImportError):
    """An optional dependency is not installed; the message names the extra to install
    (``pip install "looptrace[EXTRA]"``)."""


class StorageError(LooptraceError, OSError):
    """The machine refused a write (disk full, permission denied, read-only file system).

    The message names the path, what happened and how to resume; nothing partial is left under the final
    name, so rerunning the same command after fixing the cause resumes where it stopped."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0])
