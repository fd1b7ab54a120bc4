"""skyrl_callbacks.cloud against real servers: moto S3, the GCS emulator, a fault proxy.

No mocks: every byte goes over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest

fsspec = pytest.importorskip("fsspec")

from skyrl_callbacks.cloud import (  # noqa: E402
    copy_delete_move,
    download_files,
    is_transient,
    open_for_write,
    retrying,
    upload_dir,
)
from skyrl_callbacks.errors import StorageError  # noqa: E402

MiB = 1 << 20
THRESHOLD = 5 * MiB
CHUNK = 5 * MiB


# --------------------------------------------------------------------------- helpers


def _make_tree(root, big: int = 12 * MiB) -> dict[str, bytes]:
    """A checkpoint-like tree: one multipart-sized shard, small files, nesting, empty file."""
    files = {
        "model/shard-00000.pt": os.urandom(big),
        "model/shard-00001.pt": os.urandom(300_000),
        "optim/rank0/state.bin": os.urandom(70_001),
        "trainer_state.pt": os.urandom(1234),
        "empty.txt": b"",
        "deep/a/b/c/meta.json": b'{"step": 7}',
    }
    for rel, data in files.items():
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    return files


def _fs(protocol: str, storage_options: dict, *, inner_retries: bool = True):
    """A fresh (uncached) filesystem. ``inner_retries=False`` turns off botocore's and
    s3fs's own retries, so that only ``skyrl_callbacks.cloud.retrying`` retries."""
    opts = dict(storage_options)
    if protocol == "s3" and not inner_retries:
        opts["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, **opts)
    if protocol == "s3" and not inner_retries:
        fs.retries = 1  # s3fs's own loop (class attribute, default 5)
    return fs


@pytest.fixture(params=["s3", "gcs"])
def store(request):
    """``(protocol, fs, bucket)`` on each real server."""
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
    else:
        server = request.getfixturevalue("gcs_server")
    fs = _fs(request.param, server.storage_options)
    return request.param, fs, server.make_bucket(request.param)


# --------------------------------------------------------------------------- round trips


def test_upload_dir_download_round_trip(store, tmp_path):
    protocol, fs, bucket = store
    src = tmp_path / "src"
    files = _make_tree(src)
    prefix = f"{bucket}/ckpt/global_step_7"

    sizes = upload_dir(
        fs, src, prefix, max_concurrency=4, multipart_threshold=THRESHOLD, chunk_size=CHUNK
    )
    assert sizes == {rel: len(data) for rel, data in files.items()}

    remote = {p[len(prefix) + 1 :]: info["size"] for p, info in fs.find(prefix, detail=True).items()}
    assert remote == sizes
    if protocol == "s3":
        # The 12 MiB file went up as a multipart upload of 5 MiB parts (ETag "<md5>-3").
        etag = fs.info(f"{prefix}/model/shard-00000.pt")["ETag"].strip('"')
        assert etag.endswith("-3"), etag
        small = fs.info(f"{prefix}/model/shard-00001.pt")["ETag"].strip('"')
        assert "-" not in small

    dst = tmp_path / "dst"
    mapping = {f"{prefix}/{rel}": str(dst / rel) for rel in files}
    got = download_files(fs, mapping, max_concurrency=4)
    assert got == {f"{prefix}/{rel}": len(data) for rel, data in files.items()}
    for rel, data in files.items():
        assert (dst / rel).read_bytes() == data, rel
    assert not [p for p in dst.rglob("*.part-*")], "temporary download files left behind"


def test_upload_dir_with_protocol_prefix_and_overwrite(s3_server, tmp_path):
    fs = _fs("s3", s3_server.storage_options)
    bucket = s3_server.make_bucket("proto")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x.bin").write_bytes(b"old")
    upload_dir(fs, src, f"s3://{bucket}/p/")
    (src / "d" / "x.bin").write_bytes(b"new-bytes")
    assert upload_dir(fs, src, f"s3://{bucket}/p") == {"d/x.bin": 9}
    assert fs.cat(f"{bucket}/p/d/x.bin") == b"new-bytes"
    assert fs.find(f"{bucket}/p") == [f"{bucket}/p/d/x.bin"]  # not nested as p/src/...


def test_missing_bucket_and_file_fail_fast(s3_server, tmp_path):
    fs = _fs("s3", s3_server.storage_options)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        upload_dir(fs, src, "no-such-bucket-xyz/p", deadline_s=30)
    with pytest.raises(FileNotFoundError):
        download_files(fs, {f"{s3_server.make_bucket()}/missing": str(tmp_path / "m")})
    assert time.monotonic() - t0 < 10, "non-transient errors must not be retried"
    assert not (tmp_path / "m").exists()
    with pytest.raises(FileNotFoundError):
        upload_dir(fs, tmp_path / "nope", "bucket/p")


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("mode", ["reset", "503"])
def test_upload_survives_transient_faults(fault_proxy, s3_server, tmp_path, mode):
    """Client-side retries off: only ``retrying`` can get this upload through."""
    bucket = s3_server.make_bucket("faults")
    src = tmp_path / "src"
    files = _make_tree(src, big=11 * MiB)
    fault_proxy.configure(mode=mode, first_n=6)
    fs = _fs("s3", fault_proxy.storage_options, inner_retries=False)

    sizes = upload_dir(
        fs, src, f"{bucket}/ck", max_concurrency=3, multipart_threshold=THRESHOLD, chunk_size=CHUNK
    )

    c = fault_proxy.counters()
    assert c["requests_faulted"] == 6
    assert (c["resets"] if mode == "reset" else c["slowdowns"]) == 6
    assert c["forwarded"] >= len(files)
    direct = _fs("s3", s3_server.storage_options)
    assert sizes == {rel: len(d) for rel, d in files.items()}
    for rel, data in files.items():
        assert direct.cat(f"{bucket}/ck/{rel}") == data, rel


def test_default_client_retries_with_every_nth_mixed_faults(fault_proxy, s3_server, tmp_path):
    bucket = s3_server.make_bucket("mixed")
    src = tmp_path / "src"
    files = _make_tree(src, big=11 * MiB)
    fault_proxy.configure(mode="mixed", every_nth=4)
    fs = _fs("s3", fault_proxy.storage_options)
    upload_dir(fs, src, f"{bucket}/ck", multipart_threshold=THRESHOLD, chunk_size=CHUNK)
    dst = tmp_path / "dst"
    download_files(fs, {f"{bucket}/ck/{r}": str(dst / r) for r in files})
    c = fault_proxy.counters()
    assert c["resets"] >= 1 and c["slowdowns"] >= 1, c
    for rel, data in files.items():
        assert (dst / rel).read_bytes() == data


def test_download_survives_connection_resets(fault_proxy, s3_server, tmp_path):
    bucket = s3_server.make_bucket("dl")
    data = os.urandom(3 * MiB)
    _fs("s3", s3_server.storage_options).pipe(f"{bucket}/blob", data)
    fault_proxy.configure(mode="reset", first_n=3)
    fs = _fs("s3", fault_proxy.storage_options, inner_retries=False)
    download_files(fs, {f"{bucket}/blob": str(tmp_path / "blob")})
    assert (tmp_path / "blob").read_bytes() == data
    assert fault_proxy.counters()["resets"] == 3


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_persistent_faults_raise_storage_error_within_deadline(
    fault_proxy, s3_server, tmp_path, mode
):
    bucket = s3_server.make_bucket("down")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"x" * 1000)
    fault_proxy.fault_always(mode)
    fs = _fs("s3", fault_proxy.storage_options, inner_retries=False)
    deadline = 2.0
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        upload_dir(fs, src, f"{bucket}/p", deadline_s=deadline)
    elapsed = time.monotonic() - t0
    assert elapsed < deadline + 3, elapsed
    msg = str(info.value)
    assert "upload" in msg and "a.bin" in msg and "attempts" in msg, msg
    # retried at least once before the deadline (how many attempts fit in 2 s depends on the machine's load)
    assert fault_proxy.counters()["requests_faulted"] >= 2
    assert info.value.__cause__ is not None


