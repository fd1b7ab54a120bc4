"""Scale check for the FSDP writer (issue 10, points 1 and 3): save at N ranks, load at others.

One process per rank (torchrun)::

    torchrun --nproc_per_node=8 bench/scale_fsdp.py save --params-b 3 --dir /tmp/scale --export
    torchrun --nproc_per_node=4 bench/scale_fsdp.py load --params-b 3 --dir /tmp/scale
    torchrun --nproc_per_node=2 bench/scale_fsdp.py load --params-b 3 --dir /tmp/scale

``tests/gpu/run_fsdp_scale.sh`` runs the whole sequence as one command (``--cpu`` for a gloo smoke run).

The model is a Llama (``LlamaForCausalLM`` from a config, nothing downloaded) of about ``--params-b``
billion fp32 parameters, ``fully_shard`` per decoder layer and at the root, with AdamW after one step
(gradients set to a constant, so no forward is needed: every rank count gets the same state).

``save`` (N ranks): ours sharded **sync** save (step 1) and **async** save (step 2) through
``CheckpointManager``; per-rank and aggregate write GB/s, the async stall and total. Then a digest
(xxh3-128) of every gathered full tensor -- weights and AdamW state, gathered one tensor at a time --
goes to ``ref.json``. ``--export``: ``CheckpointManager.export_hf`` of the model (no rank-0 gather of the
whole model): wall time and each rank's peak host RSS growth (kernel high-water mark, reset right
before), and rank 0 re-reads the safetensors and checks every tensor against the digests.

``load`` (any rank count): a model built from another seed, trained one step, loads step 1 (sync) and
step 2 (async) and compares the digests of its gathered tensors with ``ref.json``: bitwise.

Every phase appends JSON rows to ``{dir}/results.jsonl`` (rank 0) and prints ``[scale] PASS/FAIL`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def llama_config(params_b: float):
    from transformers import LlamaConfig

    if params_b >= 0.5:
        hidden, heads = 2560, 20
    else:  # CPU smoke sizes
        hidden, heads = 256, 4
    vocab, inter = 32000, 4 * hidden
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(2, round((params_b * 1e9 - 2 * vocab * hidden) / per_layer))
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                       num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
                       max_position_embeddings=512, tie_word_embeddings=False)


def build(params_b: float, device, seed: int):
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    cfg = llama_config(params_b)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, 1e-3 * (1 + (i + seed) % 7))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _digest(t) -> str:
    import torch
    import xxhash

    flat = t.detach().reshape(-1).contiguous().cpu()
    return f"{flat.dtype}:{tuple(t.shape)}:" + xxhash.xxh3_128_hexdigest(flat.view(torch.uint8).numpy())


def digests(model, opt, rank: int) -> dict:
    """Digest of every full tensor (weights, AdamW state), gathered one at a time; rank 0 only."""
    from torch.distributed.tensor import DTensor

    out = {}

    def full(v):
        return v.full_tensor() if isinstance(v, DTensor) else v

    for name, p in model.named_parameters():
        f = full(p)
        if rank == 0:
            out[f"model/{name}"] = _digest(f)
        del f
        for key in sorted(opt.state.get(p, {})):
            f = full(opt.state[p][key])
            if rank == 0:
                out[f"optim/{name}/{key}"] = _digest(f)
            del f
    return out


def local_bytes(model, opt) -> int:
    import torch

    n = 0
    for p in model.parameters():
        loc = p.to_local() if hasattr(p, "to_local") else p
        n += loc.numel() * loc.element_size()
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v):
                lv = v.to_local() if hasattr(v, "to_local") else v
                n += lv.numel() * lv.element_size()
    return n


def peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> int:
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["save", "load"])
    ap.add_argument("--params-b", type=float, default=3.0)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU (smoke run)")
    ap.add_argument("--export", action="store_true", help="save phase: also time the HF export and check it")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.bench_fsdp_save import init_dist, timed

    rank, world, device = init_dist(args.cpu)

    from skyrl_callbacks import CheckpointManager
    from skyrl_callbacks.roles import Role

    os.makedirs(args.dir, exist_ok=True)
    results = os.path.join(args.dir, "results.jsonl")
    ref_path = os.path.join(args.dir, "ref.json")
    cfg = dict(ckpt_path=os.path.join(args.dir, "ckpt"), run_lock=False, max_ckpts_to_keep=2,
               export_path=os.path.join(args.dir, "export"))
    failures = 0

    def report(name: str, ok: bool, detail: str, **figures) -> None:
        nonlocal failures
        failures += 0 if ok else 1
        if rank == 0:
            print(f"[scale] {'PASS' if ok else 'FAIL'} fsdp_{name}: {detail}", flush=True)
            with open(results, "a") as fh:
                fh.write(json.dumps({"name": f"fsdp_{name}", "ok": ok, "detail": detail, "world": world,
                                     **figures}) + "\n")

    def gathered(values) -> list:
        out = [None] * world
        dist.all_gather_object(out, values)
        return out

    seed = 0 if args.phase == "save" else 1
    t0 = time.perf_counter()
    model, opt = build(args.params_b, device, seed)
    build_s = time.perf_counter() - t0
    role = Role("policy", model, [opt], [])
    mine = local_bytes(model, opt)
    per_rank = gathered(mine)
    total = sum(per_rank)
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"[scale] {args.phase} at {world} ranks: {n_params / 1e9:.2f}B params, {total / 2**30:.1f} GiB of state "
              f"({min(per_rank) / 2**30:.2f}-{max(per_rank) / 2**30:.2f} GiB per rank), built in {build_s:.1f} s", flush=True)

    if args.phase == "save":
        mgr = CheckpointManager(dict(cfg))
        mgr_async = CheckpointManager(dict(cfg, async_save=True))
        t_sync = timed(lambda: mgr.save(1, [role]))
        dist.barrier()
        t0 = time.perf_counter()
        mgr_async.save(2, [role])
        stall = time.perf_counter() - t0
        mgr_async.wait()
        dist.barrier()
        t_async = time.perf_counter() - t0
        mgr_async.close()
        rates = [b / 1e9 / t_sync for b in per_rank]
        report("save_sync", True, f"{t_sync:.2f} s, aggregate {total / 1e9 / t_sync:.2f} GB/s, per rank "
               f"{min(rates):.2f}-{max(rates):.2f} GB/s", seconds=t_sync, bytes=total,
               agg_gbps=total / 1e9 / t_sync, rank_gbps_min=min(rates), rank_gbps_max=max(rates))
        report("save_async", True, f"stall {stall:.3f} s, total {t_async:.2f} s, aggregate "
               f"{total / 1e9 / t_async:.2f} GB/s", stall=stall, seconds=t_async, bytes=total,
               agg_gbps=total / 1e9 / t_async)
        t0 = time.perf_counter()
        ref = digests(model, opt, rank)
        if rank == 0:
            with open(ref_path, "w") as fh:
                json.dump({"world": world, "params_b": args.params_b, "digests": ref}, fh)
            print(f"[scale] {len(ref)} reference digests in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.export:
            import gc

            gc.collect()
            base = status_kib("VmRSS")
            peak_rss_reset()
            t_exp = timed(lambda: mgr.export_hf(2, role))
            grow = gathered((status_kib("VmHWM") - base) * 1024)
            problems = []
            if rank == 0:
                from safetensors import safe_open

                out_dir = os.path.join(cfg["export_path"], "global_step_2", "policy")
                seen = set()
                for f in sorted(os.listdir(out_dir)):
                    if f.endswith(".safetensors"):
                        with safe_open(os.path.join(out_dir, f), "pt") as st:
                            for k in st.keys():
                                seen.add(k)
                                if ref.get(f"model/{k}") != _digest(st.get_tensor(k)):
                                    problems.append(k)
                missing = {k[len("model/"):] for k in ref if k.startswith("model/")} - seen
                problems += sorted(missing)
            problems = gathered(problems)[0]
            report("hf_export", not problems,
                   f"{t_exp:.2f} s; peak host RSS growth per rank {min(grow) / 2**30:.2f}-{max(grow) / 2**30:.2f} GiB "
                   f"for a {n_params * 4 / 2**30:.1f} GiB fp32 model; "
                   + ("every tensor equals the model's" if not problems else f"{len(problems)} tensor(s) differ or are "
                      f"missing, e.g. {problems[:3]}"),
                   seconds=t_exp, rss_grow_max=max(grow), rss_grow_min=min(grow), model_bytes=n_params * 4)
        mgr.close()
    else:
        ref = None
        if rank == 0:
            with open(ref_path) as fh:
                ref = json.load(fh)
        saved_world = gathered(ref["world"] if ref else None)[0]
        for step, kind in ((1, "sync"), (2, "async")):
            mgr = CheckpointManager(dict(cfg))
            step_dir = mgr.step_dir(step)
            if rank == 0 and not args.cpu:
                from bench.bench_save import drop_cache

                drop_cache(step_dir)
            t_load = timed(lambda: mgr.load([role], step_dir))
            got = digests(model, opt, rank)
            bad = []
            if rank == 0:
                want = ref["digests"]
                bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            bad = gathered(bad)[0]
            report(f"load_{kind}_{saved_world}_to_{world}", not bad,
                   f"{t_load:.2f} s ({total / 1e9 / t_load:.2f} GB/s aggregate); "
                   + (f"{len(got) if rank == 0 else ''} tensors bitwise equal (weights and AdamW state)" if not bad
                      else f"{len(bad)} differ, e.g. {bad[:3]}"),
                   seconds=t_load, bytes=total, agg_gbps=total / 1e9 / t_load, saved_world=saved_world)
            mgr.close()
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
