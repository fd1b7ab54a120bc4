"""PlainWriter: single process and DDP (replicated weights) in SkyRL's file names.

``policy/model_state.pt``, ``policy/optimizer_state.pt``, ``policy/lr_scheduler_state.pt``,
written by rank 0 only (every DDP rank holds the same bytes), read by every rank.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any, Iterator

import torch

from skyrl_callbacks.errors import CorruptCheckpointError, IncompatibleCheckpointError
from skyrl_callbacks.writers.base import MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RoleWriter

if TYPE_CHECKING:
    from skyrl_callbacks.dist import DistContext
    from skyrl_callbacks.roles import Role
    from skyrl_callbacks.storage import Storage

logger = logging.getLogger(__name__)

__all__ = ["PlainWriter", "unwrap_model", "pack_states", "unpack_states", "torch_save", "torch_load"]

_MULTI_KEY = "__skyrl_multi__"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP/DataParallel/compile wrappers (their keys carry no ``module.``)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def pack_states(objs: list) -> Any:
    """One optimizer/scheduler saves its ``state_dict`` as is (SkyRL's format); several are listed."""
    states = [o.state_dict() for o in objs]
    if len(states) == 1:
        return states[0]
    return {_MULTI_KEY: True, "states": states}


def unpack_states(data: Any, count: int, what: str, path: str) -> list:
    states = data["states"] if isinstance(data, dict) and data.get(_MULTI_KEY) else [data]
    if len(states) != count:
        raise IncompatibleCheckpointError(
            f"{path}: holds {len(states)} {what} state(s) but the role has {count} {what}(s). "
            f"Configure the same {what}s as the run that saved it, or load weights only."
        )
    return states


def torch_save(storage: "Storage", path: str, obj: Any) -> None:
    """``torch.save`` through ``storage``, without the zip format's per-record CRC32.

    The CRC costs a third of a save's time on a fast disk and protects nothing our manifest's
    checksum (xxh3, computed as the bytes are written) does not; ``torch.load`` reads such
    files as usual.
    """
    with storage.open(path, "wb") as fh, _no_zip_crc():
        torch.save(obj, fh)


def write_files_concurrently(storage: "Storage", directory: str, jobs: list) -> None:
    """``torch_save`` each ``(name, obj)`` of ``jobs`` under ``directory``, one thread per file
    (torch.save releases the GIL while it writes). The first error is raised after all ended."""
    if len(jobs) <= 1:
        for name, obj in jobs:
            torch_save(storage, storage.join(directory, name), obj)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="skyrl-write") as pool:
        futures = [pool.submit(torch_save, storage, storage.join(directory, name), obj) for name, obj in jobs]
    for fut in futures:
        fut.result()


_CRC_LOCK = threading.Lock()
_CRC_USERS = [0, True]  # [threads inside torch_save, the setting to restore]


@contextlib.contextmanager
def _no_zip_crc() -> Iterator[None]:
    """Turn torch's save-time zip CRC off while any of our saves runs (thread-safe refcount;
    the user's setting comes back when the last one ends)."""
    try:
        from torch.utils.serialization import config as ser_config
    except ImportError:  # pragma: no cover - torch < 2.6 has no switch: keep the CRC
        yield
        return
    with _CRC_LOCK:
        if _CRC_USERS[0] == 0:
            _CRC_USERS[1] = ser_config.save.compute_crc32
            ser_config.save.compute_crc32 = False
        _CRC_USERS[0] += 1
    try:
        yield
    finally:
        with _CRC_LOCK:
            _CRC_USERS[0] -= 1
            if _CRC_USERS[0] == 0:
                ser_config.save.compute_crc32 = _CRC_USERS[1]


