"""Loads that never execute code from a checkpoint.

A checkpoint directory (or bucket) is data: whoever can write to it must not be able to run
code in the training process. ``torch.load(weights_only=False)`` unpickles arbitrary objects,
and unpickling calls whatever the pickle names (``os.system`` ...). So every load here:

* ``torch.load`` files (``trainer_state.pt``, ``data.pt``, model/optimizer/scheduler states,
  SkyRL's per-rank FSDP files): ``weights_only=True`` (tensors, containers, primitives, torch
  dtypes/devices/sizes). No safe globals are registered: what this package writes is made of
  those types only.
* DCP ``.metadata`` (a plain pickle that DCP reads with ``pickle.load``): a restricted
  unpickler that resolves only DCP's metadata classes and torch dtypes/layouts/sizes
  (:func:`load_dcp_metadata`).
* DCP byte entries (DCP's planner reads them with ``torch.load(weights_only=False)``): each is
  loaded ``weights_only=True`` first (:func:`guard_dcp_reader`, :func:`check_dcp_bytes`).

A file that needs more (written by an older version of this package, by SkyRL itself, or
planted) is refused with :class:`~skyrl_callbacks.errors.UntrustedCheckpointError` naming the
file, what it asked for (``GLOBAL posix.system`` ...) and the opt-in: the config key
``trust_checkpoint_code: true`` (CLI ``--trust-checkpoint-code``) loads such files the old way,
for checkpoint stores whose every writer is trusted.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import pickle
import re
from typing import Any, BinaryIO, Iterator, Optional, Union

import torch

from skyrl_callbacks.errors import UntrustedCheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "TRUST_KEY",
    "TRUST_FLAG",
    "trusting",
    "trusted",
    "refused_what",
    "untrusted_error",
    "safe_torch_load",
    "load_dcp_metadata",
    "guard_dcp_reader",
    "check_dcp_bytes",
]

#: the config key and CLI flag that allow loads that may execute code
TRUST_KEY = "trust_checkpoint_code"
TRUST_FLAG = "--trust-checkpoint-code"

_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("skyrl_trust_checkpoint_code", default=False)
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


@contextlib.contextmanager
def trusting(trust: bool) -> Iterator[None]:
    """Loads in this context (this thread and code it calls) follow ``trust`` (the config's
    ``trust_checkpoint_code``); outside any, nothing is trusted."""
    token = _TRUST.set(bool(trust))
    try:
        yield
    finally:
        _TRUST.reset(token)


def trusted() -> bool:
    """Whether the current context allows loads that may execute code."""
    return _TRUST.get()


def refused_what(exc: BaseException) -> Optional[str]:
    """The global a ``weights_only`` load refused (``"GLOBAL posix.system"``), or None when ``exc``
    is no such refusal. Code can only be reached through a global, so other weights-only failures
    (``Unsupported operand ...``: a flipped bit in the pickle, a torn file) are corruption, reported
    as such and never retried with ``weights_only=False``."""
    if not isinstance(exc, pickle.UnpicklingError):
        return None
    text = str(exc)
    if "Weights only load failed" not in text and "WeightsUnpickler" not in text:
        return None
    match = _GLOBAL_RE.search(text)
    return f"GLOBAL {match.group(1)}" if match else None


def untrusted_error(path: str, what: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"{path}: refused to load: it holds {what}, which a weights-only load does not allow (unpickling it "
        f"would run code named by the file). Checkpoints written by this version of skyrl-callbacks never "
        f"hold such objects: this file was written by SkyRL itself, by an older skyrl-callbacks, or by "
        f"someone who could write to the checkpoint store. Only if you trust every writer of that store, "
        f"set {TRUST_KEY}: true (CLI: {TRUST_FLAG}) to load it the old way.",
        path=path,
        refused=what,
    )


def safe_torch_load(f: Union[str, BinaryIO], path: str, *, map_location: Any = "cpu", mmap: bool = False,
                    trust: Optional[bool] = None) -> Any:
    """``torch.load(f, weights_only=True)``; a file that needs more is loaded only when trusted
    (``trust``, default: the :func:`trusting` context), else :class:`UntrustedCheckpointError`
    names ``path``, the refused global and the opt-in. Other errors (torn files...) propagate."""
    try:
        try:
            return torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            # DTensors (SkyRL's per-rank FSDP files) are allowed, once torch.distributed.tensor is imported
            if "torch.distributed.tensor`` must be imported" not in str(exc) or not torch.distributed.is_available():
                raise
            __import__("importlib").import_module("torch.distributed.tensor")

            if not isinstance(f, str):
                f.seek(0)
            return torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        what = refused_what(exc)
        if what is None:
            raise
        if not (trusted() if trust is None else trust):
            raise untrusted_error(path, what) from exc
        logger.warning("%s: holds %s; loading it with weights_only=False because %s is set", path, what, TRUST_KEY)
        if not isinstance(f, str):
            f.seek(0)
        return torch.load(f, map_location=map_location, weights_only=False, mmap=mmap)


# --------------------------------------------------------------------------- DCP
def _metadata_globals() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import filesystem as dcp_fs
    from torch.distributed.checkpoint import metadata as dcp_md

    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(dcp_md, name):
            allowed[(dcp_md.__name__, name)] = getattr(dcp_md, name)
    allowed[(dcp_fs.__name__, "_StorageInfo")] = dcp_fs._StorageInfo
    from torch.distributed.checkpoint import planner as dcp_planner

    # Megatron's metadata also keeps the save plans (``all_local_plans``): DCP's plain dataclasses/enums
    for name in ("SavePlan", "WriteItem", "TensorWriteData", "WriteItemType", "LoadPlan", "ReadItem", "LoadItemType"):
        if hasattr(dcp_planner, name):
            allowed[(dcp_planner.__name__, name)] = getattr(dcp_planner, name)
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a lookup by name
    import pathlib

    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):  # StorageMeta.checkpoint_id
        allowed[("pathlib", name)] = getattr(pathlib, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata classes and torch dtypes/layouts/sizes; any other global
    (the only way a pickle reaches code) is refused."""

    _allowed: Optional[dict] = None

    def find_class(self, module: str, name: str) -> Any:
        allowed = type(self)._allowed
        if allowed is None:
            allowed = type(self)._allowed = _metadata_globals()
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not a DCP metadata class") from None


