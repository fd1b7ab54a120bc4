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

    # ------------------------------------------------------------------ async saving
    # ``async_save=True`` splits a save in three parts (see docs/async.md):
    #   1. ``snapshot`` (foreground, collective on the training group): a consistent copy of this
    #      rank's state of ``role`` in reusable host buffers (``stager``); never aliases live tensors;
    #   2. ``write_snapshot`` (background thread): writes the copy; collectives only through the
    #      ``dist`` it is given (a dedicated gloo group), never through the training group;
    #   3. ``finalize_snapshot`` (foreground, collective, once every rank's write finished): any
    #      closing step that needs the training group (e.g. metadata written by a coordinator).
    def snapshot(self, role: "Role", dist: "DistContext", stager: Any) -> Any:
        """Foreground, collective: this rank's state of ``role`` copied into ``stager``'s buffers."""
        raise NotImplementedError(f"{type(self).__name__} does not support async_save")

    def prewarm_tree(self, role: "Role", dist: "DistContext") -> Any:
        """The live tree :meth:`snapshot` will stage (references, no copies), for allocating the
        async saves' buffers ahead of the first save; None where nothing can be prepared (this
        rank stages nothing, or the snapshot itself gathers). Collective like ``snapshot``."""
        return None

    def write_snapshot(self, storage: "Storage", role_dir: str, snap: Any, dist: "DistContext") -> list[str]:
        """Background thread: write ``snap`` under ``role_dir``; returns this rank's files (relative)."""
        raise NotImplementedError(f"{type(self).__name__} does not support async_save")

    def finalize_snapshot(self, storage: "Storage", role_dir: str, snap: Any, dist: "DistContext") -> list[str]:
        """Foreground, collective, after every rank's ``write_snapshot`` returned: extra files written."""
        return []

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


def write_json(storage: "Storage", path: str, data: dict) -> None:
    """A small JSON file of a writer (``fsdp_config.json``, ``megatron_config.json``)."""
    import json

    with storage.open(path, "wb") as fh:
        fh.write(json.dumps(data, indent=1, sort_keys=True).encode("utf-8"))


def read_json_object(storage: "Storage", path: str) -> Optional[dict]:
    """The JSON object in ``path``, or None when there is no such file.

    Raises:
        CorruptCheckpointError: the file exists but is not a JSON object.
    """
    import json

    from skyrl_callbacks.errors import CorruptCheckpointError

    if not storage.exists(path):
        return None
    try:
        data = json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def select_writer(model: Any, config: Any = None) -> RoleWriter:
    """Pick the writer for a model: FSDP2/FSDP1, megatron-core, else plain (single process/DDP)."""
    from skyrl_callbacks.writers import plain

    try:
        from skyrl_callbacks.writers import fsdp
    except ImportError:  # pragma: no cover - the fsdp writer ships with the package
        fsdp = None  # type: ignore[assignment]
    if fsdp is not None and fsdp.is_fsdp_model(model):
        return fsdp.FSDPWriter(
            state_dict_type=getattr(config, "state_dict_type", "sharded"),
            dcp_thread_count=getattr(config, "dcp_thread_count", fsdp.DEFAULT_DCP_THREAD_COUNT),
        )
    try:
        from skyrl_callbacks.writers import megatron
    except ImportError:  # pragma: no cover
        megatron = None  # type: ignore[assignment]
    if megatron is not None and megatron.is_megatron_model(model):
        return megatron.MegatronWriter(
            optimizer_sharding=getattr(config, "megatron_optimizer_sharding", "fully_reshardable")
        )
    return plain.PlainWriter()
