"""Verification of a checkpoint while it is loaded: every byte hashed once, as it is read.

``verify_on_resume: true`` (the default) checks every file of the checkpoint against the checksum in
its manifest, without a second read of the large files:

* the readers of the large files (the plain writer's ``model_state.pt`` / ``optimizer_state.pt``,
  the FSDP writer's ``.distcp`` shards) feed the bytes they read to an :class:`OrderedHash`, which
  hashes the file in order while the reader threads fill their destinations out of order; the
  few bytes no destination takes (zip headers, the pickle, the zip directory: kilobytes) are read
  again from the page cache by the hash;
* the small files (``trainer_state.pt``, ``data.pt``, schedulers, ``huggingface/``, DCP's
  ``.metadata``) and the files of readers that are not ours (Megatron's) are hashed before the
  load, spread over the ranks and 4 threads per rank;
* whatever a reader could not hash while reading (an object store, a resharded FSDP load where
  no rank reads a whole file, a tree of unusual objects) is hashed after the load.

A mismatch anywhere is a :class:`CorruptCheckpointError` on every rank: ``latest`` falls back to
the previous committed checkpoint, ``from_path`` raises. The load may already have written the
bad bytes into the model or optimizer; the fallback's load replaces them (every role, model,
optimizer and scheduler is loaded again), and a raised error ends the resume.

The readers find the active verification through :func:`current` (a context variable set by the
manager around the load), so the writers' ``load`` signature does not change.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:
    from skyrl_callbacks.storage import Storage

__all__ = ["LoadVerification", "OrderedHash", "current", "active", "streamable", "part_classes"]

_ACTIVE: contextvars.ContextVar[Optional["LoadVerification"]] = contextvars.ContextVar("skyrl_load_verify", default=None)


def current() -> Optional["LoadVerification"]:
    """The verification of the load in progress on this thread, or None (verification off)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def active(verification: Optional["LoadVerification"]) -> Iterator[None]:
    token = _ACTIVE.set(verification)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def streamable(rel: str, strategies: dict) -> bool:
    """Whether a file (relative to the step directory) is read by one of our readers that hash it
    as they read it (else it is hashed before the load)."""
    role, _, rest = rel.partition("/")
    kind = strategies.get(role)
    if kind == "plain":
        return rest in ("model_state.pt", "optimizer_state.pt")
    if kind == "fsdp":
        return rest.endswith(".distcp")
    return False


def part_classes(role: Any) -> dict:
    """``{"optimizers": [class names], "schedulers": [class names]}`` of a role, wrappers removed
    (Lightning's ``LightningOptimizer``, Accelerate's ``AcceleratedOptimizer`` / ``AcceleratedScheduler``)."""
    return {"optimizers": [_optimizer_class(o) for o in role.optimizers],
            "schedulers": [_scheduler_class(s) for s in role.schedulers]}


