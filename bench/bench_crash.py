"""Long crash mode: the crash suite's SIGKILL-at-random-moments trials, N times (docs/reliability.md).

Reuses the harness of tests/test_crash_safety.py (its save loop ``tests/scripts/save_loop.py``
and its ``check_resumable``): a process saves checkpoints back to back (``max_ckpts_to_keep=2``,
~7 MB each at the default width, so most of its time is spent inside a save: writing, checksumming,
committing, moving the pointer, retention), is SIGKILLed at a random moment, and then resume must
pick the newest committed step holding exactly that step's bytes, with the pointer naming a
committed step and every committed checkpoint verifying.

Every kill lands after the process printed its first "saved N" line, in a loop that does nothing
but save (and fill the next step's weights, a small fraction of the time): it is counted as a kill
inside a save. Kills that left a staging directory (``.tmp-global_step_*``) are counted apart: those
were certainly before the commit; "resumed N+1" after "saved N" shows a kill between the commit and
the return of ``save``.

    python bench/bench_crash.py --trials 50
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_crash_safety import SCRIPT, check_resumable  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--width", type=int, default=768, help="layer width of the saved model (768: ~7 MB per checkpoint)")
    ap.add_argument("--max-delay", type=float, default=0.6, help="kill after U(0, max-delay) s past the first save")
    ap.add_argument("--seed", type=int, default=20261129)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    work = Path(tempfile.mkdtemp(prefix="skyrl-bench-crash-", dir=args.dir))
    ckpt = work / "ckpts"
    subprocess.run([sys.executable, str(SCRIPT), "--ckpt-path", str(ckpt), "--steps", "1", "--width", str(args.width)],
                   env=env, check=True, capture_output=True, timeout=120)
    start, inside, failures, staged_left = 2, 0, [], 0
    t0 = time.time()
    for trial in range(1, args.trials + 1):
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--ckpt-path", str(ckpt), "--start", str(start),
                                 "--steps", "100000", "--width", str(args.width)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        last_saved = None
        for line in proc.stdout:  # wait until it is past imports and the first save
            if line.startswith("saved"):
                last_saved = int(line.split()[1])
                break
        time.sleep(rng.uniform(0.0, args.max_delay))
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
        for line in rest.splitlines():
            if line.startswith("saved"):
                last_saved = int(line.split()[1])
        leftovers = [p.name for p in ckpt.iterdir() if p.name.startswith(".tmp-global_step_")]
        # the loop only saves: a kill after the first save lands inside one (writing, committing,
        # pointer or retention); staging leftovers show it was before the commit
        inside += 1
        staged_left += bool(leftovers)
        try:
            step = check_resumable(ckpt, args.width)
            if last_saved is not None and step < last_saved:
                raise AssertionError(f"resumed from {step}, but step {last_saved} had been saved")
            start = step + 1
            outcome = f"resumed {step}"
        except Exception as exc:  # noqa: BLE001 - counted and reported
            failures.append((trial, f"{type(exc).__name__}: {exc}"))
            traceback.print_exc()
            outcome = "FAILED"
            start = (last_saved or start) + 1
        print(f"trial {trial:3d}: last 'saved' {last_saved}, leftovers {len(leftovers)}, {outcome}", flush=True)
    elapsed = time.time() - t0
    print()
    print("| trials | kills inside a save | of them before the commit (staging left) | failures | time |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.trials} | {inside} | {staged_left} | {len(failures)} | {elapsed:.0f} s |")
    for trial, msg in failures:
        print(f"failure in trial {trial}: {msg}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
