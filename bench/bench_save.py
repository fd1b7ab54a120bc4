"""Benchmark: checkpoint save/load against the disk and against the peers (docs/benchmarks.md).

One command::

    python bench/bench_save.py                    # 1 GiB and 4 GiB of state, 5 rounds each
    python bench/bench_save.py --sizes-gib 1 --runs 5 --dir /mnt/nvme/tmp
    python bench/bench_save.py --device cuda      # state on the GPU (pinned staging, D2H copies)

The state: transformer-shaped fp32 weights (embedding, per layer qkv/o/fc1/fc2/norms) plus
AdamW's ``exp_avg``/``exp_avg_sq`` after one step: 3x the weights' bytes in all.

Each method runs in a fresh worker process (so its peak RSS is its own) for ``--runs`` rounds;
every round first times a **raw dump** of the same bytes (one stream, 8 MiB writes, ``fsync``)
and then the method, and every figure is reported as a median of per-round ratios against
that raw dump (the machine is noisy; a ratio taken seconds apart is stable, absolute times
are not). Every method pays for durability: files are ``fsync``'d before the clock stops
(Lightning's and Accelerate's own paths do not fsync; we add it, or they would be timing the
page cache).

Methods:

* ``raw``            raw dump (write) and cold raw read of the same bytes (the physical limit);
* ``pinned copy``    a copy of the state into warm preallocated host buffers (pinned for a GPU
  state): the least an async save must block for (the issue's yardstick on the GPU);
* ``torch.save``     one ``torch.save`` of ``{"model", "optimizer"}`` (+ fsync);
* ``lightning``      Lightning's ``TorchCheckpointIO.save_checkpoint`` (what ``ModelCheckpoint``
  runs: ``torch.save`` into a BytesIO, then one write) (+ fsync);
* ``accelerate``     ``Accelerator(cpu=True).save_state`` (safetensors model, torch.save optimizer)
  (+ fsync);
* ``dcp``            ``torch.distributed.checkpoint.save`` (FileSystemWriter, 1 thread, sync_files);
* ``dcp x4``         the same with 4 writer threads;
* ``dcp.async``      ``dcp.async_save``: stall = until it returns, total = until its future is done;
* ``ours``           ``CheckpointManager.save`` (plain writer; manifest, xxh3, commit, pointer);
* ``ours async``     ``async_save=True``: stall = until ``save`` returns; total = until committed;
* ``ours async overlap`` ``async_overlap_copy=True`` as well: after ``save`` returns the loop runs the next
  step's "forward/backward" (the compute loop, ``--fwd-bwd-s`` seconds) and then ``optimizer.step()``, whose
  pre-hook waits for the deferred copies; stall = ``save`` + that wait;
* ``ours load``      ``CheckpointManager.load`` with a cold page cache, against a cold raw read,
  into the live model and optimizer (whose state exists: the optimizer has stepped);
* ``ours load fresh`` the same into a fresh optimizer without state (what a resume at start-up
  does): the optimizer state is allocated by the load.

For the async methods a foreground compute loop runs while the background writes; "lost" is
the stall plus the slowdown of that loop against its speed measured just before (the time
training actually loses), reported against our sync save of the same round.

Columns: ``stall`` (s the caller waits), ``total`` (s until durable/committed), ``GB/s``
(state bytes / total), ``x raw`` (raw dump time / total: >1 is faster than the raw dump),
``stall/sync`` and ``lost/sync`` (async only, against ours sync in the same worker), ``RSS/state``
(peak RSS above the interpreter's, over the state bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

METHODS = ["raw", "pinned copy", "torch.save", "lightning", "accelerate", "dcp", "dcp x4", "dcp.async", "ours", "ours async",
           "ours async overlap",
           "ours load", "ours load fresh"]
CHUNK = 8 << 20
#: "ours async overlap": seconds of foreground compute (the next step's forward/backward) before the
#: optimizer step that waits for the deferred copies (--fwd-bwd-s)
FWD_BWD_S = 0.5


# --------------------------------------------------------------------------- the state
def transformer(hidden: int, vocab: int, layers: int):
    """A transformer-shaped fp32 module (embedding; per layer qkv, o, fc1, fc2, two norms), no forward."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)
            self.o = torch.nn.Linear(hidden, hidden, bias=False)
            self.fc1 = torch.nn.Linear(hidden, 4 * hidden, bias=False)
            self.fc2 = torch.nn.Linear(4 * hidden, hidden, bias=False)
            self.n1 = torch.nn.LayerNorm(hidden, bias=False)
            self.n2 = torch.nn.LayerNorm(hidden, bias=False)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, hidden)
            self.layers = torch.nn.ModuleList(Block() for _ in range(layers))

    return Model()


