"""CheckpointManager on the local disk: layout, commit, pointer, retention, resume, fallbacks."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from skyrl_callbacks import CheckpointConfig, CheckpointManager, CheckpointNotFoundError, IncompatibleCheckpointError
from skyrl_callbacks.roles import assign_optimizers, discover_roles
from skyrl_callbacks.storage import MANIFEST_FILE


class Module(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.policy = nn.Linear(4, 3)
        self.critic = nn.Linear(4, 1)
        self.ref = nn.Linear(4, 3)


def make_roles(seed: int = 0):
    torch.manual_seed(seed)
    m = Module()
    op = torch.optim.AdamW(m.policy.parameters(), lr=0.1)
    oc = torch.optim.SGD(m.critic.parameters(), lr=0.1, momentum=0.9)
    sp = torch.optim.lr_scheduler.StepLR(op, 2)
    sc = torch.optim.lr_scheduler.StepLR(oc, 3)
    roles = discover_roles(m)
    # order of optimizers deliberately reversed: assignment is by parameter identity
    assign_optimizers(roles, [oc, op], [sc, sp])
    return m, roles


def train(m: Module, roles, steps: int = 3):
    for _ in range(steps):
        x = torch.randn(5, 4)
        loss = m.policy(x).pow(2).mean() + m.critic(x).pow(2).mean()
        loss.backward()
        for r in roles:
            for o in r.optimizers:
                o.step()
                o.zero_grad()
            for s in r.schedulers:
                s.step()


def cfg(tmp_path, **kw):
    return CheckpointConfig(ckpt_path=str(tmp_path / "ckpts"), export_path=str(tmp_path / "exports"), **kw)


def test_roles_by_parameter_identity():
    m, roles = make_roles()
    by = {r.name: r for r in roles}
    assert set(by) == {"policy", "critic"}
    assert isinstance(by["policy"].optimizers[0], torch.optim.AdamW)
    assert isinstance(by["critic"].optimizers[0], torch.optim.SGD)
    assert by["critic"].schedulers[0].optimizer is by["critic"].optimizers[0]


def test_layout_on_disk(tmp_path):
    m, roles = make_roles()
    train(m, roles)
    mgr = CheckpointManager(cfg(tmp_path))
    mgr.save(10, roles, trainer_state={"hello": 1}, data_state={"pos": 3})
    root = tmp_path / "ckpts"
    assert (root / "latest_ckpt_global_step.txt").read_text() == "10"
    step = root / "global_step_10"
    for rel in ["policy/model_state.pt", "policy/optimizer_state.pt", "policy/lr_scheduler_state.pt",
                "critic/model_state.pt", "critic/optimizer_state.pt", "critic/lr_scheduler_state.pt",
                "data.pt", "trainer_state.pt", MANIFEST_FILE]:
        assert (step / rel).is_file(), rel
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())
    ts = torch.load(step / "trainer_state.pt", weights_only=False)
    assert ts["global_step"] == 10 and ts["hello"] == 1 and ts["config"]["ckpt_path"] == str(root)
    assert len(ts["rng_per_rank"]) == 1
    sd = torch.load(step / "policy" / "model_state.pt")
    assert set(sd) == {"weight", "bias"}  # the role's own keys, no 'policy.' prefix, no ref
    data = torch.load(step / "data.pt", weights_only=False)
    assert data["per_rank"] == [{"pos": 3}]


def test_whole_module_is_policy_without_ref(tmp_path):
    torch.manual_seed(0)
    m = nn.Module()
    m.body = nn.Linear(3, 3)
    m.ref_model = nn.Linear(3, 3)
    roles = discover_roles(m)
    assert [r.name for r in roles] == ["policy"]
    CheckpointManager(cfg(tmp_path)).save(1, roles)
    sd = torch.load(tmp_path / "ckpts" / "global_step_1" / "policy" / "model_state.pt")
    assert set(sd) == {"body.weight", "body.bias"}
    assert not (tmp_path / "ckpts" / "global_step_1" / "critic").exists()


def test_roundtrip_bitwise(tmp_path):
    m, roles = make_roles(0)
    train(m, roles)
    mgr = CheckpointManager(cfg(tmp_path))
    mgr.save(3, roles, data_state={"k": 1})
    m2, roles2 = make_roles(1)
    state = CheckpointManager(cfg(tmp_path)).resume(roles2)
    assert state.step == 3 and state.data_state == {"k": 1} and state.rng is not None
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        pass
    for name in ("policy", "critic"):
        for (k, a), (_, b) in zip(getattr(m, name).state_dict().items(), getattr(m2, name).state_dict().items()):
            assert torch.equal(a, b), k
    r1 = {r.name: r for r in roles}
    r2 = {r.name: r for r in roles2}
    for name in ("policy", "critic"):
        s1, s2 = r1[name].optimizers[0].state_dict(), r2[name].optimizers[0].state_dict()
        for pid in s1["state"]:
            for key, val in s1["state"][pid].items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(s2["state"][pid][key]))
        assert r1[name].schedulers[0].state_dict() == r2[name].schedulers[0].state_dict()
    # the reference model is not restored (it was never saved)
    assert not torch.equal(m.ref.weight, m2.ref.weight)


def test_retention_numeric_and_after_commit(tmp_path):
    m, roles = make_roles()
    mgr = CheckpointManager(cfg(tmp_path, max_ckpts_to_keep=2))
    foreign = tmp_path / "ckpts" / "my_notes"
    foreign.mkdir(parents=True)
    (tmp_path / "ckpts" / "global_step_abc").mkdir()
    for step in (5, 10, 100, 95):
        mgr.save(step, roles)
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert "global_step_100" in names and "global_step_95" in names
    assert "global_step_5" not in names and "global_step_10" not in names
    assert "my_notes" in names and "global_step_abc" in names  # never anything not ours
    assert (tmp_path / "ckpts" / "latest_ckpt_global_step.txt").read_text() == "95"


def test_latest_prefers_pointer_then_newest_committed(tmp_path, caplog):
    m, roles = make_roles()
    mgr = CheckpointManager(cfg(tmp_path))
    mgr.save(10, roles)
    mgr.save(20, roles)
    root = tmp_path / "ckpts"
    # an interrupted save (staging dir) and a pointer naming a step that never committed
    (root / ".tmp-global_step_30-deadbeef" / "policy").mkdir(parents=True)
    (root / "latest_ckpt_global_step.txt").write_text("30")
    _, roles2 = make_roles(1)
    state = CheckpointManager(cfg(tmp_path)).resume(roles2)
    assert state.step == 20
    assert "global_step_30" in caplog.text
    # a pointer one commit behind (crash between commit and pointer move): the commit made after
    # the pointed-to checkpoint by the same run (manifest parent_step) is used; the pointer was last
    # written before that commit (a pointer written after it was moved back by hand: test_lineage.py)
    (root / "latest_ckpt_global_step.txt").write_text("10")
    before = (root / "global_step_20" / "skyrl_manifest.json").stat().st_mtime - 5
    os.utime(root / "latest_ckpt_global_step.txt", (before, before))
    assert CheckpointManager(cfg(tmp_path)).resume(roles2).step == 20
    assert "committed after the pointer" in caplog.text
    (root / "latest_ckpt_global_step.txt").unlink()
    assert CheckpointManager(cfg(tmp_path)).resume(roles2).step == 20


def test_leftovers_removed_after_next_commit(tmp_path):
    m, roles = make_roles()
    mgr = CheckpointManager(cfg(tmp_path))
    (tmp_path / "ckpts" / ".tmp-global_step_30-deadbeef").mkdir(parents=True)
    mgr.save(40, roles)
    assert not (tmp_path / "ckpts" / ".tmp-global_step_30-deadbeef").exists()


def test_resume_none_and_empty(tmp_path):
    _, roles = make_roles()
    assert CheckpointManager(cfg(tmp_path)).resume(roles) is None
    CheckpointManager(cfg(tmp_path)).save(5, roles)
    assert CheckpointManager(cfg(tmp_path, resume_mode="none")).resume(roles) is None


def test_from_path(tmp_path):
    m, roles = make_roles()
    mgr = CheckpointManager(cfg(tmp_path))
    mgr.save(5, roles)
    train(m, roles)
    mgr.save(10, roles)
    path = str(tmp_path / "ckpts" / "global_step_5")
    _, roles2 = make_roles(1)
    assert CheckpointManager(cfg(tmp_path, resume_mode="from_path", resume_path=path)).resume(roles2).step == 5
    bad = CheckpointManager(cfg(tmp_path, resume_mode="from_path", resume_path=str(tmp_path / "ckpts" / "global_step_7")))
    with pytest.raises(CheckpointNotFoundError, match="global_step_7"):
        bad.resume(roles2)


def test_retention_retires_at_once_and_deletes_in_the_background(tmp_path, caplog):
    """The retired checkpoint is gone for every reader when save returns; its bytes are deleted by
    rank 0's background thread (the commit no longer waits for it); close() waits for that."""
    import threading

    m, roles = make_roles()
    mgr = CheckpointManager(cfg(tmp_path, max_ckpts_to_keep=1))
    ckpts = tmp_path / "ckpts"
    removed_on: list[str] = []
    rm = mgr.storage.rm

    def observed_rm(path, *args, **kwargs):  # the real removal, plus which thread ran it
        removed_on.append((os.path.basename(path), threading.current_thread().name))
        return rm(path, *args, **kwargs)

    mgr.storage.rm = observed_rm
    with caplog.at_level("WARNING", logger="skyrl_callbacks"):
        for step in (1, 2, 3, 4):
            train(m, roles, 1)
            mgr.save(step, roles)
            assert mgr.committed_steps() == [step]
            assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("global_step_")) == [f"global_step_{step}"]
        mgr.wait_retention()
        assert not [p.name for p in ckpts.iterdir() if p.name.startswith((".tmp", ".trash"))]
        mgr.close()
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith((".tmp", ".trash"))]
    retired = [(name, thread) for name, thread in removed_on if name.startswith(".trash-global_step_")]
    assert [name.split("-")[1] for name, _ in retired] == ["global_step_1", "global_step_2", "global_step_3"]
    assert all(thread.startswith("skyrl-retention") for _, thread in retired), removed_on
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    _, roles2 = make_roles(1)
    assert CheckpointManager(cfg(tmp_path)).resume(roles2).step == 4
    assert torch.equal(roles2[0].model.weight, m.policy.weight)


