"""Benchmark: the stall of the first async save of a process, with and without prewarmed buffers.

One command::

    python bench/bench_first_save.py --gib 1 --runs 3            # CPU
    python bench/bench_first_save.py --gib 2 --runs 3 --device cuda

An async save copies the state into reusable host buffers (pinned for a GPU state) and writes
the copy in the background. Its first save allocates those buffers: fresh pages to fault in,
and on a GPU host, memory to pin. ``CheckpointManager.prewarm`` (which the integrations call
after the first optimizer step) allocates them on a background thread instead.

Each round, in a fresh worker process (fresh memory, as a new training process has):

* ``cold``: the first ``save`` of the process (buffers allocated inside the stall);
* ``prewarmed``: ``prewarm`` right after the state exists, training goes on (here: the thread is
  waited for, as a few steps would), then the first ``save``;
* ``warm``: a second ``save`` of that process (the steady state: a copy into warm buffers).

Figures are medians; the ratio is ``stall / warm stall`` of the same worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def worker(mode: str, gib: float, device: str, work: str) -> dict:
    from bench.bench_save import build_state
    from skyrl_callbacks import CheckpointManager
    from skyrl_callbacks.roles import Role

    model, opt, nbytes = build_state(gib, device)
    role = Role("policy", model, [opt], [])
    mgr = CheckpointManager(dict(ckpt_path=work, run_lock=False, async_save=True, max_ckpts_to_keep=2))
    out = {"bytes": nbytes}
    if mode == "prewarmed":
        t0 = time.perf_counter()
        mgr.prewarm([role])
        out["prewarm_call"] = time.perf_counter() - t0  # what the training loop waits for
        mgr._prewarm_thread.join()
        out["prewarm_background"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mgr.save(1, [role])
    out["first"] = time.perf_counter() - t0
    mgr.wait()
    t0 = time.perf_counter()
    mgr.save(2, [role])
    out["warm"] = time.perf_counter() - t0
    mgr.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    if args.worker:
        work = os.path.join(args.dir, f"skyrl-bench-first-{os.getpid()}")
        try:
            print(json.dumps(worker(args.worker, args.gib, args.device, work)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    rows: dict = {"cold": [], "prewarmed": []}
    for _ in range(args.runs):
        for mode in rows:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--gib", str(args.gib),
                   "--device", args.device, "--dir", args.dir]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    import torch

    med = statistics.median
    nbytes = rows["cold"][0]["bytes"]
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"# first async save, {nbytes / 2**30:.2f} GiB of state on {args.device} ({dev}), torch {torch.__version__}, "
          f"{args.runs} rounds (medians)")
    print("| mode | first save stall s | x warm stall | warm stall s | prewarm call s | prewarm thread s |")
    print("|---|---|---|---|---|---|")
    for mode, rs in rows.items():
        pc = f"{med([r['prewarm_call'] for r in rs]):.3f}" if mode == "prewarmed" else "-"
        pt = f"{med([r['prewarm_background'] for r in rs]):.3f}" if mode == "prewarmed" else "-"
        print(f"| {mode} | {med([r['first'] for r in rs]):.3f} | {med([r['first'] / r['warm'] for r in rs]):.1f} | "
              f"{med([r['warm'] for r in rs]):.3f} | {pc} | {pt} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
