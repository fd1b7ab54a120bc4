"""Bad input, table-driven: bad configs, paths, permissions, a full disk, a model that does not match
the checkpoint, a changed world size, bad pointer and lock files.

Every case runs against a ``ckpt_path`` that already holds two committed checkpoints
(``global_step_1``, ``global_step_2``) and asserts

* the error type,
* that the message names the cause (the key / value / path) and the fix,
* that nothing committed is touched: every file of every ``global_step_N`` and the pointer
  hash the same before and after.

A few rows are not errors by design (a garbled pointer, a changed world size of a DDP
checkpoint): they assert the warning and the outcome instead. Read-only and disk-full cases
use real tmpfs mounts (``mount -t tmpfs``, remounted read-only) when we are root and mounting
works; otherwise ``chmod`` (read-only, non-root) or a skip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from skyrl_callbacks import CheckpointConfig, CheckpointManager, SkyRLCheckpoint
from skyrl_callbacks.dist import DistContext
from skyrl_callbacks.errors import (
    CheckpointLockError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StorageError,
)
from skyrl_callbacks.roles import Role

# --------------------------------------------------------------------------- helpers
WIDTH = 16


def model_at(step: int, width: int = WIDTH, out: int = WIDTH, extra_layer: bool = False) -> nn.Module:
    layers = [nn.Linear(width, out)] + ([nn.Linear(out, out)] if extra_layer else [])
    m = nn.Sequential(*layers)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(step)
    return m


def roles_for(model: nn.Module, n_opt: int = 1, critic: nn.Module | None = None) -> list[Role]:
    params = list(model.parameters())
    opts = [torch.optim.Adam(params[i::n_opt], lr=0.1) for i in range(n_opt)]
    model(torch.ones(1, model[0].in_features)).sum().backward()
    for o in opts:
        o.step()
    roles = [Role(name="policy", model=model, optimizers=opts, schedulers=[torch.optim.lr_scheduler.StepLR(opts[0], 2)])]
    if critic is not None:
        roles.append(Role(name="critic", model=critic))
    return roles


def save_two(root: Path, **cfg) -> None:
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(root), export_path=str(root) + "_export", **cfg))
    for step in (1, 2):
        mgr.save(step, roles_for(model_at(step)), data_state={"pos": step})
    mgr.close()


def committed_hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and (rel.startswith("global_step_") or rel == "latest_ckpt_global_step.txt"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cfg(ctx, **kw) -> CheckpointConfig:
    base = {"ckpt_path": str(ctx.root), "export_path": str(ctx.root) + "_export"}
    base.update(kw)
    return CheckpointConfig(**base)


def resume(ctx, roles, **kw):
    return CheckpointManager(cfg(ctx, **kw)).resume(roles)


def save(ctx, step: int = 3, **kw):
    mgr = CheckpointManager(cfg(ctx, **kw))
    try:
        return mgr.save(step, roles_for(model_at(step)))
    finally:
        mgr.close()


# --------------------------------------------------------------------------- mounts (root only)
def _can_mount() -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    probe = Path(f"/tmp/skyrl-mount-probe-{uuid.uuid4().hex[:8]}")
    probe.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    except OSError:
        return False
    finally:
        probe.rmdir()


CAN_MOUNT = _can_mount()


class Tmpfs:
    """A small tmpfs mounted at ``path`` for one test (root only)."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)

    def remount_ro(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def ctx(tmp_path, request):
    """``ctx.root``: a ckpt_path with steps 1 and 2 committed (on a tmpfs for the mount cases)."""
    mount = None
    kind = getattr(request, "param", None)
    if kind in ("tmpfs", "tmpfs_ro"):
        if not CAN_MOUNT:
            pytest.skip("needs root and mount -t tmpfs (a real small/read-only file system)")
        mount = Tmpfs(tmp_path / "mnt", "384k")
        root = mount.path / "ckpts"
    else:
        root = tmp_path / "ckpts"
    save_two(root)
    ns = SimpleNamespace(root=root, tmp=tmp_path, mount=mount)
    yield ns
    if mount is not None:
        mount.close()


def check(ctx, action, exc_type, *needles, warn: tuple = (), caplog=None):
    before = committed_hashes(ctx.root)
    assert set(before) >= {"global_step_1/skyrl_manifest.json", "global_step_2/skyrl_manifest.json"}
    if exc_type is None:
        result = action(ctx)
    else:
        with pytest.raises(exc_type) as info:
            action(ctx)
        msg = str(info.value)
        missing = [n for n in needles if n.lower() not in msg.lower()]
        assert not missing, f"message lacks {missing}: {msg}"
        result = info.value
    for w in warn:
        assert w.lower() in caplog.text.lower(), f"no warning {w!r} in {caplog.text[-2000:]}"
    after = committed_hashes(ctx.root)
    assert after == before, "a committed file changed"
    return result


# --------------------------------------------------------------------------- 1. configs
# (kwargs, exception, needles: the cause (key=value) and the fix)
CONFIG_CASES = [
    ("ckpt_interval_str", {"ckpt_interval": "10"}, ["ckpt_interval='10'", "must be an integer", "-1 to disable"]),
    ("ckpt_interval_zero", {"ckpt_interval": 0}, ["ckpt_interval=0", "use ckpt_interval=-1"]),
    ("ckpt_interval_float", {"ckpt_interval": 2.5}, ["ckpt_interval=2.5", "integer"]),
    ("ckpt_interval_bool", {"ckpt_interval": True}, ["ckpt_interval=True", "integer"]),
    ("ckpt_interval_neg", {"ckpt_interval": -3}, ["ckpt_interval=-3", "-1 to disable"]),
    ("hf_save_interval_neg", {"hf_save_interval": -5}, ["hf_save_interval=-5", "hf_save_interval=-1"]),
    ("max_keep_zero", {"max_ckpts_to_keep": 0}, ["max_ckpts_to_keep=0", "use -1 to keep all"]),
    ("max_keep_str", {"max_ckpts_to_keep": "3"}, ["max_ckpts_to_keep='3'", "positive integer or -1"]),
    ("resume_mode_typo", {"resume_mode": "lastest"}, ["resume_mode='lastest'", "'latest'", "'from_path'"]),
    ("resume_mode_int", {"resume_mode": 1}, ["resume_mode=1", "must be one of"]),
    ("from_path_without_path", {"resume_mode": "from_path"}, ["needs resume_path", "set resume_path",
                                                              "resume_mode='latest'"]),
    ("resume_path_not_step_dir", {"resume_mode": "from_path", "resume_path": "/x/ckpts"},
     ["resume_path='/x/ckpts'", "global_step_N", "/x/ckpts/global_step_10"]),
    ("resume_path_empty", {"resume_mode": "from_path", "resume_path": ""}, ["resume_path=''", "global_step_N"]),
    ("ckpt_path_empty", {"ckpt_path": ""}, ["ckpt_path=''", "non-empty path"]),
    ("ckpt_path_none", {"ckpt_path": None}, ["ckpt_path=None", "non-empty path"]),
    ("export_path_int", {"export_path": 123}, ["export_path=123", "path or URL"]),
    ("ckpt_path_unset_env", {"ckpt_path": "${oc.env:SKYRL_SURELY_UNSET_VAR}/c"},
     ["SKYRL_SURELY_UNSET_VAR is not set", "Set SKYRL_SURELY_UNSET_VAR", "explicit path"]),
    ("ckpt_path_other_resolver", {"ckpt_path": "${now:%Y}/c"}, ["only ${oc.env:VAR}", "OmegaConf node"]),
    ("storage_options_str", {"storage_options": "endpoint"}, ["storage_options='endpoint'", "dict of fsspec options"]),
    ("state_dict_type", {"state_dict_type": "fsdp"}, ["state_dict_type='fsdp'", "'sharded' or 'full'"]),
    ("verify_on_resume_str", {"verify_on_resume": "yes"}, ["verify_on_resume='yes'", "true or false"]),
    ("save_on_train_end_int", {"save_on_train_end": 1}, ["save_on_train_end=1", "true or false"]),
    ("run_lock_str", {"run_lock": "no"}, ["run_lock='no'", "true or false"]),
    ("cloud_upload", {"cloud_upload": "multipart"}, ["cloud_upload='multipart'", "'staged' or 'stream'"]),
    ("cloud_staging_dir_url", {"cloud_staging_dir": "s3://b/stage"}, ["cloud_staging_dir='s3://b/stage'",
                                                                        "local directory"]),
    ("cloud_retry_deadline_neg", {"cloud_retry_deadline_s": -1}, ["cloud_retry_deadline_s=-1", "positive number"]),
    ("preemption_signals_str", {"preemption_signals": "SIGTERM"}, ["preemption_signals='SIGTERM'",
                                                                    "['SIGTERM', 'SIGUSR1']"]),
    ("preemption_signals_unknown", {"preemption_signals": ["SIGFOO"]}, ["'SIGFOO'", "not a signal name", "SIGTERM"]),
]


@pytest.mark.parametrize("kwargs,needles", [pytest.param(k, n, id=i) for i, k, n in CONFIG_CASES])
def test_bad_config_value(ctx, kwargs, needles):
    check(ctx, lambda c: CheckpointConfig.from_dict({"ckpt_path": str(c.root), **kwargs}), ConfigError, *needles)


def test_unknown_key_suggests_the_right_one(ctx):
    check(ctx, lambda c: CheckpointConfig.from_dict({"ckpt_intervall": 5}), ConfigError,
          "'ckpt_intervall'", "did you mean 'ckpt_interval'", "valid keys")


def test_config_not_a_mapping(ctx):
    check(ctx, lambda c: CheckpointConfig.from_dict(42), ConfigError, "expected a dict", "got int")


def test_yaml_file_missing(ctx):
    check(ctx, lambda c: SkyRLCheckpoint(str(c.tmp / "nope.yaml")), ConfigError, "nope.yaml", "cannot be read",
          "check the path")


def test_yaml_trainer_section_bad_value(ctx):
    path = ctx.tmp / "skyrl.yaml"
    path.write_text("trainer:\n  epochs: 3\n  ckpt_interval: zero\n")
    check(ctx, lambda c: CheckpointConfig.from_yaml(str(path)), ConfigError, "ckpt_interval='zero'", "integer")


# --------------------------------------------------------------------------- 2. paths
def test_resume_path_does_not_exist(ctx):
    check(ctx, lambda c: resume(c, roles_for(model_at(0)), resume_mode="from_path",
                                resume_path=str(c.root / "global_step_7")),
          CheckpointNotFoundError, "global_step_7", "not a committed checkpoint", "Committed steps under ckpt_path: [1, 2]")


def test_resume_path_is_an_interrupted_save(ctx):
    (ctx.root / "global_step_3" / "policy").mkdir(parents=True)  # a torn copy: no manifest, no trainer_state.pt
    check(ctx, lambda c: resume(c, roles_for(model_at(0)), resume_mode="from_path",
                                resume_path=str(c.root / "global_step_3")),
          CheckpointNotFoundError, "global_step_3", "interrupted save", "[1, 2]")


def test_ckpt_path_is_a_file(ctx):
    f = ctx.tmp / "afile"
    f.write_text("not a directory")
    check(ctx, lambda c: save(c, ckpt_path=str(f)), StorageError, str(f), "not a directory",
          "choose another path")


def test_ckpt_path_below_a_file(ctx):
    f = ctx.tmp / "afile2"
    f.write_text("x")
    check(ctx, lambda c: save(c, ckpt_path=str(f / "ckpts")), StorageError, "afile2", "not a directory",
          "choose another path")


def test_unsupported_url_scheme(ctx):
    check(ctx, lambda c: CheckpointManager(cfg(c, ckpt_path="foo://bucket/run")), StorageError, "foo://",
          "s3://")


def test_export_path_same_as_ckpt_path(ctx):
    check(ctx, lambda c: CheckpointConfig(ckpt_path=str(c.root), export_path=str(c.root)), ConfigError,
          "export_path", "ckpt_path", "another directory")


# --------------------------------------------------------------------------- 3. permissions, full disk
@pytest.mark.parametrize("ctx", ["tmpfs_ro"], indirect=True)
def test_read_only_ckpt_path(ctx):
    ctx.mount.remount_ro()
    err = check(ctx, lambda c: save(c), StorageError, str(ctx.root), "not writable", "writable directory")
    assert err.errno == 30  # EROFS
    # reading still works: resume from a read-only ckpt_path (no lock needed)
    state = resume(ctx, roles_for(model_at(0)))
    assert state.step == 2


def test_read_only_directory_chmod(ctx):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the read-only tmpfs case covers this as root")
    ctx.root.chmod(0o555)
    try:
        check(ctx, lambda c: save(c), StorageError, str(ctx.root), "not writable", "writable directory")
    finally:
        ctx.root.chmod(0o755)


@pytest.mark.parametrize("ctx", ["tmpfs"], indirect=True)
def test_disk_full_during_save(ctx):
    filler = ctx.mount.path / "filler"
    filler.write_bytes(b"\0" * max(0, ctx.mount.free() - 24 * 1024))  # room for the lock, not for a checkpoint
    err = check(ctx, lambda c: save(c), StorageError, "no space left", "free space", "max_ckpts_to_keep")
    assert err.errno == 28  # ENOSPC
    assert int((ctx.root / "latest_ckpt_global_step.txt").read_text()) == 2  # the pointer did not move
    filler.unlink()
    assert resume(ctx, roles_for(model_at(0))).step == 2
    save(ctx)  # with room again the next save commits and removes the leftover of the failed one
    assert not [p.name for p in ctx.root.iterdir() if p.name.startswith((".tmp", ".trash"))]


@pytest.mark.parametrize("ctx", ["tmpfs"], indirect=True)
def test_disk_full_for_the_lock(ctx):
    filler = ctx.mount.path / "filler"
    filler.write_bytes(b"\0" * ctx.mount.free())
    check(ctx, lambda c: save(c), StorageError, ".skyrl_lock.json", "no space left", "free space")


# --------------------------------------------------------------------------- 4. model vs checkpoint
def test_model_other_shape(ctx):
    check(ctx, lambda c: resume(c, roles_for(model_at(0, out=8))), IncompatibleCheckpointError,
          "model_state.pt", "does not match the policy model", "size mismatch", "same architecture")


def test_model_extra_layer_missing_keys(ctx):
    check(ctx, lambda c: resume(c, roles_for(model_at(0, extra_layer=True))), IncompatibleCheckpointError,
          "does not match the policy model", "1.weight", "same architecture")


def test_other_optimizer_count(ctx):
    check(ctx, lambda c: resume(c, roles_for(model_at(0), n_opt=2)), IncompatibleCheckpointError,
          "optimizer_state.pt", "holds 1 optimizer state(s) but the role has 2", "same optimizers")


def test_role_missing_in_checkpoint(ctx):
    check(ctx, lambda c: resume(c, roles_for(model_at(0), critic=nn.Linear(2, 2))), IncompatibleCheckpointError,
          "no critic/ directory", "same roles", "resume_mode='none'")


def test_optimizer_param_groups_differ(ctx):
    def act(c):
        roles = roles_for(model_at(0))
        roles[0].optimizers = [torch.optim.Adam([{"params": [roles[0].model[0].weight]},
                                                 {"params": [roles[0].model[0].bias]}], lr=0.1)]
        roles[0].schedulers = []
        return resume(c, roles)

    check(ctx, act, IncompatibleCheckpointError, "optimizer_state.pt", "does not match", "same optimizer")


class _TwoRankDist(DistContext):
    """Rank 0 of a pretend world of 2 (in one process): every rank holds the same state."""

    def __init__(self) -> None:
        super().__init__()
        self.world_size, self.rank = 2, 0

    def gather_to_main(self, obj):
        return [obj, obj]


def test_changed_world_size_per_rank_state(ctx, caplog):
    """A DDP checkpoint of 2 ranks resumed by 1: weights load; the per-rank RNG and data positions cannot,
    which is reported with both world sizes (not an error: elastic restarts are legitimate)."""
    other = ctx.tmp / "ws2"
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(other)), dist=_TwoRankDist())
    mgr.save(5, roles_for(model_at(5)), data_state={"pos": 5})
    mgr.close()
    caplog.set_level(logging.WARNING)
    state = check(ctx, lambda c: CheckpointManager(CheckpointConfig(ckpt_path=str(other))).resume(
        roles_for(model_at(0))), None, warn=("saved with world size 2, running with 1", "holds 2 rank states"),
        caplog=caplog)
    assert state.step == 5 and state.rng is None and state.data_state is None


