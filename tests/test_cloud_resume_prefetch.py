"""Resume from S3 downloads the rank's files once each, concurrently (issue 20, item 3).

Against the real moto server behind the counting proxy of ``tests/servers.py``: every GET the resume
sends is logged with its Range, and the most requests in flight at one moment is recorded.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import pytest

pytest.importorskip("s3fs")

from skyrl_callbacks import CheckpointManager  # noqa: E402
from skyrl_callbacks.errors import IncompatibleCheckpointError  # noqa: E402
from skyrl_callbacks.storage import MANIFEST_FILE  # noqa: E402
from tests.test_cloud_checkpoint import Cloud, _proxy_options, assert_same, config, make, snapshot, train  # noqa: E402

WIDTH = 2048  # ~0.1 MiB of weights, 0.2 MiB of AdamW state: several 64 KiB ranged GETs per big file
CHUNK = 64 << 10


def _object_gets(proxy, bucket: str) -> dict[str, list[tuple[int, int]]]:
    """``{key: [(start, end excl.) or (0, -1) for a whole-object GET]}`` of the logged GETs of objects."""
    out: dict[str, list] = defaultdict(list)
    for method, target, rng in proxy.requests:
        path = target.split("?", 1)[0]
        if method != "GET" or "?" in target and "list-type" in target or not path.startswith(f"/{bucket}/"):
            continue
        key = path[len(bucket) + 2:]
        if rng:
            a, b = rng.split("=", 1)[1].split("-")
            out[key].append((int(a), int(b) + 1))
        else:
            out[key].append((0, -1))
    return out


def _fetched_once(gets: list, size: int) -> bool:
    """The GETs of one object cover it exactly once (one whole GET, or disjoint ranges that tile it)."""
    if gets == [(0, -1)]:
        return True
    pos = 0
    for a, b in sorted(gets):
        if a != pos or b <= a:
            return False
        pos = b
    return pos == size


def _resume(cfg):
    m2, roles2 = make(seed=5, width=WIDTH)
    mgr = CheckpointManager(cfg)
    mgr.storage.chunk_size = CHUNK  # big files in several ranged GETs
    return m2, roles2, mgr.resume(roles2)


def _staged_leftovers(tmp_path) -> list[str]:
    d = tmp_path / "stage"
    return [p.name for p in d.iterdir() if p.name.startswith(".skyrl-resume-")] if d.exists() else []


@pytest.fixture
def saved(s3_server, fault_proxy, tmp_path):
    cloud = Cloud("s3", "s3", s3_server, s3_server.make_bucket("prefetch"))
    cfg = config(cloud, tmp_path, options=_proxy_options(fault_proxy))
    m, roles = make(width=WIDTH)
    mgr = CheckpointManager(cfg)
    mgr.save(1, roles)
    first = snapshot(m, roles)
    train(m, roles)
    mgr.save(2, roles)
    mgr.close()
    fault_proxy.configure()  # zero the log
    return cloud, cfg, first, snapshot(m, roles)


def test_s3_resume_fetches_each_object_once_concurrently(saved, fault_proxy, tmp_path):
    cloud, cfg, _first, second = saved
    m2, roles2, state = _resume(cfg)
    assert state.step == 2
    assert_same(second, snapshot(m2, roles2))  # bitwise
    gets = _object_gets(fault_proxy, cloud.bucket)
    files = json.loads(cloud.fs().cat_file(f"{cloud.bucket}/run/global_step_2/{MANIFEST_FILE}"))["files"]
    assert gets.pop(f"run/global_step_2/{MANIFEST_FILE}") == [(0, -1)]  # the manifest once
    gets.pop("run/latest_ckpt_global_step.txt", None)
    # finding the fallbacks reads the lineage (parent_step) from the other manifest, once
    assert gets.pop(f"run/global_step_1/{MANIFEST_FILE}", [(0, -1)]) == [(0, -1)]
    for rel, info in files.items():  # verify_on_resume (default): every file read, each once
        assert _fetched_once(gets.pop(f"run/global_step_2/{rel}"), info["size"]), (rel, fault_proxy.requests)
    assert not gets, f"fetched objects the load does not need: {sorted(gets)}"
    ranged = [r for r in fault_proxy.requests if r[2]]
    assert len(ranged) > 4  # model_state.pt and optimizer_state.pt in 64 KiB chunks
    assert fault_proxy.max_in_flight > 1
    assert _staged_leftovers(tmp_path) == [] and (tmp_path / "stage").is_dir()


def test_s3_corrupt_object_is_caught_while_downloading_and_falls_back(saved, fault_proxy, tmp_path, caplog):
    cloud, cfg, first, _second = saved
    fs = cloud.fs()
    key = f"{cloud.bucket}/run/global_step_2/policy/model_state.pt"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum tells
    fs.pipe_file(key, bytes(data))
    fault_proxy.configure()
    with caplog.at_level(logging.WARNING, logger="skyrl_callbacks"):
        m2, roles2, state = _resume(cfg)
    assert state.step == 1
    assert_same(first, snapshot(m2, roles2))
    # caught as it was downloaded, before anything was loaded from it
    assert "policy/model_state.pt: checksum mismatch (xxh3_64) while loading (downloaded)" in caplog.text
    gets = _object_gets(fault_proxy, cloud.bucket)
    corrupt = gets["run/global_step_2/policy/model_state.pt"]
    assert len(corrupt) > 1 and _fetched_once(corrupt, len(data))  # ranged GETs, no second download
    assert _staged_leftovers(tmp_path) == []


def test_s3_failed_load_removes_the_staging_dir_and_names_the_object(saved, fault_proxy, tmp_path):
    cloud, cfg, _first, _second = saved
    m2, roles2 = make(seed=5, width=WIDTH // 2)
    mgr = CheckpointManager(cfg)
    mgr.storage.chunk_size = CHUNK
    with pytest.raises(IncompatibleCheckpointError) as info:
        mgr.resume(roles2)
    assert "s3://" in str(info.value) and "policy/model_state.pt" in str(info.value)
    assert ".skyrl-resume-" not in str(info.value)  # the object named, not its local copy
    gets = _object_gets(fault_proxy, cloud.bucket)
    assert len(gets["run/global_step_2/policy/model_state.pt"]) > 1  # it was staged (ranged GETs) ...
    assert _staged_leftovers(tmp_path) == []  # ... and the copies are gone


def test_s3_unwritable_staging_dir_is_a_storage_error_not_a_fallback(saved, tmp_path):
    """The local copies cannot be written (here: cloud_staging_dir below a file; a full disk alike): the
    checkpoint is fine, so no fallback to an older one; the error names the setting and the fix."""
    from skyrl_callbacks.errors import CorruptCheckpointError, StorageError

    _cloud, cfg, _first, _second = saved
    (tmp_path / "a_file").write_text("x")
    m2, roles2 = make(seed=5, width=WIDTH)
    with pytest.raises(StorageError) as info:
        CheckpointManager({**cfg, "cloud_staging_dir": str(tmp_path / "a_file" / "stage")}).resume(roles2)
    assert not isinstance(info.value, CorruptCheckpointError)
    assert "global_step_2" in str(info.value) and "cloud_staging_dir" in str(info.value)


@pytest.mark.parametrize("backlog", [0, 256 << 20])
def test_fetch_files_hashes_out_of_order_chunks_in_file_order(s3_server, tmp_path, monkeypatch, backlog):
    """Chunks that arrive early are kept in memory, or (backlog full) read back from the local copy:
    the digest is the whole object's either way, and the copy is byte-identical."""
    import os

    from skyrl_callbacks import prefetch
    from skyrl_callbacks.manifest import _hasher

    monkeypatch.setattr(prefetch, "_BACKLOG_MAX", backlog)
    bucket = s3_server.make_bucket("chunks")
    fs = Cloud("s3", "s3", s3_server, bucket).fs()
    data = os.urandom((1 << 20) + 12345)
    fs.pipe_file(f"{bucket}/obj", data)
    fs.pipe_file(f"{bucket}/empty", b"")
    local, empty = str(tmp_path / "x" / "obj"), str(tmp_path / "x" / "empty")
    digests = prefetch.fetch_files(fs, [(f"{bucket}/obj", local, len(data)), (f"{bucket}/empty", empty, 0)],
                                   max_concurrency=8, chunk_size=32 << 10, deadline_s=30, algo="xxh3_64")
    want = _hasher("xxh3_64")
    want.update(data)
    assert digests[f"{bucket}/obj"] == want.hexdigest()
    assert digests[f"{bucket}/empty"] == _hasher("xxh3_64").hexdigest()
    assert open(local, "rb").read() == data and os.path.getsize(empty) == 0
