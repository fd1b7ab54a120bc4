"""PlainWriter: single process and DDP (replicated weights) in SkyRL's file names.

``policy/model_state.pt``, ``policy/optimizer_state.pt``, ``policy/lr_scheduler_state.pt``,
written by rank 0 only (every DDP rank holds the same bytes), read by every rank.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from skyrl_callbacks import selfcheck
from skyrl_callbacks.errors import CorruptCheckpointError, IncompatibleCheckpointError
from skyrl_callbacks.verify import current as current_verification
from skyrl_callbacks.verify import hash_downloaded
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


def torch_save(storage: "Storage", path: str, obj: Any, *, threads: Optional[int] = None) -> None:
    """``torch.save`` through ``storage``, without the zip format's per-record CRC32.

    The CRC costs a third of a save's time on a fast disk and protects nothing our manifest's
    checksum (xxh3, computed as the bytes are written) does not; ``torch.load`` reads such
    files as usual. Large local files are written by :func:`_parallel_torch_save` (the same
    bytes, the tensor data written by ``threads`` threads, default :data:`_WRITE_THREADS`; 1
    writes one stream).
    """
    if (threads is None or threads > 1) and _parallel_torch_save(storage, path, obj, threads or _WRITE_THREADS):
        return
    with storage.open(path, "wb") as fh, _no_zip_crc():
        torch.save(obj, fh)


#: tensor bytes from which a local file is written by several threads (below, one stream is as
#: fast); ``SKYRL_PARALLEL_WRITE_MIN_BYTES`` overrides it (the test suite sets 0 to cover the path)
_PARALLEL_MIN_BYTES = 64 << 20
_WRITE_THREADS = 4
_WRITE_CHUNK = 32 << 20


def _simple_tensors(obj: Any, accept: Any, out: list) -> bool:
    """Append the tensors of ``obj`` to ``out``; False when ``obj`` holds anything but dicts, lists,
    tuples, plain values and tensors for which ``accept(tensor)`` holds (such trees take the
    ordinary ``torch.save`` / ``torch.load`` paths)."""
    if type(obj) is torch.Tensor:
        if not accept(obj):
            return False
        out.append(obj)
        return True
    if type(obj) in (dict, collections.OrderedDict):
        return all(_simple_tensors(v, accept, out) for v in obj.values())
    if type(obj) in (list, tuple):
        return all(_simple_tensors(v, accept, out) for v in obj)
    return isinstance(obj, _PLAIN_LEAVES)


def _dense_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.layout == torch.strided


def _parallel_torch_save(storage: "Storage", path: str, obj: Any, threads: int = _WRITE_THREADS, *,
                         min_bytes: Optional[int] = None) -> bool:
    """Write ``torch.save(obj)`` to the local ``path`` with the tensor bytes written by several
    threads; False (nothing written) where it does not apply.

    One stream leaves the disk idle between requests and copies into the page cache on one core;
    ``dcp.save`` gets its speed from one file per thread, but SkyRL's layout is one file per
    state. So: ``torch.save`` under ``skip_data`` writes the file with holes where the storages go
    (pickle, zip records and directory: the exact file ``torch.save`` writes, less the data);
    the file is read back to ``meta`` for each storage's offset; the storages' bytes are written
    into the holes with ``pwrite`` on ``threads`` threads, while another thread
    checksums the file in order for the manifest (no read-back of the data).
    """
    skip_data = getattr(torch.serialization, "skip_data", None)
    if not storage.is_local or skip_data is None or not hasattr(os, "pwrite"):
        return False
    tensors: list[torch.Tensor] = []
    if not _simple_tensors(obj, _dense_cpu, tensors):
        return False
    if min_bytes is None:
        try:
            min_bytes = int(os.environ.get("SKYRL_PARALLEL_WRITE_MIN_BYTES", _PARALLEL_MIN_BYTES))
        except ValueError:
            min_bytes = _PARALLEL_MIN_BYTES
    unique = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    if not unique or sum(unique.values()) < min_bytes or not selfcheck.trusted("plain-writer"):
        return False
    try:
        storage.makedirs(os.path.dirname(path) or ".")
        with open(path, "wb") as fh, _no_zip_crc(), skip_data():
            torch.save(obj, fh)
        skeleton = torch.load(path, map_location="meta", weights_only=True)
        regions = _storage_regions(obj, skeleton, os.path.getsize(path))
    except Exception:  # noqa: BLE001 - an unusual tree or torch: the one-stream path decides
        regions = None
    if regions is None:
        try:
            os.unlink(path)
        except OSError:
            pass
        return False
    _fill_regions(storage, path, os.path.getsize(path), regions, threads)
    return True


def _storage_regions(obj: Any, skeleton: Any, size: int) -> Optional[list]:
    """``[(file offset, uint8 view of the storage)]`` in file order, pairing each tensor of ``obj``
    with its ``meta`` twin in ``skeleton``; None if the two trees or offsets do not agree."""
    pairs: list = []

    def walk(a: Any, b: Any) -> bool:
        if type(a) is torch.Tensor:
            if not isinstance(b, torch.Tensor) or b.device.type != "meta":
                return False
            pairs.append((a, b))
            return True
        if type(a) in (dict, collections.OrderedDict):
            return isinstance(b, dict) and list(a) == list(b) and all(walk(a[k], b[k]) for k in a)
        if type(a) in (list, tuple):
            return type(b) is type(a) and len(a) == len(b) and all(walk(x, y) for x, y in zip(a, b))
        return True

    if not walk(obj, skeleton):
        return None
    by_offset: dict[int, torch.Tensor] = {}
    for real, meta in pairs:
        offset = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
        st = real.untyped_storage()
        if not isinstance(offset, int) or st.nbytes() != meta.untyped_storage().nbytes():
            return None
        prev = by_offset.get(offset)
        if prev is not None and prev.untyped_storage()._cdata != st._cdata:
            return None
        by_offset[offset] = real
    regions = []
    end = 0
    for offset in sorted(by_offset):
        st = by_offset[offset].untyped_storage()
        nbytes = st.nbytes()
        if offset < end or offset + nbytes > size:
            return None
        end = offset + nbytes
        if nbytes:
            regions.append((offset, torch.empty(0, dtype=torch.uint8).set_(st)))
    return regions


def _fill_regions(storage: "Storage", path: str, size: int, regions: list, threads: int = _WRITE_THREADS) -> None:
    """Write each region's bytes at its offset (``pwrite``, several threads) and record the whole
    file's checksum, computed in file order from the skeleton's bytes and the sources."""
    from concurrent.futures import ThreadPoolExecutor

    from skyrl_callbacks.manifest import _hasher, checksum_algo
    from skyrl_callbacks.storage import local_io_error

    chunks = []
    for offset, data in regions:
        mv = memoryview(data.numpy())
        chunks += [(offset + i, mv[i:i + _WRITE_CHUNK]) for i in range(0, mv.nbytes, _WRITE_CHUNK)]
    algo = checksum_algo()

    def checksum(fd: int) -> str:
        h, pos = _hasher(algo), 0
        for offset, data in regions:
            if offset > pos:
                h.update(os.pread(fd, offset - pos, pos))  # zip headers between storages (small)
            mv = memoryview(data.numpy())
            h.update(mv)
            pos = offset + mv.nbytes
        if size > pos:
            h.update(os.pread(fd, size - pos, pos))
        return h.hexdigest()

    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise local_io_error(exc, path, "writing") from exc
    try:
        with ThreadPoolExecutor(max_workers=threads + 1, thread_name_prefix="skyrl-pwrite") as pool:
            digest = pool.submit(checksum, fd)  # reads only the skeleton's bytes, already written
            futures = [pool.submit(_pwrite_all, fd, mv, offset) for offset, mv in chunks]
        for fut in futures:
            fut.result()
        storage._remember(path, size, algo, digest.result())
    except OSError as exc:
        raise local_io_error(exc, path, "writing") from exc
    finally:
        os.close(fd)


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < mv.nbytes:
        n = os.pwrite(fd, mv[done:], offset + done)
        if n == 0:  # pragma: no cover - pwrite(2) returns 0 only for a zero-length request
            raise OSError(f"pwrite wrote nothing at offset {offset + done}")
        done += n
    if EARLY_WRITEBACK:
        _start_writeback(fd, offset, mv.nbytes)


#: start the disk write of each chunk as soon as it is in the page cache (``sync_file_range``
#: with ``SYNC_FILE_RANGE_WRITE``, Linux). Without it the kernel starts writing back only past its
#: dirty threshold (10% of RAM by default, tens of GiB on a training host), so a save copied the
#: whole state into the cache first and the commit's fsync then waited for the disk: copy time +
#: disk time. Started early, the two overlap and the fsync finds little left. Env
#: ``SKYRL_EARLY_WRITEBACK=0`` turns it off.
EARLY_WRITEBACK = os.environ.get("SKYRL_EARLY_WRITEBACK", "1") != "0"
_SYNC_FILE_RANGE: list = []  # [libc function or None], resolved once


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Queue the range's dirty pages for writing (does not wait for the disk); a no-op where the
    call is missing or the file system refuses it."""
    if not _SYNC_FILE_RANGE:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):  # pragma: no cover - no such libc symbol
                fn = None
        _SYNC_FILE_RANGE.append(fn)
    fn = _SYNC_FILE_RANGE[0]
    if fn is not None:
        # 2 = SYNC_FILE_RANGE_WRITE; a failure (a file system without it) is ignored: the
        # commit's fsync still makes the file durable
        fn(fd, offset, nbytes, 2)


