"""Preemption: a real SIGTERM/SIGUSR1 to a real training process -> finish the step, save, exit 0, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "train_lightning.py"


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(SCRIPT), "--ckpt-path", str(tmp_path / "c"), "--log", str(tmp_path / "b"),
           "--out", str(tmp_path / "o.pt"), "--steps", "100000", "--interval", "100000", "--manual", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.parametrize("sig,devices", [("SIGTERM", 1), ("SIGUSR1", 1), ("SIGTERM", 2)])
def test_signal_saves_and_exits_cleanly(tmp_path, sig, devices):
    proc = start(tmp_path, "--devices", str(devices))
    log = tmp_path / "b.rank0"
    deadline = time.time() + 120
    while lines(log) < 3:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    os.killpg(proc.pid, getattr(signal, sig))  # every rank gets it, as a scheduler does
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted" in out, out[-3000:]
    ckpts = tmp_path / "c"
    step = int((ckpts / "latest_ckpt_global_step.txt").read_text())
    assert (ckpts / f"global_step_{step}" / "skyrl_manifest.json").is_file()
    # the step being trained when the signal came was finished and is the one saved
    assert step == lines(log) and step >= 3
    for rank in range(devices):
        assert lines(tmp_path / f"b.rank{rank}") == step
    # rerun: it resumes at the next step
    proc2 = start(tmp_path, "--devices", str(devices))
    deadline = time.time() + 120
    while lines(log) < step + 2:
        assert proc2.poll() is None, proc2.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc2.pid, signal.SIGTERM)
    out2, _ = proc2.communicate(timeout=120)
    assert f"continuing at step {step + 1}" in out2, out2[-3000:]
    assert proc2.returncode == 0
