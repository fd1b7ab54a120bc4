"""A LightningModule that owns a megatron-core GPT (tensor parallel), checkpointed by ``SkyRLCheckpoint``.

    torchrun --nproc_per_node 2 examples/megatron_lightning.py --steps 20 --ckpt-path runs/megatron_lightning
    # kill it and run the same command again: SkyRLCheckpoint resumes inside trainer.fit

GPU only (megatron-core's checkpoint writer needs CUDA; the CPU test suite uses test-only shims).

The module's ``policy`` attribute is a megatron-core ``GPTModel``; ``SkyRLCheckpoint`` sees it is a
megatron model and saves it with the Megatron writer (``global_step_N/policy/`` holds
megatron-core's ``dist_checkpointing`` files, every rank writing its own shards). All ranks form one
tensor-parallel group (TP = world size, DP = 1), so no gradient all-reduce is needed and a plain
``torch.optim.AdamW`` updates each rank's shards; the writer maps its state onto the parameters'
shardings, so the optimizer reshards with the model.

Lightning's ``DDPStrategy`` would wrap the module in torch DDP (wrong for tensor-parallel shards);
``MegatronTPStrategy`` below keeps the process group Lightning sets up, initialises megatron's
``parallel_state`` on it and leaves the module unwrapped.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB, SEQ = 128, 32


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ckpt-path", default="runs/megatron_lightning")
    ap.add_argument("--ckpt-interval", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the final full weights here (rank 0; tests)")
    ap.add_argument("--kill-at-step", type=int, default=None, help="exit abruptly after this step (resume tests)")
    ap.add_argument("--accelerator", default="gpu", help=argparse.SUPPRESS)  # "cpu": tests only, with CUDA shims
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        print("examples/megatron_lightning.py needs CUDA GPUs (megatron-core's checkpoint writer allocates on the "
              "GPU). Run it with torchrun on a GPU machine.", file=sys.stderr)
        return 2
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    from skyrl_callbacks import SkyRLCheckpoint

    class MegatronTPStrategy(DDPStrategy):
        """Lightning's process group + megatron ``parallel_state`` (TP = world size); no torch DDP wrap."""

        def setup_distributed(self) -> None:
            super().setup_distributed()
            from megatron.core import parallel_state as ps
            from megatron.core import tensor_parallel

            if not ps.model_parallel_is_initialized():
                ps.initialize_model_parallel(tensor_model_parallel_size=self.world_size)
                if torch.cuda.is_available():
                    tensor_parallel.model_parallel_cuda_manual_seed(1234)

        def configure_ddp(self) -> None:  # keep the LightningModule as is (no torch DDP)
            pass

    class TinyGPT(pl.LightningModule):
        def __init__(self, steps: int, kill_at_step) -> None:
            super().__init__()
            self.steps, self.kill_at_step = steps, kill_at_step
            self.policy = None

        def configure_model(self) -> None:  # called after the process group exists
            if self.policy is not None:
                return
            from megatron.core import parallel_state as ps
            from megatron.core.models.gpt import GPTModel
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
            from megatron.core.transformer.transformer_config import TransformerConfig

            torch.manual_seed(1234)
            cfg = TransformerConfig(
                num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
                activation_func=torch.nn.functional.silu, use_cpu_initialization=True, hidden_dropout=0.0,
                attention_dropout=0.0, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
            )
            self.policy = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
                                   max_sequence_length=SEQ, position_embedding_type="rope",
                                   share_embeddings_and_output_weights=False).to(self.device)

        def training_step(self, batch, batch_idx):
            ids, labels = batch
            pos = torch.arange(SEQ, device=ids.device).unsqueeze(0).expand_as(ids)
            mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device=ids.device), diagonal=1)
            loss = self.policy(ids, pos, attention_mask=mask, labels=labels).float().mean()
            self.log("loss", loss, prog_bar=True)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            if self.kill_at_step is not None and self.global_step == self.kill_at_step:
                print(f"[example] rank {self.global_rank}: killed after step {self.global_step}", flush=True)
                os._exit(1)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.policy.parameters(), lr=3e-3, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def train_dataloader(self):
            from skyrl_callbacks import ResumableDataLoader

            g = torch.Generator().manual_seed(0)
            start = torch.randint(0, VOCAB - 1, (self.steps * 4, 1), generator=g)
            ids = (start + torch.arange(SEQ + 1)) % VOCAB  # learnable: the next token is +1
            data = torch.utils.data.TensorDataset(ids[:, :-1], ids[:, 1:])
            # TP = world size: every rank must see the same batch, so no DistributedSampler
            return ResumableDataLoader(data, batch_size=4, shuffle=False)

    module = TinyGPT(args.steps, args.kill_at_step)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=world, strategy=MegatronTPStrategy(), max_steps=args.steps,
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[SkyRLCheckpoint({"ckpt_interval": args.ckpt_interval, "ckpt_path": args.ckpt_path,
                                    "max_ckpts_to_keep": 2, "export_path": args.ckpt_path + "_exports"})],
    )
    trainer.fit(module)
    if args.out:
        from skyrl_callbacks.dist import DistContext
        from skyrl_callbacks.writers.megatron import MegatronWriter, gather_full_tensors

        dist = DistContext()
        full = {k: t for k, t in gather_full_tensors(MegatronWriter()._model_state(_Role(module.policy)), dist)}
        if dist.is_main:
            torch.save(full, args.out)
    if trainer.global_rank == 0:
        print(f"[example] done: step {trainer.global_step}", flush=True)
    return 0


class _Role:
    def __init__(self, model) -> None:
        self.model, self.exclude_prefixes = model, ()


if __name__ == "__main__":
    sys.exit(main())
