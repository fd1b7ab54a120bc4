"""FSDPWriter: FSDP2 (``fully_shard``) and FSDP1 (``FullyShardedDataParallel``) roles.

Layout of one role directory (``global_step_N/policy/``), see ``docs/fsdp.md``:

``state_dict_type="sharded"`` (default; every rank writes its own shards, reshardable)::

    fsdp_config.json            rank 0: strategy, world size, layout, format version
    model_state.dcp/            torch.distributed.checkpoint directory of the model
        .metadata               rank 0 (DCP coordinator)
        __{rank}_0.distcp       that rank's shards (object stores: __{rank}_{i}.distcp, i < dcp_thread_count)
    optimizer_state.dcp/        same, for {"optimizer_0": ..., "optimizer_1": ...}
    lr_scheduler_state.pt       rank 0: scheduler state_dict (plain torch.save)

``state_dict_type="full"`` (rank 0 writes SkyRL's single files, readable by plain torch)::

    fsdp_config.json
    model_state.pt              full (unsharded) model state_dict
    optimizer_state.pt          full optimizer state_dict in torch.optim's index-keyed format
    lr_scheduler_state.pt

Loading reads whatever layout ``fsdp_config.json`` names (not the writer's own setting), and
also SkyRL's native per-rank files (``model_world_size_{W}_rank_{R}.pt`` ...) at the world size
that wrote them; :func:`convert_skyrl_native` turns those into the reshardable layout.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import uuid
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

from skyrl_callbacks import selfcheck
from skyrl_callbacks.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StorageError,
    UntrustedCheckpointError,
)
from skyrl_callbacks.staging import Stager, _is_dtensor, _is_sharded_tensor
from skyrl_callbacks.writers.base import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    RoleWriter,
    read_json_object,
    write_json,
)
from skyrl_callbacks.writers.plain import pack_states, torch_load, torch_save, unpack_states

if TYPE_CHECKING:
    from skyrl_callbacks.dist import DistContext
    from skyrl_callbacks.roles import Role
    from skyrl_callbacks.storage import Storage

logger = logging.getLogger(__name__)

__all__ = [
    "FSDPWriter",
    "is_fsdp_model",
    "fsdp_strategy_of",
    "check_shared_storage",
    "convert_skyrl_native",
    "fsdp1_optimizer_coverage",
    "native_layout_info",
    "read_fsdp_config",
    "FSDP_CONFIG_FILE",
    "MODEL_DCP_DIR",
    "OPTIMIZER_DCP_DIR",
    "FORMAT_VERSION",
    "STATE_DICT_TYPES",
    "DEFAULT_DCP_THREAD_COUNT",
]

FSDP_CONFIG_FILE = "fsdp_config.json"
MODEL_DCP_DIR = "model_state.dcp"
OPTIMIZER_DCP_DIR = "optimizer_state.dcp"
#: version of the layout described in this module (``fsdp_config.json["format_version"]``)
FORMAT_VERSION = 1
STATE_DICT_TYPES = ("sharded", "full")
#: writer threads per rank of a sharded save (``CheckpointConfig.dcp_thread_count``)
DEFAULT_DCP_THREAD_COUNT = 4
SHARED_MARKER_PREFIX = ".skyrl-shared-storage-check-"
CONVERT_HINT = "skyrl-ckpt convert CKPT_DIR OUT"

_NATIVE_RE = re.compile(r"^(model|optim|extra_state)_world_size_(\d+)_rank_(\d+)\.pt$")
_DCP_METADATA = ".metadata"


# --------------------------------------------------------------------------- detection
def _fsdp_classes() -> tuple[Optional[type], Optional[type]]:
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._composable.fsdp import FSDPModule  # type: ignore[no-redef]
        except ImportError:
            FSDPModule = None  # type: ignore[assignment,misc]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = None  # type: ignore[assignment,misc]
    return FSDPModule, FullyShardedDataParallel


def fsdp_strategy_of(model: Any) -> Optional[str]:
    """``"fsdp2"`` if ``fully_shard`` was applied to ``model`` or any submodule, ``"fsdp"`` for
    ``FullyShardedDataParallel`` (anywhere inside), else None."""
    if not isinstance(model, torch.nn.Module):
        return None
    fsdp2_cls, fsdp1_cls = _fsdp_classes()
    found1 = found2 = False
    for module in model.modules():
        if fsdp2_cls is not None and isinstance(module, fsdp2_cls):
            found2 = True
        elif fsdp1_cls is not None and isinstance(module, fsdp1_cls):
            found1 = True
    if found2:
        return "fsdp2"
    if found1:
        return "fsdp"
    return None


def is_fsdp_model(model: Any) -> bool:
    """True for FSDP2 and FSDP1 models, also when nested inside a plain wrapper module."""
    return fsdp_strategy_of(model) is not None


# --------------------------------------------------------------------------- small helpers
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's deprecation chatter (ShardedTensor, _get_pg_default_device, DeviceMesh
    pickling) that FSDP1 and DCP emit on every call."""
    mesh_logger = logging.getLogger("torch.distributed.device_mesh")
    level = mesh_logger.level
    mesh_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*_get_pg_default_device.*")
            warnings.filterwarnings("ignore", message=".*Multiple backends are registered.*")
            warnings.filterwarnings("ignore", message=".*ShardedTensor.*")
            warnings.filterwarnings("ignore", message=".*torch.distributed.checkpoint.*")
            warnings.filterwarnings("ignore", message=".*Gathering a tensor with zero elements.*")
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
            yield
    finally:
        mesh_logger.setLevel(level)


def _global_shape(value: torch.Tensor) -> tuple[int, ...]:
    if _is_sharded_tensor(value):
        return tuple(value.metadata().size)
    return tuple(value.shape)


def _dtype_of(value: torch.Tensor) -> torch.dtype:
    if _is_sharded_tensor(value):
        return value.metadata().tensor_properties.dtype
    return value.dtype


def _local_device(value: torch.Tensor) -> torch.device:
    if _is_dtensor(value):
        return value.to_local().device
    if _is_sharded_tensor(value):
        shards = value.local_shards()
        if shards:
            return shards[0].tensor.device
        return torch.device("cpu")
    return value.device


def _holds_cuda(tree: Any) -> bool:
    """Some tensor leaf of ``tree`` (a DTensor's or ShardedTensor's local shard) lives on a GPU."""
    return any(_local_device(t).type == "cuda" for _, t in _walk_tensors(tree))


def _group_rank0(dist: "DistContext") -> int:
    """Global rank of the group's rank 0 (c10d's ``src``/``dst`` take global ranks)."""
    if dist.group is None or not dist.enabled:
        return 0
    import torch.distributed as tdist

    return tdist.get_global_rank(dist.group, 0)