def build_state(gib: float, device: str):
    """A transformer-shaped model (fp32) and AdamW after one step: ~``gib`` GiB in all."""
    import torch

    target_params = gib * (1 << 30) / 4 / 3
    hidden = 1024 if gib <= 1.5 else 2048
    vocab = 32000
    per_layer = 12 * hidden * hidden + 2 * hidden
    layers = max(1, round((target_params - vocab * hidden) / per_layer))

    with torch.device(device):
        model = transformer(hidden, vocab, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    for p in model.parameters():
        p.grad = None
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for st in opt.state.values():
        nbytes += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
    return model, opt, nbytes


def tensors_of(model, opt):
    import torch

    out = list(model.state_dict().values())
    for st in opt.state.values():
        out += [t for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
    return out


# --------------------------------------------------------------------------- helpers
def fsync_tree(path: str) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path if os.path.isdir(path) else os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(path: str) -> None:
    """Evict ``path``'s (clean) pages from the page cache so the next read comes from disk."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _s, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_dump(tensors, path: str) -> float:
    """One stream of the tensors' bytes, 8 MiB writes, fsync: the physical reference."""
    import torch

    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for t in tensors:
            if t.is_cuda:
                t = t.cpu()
            mv = memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")
            for i in range(0, mv.nbytes, CHUNK):
                fh.write(mv[i:i + CHUNK])
        os.fsync(fh.fileno())
    return time.perf_counter() - t0


def raw_read(path: str) -> float:
    drop_cache(path)
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
    return time.perf_counter() - t0


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Compute:
    """A foreground compute loop (matmuls) whose slowdown measures what a background write costs."""

    def __init__(self, device: str) -> None:
        import torch

        self.a = torch.randn(384, 384, device=device)
        self.device = device
        self.per_iter = self.calibrate()

    def step(self) -> None:
        import torch

        x = self.a
        for _ in range(8):
            x = torch.tanh(x @ self.a)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def calibrate(self, n: int = 30) -> float:
        self.step()
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        return (time.perf_counter() - t0) / n


# --------------------------------------------------------------------------- methods
def run_method(method: str, model, opt, nbytes: int, work: str, device: str) -> dict:
    """One round of ``method``: returns {"stall", "total", extra...}."""
    import torch

    out = os.path.join(work, "out")
    shutil.rmtree(out, ignore_errors=True)
    if method == "pinned copy":
        srcs = tensors_of(model, opt)
        bufs = _PINNED.get("bufs")
        if bufs is None:
            bufs = _PINNED["bufs"] = [torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for t in srcs]
            for b, t in zip(bufs, srcs):
                b.copy_(t)
        t0 = time.perf_counter()
        for b, t in zip(bufs, srcs):
            b.copy_(t, non_blocking=t.is_cuda)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter() - t0
        return {"stall": t, "total": t}
    if method == "torch.save":
        t0 = time.perf_counter()
        with open(out, "wb") as fh:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        t = time.perf_counter() - t0
        return {"stall": t, "total": t}
    if method == "lightning":
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        t0 = time.perf_counter()
        TorchCheckpointIO().save_checkpoint({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}, out)
        fsync_tree(out)
        t = time.perf_counter() - t0
        return {"stall": t, "total": t}
    if method == "accelerate":
        acc = _accelerator(model, opt)
        t0 = time.perf_counter()
        acc.save_state(out)
        fsync_tree(out)
        t = time.perf_counter() - t0
        return {"stall": t, "total": t}
    if method in ("dcp", "dcp x4"):
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(out, sync_files=True, thread_count=4 if method == "dcp x4" else 1)
        t0 = time.perf_counter()
        dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, storage_writer=writer, no_dist=True)
        t = time.perf_counter() - t0
        return {"stall": t, "total": t}
    if method == "dcp.async":
        import torch.distributed.checkpoint as dcp

        _ensure_pg()
        compute = Compute(device)
        writer = dcp.FileSystemWriter(out, sync_files=True, thread_count=1)
        t0 = time.perf_counter()
        fut = dcp.async_save({"model": model.state_dict(), "optimizer": opt.state_dict()}, storage_writer=writer)
        stall = time.perf_counter() - t0
        n = 0
        while not fut.done():
            compute.step()
            n += 1
        fut.result()
        total = time.perf_counter() - t0
        return {"stall": stall, "total": total, "lost": total - n * compute.per_iter}
    if method in ("ours", "ours async", "ours async overlap"):
        from skyrl_callbacks import CheckpointManager
        from skyrl_callbacks.roles import Role

        role = Role("policy", model, [opt], [])
        mgr = _MGRS.get(method)
        if mgr is None:
            mgr = _MGRS[method] = CheckpointManager(dict(ckpt_path=out, async_save=method != "ours",
                                                         async_overlap_copy=method == "ours async overlap",
                                                         run_lock=False, max_ckpts_to_keep=1))
        mgr.storage.rm(mgr.storage.root) if os.path.exists(out) else None
        step = _MGRS.setdefault("_step", 0) + 1  # type: ignore[operator]
        _MGRS["_step"] = step
        if method == "ours":
            t0 = time.perf_counter()
            mgr.save(step, [role])
            t = time.perf_counter() - t0
            return {"stall": t, "total": t}
        compute = Compute(device)
        t0 = time.perf_counter()
        mgr.save(step, [role])
        stall = time.perf_counter() - t0
        n = 0
        if method == "ours async overlap":
            t_fb = time.perf_counter()
            while time.perf_counter() - t_fb < FWD_BWD_S:  # the next step's forward and backward
                compute.step()
                n += 1
            t_step = time.perf_counter()
            opt.step()  # no gradients: changes nothing, but its pre-hook waits for the deferred copies
            stall += time.perf_counter() - t_step
        while mgr.poll() is None:
            compute.step()
            n += 1
        total = time.perf_counter() - t0
        return {"stall": stall, "total": total, "lost": total - n * compute.per_iter}
    if method in ("ours load", "ours load fresh"):
        from skyrl_callbacks import CheckpointManager
        from skyrl_callbacks.roles import Role

        mgr = _MGRS.get(method)
        if mgr is None:
            mgr = _MGRS[method] = CheckpointManager(dict(ckpt_path=out + "_load", run_lock=False, max_ckpts_to_keep=1))
            mgr.save(1, [Role("policy", model, [opt], [])])
        if method == "ours load fresh":  # a new optimizer (no state yet) over the same parameters
            opt.state.clear()
            import gc

            gc.collect()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        role = Role("policy", model, [opt], [])
        step_dir = mgr.step_dir(1)
        drop_cache(step_dir)
        t0 = time.perf_counter()
        mgr.load([role], step_dir)
        t = time.perf_counter() - t0
        return {"stall": t, "total": t}
    raise ValueError(method)


_MGRS: dict = {}
_PINNED: dict = {}
_ACC: dict = {}


def _accelerator(model, opt):
    if "acc" not in _ACC:
        from accelerate import Accelerator

        acc = Accelerator(cpu=not _cuda())
        acc.prepare(model, opt)
        _ACC["acc"] = acc
    return _ACC["acc"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _ensure_pg() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.fg_threads)
    base_rss = current_rss()
    model, opt, nbytes = build_state(args.size_gib, args.device)
    tensors = tensors_of(model, opt)
    if args.device == "cuda":  # the raw dump is the disk's limit: it writes from host memory
        tensors = [t.cpu() for t in tensors]
    import gc

    gc.collect()
    base_rss = current_rss() - nbytes if args.device == "cpu" else current_rss()  # interpreter + libraries
    reset_peak_rss()  # building the state (grads, temporaries) is not the method's peak
    work = tempfile.mkdtemp(prefix="skyrl-bench-", dir=args.dir)
    rounds = []
    try:
        for _ in range(args.runs + 1):  # round 0 warms up (first touch of fresh memory)
            raw = raw_dump(tensors, os.path.join(work, "raw.bin"))
            r = {"raw": raw}
            if args.method == "raw":
                r.update(read=raw_read(os.path.join(work, "raw.bin")))
            elif args.method in ("ours load", "ours load fresh"):
                r.update(read=raw_read(os.path.join(work, "raw.bin")))
                r.update(run_method(args.method, model, opt, nbytes, work, args.device))
            else:
                r.update(run_method(args.method, model, opt, nbytes, work, args.device))
                if args.method in ("ours async", "ours async overlap", "dcp.async"):
                    r["sync"] = run_method("ours", model, opt, nbytes, work, args.device)["total"]
            os.remove(os.path.join(work, "raw.bin"))
            rounds.append(r)
        peak = peak_rss() - base_rss
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"method": args.method, "bytes": nbytes, "rounds": rounds[1:], "peak_rss_over_base": peak}