def background_write_threads() -> int:
    """Writer threads per file of a background (async) save: the training loop keeps the cores
    busy meanwhile, and on a small machine (2 cores: lost time 0.78 of a sync save at 4 GiB with
    4 threads) extra writer threads take them from it; one stream per file there, up to
    :data:`_WRITE_THREADS` from 16 cores."""
    return max(1, min(_WRITE_THREADS, (os.cpu_count() or 1) // 4))


def write_files_concurrently(storage: "Storage", directory: str, jobs: list, *, threads: Optional[int] = None) -> None:
    """``torch_save`` each ``(name, obj)`` of ``jobs`` under ``directory``, one thread per file
    (torch.save releases the GIL while it writes). The first error is raised after all ended."""
    if len(jobs) <= 1:
        for name, obj in jobs:
            torch_save(storage, storage.join(directory, name), obj, threads=threads)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="skyrl-write") as pool:
        futures = [pool.submit(torch_save, storage, storage.join(directory, name), obj, threads=threads)
                   for name, obj in jobs]
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


def torch_load(storage: "Storage", path: str, *, weights_only: bool = True, mmap: bool = False) -> Any:
    """``torch.load`` on CPU with a clear error naming the file when it is unreadable.

    Always ``weights_only=True`` (no load executes code from the checkpoint; ``weights_only`` is
    accepted for old callers and ignored): a file that needs more raises
    :class:`~skyrl_callbacks.errors.UntrustedCheckpointError` unless ``trust_checkpoint_code``
    is in effect (:func:`skyrl_callbacks.safe_load.trusting`).

    ``mmap=True`` (local files): the tensors map the file (copy-on-write) instead of being read
    into fresh memory first; ``load_state_dict`` then copies from the page cache once. Committed
    checkpoint files are never modified in place (retention unlinks them), so the mapping stays valid.
    """
    from skyrl_callbacks.errors import UntrustedCheckpointError
    from skyrl_callbacks.safe_load import safe_torch_load

    try:
        if mmap and storage.is_local:
            return safe_torch_load(path, path, map_location="cpu", mmap=True)
        with storage.open(path, "rb") as fh:
            hash_downloaded(storage, path, fh)  # verify_on_resume, object stores: no second download
            return safe_torch_load(fh, path, map_location="cpu")
    except UntrustedCheckpointError:
        raise
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{path}: file is missing ({exc}).") from exc
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError on torn files
        raise CorruptCheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc}).") from exc