def load_dcp_metadata(fh: BinaryIO, path: str, *, trust: Optional[bool] = None) -> Any:
    """Unpickle a DCP ``.metadata`` file with :class:`_MetadataUnpickler`; a file that names
    other globals is refused (:class:`UntrustedCheckpointError`) unless trusted."""
    data = fh.read()
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        match = _GLOBAL_RE.search(str(exc))
        if match is None:
            raise
        what = f"GLOBAL {match.group(1)}"
        if not (trusted() if trust is None else trust):
            raise untrusted_error(path, what) from exc
        logger.warning("%s: holds %s; unpickling it because %s is set", path, what, TRUST_KEY)
        return pickle.loads(data)


class _SafeBytesPlanner:
    """A load planner whose ``load_bytes`` first loads the entry ``weights_only=True`` (DCP's
    own ``load_bytes`` uses ``weights_only=False``); everything else is the planner's."""

    def __init__(self, planner: Any, path: str, reader: Any = None) -> None:
        self._planner = planner
        self._path = path
        self._reader = reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        where = f"{self._path} (entry {read_item.dest_index.fqn!r})"
        pos = value.tell()
        try:
            safe_torch_load(value, where, map_location="cpu")  # raises unless weights-only or trusted
        except UntrustedCheckpointError as exc:
            if self._reader is not None:
                self._reader.skyrl_untrusted = exc
            raise
        value.seek(pos)
        self._planner.load_bytes(read_item, value)


def guard_dcp_reader(reader: Any, path: str) -> Any:
    """Make a DCP ``FileSystemReader`` (or subclass) instance safe: its ``.metadata`` goes through
    :func:`load_dcp_metadata`, its byte entries through a weights-only load. Only this instance
    changes. Returns ``reader``."""
    if getattr(reader, "_skyrl_guarded", False):
        return reader
    from torch.distributed.checkpoint.metadata import StorageMeta

    def read_metadata(*args: Any, **kwargs: Any) -> Any:
        md_path = reader._get_metadata_path(kwargs.get("rank"))
        with reader.fs.create_stream(md_path, "rb") as fh:
            try:
                metadata = load_dcp_metadata(fh, str(md_path))
            except UntrustedCheckpointError as exc:
                reader.skyrl_untrusted = exc  # DCP reports a failed metadata read as a plain string
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = reader.load_id
        return metadata

    original_read_data = reader.read_data

    def read_data(plan: Any, planner: Any) -> Any:
        return original_read_data(plan, _SafeBytesPlanner(planner, path, reader))

    reader.read_metadata = read_metadata
    reader.read_data = read_data
    reader._skyrl_guarded = True
    return reader


def check_dcp_bytes(path: str, metadata: Any, *, trust: Optional[bool] = None) -> None:
    """Load every byte entry of the local DCP directory ``path`` weights-only (for loaders whose
    DCP reader we do not build, e.g. Megatron's). Raises :class:`UntrustedCheckpointError`
    unless trusted; entries with storage transforms are refused the same way."""
    import os

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    trust = trusted() if trust is None else trust
    if trust:
        return
    kinds = metadata.state_dict_metadata
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        if not isinstance(kinds.get(index.fqn), BytesStorageMetadata):
            continue
        where = f"{os.path.join(path, info.relative_path)} (entry {index.fqn!r})"
        if getattr(info, "transform_descriptors", None):
            raise untrusted_error(where, f"storage transforms {list(info.transform_descriptors)}")
        with open(os.path.join(path, info.relative_path), "rb") as fh:
            fh.seek(info.offset)
            data = fh.read(info.length)
        safe_torch_load(io.BytesIO(data), where, map_location="cpu", trust=False)


# --------------------------------------------------------------------------- what we write
_LEAF_TYPES = frozenset({str, bytes, bytearray, int, float, bool, complex, type(None),
                         torch.dtype, torch.device, torch.Size})
