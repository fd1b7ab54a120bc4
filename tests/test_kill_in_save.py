"""SIGKILL inside a real save of a real training run, and inside the background retention delete.

tests/scripts/train_lightning.py trains (Lightning, dropout, AdamW, python/numpy/torch draws in the
loss) and saves every step (``max_ckpts_to_keep=2``: every save from the third on retires a
checkpoint, deleted in the background). With ``--phase-log`` it appends ``save_start/save_end N`` and
``delete_start/delete_end NAME`` markers (CLOCK_MONOTONIC, shared with this process), recording
only. The uninterrupted run gives the reference and the save/delete durations; each trial waits for
a randomly chosen save (or delete) to start, sleeps a random fraction of the measured duration,
and SIGKILLs the whole process group. Where the kill landed is read back from the markers (a
save/delete started and not ended) and the leftovers on disk (``.tmp-`` staging, ``.trash-``); the
rerun resumes by itself and everything (weights, optimizer, schedulers, batches, python/numpy/torch
draws, final RNGs) must be bitwise equal to the uninterrupted run. At least half the kills must land
inside a save. ``SKYRL_KILL_IN_SAVE_TRIALS`` (default 2: one aimed at a save, one at a delete) sets the number of random trials; a
deterministic kill inside the retention delete (after its first file is gone) is a separate test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skyrl_callbacks import CheckpointConfig, CheckpointManager
from tests.resume_harness import SCRIPT, assert_states_equal, read_batches

ARGS = ["--steps", "10", "--interval", "1", "--keep", "2", "--shuffle", "generator"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")


def _cmd(run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, str(SCRIPT), "--ckpt-path", str(run_dir / "ckpts"), "--log", str(run_dir / "batches"),
            "--out", str(run_dir / "final.pt"), "--phase-log", str(run_dir / "phases"), *ARGS, *extra]


def _start(run_dir: Path, extra: list[str] = ()) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "output.txt", "a")
    return subprocess.Popen(_cmd(run_dir, list(extra)), env=ENV, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, run_dir: Path, expect_kill: bool = False, timeout: float = 300) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"timed out: {(run_dir / 'output.txt').read_text()[-3000:]}") from None
    out = (run_dir / "output.txt").read_text()
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, out[-3000:])
    else:
        assert proc.returncode == 0, (proc.returncode, out[-5000:])


def markers(run_dir: Path) -> list[tuple[float, str, str]]:
    path = run_dir / "phases"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((float(parts[0]), parts[1], parts[2]))
    return out


def open_phases(marks) -> list[str]:
    """The saves/deletes started and not ended: ["save 5", "delete .trash-global_step_3-..."]."""
    started: dict[tuple[str, str], int] = {}
    for _t, what, arg in marks:
        kind, _, edge = what.partition("_")
        if edge == "start":
            started[(kind, arg)] = 1
        elif edge in ("end", "kill"):
            started.pop((kind, arg), None)
    return [f"{k} {a}" for k, a in started]


def durations(marks, kind: str) -> list[float]:
    starts, out = {}, []
    for t, what, arg in marks:
        if what == f"{kind}_start":
            starts[arg] = t
        elif what == f"{kind}_end" and arg in starts:
            out.append(t - starts.pop(arg))
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("straight")
    _finish(_start(run_dir), run_dir)
    marks = markers(run_dir)
    windows = {"save": statistics.median(durations(marks, "save")[1:]),  # the first save includes warm-up
               "delete": statistics.median(durations(marks, "delete"))}
    return run_dir, windows


def check_rerun(straight_dir: Path, run_dir: Path, first_lines: int, resumed: int | None) -> None:
    """The rerun (already finished) equals the uninterrupted run, bitwise."""
    a = torch.load(straight_dir / "final.pt", weights_only=False)
    b = torch.load(run_dir / "final.pt", weights_only=False)
    assert b["resumed_step"] == resumed
    assert_states_equal(a, b)
    ref, got = read_batches(straight_dir / "batches"), read_batches(run_dir / "batches")
    per_step = len(ref) // a["step"]
    effective = got[: (resumed or 0) * per_step] + got[first_lines:]
    for key in ("idx", "noise", "py", "np"):
        assert [x[key] for x in effective] == [x[key] for x in ref], f"{key} stream differs after the resume"


def _kill_inside(proc: subprocess.Popen, run_dir: Path, kind: str, nth: int, window: float,
                 rng: random.Random, timeout: float = 240) -> None:
    """Wait until the ``nth`` (or a later) ``kind`` phase is running, sleep a random part of ``window``,
    SIGKILL the group. A phase that ended before the kill is due is skipped for the next one."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        marks = markers(run_dir)
        running = [p for p in open_phases(marks) if p.startswith(kind + " ")]
        seen = sum(1 for _t, what, _a in marks if what == f"{kind}_start")
        if running and seen >= nth:
            target = running[-1]
            time.sleep(rng.uniform(0.0, (0.5 if kind == "save" else 0.3) * window))
            if target in open_phases(markers(run_dir)):
                os.killpg(proc.pid, signal.SIGKILL)
                return
            nth = seen + 1  # it ended meanwhile: the next one
        time.sleep(0.002)
    raise AssertionError(f"no {kind} #{nth} to kill inside (saw {seen}): "
                         f"{(run_dir / 'output.txt').read_text()[-2000:]}")