def test_streaming_writer_small_file_retried_on_close(fault_proxy, s3_server):
    bucket = s3_server.make_bucket("stream")
    fault_proxy.configure(mode="503", first_n=2)
    fs = _fs("s3", fault_proxy.storage_options, inner_retries=False)
    with open_for_write(fs, f"{bucket}/small.pt", block_size=CHUNK) as f:
        f.write(b"abc" * 1000)
    assert fault_proxy.counters()["slowdowns"] == 2
    assert _fs("s3", s3_server.storage_options).cat(f"{bucket}/small.pt") == b"abc" * 1000


# --------------------------------------------------------------------------- streaming


def test_streaming_writer_large_file_and_abort(s3_server):
    fs = _fs("s3", s3_server.storage_options)
    bucket = s3_server.make_bucket("stream")
    data = os.urandom(12 * MiB + 17)
    with open_for_write(fs, f"{bucket}/big.pt", block_size=CHUNK) as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i : i + (1 << 20)])
        assert f.tell() == len(data)
    assert hashlib.sha256(fs.cat(f"{bucket}/big.pt")).digest() == hashlib.sha256(data).digest()

    with pytest.raises(RuntimeError):
        with open_for_write(fs, f"{bucket}/aborted.pt", block_size=CHUNK) as f:
            f.write(data)  # streams parts already
            raise RuntimeError("writer crashed")
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/aborted.pt"), "an aborted stream must not be committed"
    uploads = s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == [], "the multipart upload of the aborted stream was not aborted"