_READ_CHUNK = 32 << 20
_READ_THREADS = 4  # concurrent preads (queue depth): a single stream leaves the disk idle between requests
_PLAIN_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)


class _Skeleton:
    """A ``torch.save`` file loaded with ``map_location="meta"``: the object tree with meta tensors
    whose storages carry their byte offset in the file (``_checkpoint_offset``, torch >= 2.6).
    Only the pickle and the zip directory are read; :meth:`materialize` reads the tensor bytes."""

    def __init__(self, obj: Any, fh: Any, path: str, size: int) -> None:
        self.obj, self.fh, self.path, self.size = obj, fh, path, size
        self.tensors: list[torch.Tensor] = []
        self.simple = _simple_tensors(obj, _located_meta, self.tensors)

    def materialize(self, dests: Optional[dict] = None) -> Any:
        """The tree with real CPU tensors, read with large sequential reads in file order.

        ``dests`` maps ``id(meta tensor)`` to a live CPU tensor of the same dtype and shape that
        owns its whole storage: its bytes are read straight into it (in place) and it takes the
        meta tensor's place; every other storage is read into fresh memory.
        """
        dests = dests or {}
        by_storage: dict[int, list[torch.Tensor]] = {}
        for t in self.tensors:
            by_storage.setdefault(t.untyped_storage()._checkpoint_offset, []).append(t)
        real: dict[int, torch.Tensor] = {}
        reads = []  # (file offset, nbytes, uint8 destination)
        for offset, group in sorted(by_storage.items()):
            nbytes = group[0].untyped_storage().nbytes()
            if offset < 0 or offset + nbytes > self.size:
                raise CorruptCheckpointError(f"{self.path}: tensor data at bytes {offset}..{offset + nbytes} "
                                             f"lies beyond the end of the file ({self.size} bytes).")
            live = dests.get(id(group[0])) if len(group) == 1 else None
            if live is not None and _fits_in_place(group[0], live, nbytes):
                real[id(group[0])] = live
                reads.append((offset, nbytes, live.detach().reshape(-1).view(torch.uint8)))
                continue
            buf = torch.empty(nbytes, dtype=torch.uint8)
            for t in group:
                real[id(t)] = torch.empty(0, dtype=t.dtype).set_(buf.untyped_storage(), t.storage_offset(), t.shape, t.stride())
            reads.append((offset, nbytes, buf))
        fd = self.fh.fileno()
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        chunks = []  # (file offset, destination) in file order, _READ_CHUNK at most each
        for offset, nbytes, dst in reads:
            if dst.is_cuda:  # read through a pinned host buffer, then copied in place on the device
                chunks += [(offset + i, dst[i:i + _READ_CHUNK]) for i in range(0, nbytes, _READ_CHUNK)]
                continue
            mv = memoryview(dst.numpy())
            chunks += [(offset + i, mv[i:i + _READ_CHUNK]) for i in range(0, nbytes, _READ_CHUNK)]
        # verify_on_resume: the file hashed in order as the chunks arrive (headers between them read
        # by the hash), so the checksum needs no second read of the tensor bytes
        verification = current_verification()
        hasher = None
        if verification is not None:
            regions = [(offset, dst.numel() if isinstance(dst, torch.Tensor) else dst.nbytes) for offset, dst in chunks]
            hasher = verification.hash_for(self.path, fd, self.size, regions)
        # with a hash, one more thread: the one that hashes (whichever holds the next chunk in file
        # order) leaves _READ_THREADS reads in flight
        threads = min(_READ_THREADS + (hasher is not None), len(chunks))
        if threads <= 1:
            for offset, dst in chunks:
                _read_chunk(fd, dst, offset, self.path, hasher)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="skyrl-read") as pool:
                futures = [pool.submit(_read_chunk, fd, dst, offset, self.path, hasher) for offset, dst in chunks]
            for fut in futures:
                fut.result()
        if hasher is not None:
            verification.record(self.path, hasher.hexdigest())
        return self._rebuild(self.obj, real)

    def _rebuild(self, o: Any, real: dict) -> Any:
        if type(o) is torch.Tensor:
            return real[id(o)]
        if type(o) in (dict, collections.OrderedDict):
            return type(o)((k, self._rebuild(v, real)) for k, v in o.items())
        if type(o) in (list, tuple):
            return type(o)(self._rebuild(v, real) for v in o)
        return o


