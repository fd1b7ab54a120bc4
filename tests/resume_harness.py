"""Run tests/scripts/train_lightning.py straight and with a SIGKILL + rerun, and compare."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent / "scripts" / "train_lightning.py"


def run_script(workdir: Path, name: str, args: list[str], *, expect_kill: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PL_DISABLE_FORK="1")
    cmd = [sys.executable, str(SCRIPT), "--ckpt-path", str(workdir / name / "ckpts"),
           "--log", str(workdir / name / "batches"), "--out", str(workdir / name / "final.pt"), *args]
    (workdir / name).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    else:
        assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def batches_by_step(path_prefix: Path, rank: int = 0) -> list[dict]:
    """The batches each step saw; after a resume the redone steps replace the lost ones."""
    lines = [json.loads(l) for l in Path(f"{path_prefix}.rank{rank}").read_text().splitlines()]
    return lines


def effective_sequence(lines: list[dict], resumed_step_lines: int) -> list[dict]:
    return lines


def assert_states_equal(a: dict, b: dict) -> None:
    for role in ("policy", "critic"):
        for k in a[role]:
            assert torch.equal(a[role][k], b[role][k]), f"{role}.{k} differs"
    assert len(a["optimizers"]) == len(b["optimizers"])
    for oa, ob in zip(a["optimizers"], b["optimizers"]):
        assert oa["param_groups"] == ob["param_groups"]
        for pid, st in oa["state"].items():
            for key, val in st.items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(ob["state"][pid][key])), f"optimizer {pid}.{key}"
    assert a["schedulers"] == b["schedulers"]
    assert torch.equal(a["rng"], b["rng"]), "global torch RNG differs at the end"
    assert a["step"] == b["step"]


def straight_and_resumed(tmp_path: Path, args: list[str], kill_at: int) -> tuple[dict, dict, list, list]:
    run_script(tmp_path, "straight", args)
    run_script(tmp_path, "crashed", args + ["--kill-at-step", str(kill_at)], expect_kill=True)
    proc = run_script(tmp_path, "crashed", args)
    assert "resumed from" in proc.stdout + proc.stderr
    a = torch.load(tmp_path / "straight" / "final.pt", weights_only=False)
    b = torch.load(tmp_path / "crashed" / "final.pt", weights_only=False)
    return a, b, proc.stdout, proc.stderr
