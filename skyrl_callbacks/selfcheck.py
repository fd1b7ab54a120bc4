"""Self-checks of our own IO engines against torch's own paths, once per process.

Four engines of ours depend on torch internals that no public API promises:

``plain-writer``
    :func:`~skyrl_callbacks.writers.plain._parallel_torch_save`: ``torch.save`` under
    ``skip_data`` (a file with holes), each storage's offset read back from a ``meta`` load, the
    holes filled with ``pwrite``. Checked: its file is byte-identical to ``torch.save`` (zip CRC
    off, as all our saves) and the checksum it records is the file's.
``plain-reader``
    :class:`~skyrl_callbacks.writers.plain._Skeleton` (via ``open_skeleton``): the ``meta``
    load's ``_checkpoint_offset`` of each storage, then ``pread`` into (live) tensors. Checked:
    what it loads from a ``torch.save`` file equals ``torch.load``'s result bit for bit (values,
    dtypes, shapes, strides, shared storages), in place and into fresh memory.
``dcp-writer``
    :func:`~skyrl_callbacks.writers.fsdp._parallel_file_writer`: DCP's ``FileSystemWriter`` with
    the data step replaced (skip_data records, ``pwrite``, our own ``WriteResult`` offsets).
    Checked: every entry's bytes at the offset our ``.metadata`` gives equal those
    ``FileSystemWriter(thread_count=1)`` writes for it, and torch's ``FileSystemReader`` loads
    our checkpoint back bit for bit.
``dcp-reader``
    :func:`~skyrl_callbacks.writers.fsdp._parallel_file_reader`: entries located from their zip
    records and read straight into the destinations, the others deserialised. Checked: it loads a
    checkpoint written by ``FileSystemWriter(thread_count=1)`` bit for bit as torch's
    ``FileSystemReader`` does (whole-entry direct reads, a strided destination, a byte entry).

The first use of an engine in a process runs its check (milliseconds: a few small tensors in a
temp dir) and caches the verdict. On a mismatch, or any error inside the check, the engine is not
used for the rest of the process: the callers take torch's own path (``torch.save`` /
``torch.load`` / DCP's ``FileSystemWriter`` / ``FileSystemReader``), and one warning naming the
torch version and the cause is logged per engine.

Distributed runs: the checks use no collective. Every rank runs the same deterministic check on
the same torch build, so ranks reach the same verdict; should they not (e.g. one rank's temp dir
fails), the result is still sound: a DCP checkpoint is one file per rank plus a ``.metadata``
built from each rank's own write results, so a rank on DCP's writer and one on ours produce a
checkpoint any reader loads; readers are per rank; plain files are written by rank 0 alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["ENGINES", "trusted", "verdicts"]

ENGINES = ("plain-writer", "plain-reader", "dcp-writer", "dcp-reader")

_VERDICTS: dict[str, tuple[bool, str, float]] = {}  # engine -> (trusted, cause, seconds the check took)
_LOCKS = {name: threading.Lock() for name in ENGINES}
_INSIDE = threading.local()  # the engines a check on this thread is running (they trust themselves)


class _Mismatch(Exception):
    """Our engine's result differs from torch's own path."""


def trusted(engine: str) -> bool:
    """Whether our ``engine`` may be used in this process (runs its check on first use)."""
    if getattr(_INSIDE, engine, False):
        return True
    verdict = _VERDICTS.get(engine)
    if verdict is None:
        with _LOCKS[engine]:
            verdict = _VERDICTS.get(engine)
            if verdict is None:
                verdict = _VERDICTS[engine] = _run(engine)
    return verdict[0]


def verdicts() -> dict[str, dict]:
    """The verdicts reached so far in this process: ``{engine: {"trusted", "cause", "seconds"}}``."""
    return {k: {"trusted": v[0], "cause": v[1], "seconds": v[2]} for k, v in _VERDICTS.items()}


def _reset() -> None:
    """Forget the cached verdicts (tests)."""
    _VERDICTS.clear()


@contextlib.contextmanager
def _running(engine: str) -> Iterator[None]:
    setattr(_INSIDE, engine, True)
    try:
        yield
    finally:
        setattr(_INSIDE, engine, False)


def _run(engine: str) -> tuple[bool, str, float]:
    start = time.perf_counter()
    check = _CHECKS[engine]
    try:
        with tempfile.TemporaryDirectory(prefix="skyrl-selfcheck-") as tmp, _running(engine):
            check(tmp)
        ok, cause = True, ""
    except _Mismatch as exc:
        ok, cause = False, str(exc)
    except Exception as exc:  # noqa: BLE001 - an engine that fails on a small state is not trusted either
        ok, cause = False, f"{type(exc).__name__}: {exc}"
    took = time.perf_counter() - start
    if ok:
        logger.debug("self-check of our %s engine passed on torch %s (%.3f s)", engine, torch.__version__, took)
    else:
        logger.warning(
            "skyrl_callbacks: our %s engine does not reproduce torch %s's own path (%s); using torch's %s "
            "for the rest of this process (slower, same files).",
            engine, torch.__version__, cause[:500], _FALLBACKS[engine],
        )
    return ok, cause, took


_FALLBACKS = {
    "plain-writer": "torch.save",
    "plain-reader": "torch.load",
    "dcp-writer": "FileSystemWriter",
    "dcp-reader": "FileSystemReader",
}


# --------------------------------------------------------------------------- small states
def _sample_state() -> dict:
    """A few small tensors covering what the engines must get right: several dtypes, a view into
    a larger storage that another entry shares, an empty tensor, a 0-dim tensor, plain values."""
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(6, 5, generator=g)
    return {
        "w": torch.randn(7, 3, generator=g),
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "ints": torch.arange(11, dtype=torch.int64) * 3 - 7,
        "flags": torch.tensor([True, False, True]),
        "base": base,
        "view": base[2:4],
        "empty": torch.empty(0),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "nested": {"list": [torch.full((2, 2), 0.25), 3, "x"], "step": 7},
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _same_tensor(a: Any, b: Any, where: str) -> None:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise _Mismatch(f"{where}: a tensor on one side only ({type(a).__name__} vs {type(b).__name__})")
    if (a.dtype, tuple(a.shape), a.stride(), a.storage_offset()) != (b.dtype, tuple(b.shape), b.stride(),
                                                                     b.storage_offset()):
        raise _Mismatch(f"{where}: {a.dtype}{tuple(a.shape)} stride {a.stride()} offset {a.storage_offset()} vs "
                        f"{b.dtype}{tuple(b.shape)} stride {b.stride()} offset {b.storage_offset()}")
    if _bits(a) != _bits(b):
        raise _Mismatch(f"{where}: tensor bytes differ")


def _same_tree(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        _same_tensor(a, b, where)
    elif isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            raise _Mismatch(f"{where}: keys {list(a)} vs {list(b)}")
        for k in a:
            _same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            raise _Mismatch(f"{where}: {type(a).__name__}[{len(a)}] vs {type(b).__name__}[{len(b)}]")
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tree(x, y, f"{where}[{i}]")
    elif type(a) is not type(b) or a != b:
        raise _Mismatch(f"{where}: {a!r} vs {b!r}")


def _sharing(tree: dict) -> list:
    """Which top-level entries share a storage (as indices of first appearance)."""
    seen: dict[int, int] = {}
    return [seen.setdefault(v.untyped_storage().data_ptr(), len(seen)) if isinstance(v, torch.Tensor) and v.numel()
            else None for v in tree.values()]


def _file_digest(path: str, algo: str) -> str:
    from skyrl_callbacks.manifest import _hasher

    h = _hasher(algo)
    with open(path, "rb") as fh:
        h.update(fh.read())
    return h.hexdigest()


# --------------------------------------------------------------------------- the checks
def _check_plain_writer(tmp: str) -> None:
    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers.plain import _no_zip_crc, _parallel_torch_save

    state = _sample_state()
    storage = Storage(tmp)
    ours = os.path.join(tmp, "ours.pt")
    if not _parallel_torch_save(storage, ours, state, threads=2, min_bytes=0):
        raise _Mismatch("the threaded writer declined a small state of plain tensors")
    ref = os.path.join(tmp, "torch.pt")
    with open(ref, "wb") as fh, _no_zip_crc():
        torch.save(state, fh)
    with open(ours, "rb") as fh:
        got = fh.read()
    with open(ref, "rb") as fh:
        want = fh.read()
    if got != want:
        first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
        raise _Mismatch(f"its file differs from torch.save's ({len(got)} vs {len(want)} bytes, first at byte {first})")
    size, algo, digest = storage._known[storage._norm(ours)]
    if size != len(want) or digest != _file_digest(ours, algo):
        raise _Mismatch(f"the {algo} checksum it recorded is not the file's")


def _check_plain_reader(tmp: str) -> None:
    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers.plain import _no_zip_crc, open_skeleton

    state = _sample_state()
    path = os.path.join(tmp, "torch.pt")
    with open(path, "wb") as fh, _no_zip_crc():
        torch.save(state, fh)
    want = torch.load(path, map_location="cpu", weights_only=True)
    storage = Storage(tmp)
    for in_place in (False, True):
        with open_skeleton(storage, path, weights_only=True) as skel:
            if skel is None:
                raise _Mismatch("the direct reader declined a torch.save file of plain tensors")
            dests, live = {}, None
            if in_place:
                meta = skel.obj["w"]
                live = torch.zeros(meta.shape, dtype=meta.dtype)
                dests = {id(meta): live}
            got = skel.materialize(dests)
        _same_tree(got, want)
        if _sharing(got) != _sharing(want):
            raise _Mismatch(f"shared storages differ ({_sharing(got)} vs {_sharing(want)})")
        if in_place and got["w"] is not live:
            raise _Mismatch("an entry with a matching destination was not read into it")


def _dcp_state() -> dict:
    g = torch.Generator().manual_seed(4321)
    return {
        "a": torch.randn(9, 4, generator=g),
        "b": torch.arange(13, dtype=torch.int32),
        "c": torch.randn(6, generator=g).to(torch.bfloat16),
        "d": torch.randn(5, 3, generator=g),
        "extra": {"epoch": 3, "name": "x"},
    }


def _zeroed(state: dict) -> dict:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {kk: None for kk in v} for k, v in state.items()}


def _dcp_write(state: dict, writer: Any) -> None:
    import torch.distributed.checkpoint as dcp

    from skyrl_callbacks.writers.fsdp import _quiet
    from skyrl_callbacks.writers.plain import _no_zip_crc

    with _quiet(), _no_zip_crc():
        dcp.save(state, storage_writer=writer, no_dist=True)


def _dcp_read(template: dict, reader: Any) -> dict:
    import torch.distributed.checkpoint as dcp

    from skyrl_callbacks.writers.fsdp import _quiet

    with _quiet():
        dcp.load(template, storage_reader=reader, no_dist=True)
    return template


def _check_dcp_writer(tmp: str) -> None:
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers.fsdp import _parallel_file_writer

    state = _dcp_state()
    ours, ref = os.path.join(tmp, "ours"), os.path.join(tmp, "torch")
    os.makedirs(ours)
    os.makedirs(ref)
    _dcp_write(state, _parallel_file_writer(Storage(tmp), ours, 2))
    _dcp_write(state, FileSystemWriter(ref, single_file_per_rank=True, sync_files=False, thread_count=1))
    got_md = FileSystemReader(ours).read_metadata()
    want_md = FileSystemReader(ref).read_metadata()
    if set(got_md.state_dict_metadata) != set(want_md.state_dict_metadata):
        raise _Mismatch(f"entries {sorted(got_md.state_dict_metadata)} vs {sorted(want_md.state_dict_metadata)}")
    if set(got_md.storage_data) != set(want_md.storage_data):
        raise _Mismatch("the stored items differ from FileSystemWriter's")
    for index, want in want_md.storage_data.items():
        got = got_md.storage_data[index]
        with open(os.path.join(ours, got.relative_path), "rb") as fh:
            fh.seek(got.offset)
            got_bytes = fh.read(got.length)
        with open(os.path.join(ref, want.relative_path), "rb") as fh:
            fh.seek(want.offset)
            want_bytes = fh.read(want.length)
        if got_bytes != want_bytes:
            raise _Mismatch(f"entry {index.fqn}: {len(got_bytes)} bytes at offset {got.offset} differ from "
                            f"FileSystemWriter's record ({len(want_bytes)} bytes)")
    _same_tree(_dcp_read(_zeroed(state), FileSystemReader(ours)), state)


def _check_dcp_reader(tmp: str) -> None:
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from skyrl_callbacks.writers.fsdp import _parallel_file_reader

    state = _dcp_state()
    _dcp_write(state, FileSystemWriter(tmp, single_file_per_rank=True, sync_files=False, thread_count=1))

    def template() -> dict:
        t = _zeroed(state)
        t["d"] = torch.zeros(3, 5).t()  # a strided destination: the deserialising path
        return t

    want = _dcp_read(template(), FileSystemReader(tmp))
    got = _dcp_read(template(), _parallel_file_reader(tmp, 2))
    _same_tree(got, want)
    _same_tree({k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in got.items()}, state)


_CHECKS: dict[str, Callable[[str], None]] = {
    "plain-writer": _check_plain_writer,
    "plain-reader": _check_plain_reader,
    "dcp-writer": _check_dcp_writer,
    "dcp-reader": _check_dcp_reader,
}


def run_all() -> dict[str, dict]:
    """Run every engine's check now (if not yet run) and return :func:`verdicts` (diagnostics)."""
    for name in ENGINES:
        trusted(name)
    return verdicts()


def _main(argv: Optional[list] = None) -> int:  # pragma: no cover - `python -m skyrl_callbacks.selfcheck`
    import json

    out = run_all()
    print(json.dumps({"torch": torch.__version__, "engines": out}, indent=2))
    return 0 if all(v["trusted"] for v in out.values()) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