def _located_meta(t: torch.Tensor) -> bool:
    """A dense meta tensor of a loaded skeleton whose storage knows its offset in the file."""
    return (t.device.type == "meta" and t.layout == torch.strided and not t.requires_grad
            and isinstance(getattr(t.untyped_storage(), "_checkpoint_offset", None), int))


def _fits_in_place(meta: torch.Tensor, live: Any, nbytes: int) -> bool:
    """``live`` can take the loaded bytes of ``meta`` as they are: a dense CPU tensor of the same
    dtype and shape that owns its whole storage (not a view into a flat buffer), and ``meta``
    covers its own storage exactly."""
    return (
        type(live) is torch.Tensor
        and live.device.type in ("cpu", "cuda")
        and live.layout == torch.strided
        and live.dtype == meta.dtype
        and live.shape == meta.shape
        and live.is_contiguous()
        and meta.is_contiguous()
        and meta.storage_offset() == 0
        and live.storage_offset() == 0
        and live.untyped_storage().nbytes() == nbytes == live.numel() * live.element_size()
        and not live.requires_grad
    )


_BOUNCE = threading.local()  # each reader thread's pinned host buffer for device destinations


def _read_chunk(fd: int, dst: Any, offset: int, path: str, hasher: Any = None) -> None:
    """Read ``dst``'s bytes from ``offset``: straight into host memory (a memoryview), or for a
    CUDA ``uint8`` tensor into this thread's pinned buffer, then copied to the device. ``hasher``
    (an :class:`~skyrl_callbacks.verify.OrderedHash`, verify_on_resume) gets the bytes read."""
    if isinstance(dst, memoryview):
        _pread_into(fd, dst, offset, path)
        if hasher is not None:
            hasher.feed(offset, dst)
        return
    nbytes = dst.numel()
    bounce = getattr(_BOUNCE, "buf", None)
    if bounce is None or bounce.numel() < nbytes:
        bounce = _BOUNCE.buf = torch.empty(max(nbytes, _READ_CHUNK), dtype=torch.uint8, pin_memory=True)
    _pread_into(fd, memoryview(bounce.numpy())[:nbytes], offset, path)
    if hasher is not None:  # before the buffer is refilled (copied if it must wait for earlier chunks)
        hasher.feed(offset, memoryview(bounce.numpy())[:nbytes], volatile=True)
    with torch.cuda.device(dst.device):
        dst.copy_(bounce[:nbytes], non_blocking=True)
        torch.cuda.current_stream().synchronize()  # the buffer is refilled by this thread's next read


