"""A small RL-shaped hand-written Accelerate loop used by the exact-resume tests.

policy + critic (+ a frozen reference model that must never be saved), dropout so the RNG
matters, a python ``random`` and a numpy draw every step that go into the loss (so a resume that
does not restore those RNGs ends with other weights), AdamW + LR schedulers, a shuffled dataloader prepared by accelerate, several epochs.
``SkyRLCheckpoint.bind/step/finish`` drive checkpointing. Every rank appends the batch each
step saw (and a random draw) to ``--batch-log.rank{r}`` and writes its final states to
``--out.rank{r}``. ``--kill-at-step K`` SIGKILLs every process (and torchrun) right after
step K, like a preemption without warning.

Single process: ``python accelerate_loop.py ...``; two CPU processes:
``torchrun --nproc_per_node 2 accelerate_loop.py ...`` (``Accelerator(cpu=True)``).
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

from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from skyrl_callbacks import SkyRLCheckpoint


def kill_everything(accelerator: Accelerator) -> None:
    accelerator.wait_for_everyone()
    if "TORCHELASTIC_RUN_ID" in os.environ and accelerator.is_main_process:
        os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)  # torchrun (its workers run in their own sessions)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def local(obj):
    """This rank's tensors on the CPU (an FSDP DTensor becomes its local shard)."""
    if isinstance(obj, dict):
        return {k: local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(local(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return (obj.to_local() if hasattr(obj, "to_local") else obj).detach().cpu()
    return obj


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-path", required=True)
    p.add_argument("--export-path", default=None)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--hf-interval", type=int, default=-1)
    p.add_argument("--kill-at-step", type=int, default=-1)
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--loader", choices=["prepared", "prepared-stateful", "resumable"], default="prepared")
    p.add_argument("--batch-log", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--async-save", action="store_true", help="async_save=True")
    p.add_argument("--async-overlap", action="store_true", help="async_save=True, async_overlap_copy=True")
    p.add_argument("--gpu", action="store_true", help="one GPU per process (default: Accelerator(cpu=True))")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 through accelerate's plugin (GPUs)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep in every step (preemption tests)")
    p.add_argument("--no-exit-on-preemption", action="store_true",
                   help="bind(exit_on_preemption=False): the loop checks state.should_stop and breaks")
    args = p.parse_args()

    plugin = {}
    if args.fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(
        cpu=not args.gpu,
        dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=args.loader == "prepared-stateful"),
        **plugin,
    )
    set_seed(args.seed)
    rank = accelerator.process_index

    x = torch.randn(args.samples, 8, generator=torch.Generator().manual_seed(0))
    ds = TensorDataset(x, torch.arange(args.samples))
    if args.loader == "resumable":  # not prepared: shard with a DistributedSampler by hand
        from torch.utils.data.distributed import DistributedSampler

        from skyrl_callbacks import ResumableDataLoader

        sampler = DistributedSampler(ds, num_replicas=accelerator.num_processes, rank=rank, seed=args.seed)
        loader = ResumableDataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers)
    else:
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)

    policy = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 4))
    critic = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))
    ref = nn.Linear(8, 4).requires_grad_(False)
    opt_p = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=2e-2)
    sch_p = torch.optim.lr_scheduler.StepLR(opt_p, step_size=3, gamma=0.9)
    sch_c = torch.optim.lr_scheduler.StepLR(opt_c, step_size=2, gamma=0.8)
    if args.fsdp:  # FSDP2: one model (with its optimizer) per prepare call
        policy, opt_p, sch_p = accelerator.prepare(policy, opt_p, sch_p)
        critic, opt_c, sch_c = accelerator.prepare(critic, opt_c, sch_c)
        if args.loader != "resumable":
            loader = accelerator.prepare(loader)
    elif args.loader == "resumable":
        policy, critic, opt_p, opt_c, sch_p, sch_c = accelerator.prepare(policy, critic, opt_p, opt_c, sch_p, sch_c)
    else:
        policy, critic, opt_p, opt_c, sch_p, sch_c, loader = accelerator.prepare(
            policy, critic, opt_p, opt_c, sch_p, sch_c, loader
        )
    ref = ref.to(accelerator.device)

    cfg = {"ckpt_interval": args.interval, "ckpt_path": args.ckpt_path, "hf_save_interval": args.hf_interval,
           "export_path": args.export_path or args.ckpt_path + "_export"}
    if args.async_save or args.async_overlap:
        cfg["async_save"] = True
    if args.async_overlap:
        cfg["async_overlap_copy"] = True
    ckpt = SkyRLCheckpoint(cfg)
    state = ckpt.bind(accelerator, policy=policy, critic=critic, ref=ref, optimizers=[opt_p, opt_c],
                      schedulers=[sch_p, sch_c], dataloader=loader,
                      exit_on_preemption=not args.no_exit_on_preemption)
    batches = state.batches()
    for step in range(state.step + 1, args.steps + 1):
        xb, idx = next(batches)
        py, npy = random.random(), float(np.random.standard_normal())
        with open(f"{args.batch_log}.rank{rank}", "a") as fh:
            fh.write(json.dumps({"step": step, "idx": idx.tolist(), "noise": float(torch.rand(1)),
                                 "py": py, "np": npy, "epoch": state.epoch}) + "\n")
        xb = xb * (1.0 + 0.5 * py) + 0.1 * npy  # the python and numpy draws change the update
        logits = policy(xb)
        kl = (logits - ref(xb)).pow(2).mean()
        value = critic(xb).squeeze(-1)
        reward = logits.softmax(-1)[:, 0].detach()
        pl_loss = -(logits.log_softmax(-1)[:, 0] * (reward - value.detach())).mean() + 0.1 * kl
        accelerator.backward(pl_loss + (value - reward).pow(2).mean())
        opt_p.step()
        opt_c.step()
        sch_p.step()
        sch_c.step()
        opt_p.zero_grad()
        opt_c.zero_grad()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        ckpt.step()  # on a preemption signal: saves this step, then exits with code 0 (SystemExit)
        if step == args.kill_at_step:
            kill_everything(accelerator)
        if state.should_stop:  # only with --no-exit-on-preemption
            print(f"[loop] rank {rank} leaves the loop after step {step}", flush=True)
            break
    ckpt.finish()

    unwrap = accelerator.unwrap_model
    final = {
        "policy": local(unwrap(policy).state_dict()),
        "critic": local(unwrap(critic).state_dict()),
        "optimizers": [local(opt_p.optimizer.state_dict()), local(opt_c.optimizer.state_dict())],
        "schedulers": [sch_p.scheduler.state_dict(), sch_c.scheduler.state_dict()],
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if args.gpu else None,
        "writer": ckpt.manager.writer_for(ckpt._binding.roles[0]).kind,
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].tolist(),
        "step": int(ckpt.step),
        "resumed_step": ckpt.resumed_step,
        "epoch": state.epoch,
    }
    torch.save(final, f"{args.out}.rank{rank}")
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        # destroy_process_group() on gloo now and then deadlocks in ProcessGroupGloo's destructor
        # (pytorch/pytorch#75097): skip the teardown, everything is written
        os._exit(0)
    accelerator.end_training()


if __name__ == "__main__":
    main()
