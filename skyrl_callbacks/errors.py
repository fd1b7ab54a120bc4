"""Exceptions raised by skyrl-callbacks.

Every error names what went wrong, the offending value and the fix, so that a
log line read at 3 a.m. is enough to act on.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "UntrustedCheckpointError",
    "StorageError",
    "MissingDependencyError",
    "CheckpointLockError",
]


class CheckpointError(Exception):
    """Base class of every error raised by skyrl-callbacks."""


class ConfigError(CheckpointError, ValueError):
    """A configuration value is invalid. Raised at construction time."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint that was asked for does not exist or is not committed."""


class CorruptCheckpointError(CheckpointError):
    """A committed checkpoint failed verification or could not be read."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint does not match the model, strategy or world size it is loaded into."""


class UntrustedCheckpointError(IncompatibleCheckpointError):
    """A checkpoint file holds objects that only an unpickling that may execute code can load
    (``torch.load(weights_only=False)``); refused unless ``trust_checkpoint_code`` is set.

    Attributes:
        path: the file.
        refused: what the weights-only load refused, e.g. ``"GLOBAL posix.system"``.
    """

    def __init__(self, message: str, *, path: str = "", refused: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.refused = refused


class StorageError(CheckpointError, OSError):
    """Reading or writing the checkpoint storage failed after retries."""


class CheckpointLockError(CheckpointError):
    """Another live run owns the checkpoint directory."""


class MissingDependencyError(CheckpointError, ImportError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the optional package '{module}', which is not installed. "
            f"Install it with: pip install 'skyrl-callbacks[{extra}]'"
        )
        self.module = module
        self.extra = extra


def require(module: str, extra: str, feature: str):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip extra.

    Args:
        module: dotted module name to import.
        extra: the ``skyrl-callbacks`` extra that installs it.
        feature: what needs it, for the error message.

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised in a bare venv test
        raise MissingDependencyError(module.split(".")[0], extra, feature) from exc