def test_same_step_resave_replaces(tmp_path):
    m, roles = make_roles()
    mgr = CheckpointManager(cfg(tmp_path))
    mgr.save(5, roles)
    train(m, roles)
    mgr.save(5, roles)
    _, roles2 = make_roles(1)
    CheckpointManager(cfg(tmp_path)).resume(roles2)
    assert torch.equal(roles2[0].model.weight, m.policy.weight)
    assert [p.name for p in (tmp_path / "ckpts").iterdir() if p.name.startswith((".tmp", ".trash"))] == []


def test_mismatched_model_is_a_clear_error(tmp_path):
    m, roles = make_roles()
    CheckpointManager(cfg(tmp_path)).save(5, roles)
    other = nn.Module()
    other.policy = nn.Linear(4, 7)
    with pytest.raises(IncompatibleCheckpointError, match="policy"):
        CheckpointManager(cfg(tmp_path)).resume(discover_roles(other))


def test_missing_role_dir_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    only_policy = nn.Module()
    only_policy.policy = nn.Linear(4, 3)
    CheckpointManager(cfg(tmp_path)).save(5, discover_roles(only_policy))
    _, roles = make_roles()
    with pytest.raises(IncompatibleCheckpointError, match="critic"):
        CheckpointManager(cfg(tmp_path)).resume(roles)


def test_role_names_can_be_overridden(tmp_path):
    from skyrl_callbacks import ConfigError

    m = nn.Module()
    m.actor = nn.Linear(2, 2)
    m.value_model = nn.Linear(2, 1)
    roles = discover_roles(m, {"policy": "actor", "critic": "value_model"})
    assert [(r.name, r.model) for r in roles] == [("policy", m.actor), ("critic", m.value_model)]
    CheckpointManager(cfg(tmp_path)).save(1, roles)
    assert (tmp_path / "ckpts" / "global_step_1" / "critic" / "model_state.pt").is_file()
    with pytest.raises(ConfigError, match="'actr'"):
        discover_roles(m, {"policy": "actr"})
    m.not_a_module = 3
    with pytest.raises(ConfigError, match="not_a_module"):
        discover_roles(m, {"policy": "not_a_module"})


def test_one_optimizer_spanning_roles_goes_to_policy():
    m = Module()
    roles = discover_roles(m)
    opt = torch.optim.SGD(list(m.policy.parameters()) + list(m.critic.parameters()), lr=0.1)
    assign_optimizers(roles, [opt], [])
    by = {r.name: r for r in roles}
    assert by["policy"].optimizers == [opt] and by["critic"].optimizers == []