_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
_MAPPING_TYPES = frozenset({dict, __import__("collections").OrderedDict, __import__("collections").Counter})
_SEQUENCE_TYPES = frozenset({list, tuple, set})  # not frozenset: weights_only refuses it


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def non_portable(obj: Any, where: str = "", limit: int = 10) -> list[tuple[str, str]]:
    """``[(key path, type)]`` of the values in ``obj`` that a ``weights_only`` load refuses
    (anything but tensors, dicts, lists, tuples, sets, Python scalars/strings and torch
    dtypes/devices/sizes); at most ``limit``."""
    out: list[tuple[str, str]] = []

    def walk(value: Any, path: str) -> None:
        if len(out) >= limit:
            return
        cls = type(value)
        if cls in _LEAF_TYPES or cls in _TENSOR_TYPES:
            return
        if cls in _MAPPING_TYPES:
            for key, item in value.items():
                if type(key) not in _LEAF_TYPES:
                    out.append((f"{path}[{key!r}] (key)", _type_name(key)))
                walk(item, f"{path}[{key!r}]")
            return
        if cls in _SEQUENCE_TYPES:
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")
            return
        out.append((path or "(top)", _type_name(value)))

    walk(obj, where)
    return out


def to_portable(obj: Any) -> Any:
    """``obj`` with every value a weights-only load refuses replaced by a portable one: numpy
    scalars/arrays by Python scalars/tensors, paths by strings, enums by their value, anything
    else by its ``repr``. For state that is recorded, not restored (hyperparameters, the
    config's extra keys)."""
    cls = type(obj)
    if cls in _LEAF_TYPES or cls in _TENSOR_TYPES:
        return obj
    if cls in _MAPPING_TYPES:
        return {(k if type(k) in _LEAF_TYPES else repr(k)): to_portable(v) for k, v in obj.items()}
    if cls in _SEQUENCE_TYPES:
        return cls(to_portable(v) for v in obj)
    if cls is frozenset:
        return [to_portable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach().as_subclass(torch.Tensor) if obj.layout == torch.strided else repr(obj)
    import enum
    import os

    if isinstance(obj, enum.Enum):
        return to_portable(obj.value)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (str, int, float)):  # str/int/float subclasses (IntEnum handled above)
        return str(obj) if isinstance(obj, str) else (int(obj) if isinstance(obj, int) else float(obj))
    module = cls.__module__.split(".")[0]
    if module == "numpy":
        item = getattr(obj, "item", None)
        if getattr(obj, "shape", None) == () and callable(item):
            return to_portable(item())
        try:
            return torch.from_numpy(obj)
        except (TypeError, ValueError):
            return repr(obj)
    if isinstance(obj, __import__("collections.abc").abc.Mapping):
        return {(k if type(k) in _LEAF_TYPES else repr(k)): to_portable(v) for k, v in obj.items()}
    return repr(obj)


_WARNED: set = set()


def warn_non_portable(obj: Any, file: str, where: str) -> None:
    """Log (once per key path and type per process) the values of ``obj`` that would make
    ``file`` need ``trust_checkpoint_code`` to load."""
    for path, type_name in non_portable(obj, where):
        if (file, path, type_name) in _WARNED:
            continue
        _WARNED.add((file, path, type_name))
        logger.warning(
            "%s: %s is a %s, not a tensor or plain Python value: a weights-only load refuses it, so resuming from "
            "this checkpoint will need %s: true. Keep tensors, numbers, strings, lists and dicts in that state.",
            file, path, type_name, TRUST_KEY,
        )


def find_untrusted(exc: BaseException, reader: Any = None) -> Optional[UntrustedCheckpointError]:
    """The :class:`UntrustedCheckpointError` inside ``exc`` (itself, its cause/context, one of
    DCP's per-rank ``failures``, or the one a :func:`guard_dcp_reader` ``reader`` raised and DCP
    turned into text), or None."""
    if isinstance(getattr(reader, "skyrl_untrusted", None), UntrustedCheckpointError):
        return reader.skyrl_untrusted
    seen: set = set()
    todo: list = [exc]
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen or not isinstance(cur, BaseException):
            continue
        seen.add(id(cur))
        if isinstance(cur, UntrustedCheckpointError):
            return cur
        failures = getattr(cur, "failures", None)
        if isinstance(failures, dict):
            for wrapped in failures.values():
                todo.append(wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped)
        todo += [cur.__cause__, cur.__context__]
    return None


def check_torch_file(path: str, *, trust: Optional[bool] = None) -> None:
    """Load the local ``torch.save`` file ``path`` weights-only (when it exists) before a loader we
    do not control reads it; raises :class:`UntrustedCheckpointError` unless trusted, and
    :class:`~skyrl_callbacks.errors.CorruptCheckpointError` naming the file when it is unreadable."""
    import os

    from skyrl_callbacks.errors import CorruptCheckpointError

    if not os.path.exists(path):
        return
    try:
        safe_torch_load(path, path, map_location="cpu", trust=trust)
    except UntrustedCheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - torn file
        raise CorruptCheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc}).") from exc
