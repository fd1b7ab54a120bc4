"""FSDP2 (``fully_shard``) + CheckpointManager on real process groups (brief cases 1 and 4).

    torchrun --nproc_per_node 2 tests/gpu/fsdp2_manager.py --phase save2  --work W [--backend nccl --device cuda]
    torchrun --nproc_per_node 1 tests/gpu/fsdp2_manager.py --phase load1  --work W
    torchrun --nproc_per_node 2 tests/gpu/fsdp2_manager.py --phase load2  --work W
    torchrun --nproc_per_node 2 tests/gpu/fsdp2_manager.py --phase export_big --work W [--small]

save2 (world size 2): tiny Llama + AdamW, 3 steps; dumps the gathered state (``ref_w2.pt``,
torch's DSD full_state_dict, not the writer's path); saves it sharded and full through
CheckpointManager; HF export through ``manager.export_hf`` (RSS / GPU memory measured, safetensors
compared bitwise, ``from_pretrained`` logits vs the FSDP model's); one more step dumped as
``ref_w2_step4.pt``.
load1 (world size 1): resume both world-size-2 checkpoints and compare; then train the same
model at world size 1 and save it sharded (``ref_w1.pt``).
load2 (world size 2): resume sharded 2->2 (+ one more step compared with the saver's), full 2->2,
sharded 1->2.
export_big: a ~0.5B-parameter Llama (fp32, ~2.2 GB) sharded over the ranks, exported with two
shard sizes; peak host RSS and GPU memory per rank vs the model size; ``from_pretrained`` logits.
"""

from __future__ import annotations

import glob
import json
import os
import time

import common as C
import torch

CKPT_STEP = 3


def _mgr(work: str, name: str, **kw):
    from skyrl_callbacks.manager import CheckpointManager

    cfg = dict(ckpt_path=os.path.join(work, name), export_path=os.path.join(work, name + "_export"),
               ckpt_interval=1, resume_mode="latest")
    cfg.update(kw)
    return CheckpointManager(cfg)


def _listing(path: str) -> list[str]:
    out = []
    for root, _dirs, files in os.walk(path):
        for f in files:
            out.append(os.path.relpath(os.path.join(root, f), path))
    return sorted(out)


