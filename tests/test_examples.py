"""The runnable examples: a few steps each (the *_tiny.yaml configs), killed and rerun.

Both examples run side by side: first run SIGKILLed (whole process group) as soon as a
checkpoint is committed, then the same command again must say it resumed from that
checkpoint, finish, print the reward curve and where checkpoints and exports went.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
TINY_STEPS = 30


def _cmd(name: str, ckpt: Path) -> list[str]:
    return [sys.executable, str(EXAMPLES / f"{name}.py"), "--config", str(EXAMPLES / "configs" / f"{name}_tiny.yaml"),
            "--ckpt-path", str(ckpt)]


def _start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    fh = open(log, "w")
    try:
        return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        fh.close()


def _finish(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def test_examples_kill_and_resume(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    pytest.importorskip("lightning")
    names = ["ppo_lightning", "grpo_accelerate"]
    ckpt = {n: tmp_path / n / "ckpts" for n in names}
    logs = {n: tmp_path / f"{n}.first.log" for n in names}
    procs = {n: _start(_cmd(n, ckpt[n]), tmp_path, logs[n]) for n in names}
    # SIGKILL each process group as soon as its first checkpoint is committed
    killed_at: dict[str, int] = {}
    deadline = time.monotonic() + 180
    try:
        while len(killed_at) < len(names) and time.monotonic() < deadline:
            for n, proc in procs.items():
                pointer = ckpt[n] / "latest_ckpt_global_step.txt"
                if n in killed_at:
                    continue
                if pointer.exists():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed_at[n] = int(pointer.read_text())
                elif proc.poll() is not None:
                    pytest.fail(f"{n} exited ({proc.returncode}) before a checkpoint existed:\n{logs[n].read_text()[-3000:]}")
            time.sleep(0.05)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert set(killed_at) == set(names), {n: logs[n].read_text()[-2000:] for n in names}
    for n in names:
        assert procs[n].returncode == -signal.SIGKILL, (n, logs[n].read_text()[-2000:])
        assert killed_at[n] < TINY_STEPS, f"{n} finished before it could be killed"

    reruns = {n: _start(_cmd(n, ckpt[n]), tmp_path, tmp_path / f"{n}.rerun.log") for n in names}
    for n, proc in reruns.items():
        _finish(proc, 180)
    for n in names:
        out = (tmp_path / f"{n}.rerun.log").read_text()
        assert reruns[n].returncode == 0, (n, out[-4000:])
        step = killed_at[n]
        assert f"[skyrl-ckpt] resumed from {ckpt[n]}/global_step_{step}; continuing at step {step + 1}" in out, (
            n, out[-3000:])
        assert "reward:" in out and "(first 10 steps) ->" in out, (n, out[-2000:])
        assert f"checkpoints: {ckpt[n]} (latest: global_step_{TINY_STEPS})" in out, (n, out[-2000:])
        assert (ckpt[n] / f"global_step_{TINY_STEPS}" / "policy" / "model_state.pt").is_file()
        assert (ckpt[n] / "latest_ckpt_global_step.txt").read_text().strip() == str(TINY_STEPS)
        exports = Path(f"{ckpt[n]}_hf")
        assert (exports / f"global_step_{TINY_STEPS}" / "policy" / "model.safetensors").is_file(), n
        assert (exports / f"global_step_{TINY_STEPS}" / "policy" / "tokenizer.json").is_file(), n
        assert "[skyrl-ckpt] step" in out and "MB in" in out  # the per-save summary line
    assert (ckpt["ppo_lightning"] / f"global_step_{TINY_STEPS}" / "critic" / "model_state.pt").is_file()
    assert not (ckpt["grpo_accelerate"] / f"global_step_{TINY_STEPS}" / "critic").exists()
    assert not (tmp_path / "runs").exists()  # --ckpt-path moved everything


def test_example_configs() -> None:
    """The YAML configs carry SkyRL's checkpoint keys in a trainer: section, with paths under ./runs."""
    from skyrl_callbacks import CheckpointConfig

    for name in ("ppo_lightning", "grpo_accelerate"):
        for suffix in ("", "_tiny"):
            cfg = CheckpointConfig.from_yaml(str(EXAMPLES / "configs" / f"{name}{suffix}.yaml"))
            # relative paths are resolved against the working directory when the config is made
            assert cfg.ckpt_path == os.path.abspath(f"runs/{name}{suffix}/ckpts")
            assert cfg.export_path == os.path.abspath(f"runs/{name}{suffix}/exports")
            assert cfg.resume_mode == "latest" and cfg.hf_save_interval > 0 and cfg.ckpt_interval > 0
            assert "total_steps" in cfg.extra and "algorithm" in cfg.extra
