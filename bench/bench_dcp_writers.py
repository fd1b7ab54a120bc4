"""Benchmark: the sharded (DCP) file writers alone, every rank at once (docs/benchmarks.md, "FSDP").

One command (one process per rank; no GPU needed: the state is host memory, pinned when CUDA is
available, as the FSDP writer's staging buffers are)::

    torchrun --nproc_per_node=2 bench/bench_dcp_writers.py --gib-per-rank 2.9 --runs 3 --dir /tmp

Each rank holds ``--gib-per-rank`` of transformer-shaped fp32 tensors. Every round times, all ranks
at once, between barriers, each followed by an fsync of what it wrote (what a checkpoint's commit
does):

- ``raw dump``: each rank writes its tensors' bytes as one stream (the baseline);
- ``dcp.save``: DCP's ``FileSystemWriter``, 1 thread, and with 4 threads (one file per thread);
- ``ours, N threads``: the FSDP writer's local writer (``_parallel_file_writer``): one file per rank,
  the tensor bytes written with ``pwrite`` by N threads, checksummed on the way;
- ``ours, N threads, fsync per dcp.save``: the same, the file fsynced at the end of its write step
  (as DCP's ``sync_files=True`` does) instead of by the commit;
- ``ours, 4 threads, no early writeback``: without ``sync_file_range`` after each chunk (the disk
  write starts only at the kernel's dirty threshold or the fsync).

Ratios are taken within a round; figures are medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.bench_save import fsync_tree  # noqa: E402

CHUNK = 8 << 20


def state_of(gib: float, pin: bool) -> dict:
    import torch

    hidden = 2048
    per_layer = 12 * hidden * hidden  # qkvo + mlp, as bench_save.transformer
    layers = max(1, round(gib * 2**30 / 4 / per_layer))
    torch.manual_seed(0)
    out = {}
    for i in range(layers):
        for name, shape in (("qkv", (3 * hidden, hidden)), ("o", (hidden, hidden)), ("up", (4 * hidden, hidden)),
                            ("down", (hidden, 4 * hidden))):
            t = torch.empty(shape, pin_memory=pin)
            t.uniform_()
            out[f"layers.{i}.{name}"] = t
    return out


def main() -> int:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers import fsdp as F
    from skyrl_callbacks.writers import plain
    from skyrl_callbacks.writers.plain import _no_zip_crc

    ap = argparse.ArgumentParser()
    ap.add_argument("--gib-per-rank", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--threads", default="1,4,8")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state = state_of(args.gib_per_rank, torch.cuda.is_available())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    work = os.path.join(args.dir, "skyrl-bench-dcpw")
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    dist.barrier()
    st = Storage(work)

    def timed(fn, out: str) -> float:
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        dist.barrier()
        t0 = time.perf_counter()
        fn(out)
        fsync_tree(out) if os.path.isdir(out) else None
        dist.barrier()
        took = time.perf_counter() - t0
        return took

    def raw(out: str) -> None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"raw_{rank}.bin"), "wb", buffering=0) as fh:
            for t in state.values():
                mv = memoryview(t.view(torch.uint8).numpy()).cast("B")
                for i in range(0, mv.nbytes, CHUNK):
                    fh.write(mv[i:i + CHUNK])
            os.fsync(fh.fileno())

    def dcp_writer(threads: int):
        def run(out: str) -> None:
            with _no_zip_crc():
                dcp.save(state, storage_writer=dcp.FileSystemWriter(out, sync_files=True, thread_count=threads))
        return run

    def ours(threads: int, fsync_in_write: bool = False, early_writeback: bool = True):
        def run(out: str) -> None:
            plain.EARLY_WRITEBACK = early_writeback
            os.makedirs(out, exist_ok=True)
            writer = F._parallel_file_writer(st, out, threads)
            if fsync_in_write:
                inner = writer.write_data

                def write_data(plan, planner):
                    fut = inner(plan, planner)
                    fsync_tree(out)
                    return fut

                writer.write_data = write_data
            with _no_zip_crc():
                dcp.save(state, storage_writer=writer)
        return run

    threads = [int(x) for x in args.threads.split(",")]
    methods = [("raw dump", raw), ("dcp.save, 1 thread", dcp_writer(1)), ("dcp.save, 4 threads", dcp_writer(4))]
    methods += [(f"ours, {n} thread{'s' if n > 1 else ''}", ours(n)) for n in threads]
    methods += [("ours, 4 threads, fsync per dcp.save", ours(4, True)),
                ("ours, 4 threads, no early writeback", ours(4, early_writeback=False))]
    rows: dict = {}
    for r in range(args.runs + 1):
        times = {name: timed(fn, os.path.join(work, f"m{i}")) for i, (name, fn) in enumerate(methods)}
        if r == 0:
            continue
        for name, t in times.items():
            rows.setdefault(name, []).append((t, times["raw dump"] / t))
    if rank == 0:
        med = statistics.median
        print(f"# DCP writers, {world} ranks at once, {nbytes / 2**30:.2f} GiB per rank "
              f"({'pinned' if torch.cuda.is_available() else 'pageable'} host memory), {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, dir {args.dir}; {args.runs} rounds (medians)")
        print("| method | total s | per-rank GB/s | x raw dump |")
        print("|---|---|---|---|")
        for name, rs in rows.items():
            total = med([x[0] for x in rs])
            print(f"| {name} | {total:.3f} | {nbytes / 1e9 / total:.2f} | {med([x[1] for x in rs]):.2f} |")
        shutil.rmtree(work, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