# --------------------------------------------------------------------------- 5. pointer and lock files
@pytest.mark.parametrize("content", [b"global_step_2", b"\xff\xfe\x00", b"-4", b"2 3"],
                         ids=["dirname", "binary", "negative", "two-numbers"])
def test_foreign_pointer_content(ctx, caplog, content):
    (ctx.root / "latest_ckpt_global_step.txt").write_bytes(content)
    caplog.set_level(logging.WARNING)
    state = check(ctx, lambda c: resume(c, roles_for(model_at(0))), None, warn=("newest committed",), caplog=caplog)
    assert state.step == 2


def test_ckpt_path_owned_by_a_live_run(ctx):
    owner = subprocess.Popen(["sleep", "60"])
    try:
        (ctx.root / ".skyrl_lock.json").write_text(json.dumps(
            {"owner": "other-run", "host": socket.gethostname(), "pid": owner.pid, "heartbeat": time.time()}))
        check(ctx, lambda c: save(c), CheckpointLockError, str(ctx.root), f"pid {owner.pid}",
              socket.gethostname(), "use another ckpt_path")
        assert not list(ctx.root.glob(".tmp-global_step_3*")), "the refused run wrote a staging directory"
    finally:
        owner.kill()
        owner.wait()


def test_corrupt_manifest_from_path(ctx):
    (ctx.root / "global_step_2" / "skyrl_manifest.json").write_text("{not json")
    check(ctx, lambda c: resume(c, roles_for(model_at(0)), resume_mode="from_path",
                                resume_path=str(c.root / "global_step_2")),
          CorruptCheckpointError, "global_step_2", "manifest", "unreadable")


