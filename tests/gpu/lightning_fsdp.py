"""Lightning + SkyRLCheckpoint under FSDP strategies (brief case 2).

    torchrun --nproc_per_node 2 tests/gpu/lightning_fsdp.py --strategy fsdp --ckpt-path P --steps 8 \
        [--kill-at-step 5] --out OUT [--backend nccl --device cuda]

Strategies:
  fsdp           ``FSDPStrategy()`` with its defaults, which is what ``strategy="fsdp"`` resolves to
                 (FSDP1, use_orig_params=True, no auto-wrap: the whole LightningModule is one FSDP
                 unit); only the collective timeout is shortened
  fsdp-wrap      ``FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})`` (FSDP1, one unit per layer)
  fsdp-wrap-policy  ``FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer, LlamaForCausalLM})``: the
                 policy module itself is an FSDP unit (nested inside the root)
  modelparallel  ``ModelParallelStrategy`` with ``fully_shard`` per decoder layer + the policy in
                 ``configure_model`` (FSDP2)

Under the three FSDPStrategy variants SkyRLCheckpoint saves the policy as a view on the FSDP1 root
that wraps the whole LightningModule (``Role(model=root, include_prefix="policy.")``) and resumes
through that root; all of them must resume bitwise like ``modelparallel``.

With ``--device cpu`` (a smoke test of the script with gloo) the FSDPStrategy variants use a
subclass that wraps with ``device_id=cpu``: Lightning refuses ``FSDPStrategy`` itself on CPU.

The module's ``policy`` is the tiny Llama; AdamW + a per-step LambdaLR; shuffled resumable loader.
``--kill-at-step K`` SIGKILLs every rank after step K's rules ran, like a
preemption. At the end rank 0 writes ``OUT``: the gathered policy weights, the SkyRL step and
``resumed_step``.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

import common as C
import torch
from torch.utils.data import TensorDataset

import lightning.pytorch as pl

from skyrl_callbacks import SkyRLCheckpoint


class LlamaModule(pl.LightningModule):
    def __init__(self, strategy: str) -> None:
        super().__init__()
        self.strategy_name = strategy
        if strategy == "modelparallel":
            self.policy = None  # built in configure_model
        else:
            self.policy = _llama()

    def configure_model(self) -> None:
        if self.strategy_name != "modelparallel" or self.policy is not None:
            return
        from torch.distributed.fsdp import fully_shard

        self.policy = _llama().to(self.device)
        mesh = self.device_mesh["data_parallel"]
        for layer in self.policy.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.policy, mesh=mesh)

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        return self.policy(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.policy.parameters(), lr=C.LR, weight_decay=0.1)
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}


def _llama():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(C.llama_config(), attn_implementation=C.ATTN)


class KillAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.kill_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        skyrl = next(cb for cb in trainer.callbacks if isinstance(cb, SkyRLCheckpoint))
        if skyrl.step >= self.kill_step:
            trainer.strategy.barrier()
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # every rank; torchrun then reports the failure and exits


def _strategy(name: str, backend: str, device: str = "cuda"):
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if device == "cpu":
        class FSDPStrategy(FSDPStrategy):  # noqa: F811 - CPU smoke test only, see the module docstring
            def _setup_model(self, model):
                from torch.distributed.fsdp import FullyShardedDataParallel

                return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                                mixed_precision=self.mixed_precision_config,
                                                sharding_strategy=self.sharding_strategy,
                                                device_id=torch.device("cpu"), **self.kwargs)

    # a short collective timeout, so that a rank failing alone ends the run instead of hanging it
    timeout = timedelta(seconds=120)
    if name == "fsdp":  # what strategy="fsdp" resolves to: FSDPStrategy() with its defaults
        return FSDPStrategy(process_group_backend=backend, timeout=timeout)
    if name == "fsdp-wrap":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, process_group_backend=backend, timeout=timeout)
    if name == "fsdp-wrap-policy":  # the policy itself becomes an FSDP unit (embeddings/lm_head inside)
        from transformers import LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer, LlamaForCausalLM}, process_group_backend=backend,
                            timeout=timeout)
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend=backend,
                                 timeout=timeout)


def _writer_name(w) -> str:
    return type(w).__name__ + (f"({w.state_dict_type})" if hasattr(w, "state_dict_type") else "")


def gathered_policy(trainer, module) -> dict:
    """Full policy weights on rank 0 (collective), by torch's own means."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = trainer.strategy.model
    if isinstance(root, FSDP) or any(isinstance(m, FSDP) for m in root.modules()):
        with FSDP.summon_full_params(root, writeback=False, rank0_only=False):
            return {n: p.detach().cpu().clone() for n, p in module.policy.named_parameters()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main() -> None:
    ap = C.base_parser(__doc__)
    ap.add_argument("--strategy", required=True, choices=["fsdp", "fsdp-wrap", "fsdp-wrap-policy", "modelparallel"])
    ap.add_argument("--ckpt-path", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--kill-at-step", type=int, default=-1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    pl.seed_everything(1234, workers=True)
    data = torch.randint(0, C.LLAMA["vocab_size"], (64, 32), generator=torch.Generator().manual_seed(0))
    from skyrl_callbacks import ResumableDataLoader

    loader = ResumableDataLoader(TensorDataset(data), batch_size=4, shuffle=True)
    module = LlamaModule(args.strategy)
    cfg = {"ckpt_interval": args.interval, "ckpt_path": args.ckpt_path, "export_path": args.ckpt_path + "_export",
           "resume_mode": "latest"}
    callbacks = [SkyRLCheckpoint(cfg)]
    if args.kill_at_step > 0:
        callbacks.append(KillAt(args.kill_at_step))
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="gpu" if args.device == "cuda" else "cpu", devices=2,
        strategy=_strategy(args.strategy, args.backend, args.device), callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    weights = gathered_policy(trainer, module)
    skyrl = callbacks[0]
    if trainer.is_global_zero:
        torch.save({"policy": weights, "step": int(skyrl.step), "resumed_step": skyrl.resumed_step,
                    "global_step": trainer.global_step, "writer": _writer_name(skyrl.manager.writer_for(
                        skyrl._roles(trainer, module)[0]))}, args.out)
        print(f"[gpu] INFO lightning {args.strategy}: finished at step {int(skyrl.step)} "
              f"(global_step {trainer.global_step}), resumed_step={skyrl.resumed_step}", flush=True)


if __name__ == "__main__":
    main()
