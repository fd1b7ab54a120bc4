"""Benchmark: reading a sharded (DCP) checkpoint: DCP's ``FileSystemReader`` against ours.

One command (one process; the reader is per rank, so one rank shows it)::

    python bench/bench_dcp_load.py --gib 2 --runs 3                 # CPU destinations
    python bench/bench_dcp_load.py --gib 2 --runs 3 --device cuda   # GPU destinations

The state: transformer-shaped fp32 tensors, saved once with the FSDP writer's local writer (one
file). Every round, with a cold page cache each time: a raw read of that file (one stream, 8 MiB
reads: the baseline), ``dcp.load`` through DCP's ``FileSystemReader``, and through ours
(``_parallel_file_reader``, 4 threads), into preallocated destinations on ``--device``. The
loaded tensors are compared with the saved ones. Ratios are taken within a round; medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.bench_save import drop_cache, raw_read  # noqa: E402


def main() -> int:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers import fsdp as F

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    hidden = 2048
    shapes = [(3 * hidden, hidden), (hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden)]
    per_layer = sum(a * b for a, b in shapes) * 4
    layers = max(1, round(args.gib * 2**30 / per_layer))
    torch.manual_seed(0)
    state = {f"layers.{i}.{j}": torch.randn(shape) for i in range(layers) for j, shape in enumerate(shapes)}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    work = os.path.join(args.dir, f"skyrl-bench-dcpload-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    st = Storage(work)
    path = os.path.join(work, "ckpt")
    F._dcp_save(state, st, path, None, 4)
    data_file = os.path.join(path, "__0_0.distcp")
    dest = {k: torch.empty_like(v, device=args.device) for k, v in state.items()}

    def load(reader) -> float:
        for t in dest.values():
            t.zero_()
        drop_cache(path)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dcp.load(dest, storage_reader=reader, no_dist=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
        assert all(torch.equal(dest[k].cpu(), v) for k, v in state.items()), "loaded tensors differ"
        return took

    rows: dict = {"raw read": [], "dcp FileSystemReader": [], "ours (4 threads)": []}
    for r in range(args.runs + 1):
        rd = raw_read(data_file)
        t_dcp = load(FileSystemReader(path))
        t_ours = load(F._parallel_file_reader(path, 4))
        if r == 0:
            continue
        rows["raw read"].append((rd, 1.0))
        rows["dcp FileSystemReader"].append((t_dcp, rd / t_dcp))
        rows["ours (4 threads)"].append((t_ours, rd / t_ours))
    shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"# DCP load, {nbytes / 2**30:.2f} GiB in one rank file, destinations on {args.device} ({dev}), "
          f"torch {torch.__version__}, dir {args.dir}; {args.runs} rounds (medians), cold page cache")
    print("| method | s | GB/s | x raw read |")
    print("|---|---|---|---|")
    for name, rs in rows.items():
        t = med([x[0] for x in rs])
        print(f"| {name} | {t:.3f} | {nbytes / 1e9 / t:.2f} | {med([x[1] for x in rs]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