# --------------------------------------------------------------------------- 6. the Accelerate glue
def test_bind_unknown_argument(ctx):
    ckpt = SkyRLCheckpoint(cfg(ctx))
    check(ctx, lambda c: ckpt.bind(None, policy=model_at(0), optimizer=[]), ConfigError, "['optimizer']", "valid:",
          "optimizers")


def test_bind_policy_not_a_module(ctx):
    ckpt = SkyRLCheckpoint(cfg(ctx))
    check(ctx, lambda c: ckpt.bind(None, policy="gpt2"), ConfigError, "policy=", "torch.nn.Module", "str")


def test_step_without_bind(ctx):
    ckpt = SkyRLCheckpoint(cfg(ctx))
    check(ctx, lambda c: ckpt.step(), ConfigError, "need a bound loop", "ckpt.bind(accelerator")


def test_bind_extra_state_without_state_dict(ctx):
    ckpt = SkyRLCheckpoint(cfg(ctx))
    check(ctx, lambda c: ckpt.bind(None, policy=model_at(0), extra_state={"kl": object()}), ConfigError,
          "extra_state['kl']", "state_dict/load_state_dict")


# --------------------------------------------------------------------------- 7. paths that hide an overlap, unclear errors
def test_export_path_symlink_to_ckpt_path(ctx):
    link = ctx.tmp / "exports_link"
    link.symlink_to(ctx.root, target_is_directory=True)
    check(ctx, lambda c: CheckpointConfig(ckpt_path=str(c.root), export_path=str(link)), ConfigError,
          "export_path=", "exports_link", "is ckpt_path", f"resolved: {ctx.root}", "outside ckpt_path")


