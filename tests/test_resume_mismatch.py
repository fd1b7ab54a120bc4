"""Resuming into a run that does not match the checkpoint's optimizer/scheduler classes or roles.

Another optimizer or scheduler class is an error naming both classes (before anything is loaded);
parts of the checkpoint the run has no place for (a critic, a scheduler, an optimizer) are named
in a warning. Checkpoints saved before the classes were recorded skip the class check.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from torch import nn

from skyrl_callbacks import CheckpointManager, IncompatibleCheckpointError
from skyrl_callbacks.roles import Role
from skyrl_callbacks.storage import MANIFEST_FILE


def make(opt="adamw", sched=True, critic=False):
    torch.manual_seed(0)
    policy = nn.Linear(8, 8)
    opt_cls = {"adamw": lambda p: torch.optim.AdamW(p, lr=0.1),
               "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)}.get(opt)
    optimizers = [opt_cls(policy.parameters())] if opt_cls else []
    policy(torch.ones(2, 8)).sum().backward()
    for o in optimizers:
        o.step()
    schedulers = [torch.optim.lr_scheduler.StepLR(optimizers[0], 2)] if sched and optimizers else []
    roles = [Role(name="policy", model=policy, optimizers=optimizers, schedulers=schedulers)]
    if critic:
        c = nn.Linear(8, 1)
        roles.append(Role(name="critic", model=c, optimizers=[torch.optim.AdamW(c.parameters(), lr=0.1)]))
    return roles


def saved(tmp_path, **kw):
    ckpt = str(tmp_path / "c")
    mgr = CheckpointManager({"ckpt_path": ckpt})
    mgr.save(1, make(**kw))
    mgr.close()
    return ckpt


def test_adamw_resumed_into_sgd_names_both(tmp_path):
    ckpt = saved(tmp_path)
    roles = make(opt="sgd")
    before = roles[0].optimizers[0].state_dict()
    with pytest.raises(IncompatibleCheckpointError, match=r"policy optimizer 0 was saved as AdamW but this run has SGD"):
        CheckpointManager({"ckpt_path": ckpt}).resume(roles)
    after = roles[0].optimizers[0].state_dict()
    assert after["state"][0]["momentum_buffer"].equal(before["state"][0]["momentum_buffer"])  # untouched
    # the same class resumes (and the next step runs)
    roles = make()
    assert CheckpointManager({"ckpt_path": ckpt}).resume(roles).step == 1
    roles[0].optimizers[0].step()


def test_scheduler_class_mismatch(tmp_path):
    ckpt = saved(tmp_path)
    roles = make()
    roles[0].schedulers = [torch.optim.lr_scheduler.ExponentialLR(roles[0].optimizers[0], 0.9)]
    with pytest.raises(IncompatibleCheckpointError, match="lr_scheduler 0 was saved as StepLR but this run has ExponentialLR"):
        CheckpointManager({"ckpt_path": ckpt}).resume(roles)


def test_old_checkpoint_without_classes_skips_the_check(tmp_path):
    ckpt = saved(tmp_path)
    path = os.path.join(ckpt, "global_step_1", MANIFEST_FILE)
    manifest = json.load(open(path))
    del manifest["classes"]
    with open(path, "w") as fh:
        json.dump(manifest, fh)
    roles = make(opt="sgd")
    # no class check: torch's own load decides (SGD accepts AdamW's state dict as it is)
    assert CheckpointManager({"ckpt_path": ckpt}).resume(roles).step == 1


def test_dropped_critic_and_scheduler_are_named(tmp_path, caplog):
    ckpt = saved(tmp_path, critic=True)
    caplog.set_level(logging.WARNING)
    roles = make(sched=False)
    assert CheckpointManager({"ckpt_path": ckpt}).resume(roles).step == 1
    assert "critic/ (the critic role)" in caplog.text, caplog.text
    assert "policy's lr_scheduler state (StepLR)" in caplog.text, caplog.text
    assert "not loaded" in caplog.text


def test_dropped_parts_named_without_class_record(tmp_path, caplog):
    ckpt = saved(tmp_path, critic=True)
    path = os.path.join(ckpt, "global_step_1", MANIFEST_FILE)
    manifest = json.load(open(path))
    del manifest["classes"]
    with open(path, "w") as fh:
        json.dump(manifest, fh)
    caplog.set_level(logging.WARNING)
    assert CheckpointManager({"ckpt_path": ckpt}).resume(make(opt=None)).step == 1
    assert "critic/ (the critic role)" in caplog.text, caplog.text
    assert "policy's optimizer state" in caplog.text and "policy's lr_scheduler state" in caplog.text, caplog.text


def test_matching_run_warns_nothing(tmp_path, caplog):
    ckpt = saved(tmp_path, critic=True)
    caplog.set_level(logging.WARNING)
    assert CheckpointManager({"ckpt_path": ckpt}).resume(make(critic=True)).step == 1
    assert "no place for" not in caplog.text
