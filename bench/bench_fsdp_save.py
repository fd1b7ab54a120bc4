"""Benchmark: FSDP2 sharded save/load on several GPUs (docs/benchmarks.md, "FSDP").

One command (one process per GPU)::

    torchrun --nproc_per_node=2 bench/bench_fsdp_save.py --params-b 1.0 --runs 3 --dir /tmp

A transformer-shaped fp32 model of ``--params-b`` billion parameters, ``fully_shard`` per layer,
AdamW after one step (3x the weights' bytes of state, spread over the ranks). Every round first
times a **raw dump**: every rank writes its local shards' bytes (from host memory) as one
fsync'd stream, all ranks at once (the disk's aggregate limit), then the method. Figures are
medians over rounds; ratios are taken within a round.

Methods: ``pinned copy`` (local shards into warm pinned host buffers: the least an async save
can block), ``dcp.save`` (torch's default, 1 writer thread per rank), ``dcp.save, 4 threads``
(``FileSystemWriter(..., thread_count=4)``), ``dcp.async_save`` (stall and total, on a gloo group as
torch recommends), ``ours`` (``CheckpointManager`` with the FSDP writer, sharded, sync, defaults:
``dcp_thread_count=4`` and, on GPU, the shards staged into the writer's warm pinned buffers first;
manifest, xxh3, commit, pointer), ``ours, 1 thread`` (the same with ``dcp_thread_count=1``, the
writer's thread count before 4 became the default; it still stages into pinned buffers on GPU,
which the old writer did not, so it is not exactly the old behaviour: the old one let DCP copy
each shard to fresh pageable memory), ``ours async`` (``async_save=True``: stall until ``save``
returns, total until committed), ``ours load`` (``resume`` with a cold page cache) against a cold
raw read.
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

from bench.bench_save import drop_cache, raw_read, transformer  # noqa: E402

CHUNK = 8 << 20


def build(params_b: float, device):
    import torch
    from torch.distributed.fsdp import fully_shard

    hidden, vocab = 2048, 32000
    per_layer = 12 * hidden * hidden + 2 * hidden
    layers = max(1, round((params_b * 1e9 - vocab * hidden) / per_layer))

    torch.manual_seed(0)
    with torch.device(device):
        model = transformer(hidden, vocab, layers)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def local_tensors(model, opt) -> list:
    import torch

    out = []
    for p in model.parameters():
        out.append(p.to_local() if hasattr(p, "to_local") else p)
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                out.append(v.to_local() if hasattr(v, "to_local") else v)
    return [t.detach() for t in out]


def raw_dump(host: list, path: str) -> float:
    import torch

    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for t in host:
            mv = memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")
            for i in range(0, mv.nbytes, CHUNK):
                fh.write(mv[i:i + CHUNK])
        os.fsync(fh.fileno())
    return time.perf_counter() - t0


def init_dist(cpu: bool):
    """Join torchrun's process group (gloo on the CPU, else NCCL with one GPU per rank):
    (rank, world size, device)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo" if cpu else "nccl")
    rank = dist.get_rank()
    if cpu:
        return rank, dist.get_world_size(), torch.device("cpu")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return rank, dist.get_world_size(), torch.device("cuda", torch.cuda.current_device())