@pytest.mark.parametrize("ckpt,export,how", [
    ("{root}", "{root}/exports", "is inside"),
    ("{root}/run", "{root}", "contains"),
    ("s3://bucket/run", "s3a://bucket//run/", "is ckpt_path"),
    ("gs://bucket/run", "gcs://bucket/run/exports", "is inside"),
], ids=["export-inside", "ckpt-inside", "s3-alias", "gcs-inside"])
def test_export_path_overlaps_ckpt_path(ctx, ckpt, export, how):
    ck, ex = ckpt.format(root=ctx.root), export.format(root=ctx.root)
    check(ctx, lambda c: CheckpointConfig(ckpt_path=ck, export_path=ex), ConfigError, "export_path=", how,
          "ckpt_path=", "another directory")


def test_yaml_syntax_error_names_file_and_line(ctx):
    path = ctx.tmp / "broken.yaml"
    path.write_text("trainer:\n  ckpt_interval: 5\n  ckpt_path: [a, b\n  resume_mode: latest\n")
    check(ctx, lambda c: CheckpointConfig.from_yaml(str(path)), ConfigError, "broken.yaml", "YAML syntax error",
          "line 4", "resume_mode: latest", "fix the YAML")


def test_path_too_long(ctx):
    long_path = str(ctx.tmp / "/".join(["d" * 200] * 20))  # ~4 kB, every name within 255 bytes
    check(ctx, lambda c: save(c, ckpt_path=long_path), ConfigError, "ckpt_path=", "bytes long", "4096",
          "shorter ckpt_path")
    check(ctx, lambda c: CheckpointConfig(ckpt_path=str(c.tmp / ("n" * 300))), ConfigError, "300 bytes",
          "255 bytes per name", "shorter ckpt_path")


