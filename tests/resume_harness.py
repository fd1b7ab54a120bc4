"""Run tests/scripts/train_lightning.py straight and with a SIGKILL + rerun, and compare."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

SCRIPT = Path(__file__).parent / "scripts" / "train_lightning.py"


def run_script(workdir: Path, name: str, args: list[str], *, expect_kill: bool = False, timeout: int = 300,
               ckpt_path: Optional[str] = None) -> subprocess.CompletedProcess:
    """``ckpt_path``: a URL (s3://, gs://) instead of the local ``{workdir}/{name}/ckpts``; pass
    ``--storage-options JSON`` in ``args`` for its endpoint/credentials."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PL_DISABLE_FORK="1")
    cmd = [sys.executable, str(SCRIPT), "--ckpt-path", ckpt_path or str(workdir / name / "ckpts"),
           "--log", str(workdir / name / "batches"), "--out", str(workdir / name / "final.pt"), *args]
    (workdir / name).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    else:
        assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def read_batches(prefix: Path, rank: int = 0) -> list[dict]:
    path = Path(f"{prefix}.rank{rank}")
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


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
    assert a["py_rng"] == b["py_rng"], "python RNG differs at the end"
    assert a["np_rng"] == b["np_rng"], "numpy RNG differs at the end"
    assert a["step"] == b["step"]


_STRAIGHT_CACHE: dict[tuple, Path] = {}


def straight_run(cache_dir: Path, args: list[str]) -> Path:
    """Run (once per distinct args) the uninterrupted reference run; returns its directory."""
    key = tuple(args)
    if key not in _STRAIGHT_CACHE:
        name = f"straight{len(_STRAIGHT_CACHE)}"
        run_script(cache_dir, name, args)
        _STRAIGHT_CACHE[key] = cache_dir / name
    return _STRAIGHT_CACHE[key]


def check_exact_resume(tmp_path: Path, cache_dir: Path, args: list[str], kill_at: int, expect_resume: int, ranks: int = 1,
                       ckpt_args: Sequence[str] = (), ckpt_path: Optional[str] = None) -> str:
    """Straight run vs SIGKILL at ``kill_at`` + rerun: everything bitwise equal. Returns the rerun's output.

    ``ckpt_path``/``ckpt_args`` (e.g. a cloud URL and ``--storage-options``) apply to the
    killed and resumed runs only; the straight reference run stays local."""
    ref = straight_run(cache_dir, args)
    crash_args = list(args) + list(ckpt_args)
    run_script(tmp_path, "crashed", crash_args + ["--kill-at-step", str(kill_at)], expect_kill=True, ckpt_path=ckpt_path)
    first = {r: len(read_batches(tmp_path / "crashed" / "batches", r)) for r in range(ranks)}
    proc = run_script(tmp_path, "crashed", crash_args, ckpt_path=ckpt_path)
    out = proc.stdout + proc.stderr
    assert f"continuing at step {expect_resume + 1}" in out, out[-3000:]
    a = torch.load(ref / "final.pt", weights_only=False)
    b = torch.load(tmp_path / "crashed" / "final.pt", weights_only=False)
    assert b["resumed_step"] == expect_resume
    assert_states_equal(a, b)
    for r in range(ranks):
        straight = read_batches(ref / "batches", r)
        crashed = read_batches(tmp_path / "crashed" / "batches", r)
        lines_per_step = len(straight) // a["step"]
        effective = crashed[: expect_resume * lines_per_step] + crashed[first[r]:]
        assert [x["idx"] for x in effective] == [x["idx"] for x in straight], f"rank {r}: batch order differs"
        assert [x["noise"] for x in effective] == [x["noise"] for x in straight], f"rank {r}: RNG stream differs"
        assert [x["py"] for x in effective] == [x["py"] for x in straight], f"rank {r}: python RNG stream differs"
        assert [x["np"] for x in effective] == [x["np"] for x in straight], f"rank {r}: numpy RNG stream differs"
    return out
