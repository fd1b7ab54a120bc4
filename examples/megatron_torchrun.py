"""A plain torchrun training loop over a megatron-core GPT (tensor parallel), checkpointed the SkyRL way.

    torchrun --nproc_per_node 2 examples/megatron_torchrun.py --tp 2 --steps 20 --ckpt-path runs/megatron
    # kill it and run the same command again: it resumes from the last committed checkpoint
    torchrun --nproc_per_node 2 examples/megatron_torchrun.py --tp 1     # data parallel instead (DP=2)

GPU only: megatron-core's DDP, DistributedOptimizer and checkpoint writer allocate on CUDA (the
CPU test suite runs the writer with test-only CUDA shims, see tests/megatron_helpers.py).

The loop is what SkyRL's Megatron workers do: ``parallel_state.initialize_model_parallel``,
a ``GPTModel`` in megatron's ``DistributedDataParallel``, ``get_megatron_optimizer`` (the
``DistributedOptimizer``) and an ``OptimizerParamScheduler``. Checkpointing is the
``CheckpointManager`` with one ``Role``: ``resume`` before the loop, ``save`` every
``ckpt_interval`` steps, and an HF (Llama) export with ``CheckpointManager.export_hf``. A checkpoint saved
at one TP size resumes at another (``--tp``), optimizer included (``fully_reshardable``).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB, SEQ = 128, 32


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the world size)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ckpt-path", default="runs/megatron_torchrun")
    ap.add_argument("--ckpt-interval", type=int, default=5)
    ap.add_argument("--max-ckpts-to-keep", type=int, default=2)
    ap.add_argument("--hf-save-interval", type=int, default=-1)
    ap.add_argument("--sharding", default="fully_reshardable", choices=["fully_reshardable", "dp_reshardable"])
    ap.add_argument("--kill-at-step", type=int, default=None, help="exit abruptly after this step (resume tests)")
    ap.add_argument("--out", default=None, help="write the final full weights here (rank 0; tests)")
    return ap.parse_args(argv)


def build(tp: int):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
        activation_func=torch.nn.functional.silu, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=tp, params_dtype=torch.float32,
    )
    model = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False).cuda()
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, min_lr=3e-4, weight_decay=0.01,
                                                 use_distributed_optimizer=True, bf16=False, fp16=False), [ddp])
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=4,
                                    lr_decay_steps=100, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
                                    wd_incr_steps=100, wd_incr_style="constant")
    return ddp, opt, sched


def batch(step: int):
    """Deterministic per step (the data position is the step), same on every DP rank for brevity."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB - 1, (4, 1), generator=g)
    ids = (start + torch.arange(SEQ + 1)) % VOCAB  # learnable: the next token is +1
    return ids[:, :-1].cuda(), ids[:, 1:].cuda()


def train_step(ddp, opt, sched, step: int) -> float:
    ids, labels = batch(step)
    pos = torch.arange(SEQ, device=ids.device).unsqueeze(0).expand_as(ids)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device=ids.device), diagonal=1)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = ddp(ids, pos, attention_mask=mask, labels=labels).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    opt.step()
    sched.step(increment=1)
    return loss.item()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("examples/megatron_torchrun.py needs CUDA GPUs: megatron-core's DDP, DistributedOptimizer and "
              "checkpoint writer allocate on the GPU. Run it with torchrun on a GPU machine.", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from skyrl_callbacks.manager import CheckpointManager
    from skyrl_callbacks.roles import Role
    from skyrl_callbacks.writers.megatron import MegatronWriter

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    tp = args.tp or world
    ddp, opt, sched = build(tp)
    role = Role(name="policy", model=ddp, optimizers=[opt], schedulers=[sched])
    mgr = CheckpointManager({"ckpt_path": args.ckpt_path, "export_path": args.ckpt_path + "_exports",
                             "ckpt_interval": args.ckpt_interval, "max_ckpts_to_keep": args.max_ckpts_to_keep,
                             "hf_save_interval": args.hf_save_interval, "resume_mode": "latest",
                             "megatron_optimizer_sharding": args.sharding})
    state = mgr.resume([role])
    start = state.step + 1 if state else 1
    if rank == 0:
        print(f"[example] world {world}, TP {tp}, DP {world // tp}; " +
              (f"resumed from {state.path} (step {state.step})" if state else "fresh start"), flush=True)
    loss = float("nan")
    for step in range(start, args.steps + 1):
        loss = train_step(ddp, opt, sched, step)
        if mgr.should_save(step):
            result = mgr.save(step, [role])
            if rank == 0:
                print(f"[example] step {step}: loss {loss:.4f}, saved {result.path} ({result.bytes / 1e6:.1f} MB)",
                      flush=True)
        if mgr.should_export(step):
            mgr.export_hf(step, role)  # HF Llama folder, published atomically (config.json from the writer)
        if args.kill_at_step is not None and step == args.kill_at_step:
            print(f"[example] rank {rank}: killed after step {step}", flush=True)
            os._exit(1)
    if mgr.last_saved_step != args.steps:
        mgr.save(args.steps, [role])
    mgr.close()  # commits a save still in flight (async_save) and releases the run lock
    if args.out:
        from skyrl_callbacks.writers.megatron import gather_full_tensors

        full = {k: t for k, t in gather_full_tensors(MegatronWriter()._model_state(role), mgr.dist) if rank == 0}
        if rank == 0:
            torch.save(full, args.out)
    if rank == 0:
        print(f"[example] done: step {args.steps}, loss {loss:.4f}", flush=True)
    mgr.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
