"""The multi-threaded ``torch.save`` of local checkpoint files (``plain._parallel_torch_save``):
the file is ``torch.save``'s, byte for byte (written as a skeleton with holes, then the storages'
bytes by several threads), its manifest checksum is the file's, and trees it does not handle take
the one-stream path."""

from __future__ import annotations

import collections
import os

import torch

from skyrl_callbacks.manifest import hash_file
from skyrl_callbacks.storage import Storage
from skyrl_callbacks.writers import plain


def optimizer_like() -> dict:
    torch.manual_seed(0)
    flat = torch.randn(70_000)
    return {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(300, 40), "exp_avg_sq": torch.rand(300, 40)},
            1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(17).to(torch.bfloat16), "exp_avg_sq": torch.empty(0)},
            2: {"view": flat[100:5000], "whole": flat, "col": flat.view(700, 100)[:, 3]},  # one storage, 3 views
        },
        "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0, 1, 2], "name": None}],
        "ints": torch.arange(1000, dtype=torch.int64),
        "od": collections.OrderedDict(a=torch.ones(3, dtype=torch.float16), b=(torch.zeros(2), "x", 4)),
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_file_is_torch_save_byte_for_byte_and_checksummed(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYRL_PARALLEL_WRITE_MIN_BYTES", "0")
    monkeypatch.setattr(plain, "_WRITE_CHUNK", 4096)  # many chunks per storage, out of order across threads
    obj = optimizer_like()
    store = Storage(str(tmp_path))
    path = str(tmp_path / "optimizer_state.pt")
    assert plain._parallel_torch_save(store, path, obj)
    ref = tmp_path / "ref.pt"
    with open(ref, "wb") as fh, plain._no_zip_crc():
        torch.save(obj, fh)
    assert open(path, "rb").read() == ref.read_bytes()
    # the checksum recorded for the manifest is the one a read-back gives
    size, algo, digest = store._known[store._norm(path)]
    assert (size, digest) == hash_file(store, path, algo)
    back = torch.load(path, weights_only=True)
    assert_same(obj, back)
    back["state"][2]["whole"][100] = 42.0  # views still share one storage after loading
    assert back["state"][2]["view"][0].item() == 42.0


def test_other_trees_and_small_files_take_the_one_stream_path(tmp_path, monkeypatch):
    store = Storage(str(tmp_path))
    monkeypatch.setenv("SKYRL_PARALLEL_WRITE_MIN_BYTES", str(1 << 30))
    assert not plain._parallel_torch_save(store, str(tmp_path / "small.pt"), optimizer_like())
    monkeypatch.setenv("SKYRL_PARALLEL_WRITE_MIN_BYTES", "0")
    param = {"w": torch.nn.Parameter(torch.ones(3)), "v": torch.zeros(4)}  # a tensor subclass
    assert not plain._parallel_torch_save(store, str(tmp_path / "p.pt"), param)
    assert not os.path.exists(tmp_path / "p.pt")
    for name, obj in [("p.pt", param), ("small.pt", optimizer_like())]:
        plain.torch_save(store, str(tmp_path / name), obj)  # still written, by one stream
        assert_same(obj, torch.load(tmp_path / name, weights_only=False))


# A full disk while the storages are written: tests/test_bad_input.py::test_disk_full_during_save (a real
# tmpfs; the suite sends every file through this writer, SKYRL_PARALLEL_WRITE_MIN_BYTES=0 in conftest.py).
