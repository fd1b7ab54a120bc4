"""SIGKILL during a save leaves the previous checkpoint resumable and never a torn one visible."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skyrl_callbacks import CheckpointConfig, CheckpointManager
from skyrl_callbacks.roles import discover_roles

SCRIPT = Path(__file__).parent / "scripts" / "save_loop.py"
sys.path.insert(0, str(SCRIPT.parent))
from save_loop import build  # noqa: E402


def run(ckpt: Path, *args: str, check_kill: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--ckpt-path", str(ckpt), *args], capture_output=True, text=True, timeout=120)
    if check_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def check_resumable(ckpt: Path, width: int, expect_step: int | None = None) -> int:
    """Resume picks a committed step whose bytes are exactly that step's; returns it."""
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(ckpt)))
    committed = mgr.committed_steps()
    assert committed, "no committed checkpoint survived"
    pointer = mgr.read_pointer()
    # the pointer never names an incomplete checkpoint; it may lag one commit behind after a kill
    assert pointer is None or pointer in committed, f"pointer names {pointer}, committed are {committed}"
    m = build(0, width)
    roles = discover_roles(m)
    roles[0].optimizers = [torch.optim.SGD(m.policy.parameters(), lr=0.1)]
    state = mgr.resume(roles)
    assert state.step == max(committed)
    ref = build(state.step, width)
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), f"{k} does not hold the bytes of step {state.step}"
    assert state.data_state == {"step": state.step}
    for problems in [mgr.verify(mgr.step_dir(s), checksums=True) for s in committed]:
        assert problems == []
    if expect_step is not None:
        assert state.step == expect_step
    return state.step


@pytest.mark.parametrize(
    "phase,expect",
    [("write", 3), ("before_commit", 3), ("after_rename", 4), ("before_pointer", 4), ("after_pointer", 4), ("retention", 4)],
)
def test_kill_at_each_phase(tmp_path, phase, expect):
    ckpt = tmp_path / "ckpts"
    run(ckpt, "--steps", "3", "--width", "32")
    run(ckpt, "--start", "4", "--steps", "1", "--width", "32", "--kill-phase", phase, "--kill-step", "4", check_kill=True)
    check_resumable(ckpt, 32, expect_step=expect)
    # the run goes on: the next save commits and cleans up the leftovers of the killed one
    run(ckpt, "--start", "5", "--steps", "1", "--width", "32")
    assert check_resumable(ckpt, 32) == 5
    leftovers = [p.name for p in ckpt.iterdir() if p.name.startswith((".tmp", ".trash"))]
    assert leftovers == []


def test_random_sigkill_trials(tmp_path):
    """Kill a save loop at random moments (most of its time is spent saving)."""
    rng = random.Random(1234)
    trials = int(os.environ.get("SKYRL_CRASH_TRIALS", "4"))
    width = 768  # ~7 MB of state per checkpoint, so kills land inside saves
    ckpt = tmp_path / "ckpts"
    run(ckpt, "--steps", "1", "--width", str(width))
    start = 2
    for _ in range(trials):
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--ckpt-path", str(ckpt), "--start", str(start), "--steps", "1000",
             "--width", str(width)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # wait until it is past imports and saving, then kill at a random moment
        line = proc.stdout.readline()
        assert line.startswith("saved"), proc.stderr.read()[-2000:]
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        start = check_resumable(ckpt, width) + 1
