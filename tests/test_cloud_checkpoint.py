"""Checkpoints on object stores, end to end, against real servers (moto S3, the GCS emulator).

No mocks of the store: every byte goes over HTTP on 127.0.0.1; faults come from a real
TCP proxy (resets and ``503 SlowDown``). Covered: save/resume/retention on S3 and GCS in
both upload modes, multipart uploads, the manifest-last commit (an upload without a
manifest is invisible and is removed after the next commit), ``from_path`` with a cloud
URL, transient and persistent faults, an HF export to S3 loaded back with
``from_pretrained``, and a Lightning run SIGKILLed and resumed bitwise from S3 and GCS.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

fsspec = pytest.importorskip("fsspec")

from skyrl_callbacks import CheckpointConfig, CheckpointManager  # noqa: E402
from skyrl_callbacks.errors import CheckpointError, CheckpointNotFoundError, ConfigError, StorageError  # noqa: E402
from skyrl_callbacks.roles import Role, assign_optimizers, discover_roles  # noqa: E402
from skyrl_callbacks import storage as storage_module  # noqa: E402
from skyrl_callbacks.storage import MANIFEST_FILE, Storage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


# --------------------------------------------------------------------------- helpers


@dataclass
class Cloud:
    kind: str  # "s3" | "gcs"
    proto: str  # URL scheme
    server: object
    bucket: str

    @property
    def options(self) -> dict:
        return dict(self.server.storage_options)

    def url(self, *parts: str) -> str:
        return "/".join([f"{self.proto}://{self.bucket}", *parts])

    def fs(self):
        """A fresh filesystem of our own, independent of the code under test."""
        return fsspec.filesystem(self.proto, skip_instance_cache=True, **self.options)

    def keys(self, *parts: str) -> dict[str, int]:
        """``{relative key: size}`` of every object below ``parts``."""
        fs = self.fs()
        prefix = f"{self.bucket}/{'/'.join(parts)}".rstrip("/")
        try:
            found = fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            if info.get("type") == "directory" or path.endswith("/.skyrl_lock.json"):
                continue  # the run lock (skyrl_callbacks.lock) is not part of any checkpoint
            out[str(path).split("://")[-1][len(prefix) + 1 :]] = int(info["size"])
        return out


@pytest.fixture(params=["s3", "gcs"])
def cloud(request) -> Cloud:
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        return Cloud("s3", "s3", server, server.make_bucket("ckpt"))
    server = request.getfixturevalue("gcs_server")
    return Cloud("gcs", "gs", server, server.make_bucket("ckpt"))


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.policy = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))
        self.critic = nn.Linear(8, 1)


def make(seed: int = 0, width: int = 16, steps: int = 1):
    """A policy + critic with AdamW/SGD and schedulers, trained ``steps`` steps."""
    torch.manual_seed(seed)
    m = Net(width)
    op = torch.optim.AdamW(m.policy.parameters(), lr=1e-2)
    oc = torch.optim.SGD(m.critic.parameters(), lr=1e-2, momentum=0.9)
    sp = torch.optim.lr_scheduler.StepLR(op, 2, 0.5)
    roles = discover_roles(m)
    assign_optimizers(roles, [op, oc], [sp])
    train(m, roles, steps)
    return m, roles


def train(m: Net, roles, steps: int = 1) -> None:
    for _ in range(steps):
        x = torch.randn(4, 8)
        (m.policy(x).pow(2).mean() + m.critic(x).pow(2).mean()).backward()
        for r in roles:
            for o in r.optimizers:
                o.step()
                o.zero_grad()
            for s in r.schedulers:
                s.step()


def snapshot(m: Net, roles) -> dict:
    return copy.deepcopy({
        "model": m.state_dict(),
        "optim": [o.state_dict() for r in roles for o in r.optimizers],
        "sched": [s.state_dict() for r in roles for s in r.schedulers],
    })


def assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for oa, ob in zip(a["optim"], b["optim"], strict=True):
        assert oa["param_groups"] == ob["param_groups"]
        for pid, st in oa["state"].items():
            for key, val in st.items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(ob["state"][pid][key])), (pid, key)
    assert a["sched"] == b["sched"]


def config(cloud: Cloud, tmp_path: Path, run: str = "run", *, options=None, **kw) -> dict:
    return dict(
        ckpt_path=cloud.url(run),
        export_path=cloud.url(run + "-export"),
        storage_options=options if options is not None else cloud.options,
        cloud_staging_dir=str(tmp_path / "stage"),
        **kw,
    )


def stage_leftovers(tmp_path: Path) -> list[str]:
    d = tmp_path / "stage"
    return [p.name for p in d.iterdir() if p.name.startswith("skyrl-stage-")] if d.exists() else []


def manifest_of(cloud: Cloud, *parts: str) -> dict:
    return json.loads(cloud.fs().cat_file(f"{cloud.bucket}/{'/'.join(parts)}/{MANIFEST_FILE}"))


# --------------------------------------------------------------------------- config and dependencies


def test_cloud_config_keys_are_validated():
    c = CheckpointConfig(ckpt_path="s3://b/run", cloud_upload="stream", cloud_retry_deadline_s=5)
    assert (c.cloud_upload, c.cloud_retry_deadline_s, c.cloud_staging_dir) == ("stream", 5.0, None)
    assert CheckpointConfig().cloud_upload == "staged"
    for bad in ({"cloud_upload": "async"}, {"cloud_staging_dir": "s3://b/tmp"}, {"cloud_retry_deadline_s": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            CheckpointConfig(**bad)
    # credentials never reach trainer_state.pt
    c = CheckpointConfig(ckpt_path="s3://b/run", storage_options={"key": "AKIA", "secret": "s", "endpoint_url": "http://x"})
    assert c.to_dict()["storage_options"] == {"key": "***", "secret": "***", "endpoint_url": "http://x"}


def _python(code: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=str(ROOT),
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_missing_s3fs_or_gcsfs_names_the_extra():
    """s3fs/gcsfs absent (simulated with a sys.modules block): MissingDependencyError naming the extra."""
    proc = _python(
        """
        import sys
        sys.modules["s3fs"] = None
        sys.modules["gcsfs"] = None
        from skyrl_callbacks import CheckpointManager
        from skyrl_callbacks.errors import MissingDependencyError
        for url, module, extra in (("s3://b/run", "s3fs", "s3"), ("gs://b/run", "gcsfs", "gcs"), ("gcs://b/run", "gcsfs", "gcs")):
            try:
                CheckpointManager({"ckpt_path": url})
            except MissingDependencyError as exc:
                assert exc.module == module and exc.extra == extra, (exc.module, exc.extra)
                assert f"skyrl-callbacks[{extra}]" in str(exc), str(exc)
                assert isinstance(exc, ImportError)
            else:
                raise SystemExit(f"no MissingDependencyError for {url}")
        CheckpointManager({"ckpt_path": "memory://run"})  # other fsspec URLs still work
        print("OK")
        """
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_env_vars_configure_the_stores(s3_server, gcs_server, monkeypatch):
    """No storage_options: the endpoint and credentials come from the usual environment variables."""
    import gcsfs
    import s3fs

    for k, v in {
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "STORAGE_EMULATOR_HOST": gcs_server.endpoint_url,
    }.items():
        monkeypatch.setenv(k, v)
    urls = [f"s3://{s3_server.make_bucket('env')}/run", f"gs://{gcs_server.make_bucket('env')}/run"]
    try:
        for url in urls:
            # filesystems are cached by their options: make sure the environment is read afresh
            s3fs.S3FileSystem.clear_instance_cache()
            gcsfs.GCSFileSystem.clear_instance_cache()
            m = nn.Linear(3, 3)
            CheckpointManager({"ckpt_path": url}).save(1, [Role("policy", m)])
            m2 = nn.Linear(3, 3)
            mgr = CheckpointManager({"ckpt_path": url})
            assert mgr.committed_steps() == [1] and mgr.read_pointer() == 1
            mgr.resume([Role("policy", m2)])
            assert torch.equal(m.weight, m2.weight)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.mark.parametrize("mode", ["staged", "stream"])
def test_memory_url_save_resume_retention(mode, tmp_path):
    """Any fsspec URL works (memory:// here), with the object-store commit protocol."""
    url = f"memory://skyrl-test-{mode}-{os.getpid()}/run"
    cfg = dict(ckpt_path=url, max_ckpts_to_keep=2, cloud_upload=mode, cloud_staging_dir=str(tmp_path / "stage"))
    m, roles = make()
    mgr = CheckpointManager(cfg)
    for step in (1, 2, 3):
        train(m, roles)
        mgr.save(step, roles)
    want = snapshot(m, roles)
    assert mgr.committed_steps() == [2, 3] and mgr.read_pointer() == 3
    m2, roles2 = make(seed=1)
    assert CheckpointManager(cfg).resume(roles2).step == 3
    assert_same(want, snapshot(m2, roles2))
    assert stage_leftovers(tmp_path) == []
    Storage(url).rm(url)


def test_resaving_a_step_whose_old_copy_is_still_being_deleted_waits_for_the_deletion(tmp_path):
    """Object stores: retention removes a retired checkpoint's objects in the background, in the very
    directory a new save of that step writes into. A re-save of the step (a rollback) waits for the
    deletion; otherwise the late delete would remove the new checkpoint's files after its commit."""
    import threading

    url = f"memory://skyrl-test-resave-{os.getpid()}/run"
    cfg = dict(ckpt_path=url, max_ckpts_to_keep=1, cloud_upload="stream")
    m, roles = make()
    mgr = CheckpointManager(cfg)
    release = threading.Event()
    rm = mgr.storage.rm

    def slow_rm(path, *args, **kwargs):  # the real delete; retention's background one held back until released
        if path.rstrip("/").endswith("global_step_1") and threading.current_thread().name.startswith("skyrl-retention"):
            release.wait(30)
        return rm(path, *args, **kwargs)

    mgr.storage.rm = slow_rm
    train(m, roles)
    mgr.save(1, roles)
    mgr.save(2, roles)  # retires step 1: its manifest goes now, its objects in the background (held)
    assert mgr.committed_steps() == [2]
    train(m, roles)
    want = snapshot(m, roles)
    threading.Timer(0.5, release.set).start()
    mgr.save(1, roles)  # must not write into global_step_1 before the held delete has run
    mgr.close()
    m2, roles2 = make(seed=1)
    assert CheckpointManager({**cfg, "resume_mode": "from_path", "resume_path": f"{url}/global_step_1"}).resume(roles2).step == 1
    assert_same(want, snapshot(m2, roles2))
    Storage(url).rm(url)


# --------------------------------------------------------------------------- S3 and GCS


@pytest.mark.parametrize("mode", ["staged", "stream"])
def test_async_save_uploads_in_the_background(cloud, mode, tmp_path):
    """async_save on object stores: the upload runs in the background, the manifest and the
    pointer follow at the commit, retention after it; the checkpoint holds the saved step."""
    cfg = config(cloud, tmp_path, max_ckpts_to_keep=2, cloud_upload=mode, async_save=True)
    m, roles = make()
    mgr = CheckpointManager(cfg)
    snaps = {}
    for step in (1, 2, 3):
        train(m, roles)
        snaps[step] = snapshot(m, roles)
        assert mgr.save(step, roles, data_state={"pos": step}).pending
        train(m, roles)  # the weights move on while the upload runs
    assert mgr.committed_steps() == [1, 2] and mgr.read_pointer() == 2
    mgr.close()
    assert mgr.committed_steps() == [2, 3] and mgr.read_pointer() == 3
    assert stage_leftovers(tmp_path) == []
    m2, roles2 = make(seed=7)
    state = CheckpointManager({**cfg, "verify_on_resume": True}).resume(roles2)
    assert (state.step, state.data_state) == (3, {"pos": 3})
    assert_same(snaps[3], snapshot(m2, roles2))


@pytest.mark.parametrize("mode", ["staged", "stream"])
def test_save_resume_retention(cloud, mode, tmp_path):
    """Save 4 steps keeping 2; resume bitwise; the manifest lists every object with its size."""
    cfg = config(cloud, tmp_path, max_ckpts_to_keep=2, cloud_upload=mode)
    m, roles = make()
    mgr = CheckpointManager(cfg)
    snaps = {}
    for step in (1, 2, 3, 4):
        train(m, roles)
        mgr.save(step, roles, trainer_state={"note": f"step {step}"}, data_state={"pos": step})
        snaps[step] = snapshot(m, roles)
    assert stage_leftovers(tmp_path) == []  # local stages removed after each save
    mgr.wait_retention()  # retired checkpoints' objects are deleted in the background

    # retention: only the newest two remain, nothing of the deleted ones is left behind
    top = {k.split("/")[0] for k in cloud.keys("run")}
    assert top == {"global_step_3", "global_step_4", "latest_ckpt_global_step.txt"}
    assert mgr.committed_steps() == [3, 4] and mgr.read_pointer() == 4

    # the manifest is the complete list of objects, with their sizes
    objects = cloud.keys("run", "global_step_4")
    manifest = manifest_of(cloud, "run", "global_step_4")
    assert {k: v["size"] for k, v in manifest["files"].items()} == {k: v for k, v in objects.items() if k != MANIFEST_FILE}
    assert {"policy/model_state.pt", "policy/optimizer_state.pt", "policy/lr_scheduler_state.pt",
            "critic/model_state.pt", "critic/optimizer_state.pt", "data.pt", "trainer_state.pt"} <= set(objects)
    assert all(v["hash"] for v in manifest["files"].values())  # checksums recorded without read-back

    # latest resume, verifying checksums too
    m2, roles2 = make(seed=7)
    state = CheckpointManager({**cfg, "verify_on_resume": True}).resume(roles2)
    assert (state.step, state.trainer_state["note"], state.data_state) == (4, "step 4", {"pos": 4})
    assert_same(snaps[4], snapshot(m2, roles2))

    # from_path with a cloud URL of an older step
    m3, roles3 = make(seed=8)
    state = CheckpointManager({**cfg, "resume_mode": "from_path", "resume_path": cloud.url("run", "global_step_3")}).resume(roles3)
    assert state.step == 3 and state.path == cloud.url("run", "global_step_3")
    assert_same(snaps[3], snapshot(m3, roles3))
    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager({**cfg, "resume_mode": "from_path", "resume_path": cloud.url("run", "global_step_1")}).resume(roles3)


@pytest.mark.parametrize("mode", ["staged", "stream"])
def test_multipart_uploads(s3_server, mode, tmp_path, monkeypatch):
    """Files above the threshold go up as multipart uploads (staged and streamed) and read back exactly."""
    cloud = Cloud("s3", "s3", s3_server, s3_server.make_bucket("mp"))
    width = 1 << 18  # policy: 3.4 M parameters, 13.6 MB; AdamW state twice that
    m, roles = make(width=width)
    mgr = CheckpointManager(config(cloud, tmp_path, cloud_upload=mode))
    mgr.storage.multipart_threshold = mgr.storage.chunk_size = 5 * MiB
    mgr.save(1, roles)
    objects = cloud.keys("run", "global_step_1")
    big = {k: v for k, v in objects.items() if v > 10 * MiB}
    assert {"policy/model_state.pt", "policy/optimizer_state.pt"} <= set(big), objects
    client = s3_server.client()
    for key in big:  # multipart ETags end in -<number of parts>
        assert "-" in client.head_object(Bucket=cloud.bucket, Key=f"run/global_step_1/{key}")["ETag"], key
    assert client.list_multipart_uploads(Bucket=cloud.bucket).get("Uploads", []) == []
    # reading back: files above READ_IN_MEMORY_MAX are downloaded to a temp file in the stage dir
    monkeypatch.setattr(storage_module, "READ_IN_MEMORY_MAX", 1 << 20)
    m2, roles2 = make(seed=3, width=width)
    CheckpointManager(config(cloud, tmp_path)).resume(roles2)
    assert_same(snapshot(m, roles), snapshot(m2, roles2))
    assert [p.name for p in (tmp_path / "stage").iterdir()] == []  # temp downloads are gone


def test_upload_without_manifest_is_invisible_and_removed_after_next_commit(cloud, tmp_path, monkeypatch):
    """A crash between upload and commit leaves objects but no manifest: resume, listing and
    retention ignore them, and the next commit removes them."""
    cfg = config(cloud, tmp_path, max_ckpts_to_keep=1)
    m, roles = make()
    CheckpointManager(cfg).save(5, roles)
    want = snapshot(m, roles)

    train(m, roles)
    crashing = CheckpointManager(cfg)

    def crash(self, staging, final, manifest):
        raise KeyboardInterrupt("simulated kill between upload and commit")

    monkeypatch.setattr(Storage, "commit", crash)
    with pytest.raises(KeyboardInterrupt):
        crashing.save(10, roles)
    monkeypatch.undo()
    leftover = cloud.keys("run", "global_step_10")
    assert "policy/model_state.pt" in leftover and MANIFEST_FILE not in leftover

    mgr = CheckpointManager(cfg)
    assert mgr.committed_steps() == [5] and mgr.read_pointer() == 5
    m2, roles2 = make(seed=9)
    assert mgr.resume(roles2).step == 5
    assert_same(want, snapshot(m2, roles2))
    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager({**cfg, "resume_mode": "from_path", "resume_path": cloud.url("run", "global_step_10")}).resume(roles2)

    # the next commit (step 15, keep 1) removes step 5 by retention and the step-10 upload as a leftover
    mgr.save(15, roles2)
    top = {k.split("/")[0] for k in cloud.keys("run")}
    assert top == {"global_step_15", "latest_ckpt_global_step.txt"}


def test_hf_export_to_s3_is_published_manifest_last(s3_server, tmp_path, monkeypatch):
    """HF export to an s3:// export_path: every file uploaded before the manifest; loads with
    from_pretrained from a local download and gives the same logits."""
    transformers = pytest.importorskip("transformers")
    from tests.hf_utils import tiny_llama

    cloud = Cloud("s3", "s3", s3_server, s3_server.make_bucket("export"))
    model = tiny_llama(seed=0).eval()
    mgr = CheckpointManager(config(cloud, tmp_path))
    events = []
    orig_upload, orig_put = Storage.upload_files, Storage._put_bytes

    def upload(self, local_top, remote_top, rels):
        rels = list(rels)
        out = orig_upload(self, local_top, remote_top, rels)
        events.extend(("upload", r) for r in rels)
        return out

    def put(self, path, data):
        events.append(("put", path.rsplit("/", 1)[-1]))
        return orig_put(self, path, data)

    monkeypatch.setattr(Storage, "upload_files", upload)
    monkeypatch.setattr(Storage, "_put_bytes", put)
    out = mgr.export_hf(7, Role("policy", model))
    monkeypatch.undo()
    assert out == cloud.url("run-export", "global_step_7", "policy")
    assert events[-1] == ("put", MANIFEST_FILE), events
    assert {e[1] for e in events[:-1] if e[0] == "upload"} >= {"config.json", "model.safetensors"}

    objects = cloud.keys("run-export", "global_step_7", "policy")
    manifest = manifest_of(cloud, "run-export", "global_step_7", "policy")
    assert {k: v["size"] for k, v in manifest["files"].items()} == {k: v for k, v in objects.items() if k != MANIFEST_FILE}

    local = tmp_path / "download"
    cloud.fs().get(f"{cloud.bucket}/run-export/global_step_7/policy/", str(local), recursive=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(local)).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


# --------------------------------------------------------------------------- faults


def _proxy_options(fault_proxy) -> dict:
    # no botocore-level retries (their backoff sleeps up to seconds): s3fs's short retry loop
    # and skyrl_callbacks.cloud.retrying (bounded by cloud_retry_deadline_s) do the work
    return {**fault_proxy.storage_options, "config_kwargs": {"retries": {"total_max_attempts": 1}}}


@pytest.mark.parametrize("mode", ["staged", "stream"])
def test_transient_faults_are_retried(s3_server, fault_proxy, mode, tmp_path):
    """Resets and 503 SlowDown on every 3rd request: save, retention and resume all succeed."""
    cloud = Cloud("s3", "s3", s3_server, s3_server.make_bucket("flaky"))
    cfg = config(cloud, tmp_path, options=_proxy_options(fault_proxy), cloud_upload=mode, max_ckpts_to_keep=1,
                 cloud_retry_deadline_s=30)
    m, roles = make()
    fault_proxy.configure(mode="mixed", every_nth=3)
    mgr = CheckpointManager(cfg)
    mgr.save(1, roles)
    train(m, roles)
    mgr.save(2, roles)
    m2, roles2 = make(seed=5)
    assert CheckpointManager(cfg).resume(roles2).step == 2
    counters = fault_proxy.counters()
    assert counters["resets"] > 2 and counters["slowdowns"] > 2, counters
    fault_proxy.heal()
    assert_same(snapshot(m, roles), snapshot(m2, roles2))
    assert {k.split("/")[0] for k in cloud.keys("run")} == {"global_step_2", "latest_ckpt_global_step.txt"}


@pytest.mark.parametrize("phase", ["upload", "commit", "stream"])
def test_persistent_outage_fails_the_save_and_keeps_the_previous_checkpoint(s3_server, fault_proxy, phase, tmp_path, monkeypatch):
    """The store starts failing for good in the middle of a save: the save raises a
    CheckpointError within the retry deadline, the pointer is not moved, the previous
    checkpoint still resumes, and the next good save cleans up."""
    import time

    cloud = Cloud("s3", "s3", s3_server, s3_server.make_bucket("outage"))
    mode = "stream" if phase == "stream" else "staged"
    cfg = config(cloud, tmp_path, options=_proxy_options(fault_proxy), cloud_upload=mode, cloud_retry_deadline_s=2)
    m, roles = make()
    mgr = CheckpointManager(cfg)
    mgr.save(1, roles)
    want = snapshot(m, roles)
    train(m, roles)

    def go_down():
        fault_proxy.fault_always(mode="mixed")

    if phase == "upload":
        orig = Storage.upload_files
        monkeypatch.setattr(Storage, "upload_files", lambda self, *a: (go_down(), orig(self, *a))[1])
    elif phase == "commit":
        orig = Storage.commit
        monkeypatch.setattr(Storage, "commit", lambda self, *a: (go_down(), orig(self, *a))[1])
    else:
        orig = Storage._open_write
        monkeypatch.setattr(Storage, "_open_write", lambda self, p: (go_down(), orig(self, p))[1])
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        mgr.save(2, roles)
    elapsed = time.monotonic() - t0
    assert isinstance(info.value, StorageError), repr(info.value)
    assert elapsed < 30, elapsed
    assert fault_proxy.counters()["requests_faulted"] > 1
    monkeypatch.undo()
    fault_proxy.heal()

    direct = config(cloud, tmp_path)  # read the store around the proxy
    check = CheckpointManager(direct)
    assert check.read_pointer() == 1 and check.committed_steps() == [1]
    assert MANIFEST_FILE not in cloud.keys("run", "global_step_2")
    m2, roles2 = make(seed=4)
    assert check.resume(roles2).step == 1
    assert_same(want, snapshot(m2, roles2))

    mgr.save(3, roles)  # the store is back: the next save works and removes the failed upload
    assert mgr.committed_steps() == [1, 3] and mgr.read_pointer() == 3
    assert cloud.keys("run", "global_step_2") == {}


def test_outage_during_retention_does_not_fail_a_committed_save(s3_server, fault_proxy, tmp_path, monkeypatch, caplog):
    """The store fails after the commit, while old checkpoints are deleted: the save stands
    (committed, pointer moved), a warning says so, and the next save does the cleanup."""
    cloud = Cloud("s3", "s3", s3_server, s3_server.make_bucket("retention"))
    cfg = config(cloud, tmp_path, options=_proxy_options(fault_proxy), max_ckpts_to_keep=1, cloud_retry_deadline_s=1)
    m, roles = make()
    mgr = CheckpointManager(cfg)
    mgr.save(1, roles)
    orig = CheckpointManager._retention
    monkeypatch.setattr(CheckpointManager, "_retention",
                        lambda self, step: (fault_proxy.fault_always("503"), orig(self, step))[1])
    result = mgr.save(2, roles)
    monkeypatch.undo()
    fault_proxy.heal()
    assert result.step == 2 and "retention after global_step_2 failed" in caplog.text
    assert mgr.read_pointer() == 2 and mgr.committed_steps() == [1, 2]
    mgr.save(3, roles)
    assert mgr.committed_steps() == [3]


# --------------------------------------------------------------------------- Lightning, SIGKILL, exact resume


@pytest.fixture(scope="module")
def straight_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cloud-straight")


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_lightning_sigkill_and_resume_from_the_cloud_is_bitwise_identical(kind, request, tmp_path, straight_dir):
    """A Lightning RL-shaped run checkpointing to S3/GCS (keeping 1), SIGKILLed at step 8 and
    rerun, resumes from global_step_5 in the bucket and ends bitwise identical (weights,
    optimizers, schedulers, RNG, batch order) to an uninterrupted local run."""
    from tests.resume_harness import check_exact_resume

    server = request.getfixturevalue("s3_server" if kind == "s3" else "gcs_server")
    bucket = server.make_bucket("lightning")
    url = f"{'s3' if kind == 's3' else 'gs'}://{bucket}/run"
    # the same arguments as tests/test_exact_resume.py's first case: the local straight run is shared
    args = ["--steps", "16", "--interval", "5", "--manual", "--shuffle", "global"]
    ckpt_args = ["--keep", "1", "--storage-options", json.dumps(server.storage_options)]
    out = check_exact_resume(tmp_path, straight_dir, args, kill_at=8, expect_resume=5, ckpt_args=ckpt_args, ckpt_path=url)
    assert f"resumed from {url}/global_step_5" in out
    cloud = Cloud(kind, url.split("://")[0], server, bucket)
    assert {k.split("/")[0] for k in cloud.keys("run")} == {"global_step_16", "latest_ckpt_global_step.txt"}


# --------------------------------------------------------------------------- two ranks (FSDP2 on gloo)


def _fsdp_rank(rank: int, work: str, port: int, spec_json: str) -> None:
    """One rank of :func:`test_two_ranks_fsdp_sharded_save_resume_and_failure_on_one_rank`."""
    from datetime import timedelta

    import torch.distributed as tdist
    from torch.distributed.fsdp import fully_shard

    from tests.servers import FaultProxy

    spec = json.loads(spec_json)
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                             timeout=timedelta(seconds=120))
    out: dict = {"rank": rank}

    def build(seed: int):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 13), nn.Tanh(), nn.Linear(13, 13), nn.Tanh(), nn.Linear(13, 5))
        for i in (0, 2, 4):
            fully_shard(model[i])
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, Role("policy", model, [opt])

    def step(model, role) -> None:
        torch.manual_seed(100 + rank)
        model(torch.randn(4, 8)).pow(2).mean().backward()
        role.optimizers[0].step()
        role.optimizers[0].zero_grad()

    def local_state(model, role) -> list:
        vals = [p.to_local().detach().clone() for p in model.parameters()]
        for p in model.parameters():
            st = role.optimizers[0].state[p]
            vals += [st["exp_avg"].to_local().clone(), st["exp_avg_sq"].to_local().clone(), st["step"].clone()]
        return vals

    try:
        cfg = dict(spec["cfg"])
        model, role = build(0)
        step(model, role)
        CheckpointManager(cfg).save(1, [role])  # staged: each rank uploads its own shards
        step(model, role)
        CheckpointManager({**cfg, "cloud_upload": "stream"}).save(2, [role])  # DCP's FsspecWriter
        ref = local_state(model, role)

        # rank 1 alone loses the store (through its own fault proxy) while uploading step 3
        opts = dict(cfg["storage_options"])
        proxy = None
        if rank == 1:
            proxy = FaultProxy("127.0.0.1", spec["s3_port"]).start()
            opts["endpoint_url"] = proxy.endpoint_url
            opts["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
        mgr3 = CheckpointManager({**cfg, "storage_options": opts, "cloud_retry_deadline_s": 2})
        if proxy is not None:
            orig = Storage.upload_files

            def failing_upload(self, *a):
                proxy.fault_always("mixed")
                return orig(self, *a)

            Storage.upload_files = failing_upload
        step(model, role)
        try:
            mgr3.save(3, [role])
            out["failure"] = None
        except CheckpointError as exc:
            out["failure"] = [type(exc).__name__, type(exc.__cause__).__name__, str(exc)]
        finally:
            if proxy is not None:
                Storage.upload_files = orig
                proxy.stop()

        model2, role2 = build(1)
        mgr = CheckpointManager(cfg)
        state = mgr.resume([role2])
        out["resumed"] = state.step
        out["committed"] = mgr.committed_steps()
        out["pointer"] = mgr.read_pointer()
        got = local_state(model2, role2)
        out["equal"] = len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))
        out["stage_left"] = [n for n in os.listdir(cfg["cloud_staging_dir"]) if n.startswith("skyrl-stage-")]
    except BaseException:  # noqa: BLE001 - reported to the test
        import traceback

        out["error"] = traceback.format_exc()
        raise
    finally:
        with open(os.path.join(work, f"rank{rank}.json"), "w") as fh:
            json.dump(out, fh)
        tdist.destroy_process_group()


