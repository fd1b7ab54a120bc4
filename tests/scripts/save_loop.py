"""Save checkpoints in a loop, to be SIGKILLed by tests (at random or at a named phase).

Weights at step s are a pure function of s, so a test can check that whatever checkpoint
resume picks holds exactly the bytes of its step.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from torch import nn

from skyrl_callbacks import CheckpointConfig, CheckpointManager
from skyrl_callbacks.manager import CheckpointManager as _M
from skyrl_callbacks.roles import discover_roles
from skyrl_callbacks.storage import Storage

PHASES = ("none", "write", "before_commit", "after_rename", "before_pointer", "after_pointer", "retention")


def build(step: int, width: int) -> nn.Module:
    m = nn.Module()
    m.policy = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))
    m.critic = nn.Linear(width, 1)
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.fill_(step * 1000 + i)
    return m


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(phase: str, at_step: int) -> None:
    """Wrap the commit phases so the process dies at ``phase`` of the save of ``at_step``."""
    current = {"step": None}
    orig_save, orig_commit, orig_write, orig_ret = _M.save, Storage.commit, Storage.atomic_write, _M._retention

    def save(self, step, roles, **kw):
        current["step"] = step
        return orig_save(self, step, roles, **kw)

    def commit(self, staging, final, manifest):
        if current["step"] == at_step and phase == "before_commit":
            die()
        if current["step"] == at_step and phase == "after_rename":
            orig_commit(self, staging, final, manifest)
            die()
        return orig_commit(self, staging, final, manifest)

    def atomic_write(self, path, data):
        pointer = path.endswith("latest_ckpt_global_step.txt")
        if pointer and current["step"] == at_step and phase == "before_pointer":
            die()
        orig_write(self, path, data)
        if pointer and current["step"] == at_step and phase == "after_pointer":
            die()

    def retention(self, step):
        if step == at_step and phase == "retention":
            # delete one old checkpoint, then die in the middle of retention
            committed = self.committed_steps()
            if len(committed) > 1:
                self.storage.delete_checkpoint(self.step_dir(committed[0]))
            die()
        return orig_ret(self, step)

    _M.save, Storage.commit, Storage.atomic_write, _M._retention = save, commit, atomic_write, retention

    if phase == "write":
        import skyrl_callbacks.writers.plain as plain

        orig_ts = plain.torch_save

        def torch_save(storage, path, obj, **kw):
            if current["step"] == at_step and path.endswith("optimizer_state.pt"):
                with storage.open(path, "wb") as fh:
                    fh.write(b"torn")
                die()
            return orig_ts(storage, path, obj, **kw)

        plain.torch_save = torch_save


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-path", required=True)
    p.add_argument("--start", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--kill-phase", choices=PHASES, default="none")
    p.add_argument("--kill-step", type=int, default=-1)
    args = p.parse_args()
    if args.kill_phase != "none":
        install_kill(args.kill_phase, args.kill_step)
    cfg = CheckpointConfig(ckpt_path=args.ckpt_path, max_ckpts_to_keep=args.keep, ckpt_interval=1)
    mgr = CheckpointManager(cfg)
    m0 = build(0, args.width)
    roles0 = discover_roles(m0)
    roles0[0].optimizers = [torch.optim.SGD(m0.policy.parameters(), lr=0.1)]
    mgr.resume(roles0)  # like a real run: resume first (sets the lineage of the next save)
    for step in range(args.start, args.start + args.steps):
        m = build(step, args.width)
        roles = discover_roles(m)
        opt = torch.optim.SGD(m.policy.parameters(), lr=0.1)
        roles[0].optimizers = [opt]
        mgr.save(step, roles, data_state={"step": step})
        print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main()