def test_random_sigkill_inside_saves_and_deletes_resumes_bitwise(tmp_path, straight):
    straight_dir, windows = straight
    rng = random.Random(2027)
    trials = int(os.environ.get("SKYRL_KILL_IN_SAVE_TRIALS", "2"))
    landings = []
    for i in range(trials):
        kind = "save" if i % 2 == 0 else "delete"  # saves on even trials, retention deletes on odd ones
        run_dir = tmp_path / f"trial{i}"
        proc = _start(run_dir)
        try:
            _kill_inside(proc, run_dir, kind, nth=rng.randint(3, 5), window=windows[kind], rng=rng)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        _finish(proc, run_dir, expect_kill=True)
        ckpts = run_dir / "ckpts"
        landed = open_phases(markers(run_dir))
        leftovers = sorted(p.name.rsplit("-", 1)[0] for p in ckpts.iterdir() if p.name.startswith((".tmp-", ".trash-")))
        committed = CheckpointManager(CheckpointConfig(ckpt_path=str(ckpts), run_lock=False)).committed_steps()
        first = len(read_batches(run_dir / "batches"))
        _finish(_start(run_dir), run_dir)  # the rerun resumes by itself
        check_rerun(straight_dir, run_dir, first, max(committed) if committed else None)
        assert not [p.name for p in ckpts.iterdir() if p.name.startswith((".tmp-", ".trash-"))], "leftovers remain"
        landings.append({"target": kind, "open": landed, "leftovers": leftovers, "resumed": max(committed) if committed else None})
    summary = json.dumps({"windows_s": windows, "landings": landings})
    print(f"kill landings: {summary}")
    in_save = sum(1 for entry in landings if any(p.startswith("save ") for p in entry["open"]))
    assert in_save * 2 >= trials, f"only {in_save} of {trials} kills landed inside a save: {summary}"


def test_sigkill_inside_background_retention_delete(tmp_path, straight):
    """The third retirement dies after deleting the first file of the retired checkpoint (renamed to
    ``.trash-`` already, so invisible): the rerun resumes bitwise and removes the half-deleted leftover."""
    straight_dir, _ = straight
    run_dir = tmp_path / "killed"
    _finish(_start(run_dir, ["--kill-in-delete", "3"]), run_dir, expect_kill=True)
    ckpts = run_dir / "ckpts"
    assert any(what == "delete_kill" for _t, what, _a in markers(run_dir))
    trash = [p for p in ckpts.iterdir() if p.name.startswith(".trash-global_step_3-")]
    assert len(trash) == 1, sorted(p.name for p in ckpts.iterdir())
    committed = CheckpointManager(CheckpointConfig(ckpt_path=str(ckpts), run_lock=False)).committed_steps()
    assert 3 not in committed and len(committed) >= 2
    first = len(read_batches(run_dir / "batches"))
    _finish(_start(run_dir), run_dir)
    check_rerun(straight_dir, run_dir, first, max(committed))
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith((".tmp-", ".trash-"))], "leftover not removed"