def _pread_into(fd: int, mv: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < mv.nbytes:
        try:
            n = os.preadv(fd, [mv[done:done + _READ_CHUNK]], offset + done)
        except OSError as exc:
            raise CorruptCheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc}).") from exc
        if n == 0:
            raise CorruptCheckpointError(f"{path}: ends inside tensor data (read {offset + done} bytes).")
        done += n


@contextlib.contextmanager
def open_skeleton(storage: "Storage", path: str, *, weights_only: bool = True) -> Iterator[Optional[_Skeleton]]:
    """The :class:`_Skeleton` of a local ``torch.save`` file, or None where the direct read does
    not apply (object stores, torch without storage offsets, trees with other objects, files a
    weights-only load refuses): the caller then uses :func:`torch_load`, which decides. Errors
    name the file (:class:`CorruptCheckpointError`). Always ``weights_only=True`` (the argument
    is ignored)."""
    if not storage.is_local or not hasattr(os, "preadv") or not selfcheck.trusted("plain-reader"):
        yield None
        return
    try:
        fh = open(path, "rb")
    except OSError:
        yield None  # torch_load reports it, naming the file
        return
    with fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            skel: Optional[_Skeleton] = _Skeleton(torch.load(fh, map_location="meta", weights_only=True),
                                                  fh, path, size)
        except Exception:  # a torn file, or a torch that cannot load to "meta": torch_load decides
            skel = None
        yield skel if skel is not None and skel.simple else None


def model_destinations(saved: Any, live: dict) -> dict:
    """``{id(loaded tensor): live tensor}`` for ``model.load_state_dict(saved)`` when every saved
    key names a live tensor of the same dtype and shape (else empty: a mismatching checkpoint
    leaves the model untouched and ``load_state_dict`` reports it). Tensors shared by several
    keys (tied weights) are read into fresh memory."""
    if not isinstance(saved, dict):
        return {}
    out: dict = {}
    for key, t in saved.items():
        dst = live.get(key)
        if not (isinstance(t, torch.Tensor) and isinstance(dst, torch.Tensor)) or dst.shape != t.shape \
                or dst.dtype != t.dtype:
            return {}
        out[id(t)] = dst
    return _unshared(out)


def _unshared(dests: dict) -> dict:
    """``dests`` without the live tensors whose storage two entries would fill (one of them
    would overwrite the other); those entries are read into fresh memory."""
    owners: dict = {}
    for dst in dests.values():
        key = dst.untyped_storage()._cdata
        owners[key] = owners.get(key, 0) + 1
    return {k: v for k, v in dests.items() if owners[v.untyped_storage()._cdata] == 1}


