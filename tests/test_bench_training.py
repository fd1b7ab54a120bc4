"""Smoke test of bench/bench_training.py --cpu: a tiny Llama under Lightning, three modes, real saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_training_cpu_tiny(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "bench_training.py"), "--cpu", "--tiny", "--every", "3",
         "--modes", "none", "ours async overlap", "lightning", "--dir", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["none", "ours async overlap", "lightning"]
    assert result["env"]["every"] == 3
    for mode, row in rows.items():
        # window = steps N .. 3N-1 with 2 saves (N, 2N) inside it
        assert row["window_steps"] == 5 and row["steps_per_s"] > 0, row
        assert row["saves"] == (0 if mode == "none" else 2), row
    # the checkpointing modes really wrote checkpoints (ours: two global_step dirs; Lightning: two .ckpt files)
    assert rows["ours async overlap"]["files"] >= 2 * 3, rows["ours async overlap"]
    assert rows["lightning"]["files"] == 2, rows["lightning"]
    assert rows["none"]["files"] == 0
    assert "| ours async overlap |" in result["markdown"] and "overhead %" in result["markdown"]
    assert "N = 3" in proc.stdout
