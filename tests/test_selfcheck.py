"""Our own IO engines (plain threaded writer/reader, DCP data-step writer/reader) check themselves
against torch's own paths on first use in a process; a failed check makes the callers take torch's
path for the rest of the process, with one warning naming the torch version.

The mismatches are forced the way a torch release would drift: a layout constant (the zip
storage alignment) that differs between ``torch.save`` with and without ``skip_data``, and a
``meta`` load whose ``_checkpoint_offset`` no longer points at the tensor bytes."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from skyrl_callbacks import selfcheck
from skyrl_callbacks.storage import Storage
from skyrl_callbacks.writers import fsdp as fsdp_mod
from skyrl_callbacks.writers.plain import PlainWriter, _no_zip_crc, torch_save


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    selfcheck._reset()
    yield
    selfcheck._reset()  # later tests (same process) check the unpatched torch again


def _warnings(caplog, engine: str) -> list:
    return [r for r in caplog.records if r.name == "skyrl_callbacks.selfcheck" and r.levelno == logging.WARNING
            and f"our {engine} engine" in r.getMessage()]


@pytest.fixture
def aligned_128_under_skip_data(monkeypatch):
    """``torch.save`` under ``skip_data`` lays storages out on 128-byte boundaries while a normal
    save keeps 64: the files our writers build from skip_data skeletons no longer match torch's."""
    from torch.utils.serialization import config

    real = torch.serialization.skip_data

    @contextlib.contextmanager
    def drifted(*args, **kwargs):
        old = config.save.storage_alignment
        config.save.storage_alignment = 128
        try:
            with real(*args, **kwargs):
                yield
        finally:
            config.save.storage_alignment = old

    monkeypatch.setattr(torch.serialization, "skip_data", drifted)