def test_streaming_writer_gcs(gcs_server):
    fs = _fs("gcs", gcs_server.storage_options)
    bucket = gcs_server.make_bucket("stream")
    data = os.urandom(6 * MiB + 5)
    with open_for_write(fs, f"{bucket}/big.pt", block_size=2 * MiB) as f:
        f.write(data)
    with open_for_write(fs, f"{bucket}/small.pt") as f:
        f.write(b"small")
    assert fs.cat(f"{bucket}/big.pt") == data
    assert fs.cat(f"{bucket}/small.pt") == b"small"


# --------------------------------------------------------------------------- moves


def test_copy_delete_move_directory_on_gcs(gcs_server, tmp_path):
    """The emulator answers 501 to moveTo; the move must not go through it (or wait ~30 s)."""
    fs = _fs("gcs", gcs_server.storage_options)
    bucket = gcs_server.make_bucket("mv")
    src = tmp_path / "src"
    files = _make_tree(src, big=6 * MiB)
    upload_dir(fs, src, f"{bucket}/.tmp-global_step_3-abc")
    t0 = time.monotonic()
    moved = copy_delete_move(fs, f"gs://{bucket}/.tmp-global_step_3-abc", f"gs://{bucket}/global_step_3")
    assert time.monotonic() - t0 < 10
    assert sorted(moved) == sorted(f"gs://{bucket}/global_step_3/{r}" for r in files)
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/.tmp-global_step_3-abc/trainer_state.pt")
    assert fs.find(f"{bucket}/.tmp-global_step_3-abc") == []
    for rel, data in files.items():
        assert fs.cat(f"{bucket}/global_step_3/{rel}") == data


def test_copy_delete_move_single_file_gcs_and_s3(gcs_server, s3_server):
    for protocol, server in (("gcs", gcs_server), ("s3", s3_server)):
        fs = _fs(protocol, server.storage_options)
        bucket = server.make_bucket("mv1")
        fs.pipe(f"{bucket}/a/manifest.json.tmp", b"{}")
        assert copy_delete_move(fs, f"{bucket}/a/manifest.json.tmp", f"{bucket}/a/manifest.json") == [
            f"{bucket}/a/manifest.json"
        ]
        fs.invalidate_cache()
        assert fs.cat(f"{bucket}/a/manifest.json") == b"{}"
        assert not fs.exists(f"{bucket}/a/manifest.json.tmp")
        with pytest.raises(FileNotFoundError):
            copy_delete_move(fs, f"{bucket}/nothing", f"{bucket}/else")


def test_copy_delete_move_local(tmp_path):
    fs = fsspec.filesystem("file")
    (tmp_path / "s" / "d").mkdir(parents=True)
    (tmp_path / "s" / "d" / "f").write_bytes(b"1")
    copy_delete_move(fs, str(tmp_path / "s"), str(tmp_path / "t"))
    assert (tmp_path / "t" / "d" / "f").read_bytes() == b"1"
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- retrying


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    "code,status,transient",
    [
        ("SlowDown", 503, True),
        ("InternalError", 500, True),
        ("RequestTimeout", 400, True),
        ("ThrottlingException", 400, True),
        ("AccessDenied", 403, False),
        ("NoSuchBucket", 404, False),
        ("NoSuchKey", 404, False),
        ("NotImplemented", 501, False),
    ],
)
def test_is_transient_botocore_codes(code, status, transient):
    pytest.importorskip("botocore")
    exc = _client_error(code, status)
    assert is_transient(exc) is transient
    # s3fs re-raises as OSError with the ClientError as cause.
    wrapped = OSError(5, str(exc))
    wrapped.__cause__ = exc
    assert is_transient(wrapped) is transient


def test_is_transient_builtin_and_gcsfs():
    assert is_transient(ConnectionResetError(104, "Connection reset by peer"))
    assert is_transient(TimeoutError("timed out"))
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(PermissionError("x"))
    assert not is_transient(ValueError("bad argument"))
    assert not is_transient(StorageError("gave up"))
    gretry = pytest.importorskip("gcsfs.retry")
    assert is_transient(gretry.HttpError({"code": 503, "message": "backend"}))
    assert is_transient(gretry.HttpError({"code": 429, "message": "rate"}))
    assert not is_transient(gretry.HttpError({"code": 403, "message": "denied"}))
    assert not is_transient(gretry.HttpError({"code": 501, "message": "nope"}))


def test_retrying_backoff_and_non_transient():
    calls = []
    sleeps = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "ok"

    assert retrying(flaky, what="flaky op", base_delay=0.1, max_delay=0.3, sleep=sleeps.append) == "ok"
    assert len(calls) == 4 and len(sleeps) == 3
    assert all(0.05 <= s <= 0.3 for s in sleeps) and sleeps[2] >= 0.15

    def denied():
        calls.append(1)
        raise PermissionError("AccessDenied")

    calls.clear()
    with pytest.raises(PermissionError):
        retrying(denied, what="x")
    assert len(calls) == 1

    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"always down failed after \d+ attempts"):
        retrying(lambda: (_ for _ in ()).throw(TimeoutError("t")), what="always down", deadline_s=0.5, base_delay=0.05, max_delay=0.1)
    assert time.monotonic() - t0 < 1.0
