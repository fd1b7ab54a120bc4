"""A small RL-shaped Lightning run used by the exact-resume and crash tests.

policy + critic (+ a frozen reference model that must never be saved), dropout so the RNG
matters, AdamW + LR schedulers. Every step also draws from python ``random`` and numpy's global
RNG and feeds the draws into the loss (and the log): a resume that restored only torch's RNG
would train on other inputs and end with other weights. Writes a log of the batches each step saw and, at the end,
the final states to ``--out``. ``--kill-at-step K`` SIGKILLs the whole process group inside
step K (after the rules ran), like a preemption without warning. ``--phase-log PATH`` appends
``<CLOCK_MONOTONIC> save_start|save_end N`` around every save and ``delete_start|delete_end NAME``
around the deletion of a retired checkpoint (record only: a test that SIGKILLs the run at a random
moment reads where the kill landed); ``--kill-in-delete K`` SIGKILLs the run inside the K-th
background retention delete, after its first file is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl

from skyrl_callbacks import SkyRLCheckpoint


class RLModule(pl.LightningModule):
    def __init__(self, manual: bool, log_path: str, hidden: int = 32) -> None:
        super().__init__()
        self.policy = nn.Sequential(nn.Linear(8, hidden), nn.Dropout(0.2), nn.ReLU(), nn.Linear(hidden, 4))
        self.critic = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))
        self.ref = nn.Linear(8, 4)
        self.ref.requires_grad_(False)
        self.automatic_optimization = not manual
        self.log_path = log_path
        self.seen = 0

    def _record(self, batch) -> tuple[float, float]:
        """Log what this step saw and return its python / numpy draws (they go into the loss)."""
        x, idx = batch
        rank = self.trainer.global_rank
        py, npy = random.random(), float(np.random.standard_normal())
        with open(f"{self.log_path}.rank{rank}", "a") as fh:
            fh.write(json.dumps({"idx": idx.tolist(), "noise": float(torch.rand(1)), "py": py, "np": npy}) + "\n")
        return py, npy

    def _losses(self, batch, draws):
        x, _ = batch
        x = x * (1.0 + 0.5 * draws[0]) + 0.1 * draws[1]  # the python and numpy draws change the update
        logits = self.policy(x)
        kl = (logits - self.ref(x)).pow(2).mean()
        value = self.critic(x).squeeze(-1)
        reward = logits.softmax(-1)[:, 0].detach()
        return -(logits.log_softmax(-1)[:, 0] * (reward - value.detach())).mean() + 0.1 * kl, (value - reward).pow(2).mean()

    def training_step(self, batch, batch_idx):
        draws = self._record(batch)
        if self.automatic_optimization:
            pl_loss, v_loss = self._losses(batch, draws)
            return pl_loss + v_loss
        opt_p, opt_c = self.optimizers()
        sch_p, sch_c = self.lr_schedulers()
        pl_loss, v_loss = self._losses(batch, draws)
        opt_p.zero_grad()
        opt_c.zero_grad()
        self.manual_backward(pl_loss + v_loss)  # one backward: DDP needs every parameter in the graph
        opt_p.step()
        opt_c.step()
        sch_p.step()
        sch_c.step()

    def configure_optimizers(self):
        if self.automatic_optimization:
            opt = torch.optim.AdamW(list(self.policy.parameters()) + list(self.critic.parameters()), lr=1e-2)
            sch = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}
        opt_p = torch.optim.AdamW(self.policy.parameters(), lr=1e-2)
        opt_c = torch.optim.AdamW(self.critic.parameters(), lr=2e-2)
        return [opt_p, opt_c], [
            torch.optim.lr_scheduler.StepLR(opt_p, step_size=3, gamma=0.9),
            torch.optim.lr_scheduler.StepLR(opt_c, step_size=2, gamma=0.8),
        ]


class KillAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.kill_step = step
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        skyrl = next(cb for cb in trainer.callbacks if isinstance(cb, SkyRLCheckpoint))
        if skyrl.step >= self.kill_step:
            os.killpg(os.getpgid(0), signal.SIGKILL)


def install_phase_log(path: str, kill_in_delete: int = -1) -> None:
    """Record (only) when saves and retention deletes start and end; optionally die inside a delete."""
    from skyrl_callbacks.manager import CheckpointManager
    from skyrl_callbacks.storage import Storage

    def mark(what: str) -> None:
        with open(path, "a") as fh:
            fh.write(f"{time.monotonic():.6f} {what}\n")

    orig_save, orig_rm = CheckpointManager.save, Storage.rm
    deletes = [0]

    def save(self, step, roles, **kw):
        mark(f"save_start {step}")
        result = orig_save(self, step, roles, **kw)
        mark(f"save_end {step}")
        return result

    def rm(self, target, recursive=True):
        name = os.path.basename(str(target).rstrip("/"))
        if not (self.is_local and name.startswith(".trash-")):
            return orig_rm(self, target, recursive)
        deletes[0] += 1
        mark(f"delete_start {name}")
        if deletes[0] == kill_in_delete:
            first = next(os.path.join(d, f) for d, _, files in os.walk(target) for f in files)
            os.unlink(first)
            mark(f"delete_kill {name}")
            os.killpg(os.getpgid(0), signal.SIGKILL)
        orig_rm(self, target, recursive)
        mark(f"delete_end {name}")

    CheckpointManager.save, Storage.rm = save, rm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-path", required=True)
    p.add_argument("--export-path", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--keep", type=int, default=-1)
    p.add_argument("--hf-interval", type=int, default=-1)
    p.add_argument("--kill-at-step", type=int, default=-1)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--shuffle", choices=["none", "global", "generator"], default="global")
    p.add_argument("--loader", choices=["resumable", "torchdata", "mixin", "plain"], default="resumable")
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--manual", action="store_true")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--log", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--async-save", action="store_true", help="async_save=True")
    p.add_argument("--async-overlap", action="store_true", help="async_save=True, async_overlap_copy=True")
    p.add_argument("--storage-options", default=None, help="JSON dict of fsspec options (cloud ckpt paths)")
    p.add_argument("--phase-log", default=None, help="append save/delete start/end markers to this file")
    p.add_argument("--kill-in-delete", type=int, default=-1, help="SIGKILL inside the K-th retention delete")
    p.add_argument("--hidden", type=int, default=32, help="policy width (bigger: longer saves)")
    args = p.parse_args()
    if args.phase_log:
        install_phase_log(args.phase_log, args.kill_in_delete)

    pl.seed_everything(args.seed, workers=True)
    x = torch.randn(args.samples, 8, generator=torch.Generator().manual_seed(0))
    ds = TensorDataset(x, torch.arange(args.samples))
    kwargs = dict(batch_size=args.batch_size, num_workers=args.num_workers, shuffle=args.shuffle != "none")
    if args.shuffle == "generator":
        kwargs["generator"] = torch.Generator().manual_seed(77)
    if args.loader == "plain":
        loader = DataLoader(ds, **kwargs)
    elif args.loader == "torchdata":
        from skyrl_callbacks.data import TorchdataResumableDataLoader

        loader = TorchdataResumableDataLoader(ds, **kwargs)
    elif args.loader == "resumable":
        from skyrl_callbacks import ResumableDataLoader

        loader = ResumableDataLoader(ds, **kwargs)
    else:
        from skyrl_callbacks import DataLoaderStateMixin

        class MyLoader(DataLoaderStateMixin, DataLoader):
            pass

        loader = MyLoader(ds, **kwargs)

    module = RLModule(args.manual, args.log, args.hidden)
    cfg = {"ckpt_interval": args.interval, "ckpt_path": args.ckpt_path, "max_ckpts_to_keep": args.keep,
           "hf_save_interval": args.hf_interval, "export_path": args.export_path or args.ckpt_path + "_export"}
    if args.async_save or args.async_overlap:
        cfg["async_save"] = True
    if args.async_overlap:
        cfg["async_overlap_copy"] = True
    if args.storage_options:
        cfg["storage_options"] = json.loads(args.storage_options)
    callbacks = [SkyRLCheckpoint(cfg)]
    if args.kill_at_step > 0:
        callbacks.append(KillAt(args.kill_at_step))
    max_steps = args.steps * (2 if args.manual else 1)  # manual: Lightning counts every optimizer.step()
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto", callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=args.accumulate, num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    if trainer.is_global_zero:
        skyrl = callbacks[0]
        state = {
            "policy": module.policy.state_dict(),
            "critic": module.critic.state_dict(),
            "optimizers": [o.state_dict() for o in trainer.optimizers],
            "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
            "rng": torch.get_rng_state(),
            "py_rng": random.getstate(),
            "np_rng": np.random.get_state()[1].tolist(),
            "step": skyrl.step,
            "resumed_step": skyrl.resumed_step,
        }
        torch.save(state, args.out)


if __name__ == "__main__":
    main()
