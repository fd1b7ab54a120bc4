"""Resume from an object store: download this rank's files of a checkpoint at once, concurrently.

At the start of ``CheckpointManager.load`` on S3/GCS, the files this rank will read are fetched into a
local staging directory (``cloud_staging_dir``, else the temp dir) before anything is loaded:

* only the rank's own files: ``trainer_state.pt``, ``data.pt`` and, for each role saved by the plain
  writer, its ``model_state.pt`` / ``optimizer_state.pt`` / ``lr_scheduler_state.pt`` (those the role
  has a place for). Roles of other writers (FSDP's DCP reader, Megatron, HF) keep reading from the
  store as before;
* each file cut into ranged GETs of ``chunk_size`` bytes; the chunks of all files share one pool of
  ``max_concurrency`` requests in flight (largest file first), each chunk retried within the store's
  retry deadline (:func:`skyrl_callbacks.cloud.retrying`; every request has the store's timeouts);
* with ``verify_on_resume`` every file is hashed (the manifest's algorithm) as its chunks arrive, in
  file order (a chunk that arrives early waits in memory, or is read back from the local copy when too
  many wait): no second download, and a mismatch is reported before anything is loaded.

The manager loads from the local copies and removes the staging directory afterwards, also on failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from skyrl_callbacks.storage import Storage

__all__ = ["Staged", "ShortObject", "LocalCopyError", "fetch_files", "stage"]


class LocalCopyError(OSError):
    """The local copy of an object cannot be written (a full disk, no permission)."""


class ShortObject(OSError):
    """An object has fewer bytes than its recorded size (a torn or replaced object)."""

#: bytes of early chunks one file's hash keeps in memory; beyond, they are read back from the local copy
_BACKLOG_MAX = 256 << 20


class _InOrderHash:
    """The checksum of a local file being filled by chunks that complete out of order."""

    def __init__(self, fd: int, algo: str) -> None:
        from skyrl_callbacks.manifest import _hasher

        self.fd, self._h = fd, _hasher(algo)
        self._pos = 0
        self._pending: dict[int, tuple[int, Optional[bytes]]] = {}
        self._backlog = 0
        self._lock = threading.Lock()

    def done(self, offset: int, data: bytes) -> None:
        with self._lock:
            keep = offset == self._pos or self._backlog + len(data) <= _BACKLOG_MAX
            self._pending[offset] = (len(data), data if keep else None)
            if keep:
                self._backlog += len(data)
            while self._pos in self._pending:
                n, block = self._pending.pop(self._pos)
                if block is None:
                    block = os.pread(self.fd, n, self._pos)  # written already (pwrite before done)
                else:
                    self._backlog -= n
                self._h.update(block)
                self._pos += n

    def hexdigest(self, size: int) -> Optional[str]:
        return self._h.hexdigest() if self._pos == size and not self._pending else None


def fetch_files(
    fs: Any,
    items: list[tuple[str, str, int]],
    *,
    max_concurrency: int = 8,
    chunk_size: int = 16 << 20,
    deadline_s: float = 120,
    algo: Optional[str] = None,
    retry: Optional[Callable[..., Any]] = None,
) -> dict[str, Optional[str]]:
    """Download ``(remote path, local path, size)`` items with ranged GETs of ``chunk_size`` bytes,
    ``max_concurrency`` requests in flight over all files, each request retried within ``deadline_s``.

    Returns:
        ``{remote path: hexdigest}`` (``algo``; None without ``algo``).

    Raises:
        FileNotFoundError: an object does not exist.
        ShortObject: an object is shorter than its size.
        OSError: the local copy cannot be written (e.g. the disk is full).
        StorageError: a request kept failing until its deadline.
    """
    from skyrl_callbacks.cloud import _run_all, retrying

    retry = retry or retrying
    files = sorted(items, key=lambda it: -it[2])
    fds: dict[str, int] = {}
    hashes: dict[str, Optional[_InOrderHash]] = {}
    tasks = []
    try:
        for rpath, lpath, size in files:
            try:
                os.makedirs(os.path.dirname(lpath), exist_ok=True)
                fd = os.open(lpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                fds[rpath] = fd
                os.ftruncate(fd, size)
            except OSError as exc:
                raise LocalCopyError(f"{lpath}: {exc}") from exc
            hashes[rpath] = _InOrderHash(fd, algo) if algo else None
            for off in range(0, size, chunk_size) if size > chunk_size else [0] if size else []:
                n = min(chunk_size, size - off)
                tasks.append((f"{rpath}@{off}", (lambda r=rpath, o=off, n=n, whole=size <= chunk_size: _chunk(
                    fs, r, o, n, whole, fds[r], hashes[r], retry, deadline_s))))
        _run_all(tasks, max_concurrency, "download")
        return {r: (h.hexdigest(size) if h is not None else None) for (r, _l, size), h in
                ((f, hashes[f[0]]) for f in files)}
    finally:
        for fd in fds.values():
            os.close(fd)


def _chunk(fs: Any, rpath: str, offset: int, n: int, whole: bool, fd: int, hasher: Optional[_InOrderHash],
           retry: Callable[..., Any], deadline_s: float) -> None:
    def get() -> bytes:
        if whole:
            return fs.cat_file(rpath)
        return fs.cat_file(rpath, start=offset, end=offset + n)

    data = retry(get, what=f"download {rpath} bytes {offset}-{offset + n}", deadline_s=deadline_s)
    if len(data) != n:
        raise ShortObject(f"{rpath}: {len(data)} bytes at offset {offset}, expected {n} (the object "
                      f"does not have the size the manifest records)")
    mv = memoryview(data)
    done = 0
    try:
        while done < n:
            done += os.pwrite(fd, mv[done:], offset + done)
    except OSError as exc:
        raise LocalCopyError(f"local copy of {rpath}: {exc}") from exc
    if hasher is not None:
        hasher.done(offset, data)


class Staged:
    """Local copies of some files of a checkpoint on an object store (see :func:`stage`)."""

    def __init__(self, root: str, rels: list[str], digests: dict[str, Optional[str]]) -> None:
        from skyrl_callbacks.storage import Storage

        self.root, self.rels, self.digests = root, set(rels), digests
        self.storage = Storage(root)
        #: names of the roles loaded from these copies (set by the manager)
        self.roles: set[str] = set()

    def has(self, rel: str) -> bool:
        return rel in self.rels

    def path(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def rename_in(self, exc: BaseException, step_dir: str) -> None:
        """An error of a load from the copies names the checkpoint's files, not the staging dir."""
        if exc.args and isinstance(exc.args[0], str) and self.root in exc.args[0]:
            exc.args = (exc.args[0].replace(self.root, step_dir.rstrip("/")),) + tuple(exc.args[1:])

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def stage(store: "Storage", step_dir: str, rels: list[str], sizes: dict[str, int], *, staging_dir: Optional[str],
          algo: Optional[str]) -> Staged:
    """Download ``rels`` (relative to ``step_dir``) of ``store`` into a new directory under ``staging_dir``
    (the temp dir when None); the directory is removed again when this raises."""
    from skyrl_callbacks.errors import StorageError

    base = staging_dir or store.local_tmp_dir or tempfile.gettempdir()
    root = os.path.join(base, f".skyrl-resume-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(root)
    except OSError as exc:
        raise LocalCopyError(f"{root}: {exc}") from exc
    try:
        items = [(store.join(step_dir, rel), os.path.join(root, *rel.split("/")), int(sizes[rel])) for rel in rels]
        try:
            digests = fetch_files(store.fs, items, max_concurrency=max(1, store.upload_concurrency),
                                  chunk_size=store.chunk_size, deadline_s=store.retry_deadline_s, algo=algo)
        except StorageError as exc:
            raise store._name_endpoint(exc) from exc
        return Staged(root, rels, {rel: digests[r] for rel, (r, _l, _s) in zip(rels, items)})
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