def torch_load(storage: "Storage", path: str, *, weights_only: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` on CPU with a clear error naming the file when it is unreadable.

    ``mmap=True`` (local files): the tensors map the file (copy-on-write) instead of being read
    into fresh memory first; ``load_state_dict`` then copies from the page cache once. Committed
    checkpoint files are never modified in place (retention unlinks them), so the mapping stays valid.
    """
    try:
        if mmap and storage.is_local:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        with storage.open(path, "rb") as fh:
            return torch.load(fh, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{path}: file is missing ({exc}).") from exc
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError on torn files
        raise CorruptCheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc}).") from exc


class PlainWriter(RoleWriter):
    """Writer for unsharded models (single process, DDP)."""

    kind = "plain"

    def __init__(self) -> None:
        self._gpu_stager: Any = None

    def save(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext") -> list[str]:
        if not dist.is_main:
            return []
        state = self._collect(role)
        if _on_cuda(state):
            # torch.save copies GPU storages to the host one by one through pageable memory
            # (~0.4x of the disk's speed on an H200 host); one pass into warm pinned buffers
            # first runs at PCIe/C2C speed and lets the file writes run at the disk's.
            from skyrl_callbacks.staging import Stager

            if self._gpu_stager is None:
                self._gpu_stager = Stager(pin_memory=True)
            state = self._gpu_stager.stage(state)
        return self._write(storage, role_dir, state)

    # async: rank 0 copies its state (every DDP rank holds the same bytes); others stage nothing
    def snapshot(self, role: "Role", dist: "DistContext", stager: Any) -> Any:
        return stager.stage(self._collect(role)) if dist.is_main else None

    def write_snapshot(self, storage: "Storage", role_dir: str, snap: Any, dist: "DistContext") -> list[str]:
        return [] if snap is None else self._write(storage, role_dir, snap)

    @staticmethod
    def _collect(role: "Role") -> dict:
        """The live state of ``role`` (references, not copies) in the shape ``_write`` takes."""
        model = unwrap_model(role.model)
        sd = role.model_state_dict() if model is role.model else _filtered(model.state_dict(), role)
        return {
            "model": sd,
            "optimizer": pack_states(role.optimizers) if role.optimizers else None,
            "scheduler": pack_states(role.schedulers) if role.schedulers else None,
        }

    @staticmethod
    def _write(storage: "Storage", role_dir: str, state: dict) -> list[str]:
        """The role's files, written concurrently (one stream per file: the optimizer file, twice
        the model's size with Adam, no longer waits for the model file)."""
        jobs = [(MODEL_FILE, state["model"])]
        if state["optimizer"] is not None:
            jobs.append((OPTIMIZER_FILE, state["optimizer"]))
        if state["scheduler"] is not None:
            jobs.append((SCHEDULER_FILE, state["scheduler"]))
        write_files_concurrently(storage, role_dir, jobs)
        return [name for name, _ in jobs]

    def load(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext") -> None:
        model = unwrap_model(role.model)
        path = storage.join(role_dir, MODEL_FILE)
        sd = torch_load(storage, path, weights_only=True, mmap=True)
        strict = not role.exclude_prefixes
        try:
            result = model.load_state_dict(sd, strict=strict)
        except RuntimeError as exc:
            raise IncompatibleCheckpointError(
                f"{path}: does not match the {role.name} model: {exc}. "
                f"Build the same architecture as the run that saved it."
            ) from exc
        if not strict:
            missing = [k for k in result.missing_keys if not k.startswith(role.exclude_prefixes)]
            if missing or result.unexpected_keys:
                raise IncompatibleCheckpointError(
                    f"{path}: does not match the {role.name} model (missing {missing[:5]}, "
                    f"unexpected {list(result.unexpected_keys)[:5]}). Build the same architecture."
                )
        self._load_list(storage, storage.join(role_dir, OPTIMIZER_FILE), role.optimizers, "optimizer")
        self._load_list(storage, storage.join(role_dir, SCHEDULER_FILE), role.schedulers, "lr_scheduler")

    @staticmethod
    def _load_list(storage: "Storage", path: str, objs: list, what: str) -> None:
        if not objs:
            return
        if not storage.exists(path):
            raise IncompatibleCheckpointError(
                f"{path}: missing, but the role has {len(objs)} {what}(s). The checkpoint was saved "
                f"without {what} state; resume with the same {what} setup as the saving run."
            )
        states = unpack_states(torch_load(storage, path), len(objs), what, path)
        for obj, state in zip(objs, states):
            try:
                obj.load_state_dict(state)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise IncompatibleCheckpointError(
                    f"{path}: {what} state does not match: {exc}. Configure the same {what} (same parameter "
                    f"groups) as the run that saved it, or start fresh with resume_mode='none'."
                ) from exc


def _on_cuda(tree: Any) -> bool:
    if isinstance(tree, torch.Tensor):
        return tree.is_cuda
    if isinstance(tree, dict):
        return any(_on_cuda(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_on_cuda(v) for v in tree)
    return False


def _filtered(sd: dict, role: "Role") -> dict:
    if not role.exclude_prefixes:
        return sd
    return {k: v for k, v in sd.items() if not k.startswith(role.exclude_prefixes)}


