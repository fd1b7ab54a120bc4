"""Megatron scale check (issue 10, point 2): save a megatron-core GPT at one TP x PP x DP layout
through ``CheckpointManager`` (sync, then async), load it back at other layouts, compare the
gathered full weights and optimizer state bitwise (by hash), and record the figures (per-rank and
aggregate write GB/s, training-loop stall, total time).

    # one rank per GPU (NCCL), DP = world / (TP * PP)
    torchrun --nproc_per_node 8 tests/gpu/megatron_scale.py save WORK --tp 2 --pp 2 --model 1b
    torchrun --nproc_per_node 2 tests/gpu/megatron_scale.py load WORK --tp 1 --pp 1 --model 1b --tag tp1pp1
    # CPU / gloo with the shims of tests/megatron_helpers.py: forks N ranks
    python tests/gpu/megatron_scale.py save WORK --tp 2 --pp 2 --model small --nproc 4

``tests/gpu/run_megatron_scale.sh`` runs the whole sequence in one command and prints the table.

``save`` (tag ``save``): builds the GPT (``--model`` preset) and trains it with a plain torch AdamW on
seeded gradients (identical on the replicas of a shard, so DP replicas stay equal; a forward at
PP > 1 would need megatron's pipeline schedules, which measure nothing here). Step 1 is saved
blocking (the process's first save: megatron-core starts its helper processes then, so it is
reported apart); after one more step every gathered full tensor (model, ``optimizer.state.*``) is
hashed into ``WORK/ref_sync.json`` and step 2 saved blocking; after one more step the hashes go to
``ref_async.json`` and step 3 is saved async while training goes on (each step padded to
``--step-time`` seconds, the manager polled after each) until the save commits.
``--distopt`` (GPU only) uses megatron DDP + ``DistributedOptimizer`` (``fully_reshardable``)
instead of torch AdamW; when its sharded optimizer state does not gather to full tensors only the
model is compared.

``load``: a fresh model (another seed) at this run's layout, ``CheckpointManager.load`` of step 2
and of step 3, the gathered full tensors hashed and compared with the references (bitwise), then
one more training step on the loaded state.

Every rank writes ``WORK/results_{tag}_rank{R}.json`` (``{"name", "ok", "detail"}`` items); rank 0
writes ``WORK/figures_{tag}.json`` (per-rank and aggregate figures) and prints
``[scale] PASS/FAIL name: detail`` lines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository
sys.path.insert(0, os.path.dirname(HERE))  # tests/

warnings.filterwarnings("ignore")

import torch  # noqa: E402

import megatron_helpers as H  # noqa: E402
from megatron_worker import Results, _free_port, run_and_record  # noqa: E402

# Llama-shaped presets: hidden, layers, heads, KV groups, FFN, vocab (KV groups and vocab divisible by TP<=4,
# layers by PP<=4)
PRESETS = {
    "tiny": dict(hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=4, ffn_hidden_size=128,
                 vocab_size=128),
    "small": dict(hidden_size=256, num_layers=4, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=704,
                  vocab_size=1024),
    "1b": dict(hidden_size=2048, num_layers=16, num_attention_heads=16, num_query_groups=8, ffn_hidden_size=5632,
               vocab_size=32000),
    "7b": dict(hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=11008,
               vocab_size=32000),
}


class ScaleResults(Results):
    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.items.append({"name": name, "ok": bool(ok), "detail": detail[:3000]})
        if self.rank == 0:
            print(f"[scale] {'PASS' if ok else 'FAIL'} {name}: {detail[:400]}", flush=True)


# --------------------------------------------------------------------------- model, training, hashing
def build_role(args, seed: int):
    from skyrl_callbacks.roles import Role

    H.init_parallel(tp=args.tp, pp=args.pp)
    cfg = dict(PRESETS[args.model])
    vocab = cfg.pop("vocab_size")
    if torch.cuda.is_available():
        cfg["use_cpu_initialization"] = False  # initialise on the GPU (the TP tracker is seeded per TP rank)
    model = H.build_gpt(seed, vocab_size=vocab, **cfg)
    if not args.distopt:
        return H.make_role(model)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True,
                                                 bf16=False, fp16=False), [ddp])
    return Role(name="policy", model=ddp, optimizers=[opt], schedulers=[])


def train_step(role, step: int, distopt: bool) -> None:
    """One optimizer step on seeded gradients: a parameter's gradient depends on the step, its pipeline
    stage, its index and (TP-sharded parameters only) the TP rank, so every replica of a shard (DP
    ranks, and TP ranks for replicated parameters such as the norms) gets the same gradient."""
    from megatron.core import parallel_state as ps

    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    if distopt:
        role.model.zero_grad_buffer()
        role.optimizers[0].zero_grad()
    for i, p in enumerate(role.model.parameters()):
        shard = tp if getattr(p, "tensor_model_parallel", False) else -1
        g = torch.Generator(device=p.device).manual_seed(step * 1_000_003 + pp * 10_007 + (shard + 1) * 101 + i)
        grad = torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype).mul_(1e-2)
        if distopt:
            p.main_grad.copy_(grad)
        else:
            p.grad = grad
    if distopt:
        role.model.finish_grad_sync()
    for opt in role.optimizers:
        opt.step()
        opt.zero_grad()
    for s in role.schedulers:
        s.step()


def _digest(t: torch.Tensor) -> list:
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return [list(t.shape), str(t.dtype).replace("torch.", ""), h.hexdigest(), float(t.double().sum())]


def hashed_state(role, dist) -> dict:
    """Rank 0: ``{global key: [shape, dtype, sha256, sum]}`` of every full tensor (model and, where its
    sharded form gathers to full tensors, optimizer state), assembled one at a time from the main
    replicas of all ranks; plus the optimizer steps and the scheduler state. ``{}`` elsewhere."""
    from skyrl_callbacks.writers.megatron import MegatronWriter, _layout, gather_full_tensors

    writer = MegatronWriter()
    out: dict = {}
    try:
        state = writer._state(role, loading=False, sharding=writer.optimizer_sharding, layout=_layout(), with_rng=False)
        for key, full in gather_full_tensors(state, dist):
            if dist.is_main:
                out[key] = _digest(full)
    except Exception as exc:  # noqa: BLE001 - e.g. DistributedOptimizer shards that do not gather
        if dist.is_main:
            print(f"[scale] note: optimizer state not gathered ({type(exc).__name__}: {str(exc)[:200]}); "
                  f"hashing the model only", flush=True)
        out = {"_model_only": True}
        for key, full in gather_full_tensors(writer._model_state(role), dist):
            if dist.is_main:
                out[key] = _digest(full)
    for i, opt in enumerate(role.optimizers):
        if isinstance(opt, torch.optim.Optimizer):
            steps = {float(s["step"]) for s in opt.state_dict()["state"].values() if "step" in s}
            out[f"optimizer{i}.step"] = sorted(steps)
    out["schedulers"] = [{k: v for k, v in s.state_dict().items() if not callable(v)} for s in role.schedulers]
    out["schedulers"] = json.loads(json.dumps(out["schedulers"], default=str))
    return out if dist.is_main else {}


def _cmp(v):
    """A digest compares by shape, dtype and hash (the sum is for the report only)."""
    return v[:3] if isinstance(v, list) and len(v) == 4 and isinstance(v[2], str) else v


def compare(got: dict, ref: dict) -> tuple[bool, str]:
    if got.get("_model_only") or ref.get("_model_only"):
        keep = lambda d: {k: v for k, v in d.items() if not k.startswith("optimizer") and k != "_model_only"}  # noqa: E731
        got, ref, note = keep(got), keep(ref), " (model only: optimizer state not gathered)"
    else:
        note = ""
    problems = []
    for key in sorted(set(got) | set(ref)):
        if key not in got or key not in ref:
            problems.append(f"{key}: only in {'loaded' if key in got else 'reference'}")
        elif _cmp(got[key]) != _cmp(ref[key]):
            problems.append(f"{key}: {str(got[key])[:120]} != {str(ref[key])[:120]}")
    tensors = sum(isinstance(v, list) and len(v) == 4 and isinstance(v[2], str) for v in ref.values())
    nbytes = 0
    for v in ref.values():
        if isinstance(v, list) and len(v) == 4 and isinstance(v[2], str):
            n = 1
            for d in v[0]:
                n *= d
            nbytes += n * torch.empty(0, dtype=getattr(torch, v[1])).element_size()
    if problems:
        return False, f"{len(problems)} differ: " + "; ".join(problems[:6])
    if not tensors:
        return False, "the reference holds no tensors: nothing was compared"
    return True, f"{tensors} full tensors ({nbytes / 1e9:.3f} GB) bitwise equal (sha256){note}"


# --------------------------------------------------------------------------- figures
class Meter:
    """Per-rank bytes and seconds of the writer the manager uses (its own files only)."""

    def __init__(self, writer) -> None:
        self.bytes: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        for name in ("save", "write_snapshot", "finalize_snapshot"):
            setattr(writer, name, self._wrap(name, getattr(writer, name)))

    def _wrap(self, name, fn):
        def inner(storage, role_dir, *args, **kwargs):
            t0 = time.perf_counter()
            files = fn(storage, role_dir, *args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.bytes[name] = self.bytes.get(name, 0) + sum(os.path.getsize(os.path.join(role_dir, f)) for f in files)
            return files

        return inner


def _layout_ranks() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp_rank": ps.get_tensor_model_parallel_rank(), "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank()}


def _gb(n: float) -> float:
    return n / 1e9


def _manager(ckpt: str):
    from skyrl_callbacks.manager import CheckpointManager

    return CheckpointManager({"ckpt_path": ckpt, "export_path": ckpt + "_export", "ckpt_interval": 1,
                              "run_lock": False, "async_save": True})


def _write_json(path: str, data) -> None:
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------- phases
def phase_save(args, dist, res: ScaleResults) -> None:
    rank = dist.rank
    ckpt = os.path.join(args.work, "ckpt")
    t_build = time.perf_counter()
    role = build_role(args, seed=1)
    n_local = sum(p.numel() for p in role.model.parameters())
    build_s = time.perf_counter() - t_build
    mgr = _manager(ckpt)
    meter = Meter(mgr.writer_for(role))
    fig: dict = {"rank": rank, **_layout_ranks(), "local_params": n_local, "build_s": build_s}

    # ---------------------------------------------------------------- sync saves of steps 1 and 2
    # step 1 is the process's first save (megatron-core starts its helper processes then): reported apart
    def _sync(step: int, label: str):
        before_b, before_s = meter.bytes.get("save", 0), meter.seconds.get("save", 0.0)
        t = time.perf_counter()
        result = mgr.save(step, [role], blocking=True)
        wall = time.perf_counter() - t
        wb, ws = meter.bytes.get("save", 0) - before_b, meter.seconds.get("save", 0.0) - before_s
        fig[label] = {"step": step, "bytes": wb, "write_s": ws, "gbps": _gb(wb) / ws if ws else 0.0, "stall_s": wall,
                      "total_bytes": result.bytes, "total_s": result.seconds_total, "agg_gbps": result.gbps}
        return (f"step {step}: {result.bytes / 1e9:.3f} GB, {result.files} files in {result.seconds_total:.2f} s "
                f"({result.gbps:.2f} GB/s aggregate); this rank {wb / 1e9:.3f} GB in {ws:.2f} s")

    train_step(role, 0, args.distopt)
    res.run("save_sync_first", lambda: _sync(1, "sync_first"))
    train_step(role, 1, args.distopt)
    t0 = time.perf_counter()
    ref = hashed_state(role, dist)
    fig["hash_s"] = time.perf_counter() - t0
    if dist.is_main:
        _write_json(os.path.join(args.work, "ref_sync.json"), ref)
    dist.barrier()
    res.run("save_sync", lambda: _sync(2, "sync"))

    # ---------------------------------------------------------------- async save of step 3
    train_step(role, 2, args.distopt)
    ref3 = hashed_state(role, dist)
    if dist.is_main:
        _write_json(os.path.join(args.work, "ref_async.json"), ref3)
    dist.barrier()

    def _async():
        t = time.perf_counter()
        pending = mgr.save(3, [role])
        fg = time.perf_counter() - t
        assert pending.pending, "the async save was not handed to the background"
        committed, steps, poll_s, wait_s, t_loop = None, 0, 0.0, 0.0, time.perf_counter()
        while committed is None and steps < args.max_overlap_steps:
            ts = time.perf_counter()
            train_step(role, 3 + steps, args.distopt)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            steps += 1
            left = args.step_time - (time.perf_counter() - ts)
            if left > 0:
                time.sleep(left)
            tp_ = time.perf_counter()
            committed = mgr.poll()
            poll_s += time.perf_counter() - tp_
        if committed is None:
            tw = time.perf_counter()
            committed = mgr.wait()
            wait_s = time.perf_counter() - tw
        loop_s = time.perf_counter() - t_loop
        assert committed is not None and committed.step == 3, committed
        wb = meter.bytes.get("write_snapshot", 0) + meter.bytes.get("finalize_snapshot", 0)
        ws = meter.seconds.get("write_snapshot", 0.0)
        fig["async"] = {"bytes": wb, "write_s": ws, "gbps": _gb(wb) / ws if ws else 0.0,
                        "foreground_s": fg, "poll_s": poll_s, "wait_s": wait_s, "stall_s": fg + poll_s + wait_s,
                        "finalize_s": meter.seconds.get("finalize_snapshot", 0.0), "overlap_steps": steps,
                        "loop_s": loop_s, "total_bytes": committed.bytes, "total_s": committed.seconds_total,
                        "agg_gbps": committed.gbps, "manager_stall_s": committed.seconds_blocked}
        return (f"step 3: {committed.bytes / 1e9:.3f} GB in {committed.seconds_total:.2f} s ({committed.gbps:.2f} GB/s "
                f"aggregate), stall {fg + poll_s + wait_s:.2f} s (snapshot {fg:.2f} s), {steps} training steps "
                f"overlapped; this rank wrote {wb / 1e9:.3f} GB in {ws:.2f} s")

    res.run("save_async", _async)
    every = dist.all_gather(fig)
    if dist.is_main:
        _write_json(os.path.join(args.work, f"figures_{args.tag}.json"),
                    {"phase": "save", "tag": args.tag, "tp": args.tp, "pp": args.pp,
                     "dp": dist.world_size // (args.tp * args.pp), "world": dist.world_size, "model": args.model,
                     "distopt": args.distopt, "total_params": sum(f["local_params"] for f in every
                                                                  if f["dp_rank"] == 0),
                     "ranks": every})


def phase_load(args, dist, res: ScaleResults) -> None:
    rank = dist.rank
    ckpt = os.path.join(args.work, "ckpt")
    mgr = _manager(ckpt)
    H.init_parallel(tp=args.tp, pp=args.pp)
    fig: dict = {"rank": rank, **_layout_ranks()}
    for name, step, ref_file in (("sync", 2, "ref_sync.json"), ("async", 3, "ref_async.json")):
        def fn(name=name, step=step, ref_file=ref_file):
            fresh = build_role(args, seed=100 + step)
            train_step(fresh, 50, args.distopt)  # optimizer state of its own, to be overwritten
            t = time.perf_counter()
            loaded = mgr.load([fresh], os.path.join(ckpt, f"global_step_{step}"))
            load_s = time.perf_counter() - t
            assert loaded.step == step, f"loaded step {loaded.step}, expected {step}"
            got = hashed_state(fresh, dist)
            fig[name] = {"load_s": load_s}
            if dist.is_main:
                with open(os.path.join(args.work, ref_file)) as fh:
                    ok, detail = compare(got, json.load(fh))
                res.add(f"{args.tag}_{name}_step{step}_bitwise", ok, detail)
            train_step(fresh, step, args.distopt)  # the loaded (resharded) optimizer state is usable
            return f"loaded global_step_{step} in {load_s:.2f} s, one more step trained"

        res.run(f"{args.tag}_load_{name}", fn)
    every = dist.all_gather(fig)
    if dist.is_main:
        _write_json(os.path.join(args.work, f"figures_{args.tag}.json"),
                    {"phase": "load", "tag": args.tag, "tp": args.tp, "pp": args.pp,
                     "dp": dist.world_size // (args.tp * args.pp), "world": dist.world_size, "model": args.model,
                     "distopt": args.distopt, "ranks": every})


PHASES = {"save": phase_save, "load": phase_load}


# --------------------------------------------------------------------------- process plumbing
def _rank_main(rank: int, args, nproc: int, port: int, torchrun: bool) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "1")))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    H.install_cpu_shims()
    H.install_cpu_load_exchange_shim()  # loads at DP > 1 on the CPU (no-op with CUDA)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=args.timeout)
    if torchrun:
        tdist.init_process_group(backend, timeout=timeout)
    else:
        tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc,
                                 timeout=timeout)
    from skyrl_callbacks.dist import DistContext

    res = ScaleResults(rank, verbose=True)
    world = tdist.get_world_size()
    if world % (args.tp * args.pp):
        tdist.destroy_process_group()
        raise SystemExit(f"world size {world} is not a multiple of TP*PP={args.tp * args.pp}")
    run_and_record(res, f"{args.tag}_phase", lambda: PHASES[args.phase](args, DistContext(), res),
                   os.path.join(args.work, f"results_{args.tag}_rank{rank}.json"))
    if any(not r["ok"] for r in res.items):
        if torchrun:
            sys.exit(1)
        raise RuntimeError(f"rank {rank}: failures")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", choices=sorted(PHASES))
    ap.add_argument("work", help="shared directory: checkpoints under WORK/ckpt, references, results, figures")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--tag", default=None, help="names the results/figures files (default: the phase, or "
                                                "load_tpXppY)")
    ap.add_argument("--distopt", action="store_true", help="megatron DDP + DistributedOptimizer (GPU only)")
    ap.add_argument("--step-time", type=float, default=1.0,
                    help="pad each training step during the async save to this many seconds (a real step's time)")
    ap.add_argument("--max-overlap-steps", type=int, default=300)
    ap.add_argument("--timeout", type=int, default=1800, help="collective timeout (s)")
    ap.add_argument("--nproc", type=int, default=None, help="CPU: fork this many gloo ranks (not under torchrun)")
    args = ap.parse_args(argv)
    args.tag = args.tag or ("save" if args.phase == "save" else f"load_tp{args.tp}pp{args.pp}")
    os.makedirs(args.work, exist_ok=True)
    if "LOCAL_RANK" in os.environ:  # under torchrun: this process is one rank
        _rank_main(int(os.environ["RANK"]), args, int(os.environ["WORLD_SIZE"]), 0, True)
        return 0
    import megatron.core.dist_checkpointing  # noqa: F401 - import once in the parent, then fork
    import megatron.core.models.gpt  # noqa: F401
    import torch.multiprocessing as mp

    nproc = args.nproc or args.tp * args.pp
    try:
        mp.start_processes(_rank_main, args=(args, nproc, _free_port(), False), nprocs=nproc, join=True,
                           start_method="fork")
    except Exception as exc:  # noqa: BLE001 - a rank failed: its results file says what
        print(f"[scale] FAIL {args.tag}_processes: {str(exc).strip().splitlines()[-1][:300]}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