def test_pointer_file_is_a_directory(ctx, caplog):
    pointer = ctx.root / "latest_ckpt_global_step.txt"
    pointer.unlink()
    pointer.mkdir()
    caplog.set_level(logging.WARNING)
    assert resume(ctx, roles_for(model_at(0))).step == 2  # reading: a warning, the newest committed step
    assert "is a directory, not the pointer file; move it away" in caplog.text
    check(ctx, lambda c: save(c), StorageError, str(pointer), "is a directory", "move that directory away")
    assert not list(ctx.root.glob(".tmp-global_step_3*")) and not (ctx.root / "global_step_3").exists()


@pytest.mark.parametrize("heartbeat", ["soon", None, [1]], ids=["text", "null", "list"])
def test_lock_with_garbage_heartbeat(ctx, heartbeat):
    (ctx.root / ".skyrl_lock.json").write_text(json.dumps(
        {"owner": "other-run", "host": "some-other-host", "pid": 4242, "heartbeat": heartbeat}))
    check(ctx, lambda c: save(c), CheckpointLockError, ".skyrl_lock.json", "heartbeat", "not a time",
          "some-other-host", "delete", "another ckpt_path")


def test_lock_with_garbage_heartbeat_dead_pid_is_taken_over(ctx):
    """A damaged lock of this host whose pid is gone belongs to a dead run: taken over, as a stale lock is."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    (ctx.root / ".skyrl_lock.json").write_text(json.dumps(
        {"owner": "other-run", "host": socket.gethostname(), "pid": dead.pid, "heartbeat": "soon"}))
    save(ctx)
    assert (ctx.root / "global_step_3").is_dir()


def test_missing_s3_bucket(s3_server, tmp_path):
    url = f"s3://skyrl-no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    config = CheckpointConfig(ckpt_path=url, export_path=str(tmp_path / "e"),
                              storage_options=s3_server.storage_options, cloud_retry_deadline_s=5.0)
    mgr = CheckpointManager(config)
    with pytest.raises(StorageError) as info:
        mgr.save(1, roles_for(model_at(1)))
    msg = str(info.value)
    bucket = url.split("/")[2]
    for needle in (f"bucket {bucket!r} does not exist", "ckpt_path", url, f"create the bucket s3://{bucket}"):
        assert needle.lower() in msg.lower(), f"{needle!r} not in {msg}"


def test_relative_ckpt_path_resolved_at_construction(ctx, monkeypatch):
    """A relative ckpt_path means the working directory when the config was made, not after a later chdir
    (Hydra changes it per run), as Lightning's ModelCheckpoint resolves its dirpath."""
    monkeypatch.chdir(ctx.tmp)
    ckpt = SkyRLCheckpoint({"ckpt_path": "rel_ckpts", "export_path": "rel_exports"})
    elsewhere = ctx.tmp / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    mgr = CheckpointManager(ckpt.config)
    mgr.save(1, roles_for(model_at(1)))
    mgr.close()
    assert (ctx.tmp / "rel_ckpts" / "global_step_1" / "skyrl_manifest.json").is_file()
    assert not (elsewhere / "rel_ckpts").exists()
    assert ckpt.config.ckpt_path == str(ctx.tmp / "rel_ckpts")


