"""Concurrent-run guard: a second live run on one ckpt_path is refused; a dead run's lock is taken over."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skyrl_callbacks import CheckpointConfig, CheckpointLockError, CheckpointManager
from skyrl_callbacks.lock import LOCK_FILE
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


# --------------------------------------------------------------------------- races
RACER = """
import json, os, sys
from skyrl_callbacks import CheckpointLockError
from skyrl_callbacks.lock import RunLock
from skyrl_callbacks.storage import Storage
opts = json.loads(sys.argv[1]) if len(sys.argv) > 1 else None
if opts is not None:
    import s3fs  # noqa: F401 - imported before the race, not during its first trial
print("ready", flush=True)
for line in sys.stdin:  # one trial per line: a fresh ckpt_path; every lock taken stays held
    lock = RunLock(Storage(line.strip(), opts), heartbeat_s=0)
    try:
        lock.acquire()
        print(json.dumps({"held": True, "pid": os.getpid()}), flush=True)
    except CheckpointLockError as exc:
        print(json.dumps({"held": False, "pid": os.getpid(), "error": str(exc)}), flush=True)
"""


def _racers(first_cmd: list, opts=None, env=None) -> list:
    args = [RACER] + ([json.dumps(opts)] if opts is not None else [])
    procs = [subprocess.Popen(first_cmd + [sys.executable, "-c", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env),
             subprocess.Popen([sys.executable, "-c", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    return procs


def _race(procs, roots, gap_s: float = 0.03) -> None:
    """Each trial: the first process starts taking the lock, the second ``gap_s`` later; exactly one
    holds it and the other is refused, naming the holder."""
    for root in roots:
        procs[0].stdin.write(root + "\n")
        procs[0].stdin.flush()
        time.sleep(gap_s)
        procs[1].stdin.write(root + "\n")
        procs[1].stdin.flush()
        a, b = (json.loads(p.stdout.readline()) for p in procs)
        assert a["held"] != b["held"], (root, a, b)  # exactly one holds it
        winner, loser = (a, b) if a["held"] else (b, a)
        assert f"pid {winner['pid']}" in loser["error"] and "in use by another live run" in loser["error"], loser


def _stop(procs) -> None:
    for p in procs:
        p.kill()
        p.wait()


def _strace_slow_fsync() -> list:
    """strace prefix that makes every fsync of the traced process 100 ms slower ([] if strace cannot trace here)."""
    if shutil.which("strace") is None:
        return []
    cmd = ["strace", "-f", "-qq", "--seccomp-bpf", "-o", os.devnull, "-e", "trace=fsync,fdatasync",
           "-e", "inject=fsync,fdatasync:delay_exit=100000"]
    return cmd if subprocess.run(cmd + ["true"], capture_output=True).returncode == 0 else []


def test_two_runs_racing_for_one_local_lock_exactly_one_holds(tmp_path):
    """Two real processes, the second starting 30 ms after the first, whose every fsync is 100 ms slower (before
    the atomic create both took the lock); then both taking over one dead lock at once. 10 trials."""
    strace = _strace_slow_fsync()
    procs = _racers(strace)
    try:
        _race(procs, [str(tmp_path / f"c{i}") for i in range(6)])
        roots = []
        for i in range(4):
            root = tmp_path / f"d{i}"
            root.mkdir()
            (root / LOCK_FILE).write_text(json.dumps({"owner": "x", "host": "h", "pid": 1, "heartbeat": time.time() - 3600}))
            roots.append(str(root))
        _race(procs, roots, gap_s=0.0)
    finally:
        _stop(procs)
    assert not [p for p in tmp_path.rglob("*") if ".dead-" in p.name or ".new-" in p.name]  # nothing left behind
    if not strace:
        pytest.skip("strace cannot trace here: the races ran without the slow fsyncs")


def test_two_runs_race_for_one_s3_lock_exactly_one_holds(s3_server, s3_bucket):
    """Real processes against the moto server: the conditional PUT (If-None-Match) lets exactly one win."""
    procs = _racers([], opts=s3_server.storage_options)
    try:
        _race(procs, [f"s3://{s3_bucket}/c{i}" for i in range(4)], gap_s=0.0)
        # a dead run's lock on S3 is taken over by exactly one of two racers (If-Match on its ETag)
        fs = Storage(f"s3://{s3_bucket}", s3_server.storage_options).fs
        roots = [f"s3://{s3_bucket}/d{i}" for i in range(3)]
        for root in roots:
            fs.pipe(f"{root}/{LOCK_FILE}".split("://", 1)[1],
                    json.dumps({"owner": "x", "host": "h", "pid": 1, "heartbeat": time.time() - 3600}).encode())
        _race(procs, roots, gap_s=0.0)
    finally:
        _stop(procs)