def timed(fn) -> float:
    """Seconds of ``fn()`` on every rank, between two barriers (the slowest rank's time)."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def main() -> int:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ap = argparse.ArgumentParser()
    ap.add_argument("--params-b", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU (a smoke test of this script)")
    args = ap.parse_args()
    rank, world, device = init_dist(args.cpu)
    if os.environ.get("SKYRL_BENCH_LOG") and rank == 0:  # the manager's per-save phases (write, commit, retention)
        import logging

        logging.basicConfig(level=logging.DEBUG, format="[rank0] %(message)s")
        logging.getLogger().handlers[0].addFilter(lambda rec: rec.name.startswith("skyrl_callbacks"))
    model, opt = build(args.params_b, device)
    loc = local_tensors(model, opt)
    host = [t.cpu() for t in loc]
    my_bytes = sum(t.numel() * t.element_size() for t in host)
    tb = torch.tensor([my_bytes], device=device, dtype=torch.float64)
    dist.all_reduce(tb)
    total_bytes = int(tb.item())
    work = os.path.join(args.dir, "skyrl-bench-fsdp")
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    dist.barrier()
    gloo = dist.new_group(backend="gloo")
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=not args.cpu) for t in loc]
    for b, t in zip(pinned, loc):
        b.copy_(t)

    from skyrl_callbacks import CheckpointManager
    from skyrl_callbacks.roles import Role

    role = Role("policy", model, [opt], [])
    mgr_sync = CheckpointManager(dict(ckpt_path=os.path.join(work, "ours"), run_lock=False, max_ckpts_to_keep=1))
    mgr_1thread = CheckpointManager(dict(ckpt_path=os.path.join(work, "ours_1thread"), run_lock=False,
                                         max_ckpts_to_keep=1, dcp_thread_count=1))
    mgr_async = CheckpointManager(dict(ckpt_path=os.path.join(work, "ours_async"), run_lock=False,
                                       max_ckpts_to_keep=1, async_save=True))
    # the first async save of a process whose buffers were prewarmed (what the integrations do after
    # the first optimizer step); the thread is waited for here, as a few training steps would
    mgr_pre = CheckpointManager(dict(ckpt_path=os.path.join(work, "ours_prewarmed"), run_lock=False,
                                     max_ckpts_to_keep=1, async_save=True))
    t0 = time.perf_counter()
    mgr_pre.prewarm([role])
    prewarm_call = time.perf_counter() - t0
    mgr_pre._prewarm_thread.join()
    prewarm_thread = time.perf_counter() - t0

    def state():
        msd, osd = get_state_dict(model, [opt])
        return {"model": msd, "optimizer": osd}

    rows: dict[str, list] = {}

    def add(name, **kw):
        rows.setdefault(name, []).append(kw)

    for r in range(args.runs + 1):  # round 0 warms up
        raw_path = os.path.join(work, f"raw_{rank}.bin")
        raw = timed(lambda: raw_dump(host, raw_path))
        rd = timed(lambda: raw_read(raw_path))
        os.remove(raw_path)

        def pin():
            for b, t in zip(pinned, loc):
                b.copy_(t, non_blocking=not args.cpu)
            if not args.cpu:
                torch.cuda.synchronize()

        pc = timed(pin)
        out = os.path.join(work, "dcp")
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        t_dcp = timed(lambda: dcp.save(state(), storage_writer=dcp.FileSystemWriter(out, sync_files=True)))
        out4 = os.path.join(work, "dcp4")
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out4, ignore_errors=True)
        t_dcp4 = timed(lambda: dcp.save(state(), storage_writer=dcp.FileSystemWriter(out4, sync_files=True,
                                                                                     thread_count=4)))
        out_a = os.path.join(work, "dcp_async")
        if rank == 0:
            shutil.rmtree(out_a, ignore_errors=True)
        dist.barrier()
        t0 = time.perf_counter()
        fut = dcp.async_save(state(), storage_writer=dcp.FileSystemWriter(out_a, sync_files=True), process_group=gloo)
        stall_dcp = time.perf_counter() - t0
        fut.result()
        dist.barrier()
        tot_dcp = time.perf_counter() - t0
        step = r + 1
        t_ours = timed(lambda: mgr_sync.save(step, [role]))
        t_ours1 = timed(lambda: mgr_1thread.save(step, [role]))
        dist.barrier()
        t0 = time.perf_counter()
        mgr_async.save(step, [role])
        stall_ours = time.perf_counter() - t0
        mgr_async.wait()
        tot_ours = time.perf_counter() - t0
        step_dir = mgr_sync.step_dir(step)
        for m in (mgr_sync, mgr_1thread, mgr_async):
            m.wait_retention()  # rank 0 deletes retired checkpoints in the background: not during the load
        if rank == 0:
            drop_cache(step_dir)
        dist.barrier()
        t_load = timed(lambda: mgr_sync.load([role], step_dir))
        if r == 0:  # the first saves of the process: their buffers are allocated (and pinned) here
            first = {"ours": t_ours, "ours async stall": stall_ours, "pinned copy": pc}
            dist.barrier()
            t0 = time.perf_counter()
            mgr_pre.save(step, [role])
            first["prewarmed async stall"] = time.perf_counter() - t0
            mgr_pre.close()
            continue
        add("raw", stall=raw, total=raw, raw=raw, read=rd)
        add("pinned copy", stall=pc, total=pc, raw=raw)
        add("dcp.save", stall=t_dcp, total=t_dcp, raw=raw)
        add("dcp.save, 4 threads", stall=t_dcp4, total=t_dcp4, raw=raw)
        add("dcp.async_save", stall=stall_dcp, total=tot_dcp, raw=raw, pc=pc)
        add("ours", stall=t_ours, total=t_ours, raw=raw)
        add("ours, 1 thread", stall=t_ours1, total=t_ours1, raw=raw)
        add("ours async", stall=stall_ours, total=tot_ours, raw=raw, pc=pc)
        add("ours load", stall=t_load, total=t_load, raw=raw, read=rd)
    mgr_async.close()
    # correctness of the async checkpoint: scramble the live state, load, compare with the host copy
    with torch.no_grad():
        for t in local_tensors(model, opt):
            t.add_(1.0)
    mgr_async.load([role], mgr_async.step_dir(args.runs + 1))
    same = all(torch.equal(a.cpu(), b) for a, b in zip(local_tensors(model, opt), host))
    flags = [None] * world
    dist.all_gather_object(flags, same)
    if rank == 0:
        print(f"async checkpoint restores every rank's shards bitwise: {'PASS' if all(flags) else 'FAIL'} {flags}")
        for name, m in (("ours", mgr_sync), ("ours, 1 thread", mgr_1thread)):
            w = m.writer_for(role)
            stager = getattr(w, "_gpu_stager", None)
            print(f"{name}: {w!r}, pinned staging buffers: "
                  f"{'none' if stager is None else f'{stager.buffer_bytes / 2**30:.2f} GiB on rank 0'}")
        med = statistics.median
        print(f"# FSDP2, {world} ranks, {'CPU' if args.cpu else torch.cuda.get_device_name()}, torch {torch.__version__}; "
              f"{args.params_b:g}B params fp32 + AdamW = {total_bytes / 2**30:.1f} GiB of state "
              f"({my_bytes / 2**30:.1f} GiB per rank); dir {args.dir}; {args.runs} rounds (medians)")
        print("| method | stall s | total s | aggregate GB/s | per-rank GB/s | x raw dump | stall / pinned copy |")
        print("|---|---|---|---|---|---|---|")
        for name, rs in rows.items():
            total = med([x["total"] for x in rs])
            if name == "ours load":
                xr = med([x["read"] / x["total"] for x in rs])
                label = f"{xr:.2f} (x raw read)"
            else:
                xr = med([x["raw"] / x["total"] for x in rs])
                label = f"{xr:.2f}"
            sp = f"{med([x['stall'] / x['pc'] for x in rs]):.2f}" if "pc" in rs[0] else "-"
            print(f"| {name} | {med([x['stall'] for x in rs]):.3f} | {total:.3f} | {total_bytes / 1e9 / total:.2f} | "
                  f"{my_bytes / 1e9 / total:.2f} | {label} | {sp} |")
            if name == "raw":
                rd = med([x["read"] for x in rs])
                print(f"| raw read (cold) | - | {rd:.3f} | {total_bytes / 1e9 / rd:.2f} | {my_bytes / 1e9 / rd:.2f} | - | - |")
        print(f"first save of the process (round 0, cold buffers): ours sync {first['ours']:.3f} s, "
              f"ours async stall {first['ours async stall']:.3f} s (= {first['ours async stall'] / first['pinned copy']:.1f}x "
              f"that round's pinned copy, {first['pinned copy']:.3f} s)")
        print(f"first async save after prewarm: stall {first['prewarmed async stall']:.3f} s (= "
              f"{first['prewarmed async stall'] / first['pinned copy']:.1f}x the pinned copy); prewarm call "
              f"{prewarm_call:.3f} s in the foreground, its thread {prewarm_thread:.3f} s")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