def test_prune_keeps_a_live_runs_staging_dir(ctx, capsys):
    from skyrl_callbacks.cli import main

    staging = ctx.root / ".tmp-global_step_3-0123456789ab"
    (staging / "policy").mkdir(parents=True)
    (staging / "policy" / "model_state.pt").write_bytes(b"x" * 64)
    owner = subprocess.Popen(["sleep", "60"])
    try:
        (ctx.root / ".skyrl_lock.json").write_text(json.dumps(
            {"owner": "live-run", "host": socket.gethostname(), "pid": owner.pid, "heartbeat": time.time()}))
        check(ctx, lambda c: main(["prune", str(c.root), "--keep", "2"]), None)
        err = capsys.readouterr().err
        assert staging.is_dir(), "prune removed a live run's save in progress"
        for needle in ("not removing 1 leftover", staging.name, "live run", f"pid {owner.pid}", "after that run ends"):
            assert needle in err, f"{needle!r} not in {err}"
    finally:
        owner.kill()
        owner.wait()
    assert main(["prune", str(ctx.root), "--keep", "2"]) == 0  # the run is gone: now it is a leftover
    assert not staging.exists()


def test_stray_step_dir_with_only_trainer_state(ctx, caplog):
    """global_step_99/ holding only trainer_state.pt, no pointer: not a SkyRL-native checkpoint (no role directory
    with model files), so it is ignored with a warning and the newest intact step is resumed."""
    stray = ctx.root / "global_step_99"
    stray.mkdir()
    shutil.copy(ctx.root / "global_step_2" / "trainer_state.pt", stray / "trainer_state.pt")
    (ctx.root / "latest_ckpt_global_step.txt").unlink()
    caplog.set_level(logging.WARNING)
    state = check(ctx, lambda c: resume(c, roles_for(model_at(0))), None,
                  warn=("ignoring", "global_step_99", "role directory with model files"), caplog=caplog)
    assert state.step == 2