def _walk_tensors(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    """``(path, tensor)`` for every tensor leaf, in an order that is the same on every rank."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        keys = list(obj.keys())
        if all(isinstance(k, str) for k in keys):
            keys = sorted(keys)
        for k in keys:
            yield from _walk_tensors(obj[k], path + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_tensors(v, path + (i,))


def _get_path(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """A copy of nested dicts/lists with every tensor leaf replaced by ``fn(tensor)``.

    ``fn`` is called in :func:`_walk_tensors` order, so collectives inside it line up.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        keys = list(obj.keys())
        order = sorted(keys) if all(isinstance(k, str) for k in keys) else keys
        out = {k: _map_tensors(obj[k], fn) for k in order}
        return {k: out[k] for k in keys}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj


def _collective(dist: "DistContext", phase: str, fn: Callable[[], Any]) -> Any:
    """``dist.run``: an error on any rank is raised on every rank by the one rule of
    :meth:`DistContext.agree` (the failing rank's kind of error; a ``RankFailure`` naming the ranks
    at several)."""
    return dist.run(phase, fn)


_write_json = write_json


def read_fsdp_config(storage: "Storage", role_dir: str) -> Optional[dict]:
    """The parsed ``fsdp_config.json`` of ``role_dir``, or None when there is none.

    Raises:
        CorruptCheckpointError: the file exists but is not a JSON object.
    """
    return read_json_object(storage, storage.join(role_dir, FSDP_CONFIG_FILE))


def native_layout_info(storage: "Storage", role_dir: str) -> Optional[dict]:
    """Describe SkyRL's native per-rank files in ``role_dir``, or None when there are none.

    Returns:
        ``{"world_size": W, "fsdp_strategy": "fsdp"|"fsdp2"|None, "ranks": {kind: [ranks]}}``.

    Raises:
        CorruptCheckpointError: files of several world sizes, or ranks missing.
    """
    sizes: dict[int, dict[str, set]] = {}
    for name in storage.listdir(role_dir):
        m = _NATIVE_RE.match(name)
        if m:
            sizes.setdefault(int(m.group(2)), {}).setdefault(m.group(1), set()).add(int(m.group(3)))
    if not sizes:
        return None
    if len(sizes) > 1:
        raise CorruptCheckpointError(
            f"{role_dir}: holds SkyRL per-rank files of several world sizes {sorted(sizes)}; "
            f"remove the stale ones."
        )
    (world, kinds), = sizes.items()
    cfg = read_fsdp_config(storage, role_dir) or {}
    if cfg.get("world_size") not in (None, world):
        raise CorruptCheckpointError(
            f"{role_dir}: fsdp_config.json says world_size={cfg.get('world_size')} but the "
            f"per-rank files are for world size {world}."
        )
    for kind in ("model",):
        missing = sorted(set(range(world)) - kinds.get(kind, set()))
        if missing:
            raise CorruptCheckpointError(
                f"{role_dir}: SkyRL checkpoint of world size {world} lacks {kind}_world_size_{world}_rank_R.pt "
                f"for ranks {missing}."
            )
    return {
        "world_size": world,
        "fsdp_strategy": cfg.get("fsdp_strategy"),
        "ranks": {k: sorted(v) for k, v in kinds.items()},
    }


def _native_name(kind: str, world: int, rank: int) -> str:
    return f"{kind}_world_size_{world}_rank_{rank}.pt"


# --------------------------------------------------------------------------- DCP plumbing
class _HashingStream:
    """A write-only file wrapper that checksums what passes through (DCP writes sequentially;
    a seek makes the checksum unusable and the manifest reads the file back instead)."""

    def __init__(self, inner: Any) -> None:
        from skyrl_callbacks.manifest import _hasher, checksum_algo

        self._inner = inner
        self.algo = checksum_algo()
        self._hash = _hasher(self.algo)
        self.size = 0
        self.valid = True

    def write(self, data: Any) -> int:
        n = self._inner.write(data)
        mv = memoryview(data).cast("B")
        n = mv.nbytes if n is None else n
        self._hash.update(mv[:n])
        self.size += n
        return n

    def seek(self, *args: Any) -> int:
        self.valid = False
        return self._inner.seek(*args)

    def writable(self) -> bool:
        return True

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def __getattr__(self, name: str) -> Any:  # tell, fileno, flush, ...
        return getattr(self._inner, name)


def _hashing_filesystem(storage: "Storage") -> Any:
    """DCP's local FileSystem whose written files are checksummed on the way (no read-back)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class _HashingFileSystem(FileSystem):
        def __init__(self) -> None:
            super().__init__()
            #: what failed inside a written file (DCP's writer threads lose their exceptions)
            self.errors: list[str] = []

        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
            with super().create_stream(path, mode) as stream:
                if "w" not in mode:
                    yield stream
                    return
                hs = _HashingStream(stream)
                try:
                    yield hs
                except BaseException as exc:
                    self.errors.append(f"{os.path.basename(os.fspath(path))}: {_short(exc, 300)}")
                    raise
            if hs.valid and not os.fspath(path).endswith(".tmp"):  # .metadata is written as a temp + rename
                storage._remember(os.fspath(path), hs.size, hs.algo, hs.digest)

    return _HashingFileSystem()


def _fail_on_lost_writes(writer: Any) -> None:
    """Make ``writer.write_data`` raise unless every item of the rank's plan was written.

    With ``thread_count > 1`` DCP's FileSystemWriter/FsspecWriter write on helper threads whose
    exceptions are lost (printed by ``threading.excepthook``; torch 2.13, pytorch/pytorch#191391):
    the save would return normally, ``.metadata`` would list items that no file holds, and the
    checkpoint would fail only when loaded. A missing result fails this rank's write step, which
    DCP reports on every rank.
    """
    inner = writer.write_data

    def write_data(plan: Any, planner: Any) -> Any:
        fut = inner(plan, planner)
        done = {result.index for result in fut.wait()}
        lost = [item.index.fqn for item in plan.items if item.index not in done]
        if lost:
            errors = getattr(getattr(writer, "fs", None), "errors", None)
            cause = errors[0] if errors else "see the traceback on stderr"
            raise StorageError(
                f"a checkpoint writer thread failed ({cause}); {len(lost)} of {len(plan.items)} entries of this "
                f"rank were not written (e.g. {lost[:3]})."
            )
        return fut

    writer.write_data = write_data


class _SkeletonSink:
    """The file-like ``torch.save`` writes one entry into under ``skip_data``: bytes go to the
    file, each storage's bytes become a hole (torch seeks past them), recorded as
    ``(file offset, size)``."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.holes: list[tuple[int, int]] = []

    def write(self, data: Any) -> int:
        return self._fh.write(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        # a relative seek is a hole; anything else is unexpected (the caller checks the holes)
        self.holes.append((self._fh.tell(), offset) if whence == os.SEEK_CUR else (-1, -1))
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def flush(self) -> None:
        self._fh.flush()


def _entry_tensor(data: Any) -> torch.Tensor:
    """A write item's tensor as DCP's own loader prepares it: host memory, owning its storage."""
    t = data.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _parallel_file_writer(storage: "Storage", path: str, threads: int) -> Any:
    """DCP's ``FileSystemWriter`` with its data step replaced: each rank writes one file
    (``__{rank}_0.distcp``), the bytes ``FileSystemWriter(thread_count=1)`` writes with its serial
    loader and the zip CRC off (tested byte-identical; with CUDA available DCP's own loader
    orders entries by size instead, the same records in another order), with the tensor bytes
    written by ``threads`` threads.

    DCP's writer ``torch.save``s every entry into a Python stream, one file per thread: one
    core's page-cache copies per file, and a Python call per write. Here every entry's
    ``torch.save`` runs under ``skip_data`` (the zip records and pickle, holes where the data
    goes), then the holes are filled with ``pwrite`` from the host tensors on ``threads``
    threads while another thread checksums the file in order for the manifest: the plain
    writer's threaded save (:func:`~skyrl_callbacks.writers.plain._fill_regions`). Any reader of
    DCP checkpoints reads the result (``.metadata`` holds each entry's offset and length, as
    always). The file is flushed to disk by the checkpoint's commit, with the others.
    """
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    from skyrl_callbacks.storage import local_io_error
    from skyrl_callbacks.writers.plain import _fill_regions

    class _ParallelFileWriter(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            name = f"{plan.storage_data.prefix}0.distcp"
            file_path = os.path.join(os.fspath(self.path), name)
            byte_items = [wi for wi in plan.items if wi.type == WriteItemType.BYTE_IO]
            tensor_items = [wi for wi in plan.items if wi.type != WriteItemType.BYTE_IO]
            results, regions, keep = [], [], []
            skip_data = torch.serialization.skip_data
            try:
                with open(file_path, "wb") as fh:
                    for item in byte_items:
                        offset = fh.tell()
                        fh.write(planner.resolve_data(item).getbuffer())
                        results.append((item, offset, fh.tell() - offset))
                    for item in tensor_items:
                        t = _entry_tensor(planner.resolve_data(item))
                        keep.append(t)
                        offset = fh.tell()
                        sink = _SkeletonSink(fh)
                        with skip_data():
                            torch.save(t, sink)
                        nbytes = t.untyped_storage().nbytes()
                        holes = [h for h in sink.holes if h[1]]
                        if nbytes and len(holes) == 1 and holes[0][1] == nbytes:
                            regions.append((holes[0][0], torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())))
                        elif nbytes or holes:  # pragma: no cover - a torch whose records differ: one stream
                            fh.seek(offset)
                            fh.truncate()
                            torch.save(t, fh)
                        results.append((item, offset, fh.tell() - offset))
                    size = fh.tell()
            except OSError as exc:
                raise local_io_error(exc, file_path, "writing") from exc
            _fill_regions(storage, file_path, size, regions, threads)
            out = [WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(name, offset, length))
                   for item, offset, length in results]
            fut: Future = Future()
            fut.set_result(out)
            return fut

    return _ParallelFileWriter(path, single_file_per_rank=True, sync_files=False)


#: stored entries a rank's reader keeps in flight per thread (bounds the host memory of a load)
_READ_AHEAD_PER_THREAD = 2


class _RandomAccessFile(io.RawIOBase):
    """A read-only, seekable file of ``length`` bytes whose reads are ``_read_at`` calls (no shared
    position: :class:`_FileWindow` uses ``pread``, so reader threads may share a descriptor)."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self._length, self._pos = length, 0

    def _read_at(self, out: memoryview, pos: int) -> int:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = max(0, min(out.nbytes, self._length - self._pos))
        if n == 0:
            return 0
        got = self._read_at(out[:n], self._pos)
        self._pos += got
        return got

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class _MemoryFile(_RandomAccessFile):
    """A file over a buffer, without copying it (``io.BytesIO`` copies a bytearray; ``torch.load``
    then copies each record once, through ``readinto``)."""

    def __init__(self, buf: Any) -> None:
        self._mv = memoryview(buf).cast("B")
        super().__init__(self._mv.nbytes)

    def _read_at(self, out: memoryview, pos: int) -> int:
        out[:] = self._mv[pos:pos + out.nbytes]
        return out.nbytes


class _FileWindow(_RandomAccessFile):
    """A file over ``[start, start + length)`` of an open descriptor."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__(length)
        self._fd, self._start = fd, start

    def _read_at(self, out: memoryview, pos: int) -> int:
        return os.preadv(self._fd, [out], self._start + pos)


def _direct_read(fd: int, key: tuple, req: Any, planner: Any) -> Optional[tuple]:
    """``(destination, file offset of the tensor bytes, nbytes)`` when the stored entry ``key`` is a
    dense tensor that ``req`` loads whole into a destination of the same dtype and shape (a load at
    the world size that saved it): its bytes can go straight from the file into the destination.
    None otherwise (the caller deserialises the entry). Reads only the entry's zip records and
    pickle (``map_location="meta"``), never its data."""
    _rel, offset, length = key
    try:
        meta = torch.load(_FileWindow(fd, offset, length), map_location="meta", weights_only=True)
    except Exception:  # noqa: BLE001 - anything unusual: the general path decides
        return None
    if type(meta) is not torch.Tensor or meta.device.type != "meta":
        return None
    record = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
    nbytes = meta.numel() * meta.element_size()
    if (not isinstance(record, int) or meta.storage_offset() != 0 or not meta.is_contiguous()
            or meta.untyped_storage().nbytes() != nbytes or record + nbytes > length or nbytes == 0):
        return None
    if any(req.storage_offsets) or list(req.lengths) != list(meta.shape):
        return None
    target = planner.resolve_tensor(req).detach()
    if (target.dtype != meta.dtype or tuple(target.shape) != tuple(meta.shape) or not target.is_contiguous()
            or target.device.type not in ("cpu", "cuda")):
        return None
    return target, offset + record, nbytes


def _parallel_file_reader(path: str, threads: int) -> Any:
    """DCP's ``FileSystemReader`` with its data step replaced (local checkpoints).

    DCP reads every entry through one Python file object, one after another, into a fresh host
    tensor that is then copied into the destination: the disk waits while each entry is
    unpickled and copied. Here:

    * an entry loaded whole into a destination of the same dtype and shape (a load at the world
      size that saved it) is located from its zip records (:func:`_direct_read`, no data read)
      and its bytes are read straight into the destination with ``pread`` (through a per-thread
      pinned buffer for a GPU), in 32 MiB reads on ``threads`` threads, as the plain writer's
      loader does;
    * any other entry (resharding slices, byte entries, non-contiguous layouts) is read with
      ``pread`` on the same threads, at most ``threads * _READ_AHEAD_PER_THREAD`` ahead, while
      this thread deserialises it and copies the requested slices, as DCP does; an entry that
      several requests slice is read once.

    Entries with storage transforms (DCP extensions) go through DCP's own code.
    """
    from concurrent.futures import ThreadPoolExecutor

    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.futures import Future

    from skyrl_callbacks.verify import current as current_verification
    from skyrl_callbacks.writers.plain import _READ_CHUNK, _pread_into, _read_chunk

    class _ParallelFileReader(FileSystemReader):
        def read_data(self, plan: Any, planner: Any) -> Any:
            if any(self.storage_data[req.storage_index].transform_descriptors for req in plan.items):
                return super().read_data(plan, planner)
            entries: dict[tuple, list] = {}
            for req in plan.items:
                md = self.storage_data[req.storage_index]
                entries.setdefault((md.relative_path, md.offset, md.length), []).append(req)
            root = os.fspath(self.path)
            fds: dict[str, int] = {}
            try:
                for rel in sorted({key[0] for key in entries}):
                    file_path = os.path.join(root, rel)
                    try:
                        fds[rel] = os.open(file_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    except OSError as exc:
                        raise CorruptCheckpointError(f"{file_path}: cannot be opened ({exc}).") from exc

                def fetch(key: tuple) -> Any:
                    rel, offset, length = key
                    buf = torch.empty(length, dtype=torch.uint8)  # not zero-filled, unlike bytearray
                    _pread_into(fds[rel], memoryview(buf.numpy()), offset, os.path.join(root, rel))
                    return buf.numpy()

                # entries loaded whole into a matching destination: their bytes straight into it
                # (through a pinned buffer for a GPU), in 32 MiB reads on every thread
                direct, order = [], []
                for key in sorted(entries):
                    hit = None
                    if len(entries[key]) == 1 and entries[key][0].type != LoadItemType.BYTE_IO:
                        hit = _direct_read(fds[key[0]], key, entries[key][0], planner)
                    if hit is None:
                        order.append(key)
                    else:
                        direct.append((key, hit))
                chunks = []
                for key, (target, offset, nbytes) in direct:
                    flat = target.reshape(-1).view(torch.uint8)
                    if target.is_cuda:
                        chunks += [(key, offset + i, flat[i:i + _READ_CHUNK]) for i in range(0, nbytes, _READ_CHUNK)]
                    else:
                        mv = memoryview(flat.numpy())
                        chunks += [(key, offset + i, mv[i:i + _READ_CHUNK]) for i in range(0, nbytes, _READ_CHUNK)]
                hashers = self._hashers(root, fds, entries, chunks, order)
                if hashers:
                    def fetch(key: tuple, _fetch: Any = fetch) -> Any:  # noqa: F811 - the bytes hashed too
                        buf = _fetch(key)
                        if key[0] in hashers:
                            hashers[key[0]].feed(key[1], buf)
                        return buf

                window = max(1, threads) * _READ_AHEAD_PER_THREAD
                with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="skyrl-dcp-read") as pool:
                    reads = [pool.submit(_read_chunk, fds[key[0]], dst, offset, os.path.join(root, key[0]),
                                         hashers.get(key[0]))
                             for key, offset, dst in chunks]
                    pending = [pool.submit(fetch, key) for key in order[:window]]
                    for i, key in enumerate(order):
                        buf = pending[i].result()
                        pending[i] = None  # type: ignore[call-overload]
                        if i + window < len(order):
                            pending.append(pool.submit(fetch, order[i + window]))
                        for req in entries[key]:
                            if req.type == LoadItemType.BYTE_IO:
                                planner.load_bytes(req, io.BytesIO(buf.tobytes()))
                                continue
                            tensor = torch.load(_MemoryFile(buf), map_location="cpu", weights_only=True)
                            tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
                            target = planner.resolve_tensor(req).detach()
                            if target.size() != tensor.size():
                                raise CorruptCheckpointError(
                                    f"{os.path.join(root, key[0])}: entry {req.storage_index.fqn} has shape "
                                    f"{tuple(tensor.size())}, the model expects {tuple(target.size())}."
                                )
                            target.copy_(tensor)
                            planner.commit_tensor(req, target)
                        del buf
                    for fut in reads:
                        fut.result()
                for key, (target, _offset, _nbytes) in direct:
                    planner.commit_tensor(entries[key][0], target)
                verification = current_verification()
                for rel, hasher in hashers.items():
                    verification.record(os.path.join(root, rel), hasher.hexdigest())
            finally:
                for fd in fds.values():
                    os.close(fd)
            fut: Future = Future()
            fut.set_result(None)
            return fut

        def _hashers(self, root: str, fds: dict, entries: dict, chunks: list, order: list) -> dict:
            """verify_on_resume: an :class:`~skyrl_callbacks.verify.OrderedHash` per file this rank
            reads every entry of (at the saving world size, its own ``__{rank}_*.distcp``); files
            other ranks read parts of (resharding) are hashed after the load instead."""
            verification = current_verification()
            if verification is None:
                return {}
            in_file: dict[str, set] = {}
            for md in self.storage_data.values():
                in_file.setdefault(md.relative_path, set()).add((md.relative_path, md.offset, md.length))
            regions: dict[str, list] = {}
            for key, offset, dst in chunks:
                regions.setdefault(key[0], []).append((offset, dst.numel() if isinstance(dst, torch.Tensor) else dst.nbytes))
            for key in order:
                regions.setdefault(key[0], []).append((key[1], key[2]))
            out = {}
            for rel, fd in fds.items():
                if not in_file.get(rel, set()) <= set(entries):
                    continue
                hasher = verification.hash_for(os.path.join(root, rel), fd, os.fstat(fd).st_size, regions.get(rel, []))
                if hasher is not None:
                    out[rel] = hasher
            return out

    return _ParallelFileReader(path)


def _dcp_writer(storage: "Storage", path: str, thread_count: int = 1):
    if storage.is_local:
        from torch.distributed.checkpoint import FileSystemWriter

        os.makedirs(path, exist_ok=True)
        if hasattr(torch.serialization, "skip_data") and hasattr(os, "pwrite") and selfcheck.trusted("dcp-writer"):
            writer = _parallel_file_writer(storage, path, thread_count)
            thread_count = 1  # one file per rank, written by our threads (nothing of DCP's to guard)
        else:  # torch < 2.6, no pwrite, or our writer failed its self-check: DCP's writer, one file per thread
            writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=thread_count)
        from torch.distributed.checkpoint.filesystem import FileSystem

        if type(getattr(writer, "fs", None)) is FileSystem:  # DCP's own local file system: wrap it
            writer.fs = _hashing_filesystem(storage)
    else:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer = FsspecWriter(path, single_file_per_rank=True, sync_files=False, thread_count=thread_count,
                              **storage.storage_options)
    if thread_count > 1:
        _fail_on_lost_writes(writer)
    return writer


def _dcp_reader(storage: "Storage", path: str, threads: int = DEFAULT_DCP_THREAD_COUNT):
    if storage.is_local:
        if hasattr(os, "preadv") and selfcheck.trusted("dcp-reader"):
            return _parallel_file_reader(path, threads)
        from torch.distributed.checkpoint import FileSystemReader  # no preadv (e.g. Windows), or a failed self-check

        return FileSystemReader(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(path, **storage.storage_options)


def _dcp_save(state: dict, storage: "Storage", path: str, dist: Optional["DistContext"], thread_count: int = 1) -> None:
    import torch.distributed.checkpoint as dcp

    from skyrl_callbacks.writers.plain import _no_zip_crc

    writer = _dcp_writer(storage, path, thread_count)
    no_dist = dist is None or not dist.enabled
    try:
        with _quiet(), _no_zip_crc():
            dcp.save(state, storage_writer=writer, process_group=None if no_dist else dist.group, no_dist=no_dist)
    except BaseException as exc:  # DCP raises CheckpointException, a BaseException, on every rank
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise StorageError(f"{path}: writing the sharded checkpoint failed: {_dcp_failures(exc)}") from exc


def _dcp_load(state: dict, storage: "Storage", path: str, dist: Optional["DistContext"]) -> None:
    import torch.distributed.checkpoint as dcp

    from skyrl_callbacks.safe_load import find_untrusted, guard_dcp_reader

    reader = guard_dcp_reader(_dcp_reader(storage, path), path)  # no load executes code from the files
    no_dist = dist is None or not dist.enabled
    planner = None
    if any(_is_sharded_tensor(t) and not t.local_shards() for _, t in _walk_tensors(state)):
        # FSDP1 hands out ShardedTensors without a local shard on ranks that hold none of a small
        # parameter (e.g. a 1-row head under an FSDP root). DCP's default planner drops them while
        # flattening, then takes the missing keys for a pre-2.4 checkpoint and re-keys the whole
        # state dict the old way ("Missing key ...: optimizer_0.param_groups"). Unflattened, they
        # simply issue no reads.
        from torch.distributed.checkpoint import DefaultLoadPlanner

        planner = DefaultLoadPlanner(flatten_sharded_tensors=False)
    try:
        with _quiet():
            dcp.load(state, storage_reader=reader, planner=planner, process_group=None if no_dist else dist.group,
                     no_dist=no_dist)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        untrusted = find_untrusted(exc, reader)
        if untrusted is not None:
            raise untrusted from exc
        raise CorruptCheckpointError(f"{path}: reading the sharded checkpoint failed: {_dcp_failures(exc)}") from exc


def _dcp_failures(exc: BaseException) -> str:
    """What failed, per rank, for DCP's CheckpointException (whose text starts with tracebacks)."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return _short(exc)
    parts = []
    for rank, wrapped in sorted(failures.items()):
        inner = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped
        parts.append(f"rank {rank}: {_short(inner, 400) if isinstance(inner, BaseException) else inner}")
    return "; ".join(parts)


def _short(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _dcp_metadata(storage: "Storage", path: str):
    from skyrl_callbacks.safe_load import guard_dcp_reader

    reader = guard_dcp_reader(_dcp_reader(storage, path), path)  # .metadata: a restricted unpickler
    try:
        with _quiet():
            return reader.read_metadata()
    except UntrustedCheckpointError:
        raise
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{path}: {_DCP_METADATA} is missing ({exc}).") from exc
    except Exception as exc:  # noqa: BLE001
        raise CorruptCheckpointError(f"{path}: {_DCP_METADATA} cannot be read ({_short(exc)}).") from exc


def _flatten_keys(state: dict) -> dict[str, Any]:
    """DCP's flattened view (``a.b.0.c`` -> leaf) of a nested state dict."""
    try:
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        flat, _ = flatten_state_dict(state)
        return flat
    except Exception:  # pragma: no cover - private helper moved; fall back to a plain walk
        return {".".join(map(str, p)): t for p, t in _walk_tensors(state)}


def _check_against_metadata(template: dict, metadata: Any, path: str, what: str, strict: bool) -> None:
    """Raise IncompatibleCheckpointError naming missing/unexpected keys and shape mismatches."""
    saved = metadata.state_dict_metadata
    flat = _flatten_keys(template)
    missing = [k for k in flat if k not in saved]
    unexpected = [k for k in saved if k not in flat] if strict else []
    shapes = []
    for key, value in flat.items():
        md = saved.get(key)
        if isinstance(value, torch.Tensor) and md is not None and hasattr(md, "size"):
            if tuple(md.size) != _global_shape(value):
                shapes.append(f"{key}: saved {tuple(md.size)}, model {_global_shape(value)}")
    _raise_if_mismatch(path, what, missing, unexpected, shapes)


def _own_dcp_files(storage: "Storage", path: str, rel_dir: str, rank: int, is_coordinator: bool) -> list[str]:
    """The files DCP wrote for ``rank`` (``__{rank}_{i}.distcp``) plus ``.metadata`` on the coordinator."""
    prefix = f"__{rank}_"
    out = [f"{rel_dir}/{n}" for n in storage.listdir(path) if n.startswith(prefix) and n.endswith(".distcp")]
    if is_coordinator:
        out.append(f"{rel_dir}/{_DCP_METADATA}")
    return sorted(out)


# --------------------------------------------------------------------------- state dicts
def _sd_options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def _model_sd(role: "Role", **options: Any) -> dict:
    """The role's model state dict through DSD, keyed as saved: for a view (``include_prefix``)
    only the keys under the prefix, with the prefix stripped; excluded prefixes left out."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    with _quiet():
        sd = get_model_state_dict(role.model, options=_sd_options(**options))
    if role.is_view:
        out = {}
        for key, value in sd.items():
            own = role.own_key(key)
            if own is not None:
                out[own] = value
        return out
    if role.exclude_prefixes:
        sd = {k: v for k, v in sd.items() if not k.startswith(role.exclude_prefixes)}
    return sd


def _root_fqns(role: "Role") -> set:
    """Clean FQNs of every parameter of ``role.model`` (what DSD's optimizer state is keyed by)."""
    from skyrl_callbacks.roles import clean_name

    return {clean_name(n) for n, _ in role.model.named_parameters()}


def _osd_strip_prefix(role: "Role", osd: dict) -> dict:
    """A view's optimizer state as saved: FQNs under ``include_prefix`` lose the prefix (``state``
    keys and ``param_groups[i]["params"]``); parameters of other roles (an optimizer spanning
    several roles is saved under ``policy``) keep their full names."""
    prefix = role.include_prefix or ""
    if not prefix:
        return osd
    stripped = {k[len(prefix):] for g in osd.get("param_groups", []) for k in g["params"] if k.startswith(prefix)}
    foreign = {k for g in osd.get("param_groups", []) for k in g["params"] if not k.startswith(prefix)}
    clash = sorted(stripped & foreign)
    if clash:
        raise ConfigError(
            f"roles: the {role.name} optimizer holds parameters {clash[:3]} of another role and the same names under "
            f"include_prefix={prefix!r}; its state cannot be saved unambiguously. Give each role its own optimizer."
        )

    return _rename_osd(osd, lambda k: k[len(prefix):] if isinstance(k, str) and k.startswith(prefix) else k)


def _rename_osd(osd: dict, fix: Any) -> dict:
    """``osd`` with every parameter name (``state`` keys, ``param_groups[i]["params"]``) mapped by ``fix``."""
    groups = [{**g, "params": [fix(k) for k in g["params"]]} for g in osd.get("param_groups", [])]
    return {"state": {fix(k): v for k, v in osd.get("state", {}).items()}, "param_groups": groups}


def _osd_add_prefix(role: "Role", osd: dict) -> dict:
    """The inverse of :func:`_osd_strip_prefix` (a name gets the prefix back when the root has
    a parameter of that name)."""
    prefix = role.include_prefix or ""
    if not prefix:
        return osd
    fqns = _root_fqns(role)
    return _rename_osd(osd, lambda k: prefix + k if isinstance(k, str) and prefix + k in fqns else k)


def fsdp1_optimizer_coverage(model: torch.nn.Module, optimizers: list) -> list[str]:
    """Problems that keep FSDP1 (``use_orig_params=True``) from giving an optimizer state dict.

    FSDP1 flattens the parameters of each FSDP unit into one flat parameter; its optimizer state
    dict (``FSDP.optim_state_dict``, which DSD and Lightning use) requires an optimizer holding one
    trainable parameter of a unit to hold all of them. Separate policy/critic optimizers inside one
    unit (Lightning's ``FSDPStrategy()`` without an auto-wrap policy) break that rule.
    """
    _, fsdp1_cls = _fsdp_classes()
    if fsdp1_cls is None:
        return []
    problems = []
    for unit in fsdp1_cls.fsdp_modules(model):
        flat = getattr(getattr(unit, "_handle", None), "flat_param", None)
        params = getattr(flat, "_params", None) or []
        names = list(getattr(flat, "_fqns", None) or [str(i) for i in range(len(params))])
        trainable = {id(p) for p in params if p.requires_grad}
        for i, opt in enumerate(optimizers):
            held = {id(p) for g in opt.param_groups for p in g["params"]} & trainable
            if held and held != trainable:
                missing = [n for n, p in zip(names, params) if p.requires_grad and id(p) not in held]
                problems.append(f"optimizer {i} ({type(opt).__name__}) holds {len(held)} of the {len(trainable)} "
                                f"trainable parameters of one FSDP unit, not e.g. {missing[:3]}")
    return problems


def _optim_sd(role: "Role", optimizer: Any, **options: Any) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    try:
        with _quiet():
            osd = get_optimizer_state_dict(role.model, optimizer, options=_sd_options(**options))
    except RuntimeError as exc:
        if "is not in the optimizer state" not in str(exc):
            raise
        raise ConfigError(
            f"the {role.name} optimizer: FSDP1 cannot produce its state dict ({_short(exc, 300)}). An optimizer that "
            f"holds one parameter of an FSDP unit must hold all of its trainable parameters. Under Lightning's "
            f"FSDPStrategy give the policy and critic FSDP units of their own (e.g. auto_wrap_policy="
            f"{{type(policy), type(critic)}} or their layer classes plus the top-level model classes), or use "
            f"one optimizer for all of them."
        ) from exc
    return _osd_strip_prefix(role, osd) if role.is_view else osd


def _set_model_sd(role: "Role", sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if role.is_view:
        # The root holds other roles (and reference models) too. FSDP1's sharded load expects
        # every key of each FSDP unit, so the other keys are filled with their current (sharded)
        # values: loading one role leaves the rest of the root as it is.
        with _quiet():
            current = get_model_state_dict(role.model, options=_sd_options())
        prefix = role.include_prefix or ""
        for key, value in sd.items():
            current[prefix + key] = value
        with _quiet():
            set_model_state_dict(role.model, current, options=_sd_options(strict=True))
        return
    with _quiet():
        set_model_state_dict(role.model, sd, options=_sd_options(strict=not role.exclude_prefixes))


def _set_optim_sd(role: "Role", optimizer: Any, osd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if role.is_view:
        osd = _osd_add_prefix(role, osd)
    with _quiet():
        set_optimizer_state_dict(role.model, optimizer, osd, options=_sd_options())


def _param_order(role: "Role", model_keys: list) -> list:
    """``model_keys`` in ``named_parameters()`` order of the role's module (what
    ``AdamW(policy.parameters())`` numbers), the keys that are no parameter name after them.

    State-dict order and parameter order can differ under an FSDP1 root; full checkpoints
    number optimizer state in parameter order so that they load into an unwrapped model.
    """
    from skyrl_callbacks.roles import clean_name

    keys = set(model_keys)
    order: list = []
    seen: set = set()
    for name, _ in role.model.named_parameters():
        own = role.own_key(clean_name(name)) if role.is_view else clean_name(name)
        if own is not None and own in keys and own not in seen:
            seen.add(own)
            order.append(own)
    return order + [k for k in model_keys if k not in seen]


def _gather_full(value: torch.Tensor, dist: "DistContext") -> Optional[torch.Tensor]:
    """Collective: the full tensor of a sharded ``value`` on rank 0, on the CPU.

    DTensor: ``full_tensor()`` (every rank briefly holds this one tensor). ShardedTensor
    (FSDP1): ``gather`` to rank 0 only. Plain tensors are replicated and returned as is
    (detached, on the CPU). Other ranks get None for ShardedTensors.
    """
    if _is_dtensor(value):
        with _quiet():
            full = value.full_tensor()
        return full.detach().cpu() if dist.is_main else None  # only rank 0 keeps a host copy
    if _is_sharded_tensor(value):
        device = _local_device(value)
        out = (
            torch.empty(_global_shape(value), dtype=_dtype_of(value), device=device)
            if dist.is_main
            else None
        )
        with _quiet():
            value.gather(dst=_group_rank0(dist), out=out, dtype=_dtype_of(value))
        return None if out is None else out.cpu()
    return value.detach().cpu()


def _local_slices(value: torch.Tensor) -> list[tuple[tuple[slice, ...], torch.Tensor]]:
    """``(global slices, local tensor)`` of the pieces of ``value`` held by this rank."""
    if _is_dtensor(value):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh = value.device_mesh
        if mesh.get_coordinate() is None:
            return []
        shape, offset = compute_local_shape_and_global_offset(value.shape, mesh, value.placements)
        local = value.to_local()
        if tuple(local.shape) != tuple(shape):
            raise IncompatibleCheckpointError(
                f"unsupported DTensor layout {value.placements} (local {tuple(local.shape)} vs {tuple(shape)})"
            )
        return [(tuple(slice(o, o + s) for o, s in zip(offset, shape)), local)]
    if _is_sharded_tensor(value):
        out = []
        for shard in value.local_shards():
            md = shard.metadata
            out.append((tuple(slice(o, o + s) for o, s in zip(md.shard_offsets, md.shard_sizes)), shard.tensor))
        return out
    return [(tuple(slice(0, s) for s in value.shape), value)]



def _raise_if_mismatch(path: str, what: str, missing: list, unexpected: list, shapes: list) -> None:
    """One error listing missing, unexpected and reshaped entries (at most a few of each)."""
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
    if shapes:
        parts.append(f"{len(shapes)} with another shape (e.g. {shapes[:3]})")
    raise IncompatibleCheckpointError(
        f"{path}: does not match the {what}: {'; '.join(parts)}. "
        f"Build the same architecture (and optimizer setup) as the run that saved it."
    )

def _scatter_from_main(template: torch.Tensor, full: Optional[torch.Tensor], dist: "DistContext") -> None:
    """Collective: copy this rank's part of rank 0's ``full`` tensor into ``template`` in place.

    One tensor is broadcast at a time, so no rank holds more than one full tensor beyond its
    shards (rank 0 also holds the file it read).
    """
    shape, dtype, device = _global_shape(template), _dtype_of(template), _local_device(template)
    if dist.enabled and dist.world_size > 1:
        import torch.distributed as tdist

        # NCCL moves only CUDA tensors; CPU-resident state (AdamW's default ``step``) goes
        # through a CUDA buffer and back.
        comm = device
        if device.type == "cpu" and tdist.get_backend(dist.group) == "nccl":
            comm = torch.device("cuda", torch.cuda.current_device())
        if dist.is_main:
            buf = full.to(device=comm, dtype=dtype).contiguous()  # type: ignore[union-attr]
        else:
            buf = torch.empty(shape, dtype=dtype, device=comm)
        tdist.broadcast(buf, src=_group_rank0(dist), group=dist.group)
        buf = buf.to(device)
    else:
        buf = full.to(device=device, dtype=dtype)  # type: ignore[union-attr]
    with torch.no_grad():
        for slices, local in _local_slices(template):
            local.copy_(buf[slices] if buf.dim() else buf)


# --------------------------------------------------------------------------- optimizer formats
def _in_model_order(fqns: list, model_keys: list) -> list:
    """``fqns`` sorted as the parameters appear in the model (``model.parameters()`` order).

    FSDP1 (``use_orig_params=False``) lists an optimizer's parameters per flat parameter (root
    unit first); a plain ``AdamW(model.parameters())`` numbers them in module order. Names the
    model does not have keep their relative order, after the others.
    """
    pos = {k: i for i, k in enumerate(model_keys)}
    return sorted(fqns, key=lambda f: (0, pos[f]) if f in pos else (1, 0))


def _osd_fqn_to_index(osd: dict, model_keys: list) -> dict:
    """DSD's FQN-keyed optimizer state -> torch.optim's index-keyed ``state_dict`` format, numbering
    parameters group by group in model order (what ``AdamW(model.parameters())`` produces)."""
    index: dict[str, int] = {}
    groups = []
    for group in osd.get("param_groups", []):
        new = {k: v for k, v in group.items() if k != "params"}
        ids = []
        for fqn in _in_model_order(list(group["params"]), model_keys):
            index.setdefault(fqn, len(index))
            ids.append(index[fqn])
        new["params"] = ids
        groups.append(new)
    state = {index[fqn]: value for fqn, value in osd.get("state", {}).items() if fqn in index}
    return {"state": state, "param_groups": groups}


def _osd_index_to_fqn(saved: dict, template: dict, path: str, model_keys: list) -> dict:
    """torch.optim's index-keyed state -> FQN-keyed, naming parameters as ``template`` does
    (group by group, in model order: the inverse of :func:`_osd_fqn_to_index`).

    Raises:
        IncompatibleCheckpointError: the parameter groups differ in number or size.
    """
    t_groups = template.get("param_groups", [])
    s_groups = saved.get("param_groups", []) if isinstance(saved, dict) else []
    if not isinstance(saved, dict) or "state" not in saved or len(s_groups) != len(t_groups):
        raise IncompatibleCheckpointError(
            f"{path}: holds {len(s_groups)} optimizer param group(s) but the optimizer has {len(t_groups)}. "
            f"Configure the optimizer as in the run that saved it."
        )
    mapping: dict[Any, str] = {}
    groups = []
    for i, (sg, tg) in enumerate(zip(s_groups, t_groups)):
        if len(sg["params"]) != len(tg["params"]):
            raise IncompatibleCheckpointError(
                f"{path}: param group {i} holds {len(sg['params'])} parameters, the optimizer's has "
                f"{len(tg['params'])}. Configure the optimizer as in the run that saved it."
            )
        for idx, fqn in zip(sg["params"], _in_model_order(list(tg["params"]), model_keys)):
            mapping[idx] = fqn
        new = dict(sg)
        new["params"] = list(tg["params"])
        groups.append(new)
    state = {}
    for idx, value in saved["state"].items():
        if idx not in mapping:
            raise IncompatibleCheckpointError(f"{path}: optimizer state for unknown parameter index {idx}.")
        state[mapping[idx]] = value
    return {"state": state, "param_groups": groups}


def _own_storage(tensor: torch.Tensor, seen: set) -> torch.Tensor:
    """``tensor``, or a clone of it when an earlier tensor in ``seen`` shares its storage."""
    try:
        key = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensor subclasses
        return tensor
    if key in seen:
        return tensor.clone()
    seen.add(key)
    return tensor


class _StaticState:
    """Something with a ``state_dict()`` (to reuse :func:`pack_states`)."""

    def __init__(self, state: Any) -> None:
        self._state = state

    def state_dict(self) -> Any:
        return self._state


# --------------------------------------------------------------------------- the writer
class FSDPWriter(RoleWriter):
    """Writer for FSDP2 and FSDP1 models.

    Args:
        state_dict_type: ``"sharded"`` (default): every rank writes its shards through
            ``torch.distributed.checkpoint``; loads at any world size. ``"full"``: rank 0 writes
            SkyRL's single ``model_state.pt`` / ``optimizer_state.pt`` (gathered tensor by tensor).
        dcp_thread_count: writer threads per rank of each DCP save of the sharded layout (locally
            they share the rank's one file; on object stores each writes a file); default 4.

    After loading a SkyRL native checkpoint, :attr:`native_extra_state` holds this rank's
    ``extra_state_world_size_W_rank_R.pt`` (its ``"rng"`` entry is SkyRL's per-rank RNG state).
    """

    kind = "fsdp"

    def __init__(self, state_dict_type: str = "sharded", *, dcp_thread_count: int = DEFAULT_DCP_THREAD_COUNT) -> None:
        if state_dict_type not in STATE_DICT_TYPES:
            raise ConfigError(
                f"state_dict_type={state_dict_type!r}: expected one of {STATE_DICT_TYPES}. "
                f"'sharded' writes per-rank shards (reshardable), 'full' writes single files from rank 0."
            )
        if isinstance(dcp_thread_count, bool) or not isinstance(dcp_thread_count, int) or dcp_thread_count < 1:
            raise ConfigError(
                f"dcp_thread_count={dcp_thread_count!r}: expected an integer >= 1 (writer threads per rank of a "
                f"sharded save); use 1 for a single writer thread, or leave it out for the default 4."
            )
        self.state_dict_type = state_dict_type
        self.dcp_thread_count = dcp_thread_count
        self.native_extra_state: Optional[dict] = None
        self._gpu_stager: Any = None  # pinned host buffers of the sync sharded save (CUDA state only)

    def __repr__(self) -> str:
        return f"FSDPWriter(state_dict_type={self.state_dict_type!r}, dcp_thread_count={self.dcp_thread_count})"

    # ------------------------------------------------------------------ save
    def save(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext") -> list[str]:
        state = self._collect(role, dist)
        if self.state_dict_type == "sharded" and _holds_cuda((state["model"], state["optim"])):
            # DCP's FileSystemWriter copies every GPU shard into fresh pageable host memory on each
            # save (as PlainWriter.save notes for torch.save); one pass into this writer's warm
            # pinned buffers runs at PCIe/C2C speed, and DCP then writes host tensors only (as it
            # does for the async path's snapshot). The buffers (this rank's model and optimizer
            # shards) are kept for the next save. DCP's planning collectives over ``dist.group``
            # exchange pickled plans, not tensors, so host tensors under an NCCL group are fine.
            if self._gpu_stager is None:
                self._gpu_stager = Stager(pin_memory=True)
            staged = self._gpu_stager.stage({"model": state["model"], "optim": state["optim"]})
            state = {**state, "model": staged["model"], "optim": staged["optim"]}
        return self._write(storage, role_dir, state, dist)

    # async: the sharded layout stages this rank's shards (DTensor/ShardedTensor local pieces) and
    # writes them through DCP over the background group; the full layout gathers in the
    # foreground (collective) and rank 0 writes its host copy in the background.
    def snapshot(self, role: "Role", dist: "DistContext", stager: Any) -> Any:
        return stager.stage(self._collect(role, dist))

    def prewarm_tree(self, role: "Role", dist: "DistContext") -> Any:
        # the full layout's snapshot gathers (a collective copy): nothing to prepare there
        return self._collect(role, dist) if self.state_dict_type == "sharded" else None

    @staticmethod
    def prewarm_in_foreground(role: "Role") -> bool:
        """FSDP1's sharded state dicts are clones on the GPU (DSD's ``_create_chunk_dtensor``):
        a background prewarm would keep them alive, a second copy of the rank's state on the
        GPU, for the seconds pinning takes. Allocate in the foreground there."""
        return fsdp_strategy_of(role.model) == "fsdp"

    def write_snapshot(self, storage: "Storage", role_dir: str, snap: Any, dist: "DistContext") -> list[str]:
        return self._write(storage, role_dir, snap, dist)

    def _collect(self, role: "Role", dist: "DistContext") -> dict:
        """Everything ``_write`` needs (live references; the caller stages them for async)."""
        strategy = fsdp_strategy_of(role.model) or "fsdp2"
        config = {
            "fsdp_strategy": strategy,
            "world_size": dist.world_size,
            "state_dict_type": self.state_dict_type,
            "format_version": FORMAT_VERSION,
            "skyrl_callbacks_format": True,
            "num_optimizers": len(role.optimizers),
            "num_schedulers": len(role.schedulers),
            "torch_version": torch.__version__.split("+")[0],
        }
        if self.state_dict_type == "sharded":
            model_sd = _model_sd(role)
            optim = {f"optimizer_{i}": _optim_sd(role, opt) for i, opt in enumerate(role.optimizers)}
        else:
            model_sd, optim_sds = self._gather_full_state(role, dist, strategy)
            optim = optim_sds
        return {
            "config": config,
            "model": model_sd,
            "optim": optim,
            "schedulers": pack_states(role.schedulers) if (role.schedulers and dist.is_main) else None,
            "param_order": _param_order(role, list(model_sd)) if (self.state_dict_type == "full" and dist.is_main) else None,
        }

    def _write(self, storage: "Storage", role_dir: str, state: dict, dist: "DistContext") -> list[str]:
        if self.state_dict_type == "sharded":
            written = self._write_sharded(storage, role_dir, state, dist)
        else:
            written = self._write_full(storage, role_dir, state, dist)

        def _rank0_files() -> list[str]:
            if not dist.is_main:
                return []
            out = []
            if state["schedulers"] is not None:
                torch_save(storage, storage.join(role_dir, SCHEDULER_FILE), state["schedulers"])
                out.append(SCHEDULER_FILE)
            _write_json(storage, storage.join(role_dir, FSDP_CONFIG_FILE), state["config"])
            out.append(FSDP_CONFIG_FILE)
            return out

        written += _collective(dist, "fsdp save (rank-0 files)", _rank0_files)
        return written

    def _write_sharded(self, storage: "Storage", role_dir: str, state: dict, dist: "DistContext") -> list[str]:
        written: list[str] = []
        path = storage.join(role_dir, MODEL_DCP_DIR)
        _dcp_save(state["model"], storage, path, dist, self.dcp_thread_count)
        written += _own_dcp_files(storage, path, MODEL_DCP_DIR, dist.rank, dist.is_main)
        if state["optim"]:
            path = storage.join(role_dir, OPTIMIZER_DCP_DIR)
            _dcp_save(state["optim"], storage, path, dist, self.dcp_thread_count)
            written += _own_dcp_files(storage, path, OPTIMIZER_DCP_DIR, dist.rank, dist.is_main)
        return written

    @staticmethod
    def _gather_full_state(role: "Role", dist: "DistContext", strategy: str) -> tuple[dict, list]:
        """Collective: full model/optimizer state dicts on rank 0 (host memory)."""
        if strategy == "fsdp2":
            # torch.distributed.checkpoint.state_dict gathers DTensors one by one onto rank 0
            # (full_tensor + copy to CPU); never FSDP1's offload_to_cpu state_dict_config.
            opts = dict(full_state_dict=True, cpu_offload=True)
            model_sd = _model_sd(role, **opts)
            optim_sds = [_optim_sd(role, opt, **opts) for opt in role.optimizers]
        else:
            # FSDP1: DSD's full_state_dict=True goes through FSDP1's FULL_STATE_DICT with
            # offload_to_cpu=True, which segfaults or aliases Adam's exp_avg/exp_avg_sq on CPU.
            # Take the sharded (ShardedTensor/DTensor) state dicts and gather tensor by tensor.
            model_sd = _map_tensors(_model_sd(role), lambda t: _gather_full(t, dist))
            optim_sds = [_map_tensors(_optim_sd(role, opt), lambda t: _gather_full(t, dist)) for opt in role.optimizers]
        if not dist.is_main:
            return {}, []  # only rank 0 writes (and stages) the full state
        return model_sd, optim_sds

    def _write_full(self, storage: "Storage", role_dir: str, state: dict, dist: "DistContext") -> list[str]:
        model_sd, optim_sds = state["model"], state["optim"]

        def _write() -> list[str]:
            if not dist.is_main:
                return []
            # FSDP1 hands out one "step" tensor shared by all parameters of a flat parameter, and
            # plain tensors come back as the live objects: give every saved tensor its own storage so
            # torch.load -> optimizer.load_state_dict never ties two states together.
            seen: set = set()
            dealias = lambda t: _own_storage(t, seen)  # noqa: E731
            torch_save(storage, storage.join(role_dir, MODEL_FILE), _map_tensors(model_sd, dealias))
            out = [MODEL_FILE]
            if optim_sds:
                order = state.get("param_order") or list(model_sd)
                states = [_StaticState(_map_tensors(_osd_fqn_to_index(o, order), dealias)) for o in optim_sds]
                torch_save(storage, storage.join(role_dir, OPTIMIZER_FILE), pack_states(states))
                out.append(OPTIMIZER_FILE)
            return out

        return _collective(dist, "fsdp save (full state dict)", _write)

    # ------------------------------------------------------------------ load
    def load(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext") -> None:
        config = _collective(dist, "fsdp load (read fsdp_config.json)", lambda: read_fsdp_config(storage, role_dir))
        if config is not None and config.get("skyrl_callbacks_format"):
            self._check_config(config, role_dir)
            if config.get("state_dict_type", "sharded") == "sharded":
                self._load_sharded(storage, role_dir, role, dist, config)
            else:
                self._load_full(storage, role_dir, role, dist)
            return
        native = _collective(dist, "fsdp load (list files)", lambda: native_layout_info(storage, role_dir))
        if native is not None:
            self._load_native(storage, role_dir, role, dist, native)
            return
        if storage.exists(storage.join(role_dir, MODEL_FILE)):
            # SkyRL's documented single-file layout (or a plain writer's checkpoint).
            self._load_full(storage, role_dir, role, dist)
            return
        raise CorruptCheckpointError(
            f"{role_dir}: no FSDP checkpoint found (neither {FSDP_CONFIG_FILE} of skyrl-callbacks, "
            f"nor SkyRL's model_world_size_W_rank_R.pt files, nor {MODEL_FILE})."
        )

    @staticmethod
    def _check_config(config: dict, role_dir: str) -> None:
        version = config.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise CorruptCheckpointError(f"{role_dir}/{FSDP_CONFIG_FILE}: invalid format_version {version!r}.")
        if version > FORMAT_VERSION:
            raise IncompatibleCheckpointError(
                f"{role_dir}/{FSDP_CONFIG_FILE}: format_version {version} was written by a newer "
                f"skyrl-callbacks (this one reads up to {FORMAT_VERSION}). Upgrade skyrl-callbacks."
            )
        sdt = config.get("state_dict_type", "sharded")
        if sdt not in STATE_DICT_TYPES:
            raise IncompatibleCheckpointError(
                f"{role_dir}/{FSDP_CONFIG_FILE}: unknown state_dict_type {sdt!r} (known: {STATE_DICT_TYPES})."
            )

    def _load_sharded(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext", config: dict) -> None:
        model_path = storage.join(role_dir, MODEL_DCP_DIR)
        model_sd = _model_sd(role)
        _collective(
            dist,
            "fsdp load (check model)",
            lambda: _check_against_metadata(
                model_sd, _dcp_metadata(storage, model_path), model_path, f"{role.name} model",
                strict=not role.exclude_prefixes,
            ),
        )
        _dcp_load(model_sd, storage, model_path, dist)
        _set_model_sd(role, model_sd)
        del model_sd

        if role.optimizers:
            saved_count = config.get("num_optimizers")
            optim_path = storage.join(role_dir, OPTIMIZER_DCP_DIR)
            if saved_count != len(role.optimizers) or not storage.exists(storage.join(optim_path, _DCP_METADATA)):
                raise IncompatibleCheckpointError(
                    f"{optim_path}: holds {saved_count or 0} optimizer state(s) but the {role.name} role has "
                    f"{len(role.optimizers)} optimizer(s). Configure the same optimizers as the run that "
                    f"saved it, or load weights only."
                )
            osd = {f"optimizer_{i}": _optim_sd(role, opt) for i, opt in enumerate(role.optimizers)}
            _collective(
                dist,
                "fsdp load (check optimizer)",
                lambda: _check_against_metadata(
                    osd, _dcp_metadata(storage, optim_path), optim_path, f"{role.name} optimizer", strict=False
                ),
            )
            _dcp_load(osd, storage, optim_path, dist)
            for i, opt in enumerate(role.optimizers):
                _set_optim_sd(role, opt, osd[f"optimizer_{i}"])
        self._load_schedulers(storage, role_dir, role, dist)

    def _load_full(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext") -> None:
        model_path = storage.join(role_dir, MODEL_FILE)
        template = _model_sd(role)

        def _read_model() -> Optional[dict]:
            if not dist.is_main:
                return None
            full = torch_load(storage, model_path, weights_only=True)
            _check_full(full, template, model_path, f"{role.name} model", strict=not role.exclude_prefixes)
            return full

        full = _collective(dist, "fsdp load (read model_state.pt)", _read_model)
        model_keys = _param_order(role, list(template))
        for key, value in _walk_tensors(template):
            _scatter_from_main(value, None if full is None else _get_path(full, key), dist)
        del full
        _set_model_sd(role, template)
        del template

        if role.optimizers:
            optim_path = storage.join(role_dir, OPTIMIZER_FILE)
            templates = [_optim_sd(role, opt) for opt in role.optimizers]

            def _read_optim() -> Optional[list]:
                if not dist.is_main:
                    return None
                if not storage.exists(optim_path):
                    raise IncompatibleCheckpointError(
                        f"{optim_path}: missing, but the {role.name} role has {len(role.optimizers)} optimizer(s). "
                        f"The checkpoint was saved without optimizer state; resume with the same optimizer setup."
                    )
                states = unpack_states(torch_load(storage, optim_path), len(role.optimizers), "optimizer", optim_path)
                out = []
                for saved, tmpl in zip(states, templates):
                    fqn = _osd_index_to_fqn(saved, tmpl, optim_path, model_keys)
                    _check_full(fqn["state"], tmpl["state"], optim_path, f"{role.name} optimizer", strict=True)
                    out.append(fqn)
                return out

            fulls = _collective(dist, "fsdp load (read optimizer_state.pt)", _read_optim)
            groups = dist.broadcast(None if fulls is None else [f["param_groups"] for f in fulls])
            for i, (opt, tmpl) in enumerate(zip(role.optimizers, templates)):
                for key, value in _walk_tensors(tmpl["state"]):
                    _scatter_from_main(value, None if fulls is None else _get_path(fulls[i]["state"], key), dist)
                _set_optim_sd(role, opt, {"state": tmpl["state"], "param_groups": groups[i]})
        self._load_schedulers(storage, role_dir, role, dist)

    @staticmethod
    def _load_schedulers(storage: "Storage", role_dir: str, role: "Role", dist: "DistContext") -> None:
        if not role.schedulers:
            return
        path = storage.join(role_dir, SCHEDULER_FILE)

        def _load() -> None:
            if not storage.exists(path):
                raise IncompatibleCheckpointError(
                    f"{path}: missing, but the {role.name} role has {len(role.schedulers)} lr_scheduler(s). "
                    f"Resume with the same lr_scheduler setup as the saving run."
                )
            states = unpack_states(torch_load(storage, path), len(role.schedulers), "lr_scheduler", path)
            for sched, state in zip(role.schedulers, states):
                try:
                    sched.load_state_dict(state)
                except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                    raise IncompatibleCheckpointError(f"{path}: lr_scheduler state does not match: {exc}") from exc

        _collective(dist, "fsdp load (lr_scheduler)", _load)

    # ------------------------------------------------------------------ SkyRL native
    def _load_native(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext", info: dict) -> None:
        world = info["world_size"]
        saved_strategy = info.get("fsdp_strategy")
        strategy = fsdp_strategy_of(role.model)
        if strategy is None:
            raise IncompatibleCheckpointError(
                f"{role_dir}: is a SkyRL native FSDP checkpoint (per-rank shards); the {role.name} model is "
                f"not an FSDP model. Convert it with `{CONVERT_HINT}` first; the converted layout also "
                f"loads into unsharded models."
            )
        if world != dist.world_size:
            raise IncompatibleCheckpointError(
                f"{role_dir}: is a SkyRL native FSDP checkpoint written by {world} rank(s) "
                f"(model_world_size_{world}_rank_R.pt), but this run has {dist.world_size}. Its per-rank "
                f"shards only load at world size {world}. Convert it once to the reshardable layout with "
                f"`{CONVERT_HINT}` (CKPT_DIR is the global_step_N directory) and resume from OUT, "
                f"or resume at world size {world}."
            )
        if saved_strategy is not None and saved_strategy != strategy:
            raise IncompatibleCheckpointError(
                f"{role_dir}: SkyRL native checkpoint of strategy {saved_strategy!r} cannot be loaded into a "
                f"{strategy!r} model (per-rank files are strategy specific). Use strategy {saved_strategy!r} or "
                f"convert it with `{CONVERT_HINT}`."
            )
        has_optim = dist.rank in info["ranks"].get("optim", [])
        if role.optimizers and len(role.optimizers) != 1:
            raise IncompatibleCheckpointError(
                f"{role_dir}: SkyRL native checkpoints hold one optimizer per model, the {role.name} role has "
                f"{len(role.optimizers)}."
            )

        # before any file is read (the files may need trust_checkpoint_code)
        if role.include_prefix:
            raise IncompatibleCheckpointError(
                f"{role_dir}: is a SkyRL native FSDP checkpoint (per-rank files of one whole FSDP model), but "
                f"the {role.name} role is the part {role.include_prefix!r} of a larger FSDP root (Lightning's "
                f"FSDPStrategy); its per-rank shards cannot be mapped onto that root. Convert it with "
                f"`{CONVERT_HINT}` first; the converted layout loads into such a role."
            )
        if role.exclude_prefixes:
            raise IncompatibleCheckpointError(
                f"{role_dir}: SkyRL native checkpoints hold a whole model; roles with excluded prefixes "
                f"{role.exclude_prefixes} are not supported for them."
            )

        def _read() -> tuple:
            model_sd = torch_load(storage, storage.join(role_dir, _native_name("model", world, dist.rank)))
            osd = None
            if role.optimizers:
                if not has_optim:
                    raise IncompatibleCheckpointError(
                        f"{role_dir}: {_native_name('optim', world, dist.rank)} is missing but the {role.name} "
                        f"role has an optimizer."
                    )
                osd = torch_load(storage, storage.join(role_dir, _native_name("optim", world, dist.rank)))
            extra_path = storage.join(role_dir, _native_name("extra_state", world, dist.rank))
            extra = torch_load(storage, extra_path) if storage.exists(extra_path) else {}
            return model_sd, osd, extra

        with _quiet():
            model_sd, osd, extra = _collective(dist, "fsdp load (read SkyRL native files)", _read)

        def _apply() -> None:
            with _quiet(), _native_state_ctx(role.model, strategy):
                try:
                    role.model.load_state_dict(model_sd, strict=True)
                except RuntimeError as exc:
                    raise IncompatibleCheckpointError(
                        f"{role_dir}: SkyRL native model shards do not match the {role.name} model: {exc}"
                    ) from exc
                if osd is not None and osd:
                    try:
                        role.optimizers[0].load_state_dict(osd)
                    except (ValueError, KeyError, RuntimeError) as exc:
                        raise IncompatibleCheckpointError(
                            f"{role_dir}: SkyRL native optimizer state does not match: {exc}"
                        ) from exc
            if role.schedulers:
                sched_state = extra.get("lr_scheduler") if isinstance(extra, dict) else None
                if not sched_state:
                    raise IncompatibleCheckpointError(
                        f"{role_dir}: {_native_name('extra_state', world, dist.rank)} holds no lr_scheduler state "
                        f"but the {role.name} role has {len(role.schedulers)} lr_scheduler(s)."
                    )
                if len(role.schedulers) != 1:
                    raise IncompatibleCheckpointError(
                        f"{role_dir}: SkyRL native checkpoints hold one lr_scheduler, the role has {len(role.schedulers)}."
                    )
                role.schedulers[0].load_state_dict(sched_state)

        _collective(dist, "fsdp load (SkyRL native)", _apply)
        self.native_extra_state = extra if isinstance(extra, dict) else None

    # ------------------------------------------------------------------ HF export
    def full_state_dict(self, role: "Role", dist: "DistContext") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, full CPU tensor)`` one parameter at a time (collective on every rank).

        Each step gathers a single tensor (``DTensor.full_tensor()`` for FSDP2, a ShardedTensor
        ``gather`` to rank 0 for FSDP1), so rank 0 holds at most one full tensor beyond its own
        shards. Rank 0 gets full tensors; other ranks get the full tensor (FSDP2) or their local
        shard (FSDP1) and must keep iterating.
        """
        if not is_fsdp_model(role.model):
            yield from super().full_state_dict(role, dist)
            return
        sd = _model_sd(role)
        for name in list(sd.keys()):
            value = sd.pop(name)
            full = _gather_full(value, dist)
            if full is None:  # ranks other than 0 take part in the gather but keep nothing
                full = torch.empty(0, dtype=_dtype_of(value))
            yield name, full
            del full, value

    # ------------------------------------------------------------------ validation
    def validate_dir(self, storage: "Storage", role_dir: str) -> Optional[str]:
        try:
            config = read_fsdp_config(storage, role_dir)
            if config is not None and config.get("skyrl_callbacks_format"):
                self._check_config(config, role_dir)
                if config.get("state_dict_type", "sharded") == "sharded":
                    path = storage.join(role_dir, MODEL_DCP_DIR, _DCP_METADATA)
                    if not storage.exists(path):
                        return f"{path} is missing"
                    if config.get("num_optimizers") and not storage.exists(
                        storage.join(role_dir, OPTIMIZER_DCP_DIR, _DCP_METADATA)
                    ):
                        return f"{storage.join(role_dir, OPTIMIZER_DCP_DIR, _DCP_METADATA)} is missing"
                elif not storage.exists(storage.join(role_dir, MODEL_FILE)):
                    return f"{storage.join(role_dir, MODEL_FILE)} is missing"
                return None
            if native_layout_info(storage, role_dir) is not None:
                return None
            if storage.exists(storage.join(role_dir, MODEL_FILE)):
                return None
            return f"{role_dir}: no FSDP checkpoint files"
        except CheckpointError as exc:
            return str(exc)


def _check_full(full: Any, template: dict, path: str, what: str, strict: bool) -> None:
    """Rank 0: the full state ``full`` has every tensor of ``template`` with the same shape."""
    if not isinstance(full, dict):
        raise CorruptCheckpointError(f"{path}: expected a state dict, got {type(full).__name__}.")
    t_paths = {p: v for p, v in _walk_tensors(template)}
    f_paths = {p: v for p, v in _walk_tensors(full)}
    missing = [".".join(map(str, p)) for p in t_paths if p not in f_paths]
    unexpected = [".".join(map(str, p)) for p in f_paths if p not in t_paths] if strict else []
    shapes = [
        f"{'.'.join(map(str, p))}: saved {tuple(f_paths[p].shape)}, model {_global_shape(v)}"
        for p, v in t_paths.items()
        if p in f_paths and tuple(f_paths[p].shape) != _global_shape(v)
    ]
    _raise_if_mismatch(path, what, missing, unexpected, shapes)


@contextlib.contextmanager
def _native_state_ctx(model: torch.nn.Module, strategy: Optional[str]) -> Iterator[None]:
    """FSDP1: SHARDED_STATE_DICT, as SkyRL uses when saving; FSDP2: nothing."""
    if strategy != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedOptimStateDictConfig, ShardedStateDictConfig, StateDictType

    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(), ShardedOptimStateDictConfig()):
        yield


# --------------------------------------------------------------------------- shared storage
def check_shared_storage(storage: "Storage", staging_dir: str, dist: "DistContext") -> None:
    """Collective: make sure every rank sees the same ``staging_dir``.

    Rank 0 writes a marker file with a random token, then every rank reads it back. When a rank
    cannot (node-local disks on a multi-node job), every rank raises :class:`StorageError`; the
    sharded layout needs all ranks to write into one directory. The marker is removed afterwards.
    """
    if not dist.enabled or dist.world_size == 1:
        return
    token = uuid.uuid4().hex if dist.is_main else None
    token = dist.broadcast(token)
    marker = storage.join(staging_dir, f"{SHARED_MARKER_PREFIX}{token}")

    def _write() -> None:
        if dist.is_main:
            storage.write_bytes(marker, token.encode("ascii"))

    _collective(dist, "shared storage check (write marker)", _write)
    seen: Any
    try:
        seen = storage.exists(marker) and storage.read_bytes(marker).decode("ascii", "replace") == token
    except Exception as exc:  # noqa: BLE001
        seen = f"{type(exc).__name__}: {exc}"
    results = dist.all_gather(seen)
    if dist.is_main:
        try:
            storage.rm(marker, recursive=False)
        except Exception:  # noqa: BLE001 - best effort, the staging dir is removed on failure anyway
            logger.debug("could not remove %s", marker, exc_info=True)
    blind = [r for r, ok in enumerate(results) if ok is not True]
    if blind:
        raise StorageError(
            f"checkpoint path is not shared between nodes: rank(s) {blind} of {dist.world_size} cannot see "
            f"the file rank 0 wrote under {staging_dir} (node-local disk?). Every rank writes its own shards "
            f"into the same checkpoint directory, so ckpt_path must be on a shared file system (NFS, Lustre, "
            f"...) or an object store (s3://, gs://)."
        )
    dist.barrier()


# --------------------------------------------------------------------------- native -> ours
def _mesh_slices(global_shape: tuple, mesh: torch.Tensor, placements: Any, rank: int, where: str) -> Optional[tuple]:
    """Global slices held by ``rank`` of a DTensor described by ``mesh``/``placements``, without a
    process group (DTensor ``Shard`` chunking: ceil-sized chunks, the last ones smaller/empty)."""
    coords = (mesh == rank).nonzero()
    if len(coords) == 0:
        return None
    coord = coords[0].tolist()
    local = list(global_shape)
    offset = [0] * len(global_shape)
    for mesh_dim, placement in enumerate(placements):
        name = type(placement).__name__
        if name == "Replicate":
            continue
        if name != "Shard":
            raise IncompatibleCheckpointError(
                f"{where}: DTensor placement {placement} cannot be assembled offline (only Shard/Replicate). "
                f"Convert with a process group: convert_skyrl_native(..., role=..., dist=...)."
            )
        dim = placement.dim
        n = int(mesh.shape[mesh_dim])
        chunk = math.ceil(local[dim] / n) if local[dim] else 0
        start = min(coord[mesh_dim] * chunk, local[dim])
        size = max(0, min(local[dim], start + chunk) - start)
        offset[dim] += start
        local[dim] = size
    return tuple(slice(o, o + s) for o, s in zip(offset, local))


def _assemble(values: list, where: str) -> Any:
    """One full tensor from the per-rank values of one entry (DTensor shards, or plain tensors)."""
    first = values[0]
    if _is_dtensor(first):
        shape = tuple(first.shape)
        full = torch.empty(shape, dtype=first.dtype)
        covered = 0
        for rank, value in enumerate(values):
            slices = _mesh_slices(shape, value.device_mesh.mesh, value.placements, rank, where)
            if slices is None:
                continue
            local = value.to_local().detach().cpu()
            expected = tuple(s.stop - s.start for s in slices)
            if tuple(local.shape) != expected:
                raise IncompatibleCheckpointError(
                    f"{where}: rank {rank}'s shard has shape {tuple(local.shape)}, expected {expected} "
                    f"for {value.placements} of {shape}."
                )
            full[slices] = local
            covered += local.numel()
        if covered < full.numel():
            raise CorruptCheckpointError(f"{where}: the per-rank shards do not cover the tensor {shape}.")
        return full
    if _is_sharded_tensor(first):
        md = first.metadata()
        full = torch.empty(tuple(md.size), dtype=md.tensor_properties.dtype)
        for value in values:
            for shard in value.local_shards():
                m = shard.metadata
                full[tuple(slice(o, o + s) for o, s in zip(m.shard_offsets, m.shard_sizes))] = shard.tensor.cpu()
        return full
    if isinstance(first, torch.Tensor):
        return first.detach().cpu().clone()
    return first


def _load_native_file(storage: "Storage", path: str) -> Any:
    with _quiet():
        try:
            return torch_load(storage, path)
        except CorruptCheckpointError as exc:
            if "process group" in str(exc).lower() or "init_process_group" in str(exc):
                raise IncompatibleCheckpointError(
                    f"{path}: holds ShardedTensors, which cannot be read without a process group. Convert it "
                    f"inside a job of the original world size: convert_skyrl_native(..., role=role, dist=dist)."
                ) from exc
            raise


def convert_skyrl_native(
    src_role_dir: str,
    dst_role_dir: str,
    *,
    storage: Optional["Storage"] = None,
    dst_storage: Optional["Storage"] = None,
    include_optimizer: bool = True,
    role: Optional["Role"] = None,
    dist: Optional["DistContext"] = None,
) -> dict:
    """Turn SkyRL's native per-rank role directory into the reshardable sharded layout.

    Offline (default; one process, no process group): the per-rank pickles carry each DTensor's
    device mesh and placements, so full tensors are assembled shard by shard and written as a
    DCP checkpoint of world size 1, which loads at any world size. Optimizer states are mapped
    from SkyRL's index keys to parameter names (DTensor entries of the model file, in order,
    or ``param_names`` when the optimizer recorded them).

    FSDP1's native optimizer state is FSDP1's flattened per-rank ``FlatParameter`` state, whose
    layout is not in the files: offline conversion of it is refused (``include_optimizer=False``
    converts weights and scheduler only). Online (``role`` and ``dist`` given, inside a job at the
    checkpoint's world size with the model built): load natively, then save sharded; this works
    for every strategy.

    Args:
        src_role_dir: a ``global_step_N/policy`` directory written by SkyRL.
        dst_role_dir: where to write (``model_state.dcp/``, ``optimizer_state.dcp/``,
            ``lr_scheduler_state.pt``, ``fsdp_config.json``).
        storage / dst_storage: where they live (default: local paths).
        include_optimizer: also convert the optimizer state.
        role, dist: convert online through the live model (see above).

    Returns:
        A summary: ``{"world_size", "fsdp_strategy", "tensors", "optimizer", "files"}``.

    Raises:
        IncompatibleCheckpointError: not a native checkpoint, or it cannot be converted offline.
    """
    from skyrl_callbacks.storage import Storage

    storage = storage or Storage(os.path.dirname(os.path.abspath(src_role_dir)) if "://" not in src_role_dir else src_role_dir)
    dst_storage = dst_storage or Storage(
        os.path.dirname(os.path.abspath(dst_role_dir)) if "://" not in dst_role_dir else dst_role_dir
    )
    info = native_layout_info(storage, src_role_dir)
    if info is None:
        raise IncompatibleCheckpointError(
            f"{src_role_dir}: no SkyRL native files (model_world_size_W_rank_R.pt) to convert."
        )
    world, strategy = info["world_size"], info.get("fsdp_strategy")

    if role is not None:
        from skyrl_callbacks.dist import DistContext

        dist = dist or DistContext()
        if not include_optimizer:
            role = _role_without_optimizers(role)
        reader = FSDPWriter()
        reader.load(storage, src_role_dir, role, dist)
        files = FSDPWriter("sharded").save(dst_storage, dst_role_dir, role, dist)
        return {"world_size": world, "fsdp_strategy": strategy, "optimizer": bool(role.optimizers), "files": files}

    model_files = [_load_native_file(storage, storage.join(src_role_dir, _native_name("model", world, r))) for r in range(world)]
    keys = list(model_files[0].keys())
    for r, sd in enumerate(model_files):
        if list(sd.keys()) != keys:
            raise CorruptCheckpointError(f"{src_role_dir}: rank {r}'s model file has other keys than rank 0's.")
    if strategy is None:
        strategy = "fsdp2" if any(_is_dtensor(v) for v in model_files[0].values()) else "fsdp"
    # parameter names in optimizer order: the sharded (DTensor/ShardedTensor) entries, tied ones once
    seen: set[int] = set()
    param_fqns = []
    for k in keys:
        v = model_files[0][k]
        if (_is_dtensor(v) or _is_sharded_tensor(v)) and id(v) not in seen:
            seen.add(id(v))
            param_fqns.append(k)
    model_full = {k: _assemble([sd[k] for sd in model_files], f"{src_role_dir}: {k}") for k in keys}
    del model_files

    optim_full = None
    if include_optimizer and info["ranks"].get("optim"):
        if strategy == "fsdp":
            raise IncompatibleCheckpointError(
                f"{src_role_dir}: FSDP1 native optimizer state is flattened per FSDP unit and cannot be "
                f"converted offline. Convert online inside a job of world size {world} "
                f"(convert_skyrl_native(..., role=role, dist=dist)), or pass include_optimizer=False "
                f"to convert weights and lr_scheduler only."
            )
        optim_files = [
            _load_native_file(storage, storage.join(src_role_dir, _native_name("optim", world, r))) for r in range(world)
        ]
        optim_full = _convert_native_optim(optim_files, param_fqns, src_role_dir, model_full)
        del optim_files

    extra_path = storage.join(src_role_dir, _native_name("extra_state", world, 0))
    sched_state = None
    if storage.exists(extra_path):
        extra = _load_native_file(storage, extra_path)
        sched_state = extra.get("lr_scheduler") if isinstance(extra, dict) else None

    files = []
    path = dst_storage.join(dst_role_dir, MODEL_DCP_DIR)
    _dcp_save(model_full, dst_storage, path, None)
    files += _own_dcp_files(dst_storage, path, MODEL_DCP_DIR, 0, True)
    if optim_full is not None:
        path = dst_storage.join(dst_role_dir, OPTIMIZER_DCP_DIR)
        _dcp_save({"optimizer_0": optim_full}, dst_storage, path, None)
        files += _own_dcp_files(dst_storage, path, OPTIMIZER_DCP_DIR, 0, True)
    if sched_state:
        torch_save(dst_storage, dst_storage.join(dst_role_dir, SCHEDULER_FILE), sched_state)
        files.append(SCHEDULER_FILE)
    config = {
        "fsdp_strategy": strategy,
        "world_size": 1,
        "state_dict_type": "sharded",
        "format_version": FORMAT_VERSION,
        "skyrl_callbacks_format": True,
        "num_optimizers": 1 if optim_full is not None else 0,
        "num_schedulers": 1 if sched_state else 0,
        "torch_version": torch.__version__.split("+")[0],
        "converted_from": {"layout": "skyrl_native", "world_size": world},
    }
    _write_json(dst_storage, dst_storage.join(dst_role_dir, FSDP_CONFIG_FILE), config)
    files.append(FSDP_CONFIG_FILE)
    return {
        "world_size": world,
        "fsdp_strategy": strategy,
        "tensors": len(model_full),
        "optimizer": optim_full is not None,
        "files": files,
    }


def _convert_native_optim(optim_files: list, param_fqns: list, where: str, model_full: dict) -> dict:
    """SkyRL's per-rank index-keyed optimizer states (DTensor values) -> one FQN-keyed full state."""
    first = optim_files[0]
    groups = first.get("param_groups", [])
    names: dict[int, str] = {}
    order = [i for g in groups for i in g["params"]]
    recorded = [n for g in groups for n in (g.get("param_names") or [])]
    if recorded and len(recorded) == len(order):
        names = dict(zip(order, recorded))
    elif len(groups) == 1 and len(order) == len(param_fqns):
        # SkyRL builds AdamW(model.parameters()): one group, parameters in model order
        names = dict(zip(order, param_fqns))
    else:
        raise IncompatibleCheckpointError(
            f"{where}: the optimizer holds {len(order)} parameters in {len(groups)} group(s) without "
            f"param_names, and the model file has {len(param_fqns)} sharded parameters, so they cannot be "
            f"matched by name offline. Convert online "
            f"(convert_skyrl_native(..., role=role, dist=dist)) or pass include_optimizer=False."
        )
    state = {}
    for idx, entry in first.get("state", {}).items():
        per_key = {}
        for key in entry:
            value = _assemble([f["state"][idx][key] for f in optim_files], f"{where}: optimizer {names[idx]}.{key}")
            param = model_full.get(names[idx])
            if isinstance(value, torch.Tensor) and value.dim() and (
                param is None or tuple(value.shape) != tuple(param.shape)
            ):
                raise IncompatibleCheckpointError(
                    f"{where}: optimizer state {key} of parameter #{idx} has shape {tuple(value.shape)}, but the "
                    f"parameter matched to it by position, {names[idx]!r}, has "
                    f"{None if param is None else tuple(param.shape)}. Convert online "
                    f"(convert_skyrl_native(..., role=role, dist=dist)) or pass include_optimizer=False."
                )
            per_key[key] = value
        state[names[idx]] = per_key
    new_groups = []
    for g in groups:
        ng = {k: v for k, v in g.items() if k != "params"}
        ng["params"] = [names[i] for i in g["params"]]
        new_groups.append(ng)
    return {"state": state, "param_groups": new_groups}


def _role_without_optimizers(role: "Role") -> "Role":
    import dataclasses

    return dataclasses.replace(role, optimizers=[], schedulers=list(role.schedulers))
