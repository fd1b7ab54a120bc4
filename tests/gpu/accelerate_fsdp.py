"""Accelerate's FSDP plugin + ``SkyRLCheckpoint.bind/step/finish`` (brief case 3).

    torchrun --nproc_per_node 2 tests/gpu/accelerate_fsdp.py --fsdp-version 2 --ckpt-path P --steps 8 \
        [--kill-at-step 5] --out OUT [--backend nccl --device cuda]

The tiny Llama is prepared by ``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(
fsdp_version=V, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=
["LlamaDecoderLayer"]))`` with AdamW, a per-step LambdaLR and a shuffled prepared dataloader;
checkpoints every ``--interval`` steps through ``ckpt.step()``. ``--kill-at-step K`` SIGKILLs every
rank right after step K. Rank 0 writes ``OUT``: the gathered weights, the step, ``resumed_step``.
"""

from __future__ import annotations

import os
import signal

import common as C
import torch
from torch.utils.data import DataLoader, TensorDataset

from skyrl_callbacks import SkyRLCheckpoint


def main() -> None:
    ap = C.base_parser(__doc__)
    ap.add_argument("--fsdp-version", type=int, default=2, choices=[1, 2])
    ap.add_argument("--ckpt-path", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--kill-at-step", type=int, default=-1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, set_seed
    from transformers import AutoModelForCausalLM

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=args.fsdp_version, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="SHARDED_STATE_DICT" if args.fsdp_version == 2 else "FULL_STATE_DICT",
        **({"use_orig_params": True} if args.fsdp_version == 1 else {}),
    )
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=args.device == "cpu")
    set_seed(1234)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(C.llama_config(), attn_implementation=C.ATTN)
    data = torch.randint(0, C.LLAMA["vocab_size"], (64, 32), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(data), batch_size=4, shuffle=True)
    if args.fsdp_version == 2:  # FSDP2: accelerate wants the model and its optimizer in one prepare call
        opt = torch.optim.AdamW(model.parameters(), lr=C.LR, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        model, opt, sched, loader = accelerator.prepare(model, opt, sched, loader)
    else:  # FSDP1: the model is wrapped first, the optimizer built on the wrapped parameters
        model = accelerator.prepare(model)
        opt = torch.optim.AdamW(model.parameters(), lr=C.LR, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        opt, sched, loader = accelerator.prepare(opt, sched, loader)

    from skyrl_callbacks.writers import fsdp as F

    C.info(f"accelerate fsdp_version={args.fsdp_version}: distributed_type={accelerator.distributed_type}, "
           f"model {type(model).__name__}, strategy detected: {F.fsdp_strategy_of(model)}")
    if args.kill_at_step > 0:  # once per case (run A)
        expect = "fsdp2" if args.fsdp_version == 2 else "fsdp"
        C.report(f"accelerate_fsdp{args.fsdp_version}_model_is_fsdp", F.fsdp_strategy_of(model) == expect,
                 f"prepared model {type(model).__name__}, fsdp_strategy_of -> {F.fsdp_strategy_of(model)} "
                 f"(want {expect}), distributed_type {accelerator.distributed_type}")
    cfg = {"ckpt_interval": args.interval, "ckpt_path": args.ckpt_path, "export_path": args.ckpt_path + "_export",
           "resume_mode": "latest"}
    ckpt = SkyRLCheckpoint(cfg)
    state = ckpt.bind(accelerator, policy=model, optimizers=[opt], schedulers=[sched], dataloader=loader)
    batches = state.batches()
    for step in range(state.step + 1, args.steps + 1):
        (ids,) = next(batches)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        ckpt.step()
        if step == args.kill_at_step:
            accelerator.wait_for_everyone()
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.finish()

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if args.fsdp_version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False, rank0_only=False):
            weights = {n.replace("_fsdp_wrapped_module.", ""): p.detach().cpu().clone()
                       for n, p in model.named_parameters()}
    else:
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    w = ckpt.manager.writer_for(ckpt._binding.roles[0])
    if accelerator.is_main_process:
        torch.save({"policy": weights, "step": int(ckpt.step), "resumed_step": ckpt.resumed_step,
                    "writer": type(w).__name__ + (f"({w.state_dict_type})" if hasattr(w, "state_dict_type") else "")}, args.out)
        print(f"[gpu] INFO accelerate fsdp{args.fsdp_version}: finished at step {int(ckpt.step)}, "
              f"resumed_step={ckpt.resumed_step}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    C.finish_pg()


if __name__ == "__main__":
    main()