@pytest.fixture
def shifted_meta_offsets(monkeypatch):
    """A ``meta`` load whose storages' ``_checkpoint_offset`` lies 64 bytes past the data (as if
    torch reported the record's header instead): a direct reader trusting it reads wrong bytes."""
    real = torch.load

    def drifted(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("map_location") == "meta":
            seen = set()
            stack = [out]
            while stack:
                o = stack.pop()
                if isinstance(o, torch.Tensor):
                    st = o.untyped_storage()
                    if st._cdata not in seen and isinstance(getattr(st, "_checkpoint_offset", None), int):
                        seen.add(st._cdata)
                        st._checkpoint_offset += 64
                elif isinstance(o, dict):
                    stack += list(o.values())
                elif isinstance(o, (list, tuple)):
                    stack += list(o)
        return out

    monkeypatch.setattr(torch, "load", drifted)


def _state() -> dict:
    torch.manual_seed(0)
    return {"w": torch.randn(64, 32), "b": torch.randn(32).to(torch.bfloat16), "n": torch.arange(50), "step": 3}


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    with _no_zip_crc():
        torch.save(obj, buf)
    return buf.getvalue()


def test_every_engine_passes_on_this_torch_in_milliseconds():
    out = selfcheck.run_all()
    assert set(out) == set(selfcheck.ENGINES)
    for engine, verdict in out.items():
        assert verdict["trusted"], (engine, verdict["cause"])
        assert verdict["seconds"] < 5, (engine, verdict["seconds"])  # ~0.05-0.2 s on a loaded 2-core box


def test_plain_writer_mismatch_falls_back_to_torch_save(tmp_path, caplog, aligned_128_under_skip_data, monkeypatch):
    monkeypatch.setenv("SKYRL_PARALLEL_WRITE_MIN_BYTES", "0")  # the threaded writer would take any file
    storage = Storage(str(tmp_path))
    state = _state()
    with caplog.at_level(logging.WARNING, logger="skyrl_callbacks.selfcheck"):
        torch_save(storage, str(tmp_path / "a.pt"), state)
        torch_save(storage, str(tmp_path / "b.pt"), state)
    assert not selfcheck.trusted("plain-writer")
    assert "differs from torch.save's" in selfcheck.verdicts()["plain-writer"]["cause"]
    (warning,) = _warnings(caplog, "plain-writer")  # one warning for the whole process
    assert torch.__version__ in warning.getMessage() and "torch.save" in warning.getMessage()
    want = _torch_bytes(state)  # torch's own path: the file torch.save writes
    assert (tmp_path / "a.pt").read_bytes() == want
    assert (tmp_path / "b.pt").read_bytes() == want


def test_plain_reader_mismatch_falls_back_to_torch_load(tmp_path, caplog, shifted_meta_offsets):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
    want = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    path = str(tmp_path / "optimizer_state.pt")
    with open(path, "wb") as fh:
        torch.save(opt.state_dict(), fh)
    for st in opt.state.values():  # the live state tensors the direct read would fill in place
        for t in st.values():
            t.zero_()
    with caplog.at_level(logging.WARNING, logger="skyrl_callbacks.selfcheck"):
        PlainWriter._load_list(Storage(str(tmp_path)), path, [opt], "optimizer")
    assert not selfcheck.trusted("plain-reader")
    (warning,) = _warnings(caplog, "plain-reader")
    assert torch.__version__ in warning.getMessage() and "torch.load" in warning.getMessage()
    got = opt.state_dict()["state"]
    for idx, st in want.items():
        for key, val in st.items():
            assert torch.equal(got[idx][key], val), (idx, key)


def _dcp_state() -> dict:
    torch.manual_seed(1)
    return {"a": torch.randn(128, 16), "b": torch.arange(300, dtype=torch.int32), "c": torch.randn(40).half()}


def test_dcp_writer_mismatch_falls_back_to_filesystemwriter(tmp_path, caplog, aligned_128_under_skip_data):
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    storage = Storage(str(tmp_path))
    path = str(tmp_path / "model_state.dcp")
    state = _dcp_state()
    with caplog.at_level(logging.WARNING, logger="skyrl_callbacks.selfcheck"):
        assert type(fsdp_mod._dcp_writer(storage, path, 4)) is FileSystemWriter
        fsdp_mod._dcp_save(state, storage, path, None, thread_count=4)
    assert not selfcheck.trusted("dcp-writer")
    (warning,) = _warnings(caplog, "dcp-writer")
    assert torch.__version__ in warning.getMessage() and "FileSystemWriter" in warning.getMessage()
    import torch.distributed.checkpoint as dcp

    got = {k: torch.zeros_like(v) for k, v in state.items()}
    with fsdp_mod._quiet():
        dcp.load(got, storage_reader=FileSystemReader(path), no_dist=True)
    for k in state:
        assert torch.equal(got[k], state[k]), k


def test_dcp_reader_mismatch_falls_back_to_filesystemreader(tmp_path, caplog, shifted_meta_offsets):
    from torch.distributed.checkpoint import FileSystemReader

    storage = Storage(str(tmp_path))
    path = str(tmp_path / "model_state.dcp")
    state = _dcp_state()
    fsdp_mod._dcp_save(state, storage, path, None)
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    with caplog.at_level(logging.WARNING, logger="skyrl_callbacks.selfcheck"):
        assert type(fsdp_mod._dcp_reader(storage, path)) is FileSystemReader
        fsdp_mod._dcp_load(got, storage, path, None)
    assert not selfcheck.trusted("dcp-reader")
    (warning,) = _warnings(caplog, "dcp-reader")
    assert torch.__version__ in warning.getMessage() and "FileSystemReader" in warning.getMessage()
    for k in state:
        assert torch.equal(got[k], state[k]), k


_MIXED_WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from skyrl_callbacks import selfcheck
    from skyrl_callbacks.dist import DistContext
    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers.fsdp import _dcp_save
    rank, path = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 1:  # this rank's check failed (say, its temp dir): DCP's own writer here, ours on rank 0
        selfcheck._VERDICTS["dcp-writer"] = (False, "forced by the test", 0.0)
    torch.manual_seed(rank)
    state = {f"r{rank}": torch.randn(257, 3), "shared": torch.arange(10)}
    _dcp_save(state, Storage(path), path, DistContext(), thread_count=2)
    torch.save(state, os.path.join(path, f"want{rank}.pt"))
    print(rank, selfcheck.trusted("dcp-writer"), flush=True)
    dist.barrier()  # both ranks tear gloo down together (one aborted at exit once when the other was gone)
    dist.destroy_process_group()
""")


def test_ranks_with_different_verdicts_write_one_loadable_checkpoint(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "model_state.dcp")
    os.makedirs(path)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.pop("LOCAL_RANK", None)
    procs = [subprocess.Popen([sys.executable, "-c", _MIXED_WORKER, str(r), path], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "0 True" in outs[0] and "1 False" in outs[1], outs
    from torch.distributed.checkpoint import FileSystemReader
    import torch.distributed.checkpoint as dcp

    want = {**torch.load(os.path.join(path, "want0.pt")), **torch.load(os.path.join(path, "want1.pt"))}
    for reader in (FileSystemReader(path), fsdp_mod._parallel_file_reader(path, 2)):
        got = {k: torch.zeros_like(v) for k, v in want.items()}
        with fsdp_mod._quiet():
            dcp.load(got, storage_reader=reader, no_dist=True)
        for k in want:
            assert torch.equal(got[k], want[k]), k