def _optimizer_class(opt: Any) -> str:
    import torch

    for attr in ("_optimizer", "optimizer"):
        inner = getattr(opt, attr, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
            return _optimizer_class(inner)
    return type(opt).__name__


def _scheduler_class(sched: Any) -> str:
    import torch

    inner = getattr(sched, "scheduler", None)
    if inner is not None and inner is not sched and not isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
        return _scheduler_class(inner)
    return type(sched).__name__


class LoadVerification:
    """The expected checksums of one checkpoint, and what this rank hashed while loading it.

    Args:
        storage: the checkpoint's storage.
        step_dir: the ``global_step_N`` directory.
        files: the manifest's ``{rel: {"size", "hash"}}``.
        algo: the manifest's checksum algorithm.
    """

    def __init__(self, storage: "Storage", step_dir: str, files: dict, algo: str) -> None:
        self.storage, self.step_dir, self.algo = storage, step_dir, algo
        self._by_path: dict[str, tuple[str, int, str]] = {}
        for rel, info in files.items():
            if isinstance(info, dict) and info.get("hash"):
                self._by_path[_norm(storage.join(step_dir, rel))] = (rel, int(info.get("size") or 0), info["hash"])
        self.tracked = sorted(hit[0] for hit in self._by_path.values())
        self._sizes = {hit[0]: hit[1] for hit in self._by_path.values()}
        self.verified: set[str] = set()
        self.problems: dict[str, str] = {}
        self._lock = threading.Lock()

    def size_of(self, rel: str) -> int:
        return self._sizes.get(rel, 0)

    def expect(self, path: str) -> Optional[tuple[int, str]]:
        """``(size, hexdigest)`` the file at ``path`` must have, or None when it is not tracked."""
        hit = self._by_path.get(_norm(path))
        return None if hit is None else (hit[1], hit[2])

    def hash_for(self, path: str, fd: int, size: int, regions: list) -> Optional["OrderedHash"]:
        """An :class:`OrderedHash` for the local file ``path`` (open as ``fd``) whose ``regions``
        the caller reads, or None when the file is not tracked, its size is not the manifest's
        (the size check reports it) or the regions overlap (it is then hashed after the load)."""
        want = self.expect(path)
        if want is None or want[0] != size:
            return None
        try:
            return OrderedHash(fd, size, self.algo, regions)
        except ValueError:
            return None

    def record(self, path: str, digest: Optional[str]) -> None:
        """The checksum of the whole file ``path`` as read (None: the reader could not hash all of it)."""
        hit = self._by_path.get(_norm(path))
        if hit is None or digest is None:
            return
        rel, _size, want = hit
        with self._lock:
            self.verified.add(rel)
            if digest != want:
                self.problems[rel] = f"{rel}: checksum mismatch ({self.algo}) while loading"


def hash_downloaded(storage: "Storage", path: str, fh: Any) -> None:
    """Object stores: hash the file ``storage.open`` just downloaded (into memory or a local temp
    file) before ``torch.load`` reads it from the same handle, so a verified resume downloads it
    once. A no-op without verification, for local files (their readers hash as they read) and
    for files already hashed."""
    verification = current()
    if verification is None or storage.is_local or verification.expect(path) is None:
        return
    hit = verification._by_path.get(_norm(path))
    if hit is None or hit[0] in verification.verified:
        return
    from skyrl_callbacks.manifest import _hasher

    h = _hasher(verification.algo)
    start = fh.tell()
    while True:
        block = fh.read(8 << 20)
        if not block:
            break
        h.update(block)
    fh.seek(start)
    verification.record(path, h.hexdigest())


def _norm(path: str) -> str:
    return os.path.normpath(path) if "://" not in path else path.rstrip("/")


class OrderedHash:
    """The checksum of a file of ``size`` bytes computed in file order while several threads read
    its regions out of order into their destinations.

    The reader announces the regions it will read (``regions``: ``(offset, nbytes)``, not
    overlapping); each reader thread calls :meth:`feed` with a region's bytes once they are read.
    A region that continues the hashed prefix is hashed at once, with every region fed before it
    that is now next in line (one thread hashes at a time; the others only leave their bytes);
    the bytes between regions that no reader takes (zip headers, the pickle, the zip directory of
    a ``torch.save`` file: kilobytes, just read by the skeleton load) are read with ``pread``.
    A region fed early is kept by reference, or copied when ``volatile`` (a bounce buffer the
    thread refills next): a thread never waits for another.
    """

    def __init__(self, fd: int, size: int, algo: str, regions: list) -> None:
        from skyrl_callbacks.manifest import _hasher

        self.fd, self.size = fd, size
        self._h = _hasher(algo)
        self._order = sorted(regions)
        self._next = 0  # index in _order of the next region to hash
        self._pos = 0  # bytes hashed
        self._ready: dict[int, memoryview] = {}
        self._lock = threading.Lock()
        self._draining = False
        self._failed: Optional[BaseException] = None
        end = 0
        for offset, nbytes in self._order:
            if offset < end or offset + nbytes > size:
                raise ValueError("regions overlap or lie beyond the end of the file")
            end = offset + nbytes

    def feed(self, offset: int, data: Any, *, volatile: bool = False) -> None:
        """Hand over the bytes read at ``offset`` (a region announced at construction)."""
        mv = memoryview(data).cast("B")
        with self._lock:
            if self._failed is not None:
                return
            front = self._next < len(self._order) and self._order[self._next][0] == offset
            if not front or self._draining:
                # hashed later by the thread that fills the hole before it (or that is hashing now)
                self._ready[offset] = memoryview(bytes(mv)) if volatile else mv
                return
            self._draining = True
        try:
            self._hash_region(offset, mv)  # outside the lock: the others keep leaving their bytes
            while True:
                with self._lock:
                    nxt = self._order[self._next][0] if self._next < len(self._order) else None
                    data_next = self._ready.pop(nxt, None) if nxt is not None else None
                    if data_next is None:
                        self._draining = False
                        return
                self._hash_region(nxt, data_next)
        except BaseException as exc:
            with self._lock:
                self._failed = exc
                self._draining = False
            raise

    def _hash_region(self, offset: int, mv: memoryview) -> None:
        if self._pos < offset:
            self._hash_range(self._pos, offset)
        self._h.update(mv)
        self._pos = offset + mv.nbytes
        self._next += 1

    def _hash_range(self, start: int, end: int) -> None:
        while start < end:
            block = os.pread(self.fd, min(end - start, 8 << 20), start)
            if not block:
                raise OSError(f"file ends at byte {start}, expected {self.size}")
            self._h.update(block)
            start += len(block)

    def hexdigest(self) -> Optional[str]:
        """The whole file's checksum once every region was fed (the tail after the last region is
        hashed here); None when a region is missing or hashing failed (the file is then hashed
        after the load)."""
        with self._lock:
            if self._failed is not None or self._draining or self._next != len(self._order):
                return None
            try:
                if self._pos < self.size:
                    self._hash_range(self._pos, self.size)
                    self._pos = self.size
            except OSError:
                return None
            return self._h.hexdigest()
