"""Concurrent-run guard: a second live run on one ckpt_path is refused; a dead run's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skyrl_callbacks import CheckpointConfig, CheckpointLockError, CheckpointManager
from skyrl_callbacks.lock import LOCK_FILE, RunLock
from skyrl_callbacks.roles import discover_roles
from skyrl_callbacks.storage import Storage

HOLDER = """
import sys, time
from skyrl_callbacks.lock import RunLock
from skyrl_callbacks.storage import Storage
lock = RunLock(Storage(sys.argv[1]), heartbeat_s=0.2)
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def roles():
    m = torch.nn.Module()
    m.policy = torch.nn.Linear(2, 2)
    return discover_roles(m)


def hold(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_live_run_is_refused_and_nothing_is_touched(tmp_path):
    root = tmp_path / "c"
    first = CheckpointManager(CheckpointConfig(ckpt_path=str(root)))
    first.save(1, roles())
    first.close()
    before = sorted(p.name for p in root.rglob("*"))
    proc = hold(root)
    try:
        mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(root)))
        with pytest.raises(CheckpointLockError) as info:
            mgr.save(2, roles())
        msg = str(info.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and "another ckpt_path" in msg
        with pytest.raises(CheckpointLockError):
            mgr.acquire_lock()
        assert mgr.resume(roles()).step == 1  # reading needs no lock
        after = sorted(p.name for p in root.rglob("*") if p.name != LOCK_FILE)
        assert after == [n for n in before if n != LOCK_FILE]
        # the holder keeps its heartbeat fresh
        hb1 = json.loads((root / LOCK_FILE).read_text())["heartbeat"]
        time.sleep(0.6)
        assert json.loads((root / LOCK_FILE).read_text())["heartbeat"] > hb1
    finally:
        proc.kill()
        proc.wait()
    # the owner died (SIGKILL): its lock is taken over and saving works
    CheckpointManager(CheckpointConfig(ckpt_path=str(root))).save(2, roles())
    assert (root / "global_step_2").is_dir()


def test_stale_heartbeat_from_another_host_is_taken_over(tmp_path, caplog):
    root = tmp_path / "c"
    root.mkdir()
    (root / LOCK_FILE).write_text(json.dumps({"owner": "x", "host": "other-host", "pid": 1, "heartbeat": time.time() - 3600}))
    CheckpointManager(CheckpointConfig(ckpt_path=str(root))).save(1, roles())
    assert "dead run" in caplog.text


def test_live_lock_on_another_host_is_refused(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / LOCK_FILE).write_text(json.dumps({"owner": "x", "host": "other-host", "pid": 1, "heartbeat": time.time()}))
    with pytest.raises(CheckpointLockError, match="other-host"):
        CheckpointManager(CheckpointConfig(ckpt_path=str(root))).save(1, roles())


def test_release_and_disable(tmp_path):
    root = tmp_path / "c"
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(root)))
    mgr.save(1, roles())
    assert (root / LOCK_FILE).exists()
    mgr.close()
    assert not (root / LOCK_FILE).exists()
    (root / LOCK_FILE).write_text(json.dumps({"owner": "x", "host": "other-host", "pid": 1, "heartbeat": time.time()}))
    CheckpointManager(CheckpointConfig(ckpt_path=str(root), run_lock=False)).save(2, roles())
