"""skyrl-callbacks: SkyRL's checkpointing for PyTorch Lightning and Accelerate loops.

``import skyrl_callbacks`` needs only torch and fsspec; the framework integrations are
imported on first use (``SkyRLCheckpoint`` imports Lightning when it is installed).
"""

from __future__ import annotations

from typing import Any

from skyrl_callbacks.config import CheckpointConfig
from skyrl_callbacks.errors import (
    CheckpointError,
    CheckpointLockError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    UntrustedCheckpointError,
    MissingDependencyError,
    StorageError,
)
from skyrl_callbacks.manager import CheckpointManager, ResumeState, SaveResult

__version__ = "0.1.0"

__all__ = [
    "SkyRLCheckpoint",
    "CheckpointConfig",
    "CheckpointManager",
    "DataLoaderStateMixin",
    "ResumableDataLoader",
    "SaveResult",
    "ResumeState",
    "CheckpointError",
    "ConfigError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "UntrustedCheckpointError",
    "StorageError",
    "CheckpointLockError",
    "MissingDependencyError",
    "__version__",
]

_LAZY = {
    "SkyRLCheckpoint": "skyrl_callbacks.callback",
    "DataLoaderStateMixin": "skyrl_callbacks.data",
    "ResumableDataLoader": "skyrl_callbacks.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'skyrl_callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