def summarize(res: dict) -> dict:
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    rounds, nbytes = res["rounds"], res["bytes"]
    row = {"method": res["method"], "gib": nbytes / (1 << 30)}
    row["raw"] = med([r["raw"] for r in rounds])
    if res["method"] == "raw":
        row.update(stall=row["raw"], total=row["raw"], x_raw=1.0, read=med([r["read"] for r in rounds]))
    elif res["method"] in ("ours load", "ours load fresh"):
        row.update(stall=med([r["total"] for r in rounds]), total=med([r["total"] for r in rounds]),
                   read=med([r["read"] for r in rounds]),
                   x_raw=med([r["read"] / r["total"] for r in rounds]))  # load vs cold raw read
    else:
        row.update(stall=med([r["stall"] for r in rounds]), total=med([r["total"] for r in rounds]),
                   x_raw=med([r["raw"] / r["total"] for r in rounds]))
        if "sync" in rounds[0]:
            row["stall_sync"] = med([r["stall"] / r["sync"] for r in rounds])
            row["lost_sync"] = med([r["lost"] / r["sync"] for r in rounds])
            row["sync"] = med([r["sync"] for r in rounds])
    row["gbps"] = nbytes / 1e9 / row["total"]
    row["rss"] = res["peak_rss_over_base"] / nbytes
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-gib", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--fg-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="torch threads of the process (the foreground compute loop); default: all cores but "
                         "one, which is left to the checkpoint writer as a training job would")
    ap.add_argument("--fwd-bwd-s", type=float, default=0.5,
                    help="'ours async overlap': seconds of forward/backward before the next optimizer step")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size-gib", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    globals()["FWD_BWD_S"] = args.fwd_bwd_s
    if args.worker:
        args.method, args.size_gib = args.worker, args.size_gib
        print(json.dumps(worker(args)))
        return 0
    import torch

    print(f"# machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f", dir {args.dir or tempfile.gettempdir()}, {args.runs} rounds (medians), "
            f"{args.fg_threads} torch thread(s) in the foreground"
          + (f", {args.fwd_bwd_s:g} s of forward/backward before the optimizer step ('ours async overlap')"
             if "ours async overlap" in args.methods else ""))
    rows = []
    for gib in args.sizes_gib:
        print(f"\n## {gib:g} GiB of state\n")
        print(f"| {'method':<12} | {'stall s':>8} | {'total s':>8} | {'GB/s':>6} | {'x raw':>6} | {'stall/sync':>10} | "
              f"{'lost/sync':>9} | {'RSS/state':>9} |")
        print("|" + "|".join("-" * w for w in (14, 10, 10, 8, 8, 12, 11, 11)) + "|")
        for method in args.methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--size-gib", str(gib),
                   "--runs", str(args.runs), "--device", args.device, "--fg-threads", str(args.fg_threads), "--fwd-bwd-s", str(args.fwd_bwd_s)] + (["--dir", args.dir] if args.dir else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"| {method:<12} | failed: {proc.stderr.strip().splitlines()[-1][:90] if proc.stderr.strip() else proc.returncode}")
                continue
            row = summarize(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append(row)
            ss = f"{row['stall_sync']:.3f}" if "stall_sync" in row else "-"
            ls = f"{row['lost_sync']:.3f}" if "lost_sync" in row else "-"
            print(f"| {method:<12} | {row['stall']:8.3f} | {row['total']:8.3f} | {row['gbps']:6.2f} | {row['x_raw']:6.2f} | "
                  f"{ss:>10} | {ls:>9} | {row['rss']:9.2f} |", flush=True)
            if method in ("raw", "ours load", "ours load fresh"):
                print(f"| {'  (read)':<12} | {'':>8} | {row['read']:8.3f} | {row['gib'] * (1 << 30) / 1e9 / row['read']:6.2f} | "
                      f"{'':>6} | {'':>10} | {'':>9} | {'':>9} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
