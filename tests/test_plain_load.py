"""The plain writer's direct optimizer read (local files): the pickle is loaded to meta for the
storages' file offsets, then the bytes are read with large preads straight into the optimizer's
existing state tensors where they match (else into fresh memory). Checked against ``torch.load``
of the same file, bitwise; torn files still raise CorruptCheckpointError naming the file."""

from __future__ import annotations

import os

import pytest
import torch

from skyrl_callbacks import CheckpointManager
from skyrl_callbacks.errors import CorruptCheckpointError
from skyrl_callbacks.roles import Role


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the "
                                                                    "GPU machine: docs/gpu_runs.md)"))]


def make_role(seed: int = 0, dtype=torch.float32, device="cpu") -> Role:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return Role(name="policy", model=model, optimizers=[opt])


def train(role: Role, steps: int) -> None:
    for _ in range(steps):
        p = next(role.model.parameters())
        x = torch.randn(5, 8, dtype=p.dtype).to(p.device)
        role.model(x).float().pow(2).mean().backward()
        role.optimizers[0].step()
        role.optimizers[0].zero_grad()


def assert_state_equal(got: dict, ref: dict) -> None:
    assert got["param_groups"] == ref["param_groups"]
    assert got["state"].keys() == ref["state"].keys()
    for idx, st in ref["state"].items():
        for key, val in st.items():
            live = got["state"][idx][key]
            assert live.dtype == val.dtype and torch.equal(live.cpu(), val.cpu()), (idx, key)


def saved(tmp_path, role, step=3):
    mgr = CheckpointManager(dict(ckpt_path=str(tmp_path / "ck"), run_lock=False))
    mgr.save(step, [role])
    path = os.path.join(mgr.step_dir(step), "policy", "optimizer_state.pt")
    return mgr, path, torch.load(path, weights_only=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reads_into_the_live_state_tensors_in_place(tmp_path, dtype, device):
    role = make_role(dtype=dtype, device=device)
    train(role, 3)
    mgr, path, ref = saved(tmp_path, role)
    weights = {k: v.clone() for k, v in role.model.state_dict().items()}
    train(role, 2)  # the live state moves on; the load must bring back step 3's bytes
    opt = role.optimizers[0]
    live_before = {id(t) for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)}
    params_before = [p.data_ptr() for p in role.model.parameters()]
    mgr.load([role], mgr.step_dir(3))
    assert [p.data_ptr() for p in role.model.parameters()] == params_before
    for k, v in role.model.state_dict().items():
        assert v.device.type == device and torch.equal(v, weights[k]), k
    live_after = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    # exp_avg / exp_avg_sq (and step) were filled in place: the same tensor objects hold the loaded bytes
    reused = [t for t in live_after if id(t) in live_before]
    assert len(reused) >= 2 * len(list(role.model.parameters()))
    assert_state_equal(opt.state_dict(), ref)
    # and the next step is the one the saving run would have taken
    other = make_role(seed=9, dtype=dtype, device=device)
    other.model.load_state_dict(role.model.state_dict())
    other.optimizers[0].load_state_dict(ref)
    torch.manual_seed(5)
    train(role, 1)
    torch.manual_seed(5)
    train(other, 1)
    assert all(torch.equal(a, b) for a, b in zip(role.model.parameters(), other.model.parameters()))


@pytest.mark.parametrize("device", DEVICES)
def test_reads_into_fresh_memory_for_an_optimizer_without_state(tmp_path, device):
    role = make_role(device=device)
    train(role, 3)
    _, path, ref = saved(tmp_path, role)
    fresh = make_role(seed=1, device=device)
    assert len(fresh.optimizers[0].state) == 0
    CheckpointManager(dict(ckpt_path=str(tmp_path / "ck"), resume_mode="latest", run_lock=False)).resume([fresh])
    assert_state_equal(fresh.optimizers[0].state_dict(), ref)
    for p, st in fresh.optimizers[0].state.items():
        assert st["exp_avg"].device == p.device and st["exp_avg_sq"].device == p.device
    for a, b in zip(fresh.model.parameters(), role.model.parameters()):
        assert torch.equal(a, b)
    # nothing loaded aliases another entry: every state tensor owns its memory
    ptrs = [t.data_ptr() for st in fresh.optimizers[0].state.values() for t in st.values() if t.numel() > 1]
    assert len(ptrs) == len(set(ptrs))


@pytest.mark.parametrize("cut", ["in_tensor_data", "in_pickle"])
def test_torn_optimizer_file_raises_naming_the_file(tmp_path, cut):
    role = make_role()
    train(role, 2)
    mgr, path, _ = saved(tmp_path, role)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:  # zip: tensor records first, pickle and directory at the end
        fh.truncate(size // 2 if cut == "in_tensor_data" else size - 40)
    # the manager would refuse the file on its size already (manifest); the reader itself must too
    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers.plain import PlainWriter

    with pytest.raises(CorruptCheckpointError, match="optimizer_state.pt"):
        PlainWriter._load_list(Storage(str(tmp_path)), path, make_role(seed=2).optimizers, "optimizer")
    with pytest.raises(CorruptCheckpointError, match="optimizer_state.pt"):
        mgr.load([make_role(seed=2)], mgr.step_dir(3))
