"""Preemption in the Accelerate glue: a real SIGTERM/SIGUSR1 to a real ``bind/step/finish`` loop.

The loop (tests/scripts/accelerate_loop.py, ``Accelerator(cpu=True)``) must finish the step in
progress, save and commit it, and exit with code 0 on every rank; the rerun resumes at the
next step. One process, and two processes under torchrun (the signal to every worker, or to
rank 1 only: every rank must still agree to stop). In-process checks cover the handler
bookkeeping (installed by ``bind``, restored by ``finish`` / the stop).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from tests.test_accelerate import _free_port, _kill_tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "accelerate_loop.py"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
TIMEOUT = 120


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _start(run: Path, nproc: int, *extra: str) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    script = [str(SCRIPT), "--ckpt-path", str(run / "ckpts"), "--batch-log", str(run / "batches"),
              "--out", str(run / "final.pt"), "--steps", "100000", "--interval", "100000", "--hf-interval", "100000",
              "--step-sleep", "0.05", *extra]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        torchrun = shutil.which("torchrun")
        launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        cmd = [*launcher, "--nproc_per_node", str(nproc), "--master_port", str(_free_port()), *script]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _workers(proc: subprocess.Popen, nproc: int) -> list[int]:
    """The training processes, by rank (torchrun's children in start order; or the process itself)."""
    if nproc == 1:
        return [proc.pid]
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == proc.pid and b"accelerate_loop.py" in cmdline:
                kids.append(int(entry))
    return sorted(kids)


def _wait_steps(proc: subprocess.Popen, run: Path, nproc: int, at_least: int) -> None:
    deadline = time.time() + TIMEOUT
    while min(_lines(run / f"batches.rank{r}") for r in range(nproc)) < at_least:
        if proc.poll() is not None:
            raise AssertionError(f"the loop ended early (rc {proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            _kill_tree(proc.pid)
            raise AssertionError(f"the loop did not reach step {at_least}:\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.1)


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"the loop did not stop after the signal:\n{out[-4000:]}") from None
    return out


def _committed_pointer(ckpts: Path) -> int:
    step = int((ckpts / "latest_ckpt_global_step.txt").read_text())
    assert (ckpts / f"global_step_{step}" / "skyrl_manifest.json").is_file()
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith((".tmp", ".trash"))]
    assert not (ckpts / ".skyrl_lock.json").exists(), "the run lock was not released"
    return step


@pytest.mark.parametrize(
    "nproc,sig,target,extra",
    [
        (1, "SIGTERM", "all", ()),
        (1, "SIGUSR1", "all", ("--no-exit-on-preemption",)),
        (2, "SIGTERM", "all", ()),
        (2, "SIGUSR1", "rank1", ()),
    ],
    ids=["1proc-SIGTERM", "1proc-SIGUSR1-flag", "2proc-SIGTERM-every-rank", "2proc-SIGUSR1-rank1-only"],
)
def test_signal_finishes_step_saves_and_exits_cleanly(tmp_path, nproc, sig, target, extra):
    run = tmp_path / "run"
    proc = _start(run, nproc, *extra)
    try:
        _wait_steps(proc, run, nproc, 3)
        pids = _workers(proc, nproc)
        assert len(pids) == nproc, pids
        for pid in pids if target == "all" else pids[1:]:  # as a scheduler does (all), or one rank only
            os.kill(pid, getattr(signal, sig))
        out = _finish(proc)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert proc.returncode == 0, out[-4000:]
    assert "preempted (" in out, out[-4000:]
    step = _committed_pointer(run / "ckpts")
    # the step in progress when the signal came was finished, and it is the step saved, on every rank
    for rank in range(nproc):
        assert _lines(run / f"batches.rank{rank}") == step >= 3, (rank, step, out[-3000:])
    # no final export of a preempted run (hf_save_interval is set, so finish() would export otherwise)
    assert not (run / "ckpts_export").exists()
    if "--no-exit-on-preemption" in extra:
        assert f"leaves the loop after step {step}" in out
        final = torch.load(run / "final.pt.rank0", weights_only=False)  # the script went on after finish()
        assert final["step"] == step
    if sig != "SIGTERM":
        return  # the rerun is checked once per process count
    # rerun: it resumes at the next step and goes on
    proc2 = _start(run, nproc, *extra)
    try:
        _wait_steps(proc2, run, nproc, step + 2)
        for pid in _workers(proc2, nproc):
            os.kill(pid, signal.SIGTERM)
        out2 = _finish(proc2)
    finally:
        if proc2.poll() is None:
            _kill_tree(proc2.pid)
    assert proc2.returncode == 0, out2[-4000:]
    assert f"continuing at step {step + 1}" in out2, out2[-4000:]
    assert _committed_pointer(run / "ckpts") >= step + 2


# --------------------------------------------------------------------------- in-process bookkeeping
def _bound(tmp_path, **cfg):
    from skyrl_callbacks import SkyRLCheckpoint

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = SkyRLCheckpoint({"ckpt_path": str(tmp_path / "c"), "ckpt_interval": 100, **cfg})
    return ckpt, model, opt


def test_handlers_installed_by_bind_restored_by_finish(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    ckpt, model, opt = _bound(tmp_path)
    state = ckpt.bind(None, policy=model, optimizers=[opt])
    assert signal.getsignal(signal.SIGUSR1) is not before
    ckpt.step()
    ckpt.finish()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert not state.should_stop


def test_in_process_signal_raises_preempted_exit_code_0(tmp_path):
    from skyrl_callbacks.integrations.accelerate import Preempted

    before = signal.getsignal(signal.SIGTERM)
    ckpt, model, opt = _bound(tmp_path)
    state = ckpt.bind(None, policy=model, optimizers=[opt])
    ckpt.step()
    os.kill(os.getpid(), signal.SIGTERM)  # only recorded: nothing happens until the step ends
    with pytest.raises(Preempted) as info:
        ckpt.step()
    assert info.value.code == 0 and isinstance(info.value, SystemExit)
    assert info.value.step == 2 and info.value.signal == "SIGTERM"
    assert state.should_stop and state.preempted == "SIGTERM"
    assert int((tmp_path / "c" / "latest_ckpt_global_step.txt").read_text()) == 2
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (tmp_path / "c" / ".skyrl_lock.json").exists()


def test_preemption_signals_empty_installs_nothing(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    ckpt, model, opt = _bound(tmp_path, preemption_signals=[])
    ckpt.bind(None, policy=model, optimizers=[opt])
    assert signal.getsignal(signal.SIGUSR1) is before
    ckpt.finish()


def test_exit_on_preemption_must_be_bool(tmp_path):
    from skyrl_callbacks.errors import ConfigError

    ckpt, model, opt = _bound(tmp_path)
    with pytest.raises(ConfigError, match="exit_on_preemption='no'"):
        ckpt.bind(None, policy=model, optimizers=[opt], exit_on_preemption="no")


def test_handlers_restored_when_resume_fails(tmp_path):
    from skyrl_callbacks.errors import CheckpointError

    before = signal.getsignal(signal.SIGTERM)
    ckpt, model, opt = _bound(tmp_path, resume_mode="from_path", resume_path=str(tmp_path / "c" / "global_step_3"))
    with pytest.raises(CheckpointError):
        ckpt.bind(None, policy=model, optimizers=[opt])
    assert signal.getsignal(signal.SIGTERM) is before
