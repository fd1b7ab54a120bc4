"""Corruption suite: truncate, bit-flip or delete each kind of file of the newest checkpoint.

Each case must be detected; ``latest`` falls back to the previous committed checkpoint (and
says which path and why), ``from_path`` raises. Nothing committed is touched.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

from skyrl_callbacks import CheckpointConfig, CheckpointManager, CorruptCheckpointError
from skyrl_callbacks.roles import discover_roles

FILES = ["policy/model_state.pt", "policy/optimizer_state.pt", "policy/lr_scheduler_state.pt", "data.pt",
         "trainer_state.pt", "skyrl_manifest.json"]


def roles_at(step: int):
    m = nn.Module()
    m.policy = nn.Linear(64, 64)
    with torch.no_grad():
        m.policy.weight.fill_(step)
        m.policy.bias.fill_(step)
    roles = discover_roles(m)
    opt = torch.optim.Adam(m.policy.parameters(), lr=0.1)
    m.policy(torch.ones(1, 64)).sum().backward()
    opt.step()
    roles[0].optimizers = [opt]
    roles[0].schedulers = [torch.optim.lr_scheduler.StepLR(opt, 2)]
    return m, roles


def corrupt(path: str, how: str) -> None:
    if how == "delete":
        os.unlink(path)
    elif how == "truncate":
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            fh.truncate(size // 2)
    elif how == "bitflip":
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            fh.seek(size // 2)
            b = fh.read(1)
            fh.seek(size // 2)
            fh.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("how", ["truncate", "bitflip", "delete"])
@pytest.mark.parametrize("rel", FILES)
def test_corrupt_newest_falls_back(tmp_path, caplog, rel, how):
    cfg = dict(ckpt_path=str(tmp_path / "c"))  # the default config: verify_on_resume is on
    mgr = CheckpointManager(CheckpointConfig(**cfg))
    for step in (1, 2):
        _, roles = roles_at(step)
        mgr.save(step, roles, data_state={"pos": step})
    target = str(tmp_path / "c" / "global_step_2" / rel)
    corrupt(target, how)
    m, roles = roles_at(0)
    caplog.set_level(logging.WARNING)
    if rel == "skyrl_manifest.json" and how == "delete":
        # without a manifest the directory is treated like a SkyRL-native checkpoint: loadable, unverified
        state = CheckpointManager(CheckpointConfig(**cfg)).resume(roles)
        assert state.step == 2
        return
    state = CheckpointManager(CheckpointConfig(**cfg)).resume(roles)
    assert state.step == 1, f"{rel} {how}: resumed from {state.step}"
    assert torch.equal(m.policy.weight, roles_at(1)[0].policy.weight)
    assert "global_step_2" in caplog.text  # the report names the path
    with pytest.raises(CorruptCheckpointError, match="global_step_2"):
        CheckpointManager(CheckpointConfig(**cfg, resume_mode="from_path",
                                           resume_path=str(tmp_path / "c" / "global_step_2"))).resume(roles)
    # nothing committed was touched
    assert (tmp_path / "c" / "global_step_1" / "skyrl_manifest.json").exists()


@pytest.mark.parametrize("content", [b"", b"garbage", b"99"])
def test_bad_pointer_uses_newest_committed(tmp_path, content):
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(tmp_path / "c")))
    for step in (1, 2):
        mgr.save(step, roles_at(step)[1])
    (tmp_path / "c" / "latest_ckpt_global_step.txt").write_bytes(content)
    assert CheckpointManager(CheckpointConfig(ckpt_path=str(tmp_path / "c"))).resume(roles_at(0)[1]).step == 2


def test_size_mismatch_detected_without_checksums(tmp_path):
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(tmp_path / "c")))
    for step in (1, 2):
        mgr.save(step, roles_at(step)[1])
    with open(tmp_path / "c" / "global_step_2" / "policy" / "model_state.pt", "ab") as fh:
        fh.write(b"x")
    assert CheckpointManager(CheckpointConfig(ckpt_path=str(tmp_path / "c"))).resume(roles_at(0)[1]).step == 1


def flip_tensor_byte(path: str, index: int = 0) -> None:
    """Flip one byte inside the data of the ``index``-th largest tensor storage of a ``torch.save``
    file (same size; the pickle and the zip records untouched)."""
    meta = torch.load(path, map_location="meta", weights_only=True)
    tensors = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            tensors.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(meta)
    storages = sorted({(t.untyped_storage().nbytes(), t.untyped_storage()._checkpoint_offset) for t in tensors}, reverse=True)
    nbytes, offset = storages[index]
    at = offset + nbytes // 2
    with open(path, "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("rel", ["policy/model_state.pt", "policy/optimizer_state.pt"])
def test_default_config_catches_tensor_bitflip(tmp_path, caplog, rel):
    """Default config (no verify_on_resume given): one byte flipped inside the tensor data of the
    newest checkpoint's model or optimizer file (same size, still loadable) is caught while the
    file is read for the load; ``latest`` resumes the previous step's exact weights and Adam moments,
    ``from_path`` raises naming the file."""
    ckpt = str(tmp_path / "c")
    mgr = CheckpointManager({"ckpt_path": ckpt})
    saved = {}
    for step in (1, 2):
        m, roles = roles_at(step)
        mgr.save(step, roles)
        saved[step] = ({k: v.clone() for k, v in m.policy.state_dict().items()},
                       {k: v.clone() for k, v in roles[0].optimizers[0].state_dict()["state"][0].items()})
    target = os.path.join(ckpt, "global_step_2", rel)
    size = os.path.getsize(target)
    flip_tensor_byte(target)
    assert os.path.getsize(target) == size
    caplog.set_level(logging.WARNING)
    m, roles = roles_at(0)
    state = CheckpointManager({"ckpt_path": ckpt}).resume(roles)
    assert state.step == 1
    for k, v in saved[1][0].items():
        assert torch.equal(m.policy.state_dict()[k], v), k
    for k, v in saved[1][1].items():
        assert torch.equal(roles[0].optimizers[0].state_dict()["state"][0][k], v), k
    assert "global_step_2" in caplog.text and rel in caplog.text and "checksum mismatch" in caplog.text
    with pytest.raises(CorruptCheckpointError, match=f"global_step_2.*{rel}.*checksum mismatch"):
        CheckpointManager({"ckpt_path": ckpt, "resume_mode": "from_path",
                           "resume_path": os.path.join(ckpt, "global_step_2")}).resume(roles_at(0)[1])
    # verify_on_resume: false checks sizes only: the flipped byte is loaded without a word
    m, roles = roles_at(0)
    assert CheckpointManager({"ckpt_path": ckpt, "verify_on_resume": False}).resume(roles).step == 2
    got = (m.policy.state_dict(), roles[0].optimizers[0].state_dict()["state"][0])
    assert any(not torch.equal(got[i][k], v) for i in (0, 1) for k, v in saved[2][i].items())