def optimizer_destinations(state: Any, optimizer: Any) -> dict:
    """``{id(loaded tensor): live state tensor}`` for ``optimizer.load_state_dict(state)``: the
    saved parameter indices paired with the live parameters the way ``load_state_dict`` pairs
    them (group by group, in order). Where the optimizer has no state yet (a resume at start-up)
    and the parameter is on a GPU, a floating-point entry other than ``step`` gets a new tensor on
    the parameter's device, where ``load_state_dict`` would move it anyway (no host copy first).
    Other tensors without a live counterpart are absent (read into host memory)."""
    out: dict = {}
    try:
        saved_groups, live_groups, saved_state = state["param_groups"], optimizer.param_groups, state["state"]
        if len(saved_groups) != len(live_groups):
            return out
        for sg, lg in zip(saved_groups, live_groups):
            if len(sg["params"]) != len(lg["params"]):
                return out
            for idx, param in zip(sg["params"], lg["params"]):
                saved, live = saved_state.get(idx), optimizer.state.get(param)
                if not isinstance(saved, dict):
                    continue
                live = live if isinstance(live, dict) else {}
                for key, t in saved.items():
                    if not isinstance(t, torch.Tensor):
                        continue
                    if isinstance(live.get(key), torch.Tensor):
                        if not (param.is_floating_point() and key != "step" and live[key].dtype != param.dtype):
                            out[id(t)] = live[key]
                    elif param.is_cuda and param.is_floating_point() and key != "step" and t.dtype == param.dtype:
                        out[id(t)] = torch.empty(t.shape, dtype=t.dtype, device=param.device)
    except (KeyError, TypeError, AttributeError):
        return {}
    return _unshared(out)


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

    def prewarm_tree(self, role: "Role", dist: "DistContext") -> Any:
        return self._collect(role) if dist.is_main else None

    def write_snapshot(self, storage: "Storage", role_dir: str, snap: Any, dist: "DistContext") -> list[str]:
        return [] if snap is None else self._write(storage, role_dir, snap, background_write_threads())

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
    def _write(storage: "Storage", role_dir: str, state: dict, threads: Optional[int] = None) -> list[str]:
        """The role's files, written concurrently (the optimizer file, twice the model's size with
        Adam, does not wait for the model file), each by ``threads`` threads (default: 4)."""
        jobs = [(MODEL_FILE, state["model"])]
        if state["optimizer"] is not None:
            jobs.append((OPTIMIZER_FILE, state["optimizer"]))
        if state["scheduler"] is not None:
            jobs.append((SCHEDULER_FILE, state["scheduler"]))
        write_files_concurrently(storage, role_dir, jobs, threads=threads)
        return [name for name, _ in jobs]

    def load(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext") -> None:
        model = unwrap_model(role.model)
        path = storage.join(role_dir, MODEL_FILE)
        live = model.state_dict()
        with open_skeleton(storage, path, weights_only=True) as skel:
            if skel is None:
                # object stores, unusual trees: the file mapped where local, load_state_dict copies
                sd = torch_load(storage, path, weights_only=True, mmap=True)
            else:
                # read straight into the parameters where the saved tensors match them (through
                # pinned buffers for a GPU), hashed on the way (verify_on_resume). On the CPU this
                # replaced an mmap (page faults, then load_state_dict's copy): 0.5 GiB cold on 2
                # cores, 1.1 s -> 0.7 s (bench/bench_verified_load.py)
                sd = skel.materialize(model_destinations(skel.obj, live))
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
        with open_skeleton(storage, path) if what == "optimizer" else contextlib.nullcontext() as skel:
            if skel is None:
                states = unpack_states(torch_load(storage, path), len(objs), what, path)
            else:
                # local file: the pickle first (meta tensors), then the tensor bytes with large
                # sequential reads straight into the optimizers' existing state tensors where
                # they match (no second copy, no fresh memory), else into fresh memory
                dests: dict = {}
                for obj, meta in zip(objs, unpack_states(skel.obj, len(objs), what, path)):
                    dests.update(optimizer_destinations(meta, obj))
                states = unpack_states(skel.materialize(dests), len(objs), what, path)
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