def test_two_ranks_fsdp_sharded_save_resume_and_failure_on_one_rank(s3_server, tmp_path):
    """World size 2 (FSDP2 on gloo): every rank writes and uploads only its own shards (staged)
    or streams them (DCP fsspec writer); resume reads them back per rank, bitwise. When the
    store fails for one rank only, the save raises on both ranks and the pointer stays."""
    from tests.servers import free_port

    cloud = Cloud("s3", "s3", s3_server, s3_server.make_bucket("ranks"))
    cfg = config(cloud, tmp_path)
    os.makedirs(cfg["cloud_staging_dir"], exist_ok=True)
    spec = json.dumps({"cfg": cfg, "s3_port": s3_server.port})
    code = (
        "import sys, torch.multiprocessing as mp\n"
        "from tests.test_cloud_checkpoint import _fsdp_rank\n"
        f"mp.start_processes(_fsdp_rank, args=({str(tmp_path)!r}, {free_port()}, {spec!r}), nprocs=2, join=True, "
        "start_method='fork')\n"
    )
    proc = _python(code, env={"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, timeout=240)
    results = []
    for r in (0, 1):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
        results.append(json.loads(path.read_text()))
    assert proc.returncode == 0, [r.get("error") for r in results] + [proc.stderr[-3000:]]
    for res in results:
        assert res["resumed"] == 2 and res["committed"] == [1, 2] and res["pointer"] == 2, res
        assert res["equal"], res
        assert res["stage_left"] == [], res
    # raised on both ranks: rank 1 with its own StorageError as the cause, rank 0 naming rank 1
    (kind0, _cause0, msg0), (kind1, cause1, msg1) = results[0]["failure"], results[1]["failure"]
    assert kind0 == kind1 == "RankFailure" and cause1 == "StorageError", results
    assert "upload failed on 1 rank(s): rank 1: StorageError" in msg0 and msg0 == msg1, msg0
    shards = {f"policy/{d}.dcp/{n}" for d in ("model_state", "optimizer_state") for n in ("__0_0.distcp", "__1_0.distcp", ".metadata")}
    staged = manifest_of(cloud, "run", "global_step_1")["files"]
    assert shards <= set(staged) and all(v["hash"] for v in staged.values()), staged
    # stream mode: DCP's fsspec writer wrote the shards, the manifest has their sizes (no read-back)
    streamed = manifest_of(cloud, "run", "global_step_2")["files"]
    assert shards <= set(streamed), streamed
    assert {k: v["size"] for k, v in streamed.items()} == {
        k: v for k, v in cloud.keys("run", "global_step_2").items() if k != MANIFEST_FILE
    }
    assert MANIFEST_FILE not in cloud.keys("run", "global_step_3")
