"""RoleWriter: the interface every strategy-specific writer implements.

A writer knows how to put one :class:`~skyrl_callbacks.roles.Role` into a role directory
(``global_step_N/policy/``) and back. It never decides *when* to save, never touches the
pointer file or retention, and never imports the manager.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:
    import torch

    from skyrl_callbacks.dist import DistContext
    from skyrl_callbacks.roles import Role
    from skyrl_callbacks.storage import Storage

__all__ = ["RoleWriter", "select_writer", "MODEL_FILE", "OPTIMIZER_FILE", "SCHEDULER_FILE", "HF_DIR"]

MODEL_FILE = "model_state.pt"
OPTIMIZER_FILE = "optimizer_state.pt"
SCHEDULER_FILE = "lr_scheduler_state.pt"
HF_DIR = "huggingface"


class RoleWriter(ABC):
    """Save and load one role in one format.

    ``save`` is called on every rank with the same arguments; each rank writes only its own
    files and returns their paths relative to ``role_dir`` (they go into the manifest).
    """

    #: recorded in the manifest and in ``trainer_state.pt``
    kind: str = "base"

    @abstractmethod
    def save(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext") -> list[str]:
        """Write this rank's files of ``role`` under ``role_dir``.

        Returns:
            Paths relative to ``role_dir`` of the files this rank wrote.
        """

    @abstractmethod
    def load(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext") -> None:
        """Restore ``role`` (model, optimizers, schedulers) in place from ``role_dir``.

        Raises:
            IncompatibleCheckpointError: the checkpoint does not fit the model/strategy/world size.
            CorruptCheckpointError: a file cannot be read.
        """

    def full_state_dict(self, role: "Role", dist: "DistContext") -> Iterator[tuple[str, "torch.Tensor"]]:
        """Yield ``(name, full tensor)`` of the model for HF export, on every rank.

        Rank 0 receives full tensors; other ranks may receive anything (they must still
        iterate, as the gather is collective). The default suits unsharded models.
        """
        for name, tensor in role.model_state_dict().items():
            yield name, tensor

    def validate_dir(self, storage: "Storage", role_dir: str) -> Optional[str]:
        """A reason why ``role_dir`` cannot be loaded by this writer, or None."""
        return None


def select_writer(model: Any, config: Any = None) -> RoleWriter:
    """Pick the writer for a model: FSDP2/FSDP1, megatron-core, else plain (single process/DDP)."""
    from skyrl_callbacks.writers import plain

    try:
        from skyrl_callbacks.writers import fsdp
    except ImportError:  # pragma: no cover - the fsdp writer ships with the package
        fsdp = None  # type: ignore[assignment]
    if fsdp is not None and fsdp.is_fsdp_model(model):
        return fsdp.FSDPWriter(state_dict_type=getattr(config, "state_dict_type", "sharded"))
    try:
        from skyrl_callbacks.writers import megatron
    except ImportError:  # pragma: no cover
        megatron = None  # type: ignore[assignment]
    if megatron is not None and megatron.is_megatron_model(model):
        return megatron.MegatronWriter()
    return plain.PlainWriter()