def _sync_cuda(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(dev, fn):
    import torch.distributed as tdist

    tdist.barrier()
    _sync_cuda(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync_cuda(dev)
    tdist.barrier()
    return out, time.perf_counter() - t0


def _load_safetensors_dir(d: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def _check_hf_dir(name: str, export_dir: str, ref_model: dict, fsdp_logits: torch.Tensor, ids, dev) -> None:
    """Rank 0: exported safetensors == gathered state (bitwise); from_pretrained logits == FSDP logits."""
    from transformers import AutoModelForCausalLM

    got = _load_safetensors_dir(export_dir)
    missing = sorted(set(ref_model) - set(got))
    extra = sorted(set(got) - set(ref_model))
    bad = [k for k in got if k in ref_model and not torch.equal(got[k], ref_model[k])]
    C.report(f"{name}_safetensors_equal", not missing and not extra and not bad,
             f"{len(got)} tensors; files {sorted(os.listdir(export_dir))}; missing {missing[:4]} extra {extra[:4]} "
             f"differ {bad[:4]}")
    del got
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32,
                                              attn_implementation=C.ATTN).to(dev)
    t_load = time.perf_counter() - t0
    hf_logits = _logits(hf, ids)
    same = torch.equal(hf_logits, fsdp_logits)
    md = float((hf_logits.double() - fsdp_logits.double()).abs().max())
    C.report(f"{name}_from_pretrained_logits", md <= 1e-5,
             f"logits {tuple(hf_logits.shape)} {'bitwise equal' if same else f'max abs diff {md:.3g}'} "
             f"(from_pretrained {t_load:.2f} s)")
    del hf


# --------------------------------------------------------------------------- phases
def phase_save2(work: str, dev) -> None:

    r = C.rank()
    role = C.make_role(C.build_llama(0, dev))
    losses = C.train(role, CKPT_STEP, dev)
    C.info(f"save2: trained {CKPT_STEP} steps, losses rank0 {['%.4f' % x for x in losses]}")
    ref = C.gathered_state(role)
    ids = C.eval_ids(dev)
    fsdp_logits = _logits(role.model, ids)
    if r == 0:
        torch.save(ref, os.path.join(work, "ref_w2.pt"))
        torch.save({"ids": ids.cpu(), "logits": fsdp_logits}, os.path.join(work, "logits_w2.pt"))
    size = C.nbytes_of_model(role.model)

    # sharded save through the manager
    def _sharded():
        mgr = _mgr(work, "ckpt_sharded_w2")
        res, secs = _timed(dev, lambda: mgr.save(CKPT_STEP, [role], trainer_state={"case": "gpu"}))
        pdir = os.path.join(res.path, "policy")
        files = _listing(pdir) if r == 0 else []
        cfg = json.load(open(os.path.join(pdir, "fsdp_config.json"))) if r == 0 else {}
        want = {"fsdp_config.json", "lr_scheduler_state.pt", "model_state.dcp/.metadata",
                "model_state.dcp/__0_0.distcp", "model_state.dcp/__1_0.distcp", "optimizer_state.dcp/.metadata",
                "optimizer_state.dcp/__0_0.distcp", "optimizer_state.dcp/__1_0.distcp"}
        ok = want <= set(files) and cfg.get("world_size") == 2 and cfg.get("fsdp_strategy") == "fsdp2"
        C.report("fsdp2_sharded_save_w2", ok,
                 f"{res.bytes / 1e6:.1f} MB in {secs:.2f} s (model {C.mib(size)} fp32 + AdamW); policy/ files {files}; "
                 f"fsdp_config {cfg}")

    C.guarded("fsdp2_sharded_save_w2", _sharded)

    def _full():
        mgr = _mgr(work, "ckpt_full_w2", state_dict_type="full")
        res, secs = _timed(dev, lambda: mgr.save(CKPT_STEP, [role]))
        pdir = os.path.join(res.path, "policy")
        files = _listing(pdir) if r == 0 else []
        ok = {"model_state.pt", "optimizer_state.pt", "fsdp_config.json"} <= set(files)
        C.report("fsdp2_full_save_w2", ok, f"{res.bytes / 1e6:.1f} MB in {secs:.2f} s; policy/ files {files}")

    C.guarded("fsdp2_full_save_w2", _full)

    # diagnostic: the same with AdamW(capturable=True), whose "step" lives on the GPU (the default
    # AdamW keeps it as a CPU tensor, which NCCL cannot broadcast)
    def _full_cap():
        role_c = C.make_role(C.build_llama(0, dev), capturable=True)
        C.train(role_c, CKPT_STEP, dev)
        ref_c = C.gathered_state(role_c)
        if r == 0:
            torch.save(ref_c, os.path.join(work, "ref_w2_capturable.pt"))
        mgr = _mgr(work, "ckpt_full_cap_w2", state_dict_type="full")
        res, secs = _timed(dev, lambda: mgr.save(CKPT_STEP, [role_c]))
        files = _listing(os.path.join(res.path, "policy")) if r == 0 else []
        ok = {"model_state.pt", "optimizer_state.pt"} <= set(files) and res.bytes > 0 if r == 0 else True
        C.report("fsdp2_full_save_w2_capturable", ok,
                 f"{res.bytes / 1e6:.1f} MB in {secs:.2f} s; policy/ files {files}")

    if dev.type == "cuda":
        C.guarded("fsdp2_full_save_w2_capturable", _full_cap)

    # HF export of the 2-rank model (case 4, small model)
    def _export():
        mgr = _mgr(work, "ckpt_sharded_w2")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            gpu0 = torch.cuda.memory_allocated(dev)
        with C.PeakRSS() as rss:
            out, secs = _timed(dev, lambda: mgr.export_hf(CKPT_STEP, role))
        gpu_peak = (torch.cuda.max_memory_allocated(dev) - gpu0) if dev.type == "cuda" else 0
        mem = C.all_gather_obj({"rank": r, "rss_growth": rss.growth, "rss_peak": rss.peak, "gpu_peak_growth": gpu_peak})
        if r == 0:
            C.report("hf_export_tiny_w2", os.path.isdir(out),
                     f"{secs:.2f} s -> {os.path.relpath(out, work)}; model {C.mib(size)}; per rank: "
                     + ", ".join(f"rank{m['rank']} RSS +{C.mib(m['rss_growth'])} (peak {C.mib(m['rss_peak'])}), "
                                 f"GPU peak +{C.mib(m['gpu_peak_growth'])}" for m in mem))
            _check_hf_dir("hf_export_tiny_w2", out, ref["model"], fsdp_logits, ids, dev)
        import torch.distributed as tdist

        tdist.barrier()

    C.guarded("hf_export_tiny_w2", _export)

    # one more step, for the "training continues identically" check of load2
    C.train(role, 1, dev, start=CKPT_STEP)
    ref4 = C.gathered_state(role)
    if r == 0:
        torch.save(ref4, os.path.join(work, "ref_w2_step4.pt"))


def _resume_into(work: str, name: str, dev, seed: int, **adamw):
    role = C.make_role(C.build_llama(seed, dev), **adamw)
    mgr = _mgr(work, name)
    state, secs = _timed(dev, lambda: mgr.resume([role]))
    return role, state, secs


def phase_load1(work: str, dev) -> None:
    ref = torch.load(os.path.join(work, "ref_w2.pt"), weights_only=False)

    def _sharded():
        role, state, secs = _resume_into(work, "ckpt_sharded_w2", dev, seed=123)
        C.compare("fsdp2_sharded_2to1", C.gathered_state(role), ref,
                  f"resumed step {state.step} in {secs:.2f} s from {os.path.basename(state.path)}")
        C.report("fsdp2_sharded_2to1_step", state.step == CKPT_STEP, f"ResumeState.step={state.step}")

    C.guarded("fsdp2_sharded_2to1", _sharded)

    def _full():
        role, state, secs = _resume_into(work, "ckpt_full_w2", dev, seed=124)
        C.compare("fsdp2_full_2to1", C.gathered_state(role), ref, f"resumed step {state.step} in {secs:.2f} s")

    C.guarded("fsdp2_full_2to1", _full)

    def _save1():
        role = C.make_role(C.build_llama(0, dev))
        C.train(role, CKPT_STEP, dev)
        ref1 = C.gathered_state(role)
        torch.save(ref1, os.path.join(work, "ref_w1.pt"))
        mgr = _mgr(work, "ckpt_sharded_w1")
        res, secs = _timed(dev, lambda: mgr.save(CKPT_STEP, [role]))
        files = _listing(os.path.join(res.path, "policy"))
        cfg = json.load(open(os.path.join(res.path, "policy", "fsdp_config.json")))
        C.report("fsdp2_sharded_save_w1", cfg.get("world_size") == 1 and "model_state.dcp/__0_0.distcp" in files,
                 f"{res.bytes / 1e6:.1f} MB in {secs:.2f} s; files {files}")

    C.guarded("fsdp2_sharded_save_w1", _save1)


def phase_load2(work: str, dev) -> None:
    ref = torch.load(os.path.join(work, "ref_w2.pt"), weights_only=False)
    ref4 = torch.load(os.path.join(work, "ref_w2_step4.pt"), weights_only=False)

    def _sharded():
        role, state, secs = _resume_into(work, "ckpt_sharded_w2", dev, seed=321)
        C.compare("fsdp2_sharded_2to2", C.gathered_state(role), ref, f"resumed step {state.step} in {secs:.2f} s")
        C.report("fsdp2_sharded_2to2_step", state.step == CKPT_STEP and state.rng is not None,
                 f"ResumeState.step={state.step}, per-rank RNG restored={state.rng is not None}")
        C.train(role, 1, dev, start=CKPT_STEP)
        C.compare("fsdp2_sharded_2to2_continue", C.gathered_state(role), ref4,
                  "one more step after the resume == the saver's next step")

    C.guarded("fsdp2_sharded_2to2", _sharded)

    def _full():
        role, state, secs = _resume_into(work, "ckpt_full_w2", dev, seed=322)
        C.compare("fsdp2_full_2to2", C.gathered_state(role), ref, f"resumed step {state.step} in {secs:.2f} s")

    C.guarded("fsdp2_full_2to2", _full)

    def _full_cap():
        refc = torch.load(os.path.join(work, "ref_w2_capturable.pt"), weights_only=False)
        role, state, secs = _resume_into(work, "ckpt_full_cap_w2", dev, seed=325, capturable=True)
        C.compare("fsdp2_full_2to2_capturable", C.gathered_state(role), refc,
                  f"diagnostic, AdamW(capturable=True): resumed step {state.step} in {secs:.2f} s")

    if dev.type == "cuda":
        C.guarded("fsdp2_full_2to2_capturable", _full_cap)

    def _from1():
        ref1 = torch.load(os.path.join(work, "ref_w1.pt"), weights_only=False)
        role, state, secs = _resume_into(work, "ckpt_sharded_w1", dev, seed=323)
        C.compare("fsdp2_sharded_1to2", C.gathered_state(role), ref1, f"resumed step {state.step} in {secs:.2f} s")

    C.guarded("fsdp2_sharded_1to2", _from1)


def phase_export_big(work: str, dev, small: bool) -> None:
    """Export memory vs model size on a bigger model (no optimizer: export needs none)."""
    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from skyrl_callbacks.roles import Role

    r = C.rank()
    if small:
        cfg = C.llama_config(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=8000)
        shard = "8MB"
    else:
        cfg = C.llama_config(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                             num_key_value_heads=16, vocab_size=32000)
        shard = "512MB"
    t0 = time.perf_counter()
    model = C.build_llama(0, dev, cfg=cfg, init_on_device=True)
    size = C.nbytes_of_model(model)
    biggest = max(p.numel() * p.element_size() for p in model.parameters())
    nparams = sum(p.numel() for p in model.parameters())
    C.info(f"export_big: {nparams / 1e6:.1f} M params, {C.mib(size)} fp32, largest tensor {C.mib(biggest)}; "
           f"built+sharded in {time.perf_counter() - t0:.1f} s")
    ids = C.eval_ids(dev, vocab=cfg.vocab_size)
    fsdp_logits = _logits(model, ids)
    # a forward without backward leaves the root's parameters unsharded: reshard, so the GPU figures
    # below are the export's own (not offset by freeing those buffers)
    from torch.distributed.fsdp import FSDPModule

    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()
    role = Role(name="policy", model=model)

    def measure(label: str, fn):
        import gc

        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            gpu0 = torch.cuda.memory_allocated(dev)
        with C.PeakRSS() as rss:
            out, secs = _timed(dev, fn)
        gpu = (torch.cuda.max_memory_allocated(dev) - gpu0) if dev.type == "cuda" else 0
        mem = C.all_gather_obj({"rank": r, "rss": rss.growth, "peak": rss.peak, "gpu": gpu})
        line = (f"{secs:.2f} s; model {C.mib(size)} (largest tensor {C.mib(biggest)}); "
                + "; ".join(f"rank{m['rank']}: RSS +{C.mib(m['rss'])} (peak {C.mib(m['peak'])}), GPU peak "
                            f"+{C.mib(m['gpu'])}" for m in mem))
        return out, secs, mem, line

    ref_holder: dict = {}

    # (c) for comparison (run first; its result is the reference of the bitwise check): torch's get_model_state_dict(full_state_dict=True, cpu_offload=True)
    def _c():
        holder = {}

        def fn():
            holder["sd"] = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return None

        _, secs, mem, line = measure("dsd", fn)
        ref_holder["sd"] = holder.pop("sd")
        sd = ref_holder["sd"]
        want = {n for n, _ in model.named_parameters()}
        # the reference of the bitwise check below: it must hold every parameter, full size
        params = sum(p.numel() * p.element_size() for p in model.parameters())  # (DTensor: global numel)
        ok = r != 0 or (bool(sd) and want <= set(sd)
                        and sum(v.numel() * v.element_size() for v in sd.values()) >= params)
        C.report("dsd_full_state_dict_baseline", ok, f"(not our code, for comparison) {len(sd)} tensors; {line}")

    C.guarded("dsd_full_state_dict_baseline", _c)

    # (a) manager.export_hf, default max_shard_size (5GB: the whole model fits one shard)
    def _a():
        mgr = _mgr(work, "big", export_path=os.path.join(work, "big_export_default"))
        out, secs, mem, line = measure("default", lambda: mgr.export_hf(1, role))
        shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) if r == 0 else []
        # 5GB: the model fits one shard (and a single file needs no index)
        ok = r != 0 or (os.path.isdir(out) and (len(shards) == 1 or size > 5e9))
        C.report("hf_export_big_default_shard", ok, f"max_shard_size=5GB: {line}; shards {shards}")
        if r == 0:
            import shutil

            shutil.rmtree(os.path.dirname(out), ignore_errors=True)
        tdist.barrier()

    C.guarded("hf_export_big_default_shard", _a)

    # (b) manager.export_hf with smaller shards: host memory bounded by the shard size
    def _b():
        mgr = _mgr(work, "big", export_path=os.path.join(work, "big_export_small"))
        out, secs, mem, line = measure("small", lambda: mgr.export_hf(1, role, max_shard_size=shard))
        rss0 = mem[0]["rss"]
        shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) if r == 0 else []
        # several shards and an index naming them (the model is many times the shard size)
        ok = r != 0 or (len(shards) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json")))
        C.report("hf_export_big_small_shards", ok, f"max_shard_size={shard}: {line}; files "
                 f"{sorted(os.listdir(out)) if r == 0 else ''}")
        if r == 0:
            ref = {}
            C.report("hf_export_big_rss_bounded", rss0 < 0.75 * size,
                     f"rank0 RSS growth {C.mib(rss0)} vs model {C.mib(size)} (shard {shard})")
            got = _load_safetensors_dir(out)
            refm = ref_holder.get("sd") or {}
            bad = [k for k in refm if k not in got or not torch.equal(got[k], refm[k])]
            C.report("hf_export_big_safetensors_equal", bool(refm) and not bad and set(got) == set(refm),
                     f"{len(got)} tensors vs DSD full_state_dict: {'bitwise equal' if not bad else f'differ {bad[:4]}'}")
            del got
            from transformers import AutoModelForCausalLM

            t0 = time.perf_counter()
            hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                      attn_implementation=C.ATTN).to(dev)
            t_load = time.perf_counter() - t0
            hf_logits = _logits(hf, ids)
            del hf
            same = torch.equal(hf_logits, fsdp_logits)
            md = float((hf_logits.double() - fsdp_logits.double()).abs().max())
            C.report("hf_export_big_from_pretrained_logits", md <= 1e-4,
                     f"{'bitwise equal' if same else f'max abs diff {md:.3g}'} (from_pretrained {t_load:.1f} s)")
            del ref
        tdist.barrier()

    C.guarded("hf_export_big_small_shards", _b)


def main() -> None:
    ap = C.base_parser(__doc__)
    ap.add_argument("--phase", required=True, choices=["save2", "load1", "load2", "export_big"])
    ap.add_argument("--small", action="store_true", help="export_big: a small model (CPU smoke test)")
    args = ap.parse_args()
    dev = C.init(args.backend, args.device)
    os.makedirs(args.work, exist_ok=True)
    t0 = time.perf_counter()
    if args.phase == "save2":
        C.guarded("phase_save2", lambda: phase_save2(args.work, dev))
    elif args.phase == "load1":
        C.guarded("phase_load1", lambda: phase_load1(args.work, dev))
    elif args.phase == "load2":
        C.guarded("phase_load2", lambda: phase_load2(args.work, dev))
    else:
        C.guarded("phase_export_big", lambda: phase_export_big(args.work, dev, args.small))
    C.info(f"phase {args.phase} took {time.perf_counter() - t0:.1f} s")
    C.finish_pg()


if __name__ == "__main__":
    main()
