"""async_save: the snapshot is consistent, the commit waits for the write, errors surface.

Single process here (plain writer); ``tests/async_worker.py`` runs DDP and FSDP2 with 2 gloo
processes; Lightning exact resume with async saves is a case of ``test_exact_resume.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from skyrl_callbacks import CheckpointManager
from skyrl_callbacks.errors import CheckpointError
from skyrl_callbacks.roles import Role
from skyrl_callbacks.staging import Stager

HERE = os.path.dirname(os.path.abspath(__file__))


def make_role(seed: int = 0) -> Role:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return Role(name="policy", model=model, optimizers=[opt], schedulers=[sched])


def train(role: Role, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(5, 8)
        role.model(x).pow(2).mean().backward()
        role.optimizers[0].step()
        role.optimizers[0].zero_grad()
        role.schedulers[0].step()


def snapshot_of(role: Role) -> dict:
    return {
        "model": {k: v.clone() for k, v in role.model.state_dict().items()},
        "optim": _clone(role.optimizers[0].state_dict()),
        "sched": role.schedulers[0].state_dict(),
    }


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def assert_same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def cfg(tmp_path, **kw) -> dict:
    base = dict(ckpt_path=str(tmp_path / "ckpts"), ckpt_interval=1, async_save=True, run_lock=False)
    base.update(kw)
    return base


def test_snapshot_is_consistent_and_commit_waits(tmp_path):
    role = make_role()
    train(role, 3)
    expected = snapshot_of(role)
    mgr = CheckpointManager(cfg(tmp_path))
    result = mgr.save(3, [role], trainer_state={"k": 1})
    assert result.pending and mgr.save_in_flight and result.seconds_blocked > 0
    # the training loop goes on right away: the checkpoint must still hold step 3's values
    train(role, 2)
    with torch.no_grad():
        for p in role.model.parameters():
            p.add_(1.0)
    # nothing is published before the foreground commit
    assert mgr.read_pointer() is None
    assert mgr.committed_steps() == []
    done = mgr.wait()
    assert done is not None and not done.pending and done.step == 3 and done.bytes > 0
    assert done.seconds_total >= done.seconds_blocked > 0
    assert mgr.read_pointer() == 3 and mgr.committed_steps() == [3]
    assert mgr.verify(mgr.step_dir(3), checksums=True) == []

    fresh = make_role(seed=99)
    loader = CheckpointManager(cfg(tmp_path, resume_mode="latest"))
    state = loader.resume([fresh])
    assert state.step == 3 and state.trainer_state["k"] == 1
    assert_same(snapshot_of(fresh), expected)
    mgr.close()


def test_poll_commits_without_blocking_and_retention_after_commit(tmp_path):
    role = make_role()
    mgr = CheckpointManager(cfg(tmp_path, max_ckpts_to_keep=1))
    train(role, 1)
    mgr.save(1, [role])
    mgr.wait()
    train(role, 1)
    mgr.save(2, [role])
    # retention must not drop step 1 before step 2 is committed
    assert mgr.committed_steps() == [1] and mgr.read_pointer() == 1
    mgr._pending.future.result(timeout=60)  # the background write finished on this (only) rank
    result = mgr.poll()
    assert result is not None and result.step == 2
    assert mgr.committed_steps() == [2] and mgr.read_pointer() == 2
    assert mgr.poll() is None  # nothing in flight
    mgr.close()


def test_next_save_waits_for_the_previous_one(tmp_path):
    role = make_role()
    mgr = CheckpointManager(cfg(tmp_path))
    for step in (1, 2, 3):
        train(role, 1)
        assert mgr.save(step, [role]).pending
    assert mgr.committed_steps() == [1, 2]  # 3 is in flight, 1 and 2 committed by the later saves
    mgr.close()  # close commits the last one
    assert mgr.committed_steps() == [1, 2, 3] and mgr.read_pointer() == 3
    # the lineage of async commits is the sequence of saves
    manifest = json.loads((tmp_path / "ckpts" / "global_step_3" / "skyrl_manifest.json").read_text())
    assert manifest["parent_step"] == 2


def test_background_failure_surfaces_and_keeps_the_previous_checkpoint(tmp_path):
    role = make_role()
    mgr = CheckpointManager(cfg(tmp_path))
    train(role, 1)
    mgr.save(1, [role])
    mgr.wait()
    step1 = tmp_path / "ckpts" / "global_step_1"
    before = {p: p.read_bytes() for p in step1.rglob("*") if p.is_file()}
    # a value torch.save cannot pickle makes the background write fail for real
    role.optimizers[0].param_groups[0]["hook"] = lambda: None
    train(role, 1)
    assert mgr.save(2, [role]).pending  # the foreground part succeeds
    with pytest.raises(CheckpointError) as info:
        mgr.wait()
    msg = str(info.value)
    assert "async save of global_step_2 failed" in msg and "global_step_1" in msg, msg
    assert not mgr.save_in_flight
    assert mgr.read_pointer() == 1 and mgr.committed_steps() == [1]
    after = {p: p.read_bytes() for p in step1.rglob("*") if p.is_file()}
    assert after == before
    # the run can go on: the next save (fixed state) commits and cleans the failed staging dir
    del role.optimizers[0].param_groups[0]["hook"]
    assert mgr.save(3, [role]).pending
    mgr.wait()
    assert mgr.committed_steps() == [1, 3]
    assert not [n for n in os.listdir(tmp_path / "ckpts") if n.startswith(".tmp")]
    mgr.close()


def test_poll_raises_the_background_error_on_the_next_step(tmp_path):
    role = make_role()
    role.optimizers[0].param_groups[0]["hook"] = lambda: None
    mgr = CheckpointManager(cfg(tmp_path))
    mgr.save(1, [role])
    mgr._pending.future.exception(timeout=60)
    with pytest.raises(CheckpointError, match="async save of global_step_1 failed"):
        mgr.poll()
    assert mgr.read_pointer() is None and mgr.committed_steps() == []
    assert mgr.last_saved_step is None  # the step is not counted as saved


def test_blocking_save_with_async_config(tmp_path):
    role = make_role()
    mgr = CheckpointManager(cfg(tmp_path))
    result = mgr.save(1, [role], blocking=True)
    assert not result.pending and mgr.committed_steps() == [1] and not mgr.save_in_flight


def test_stager_reuses_buffers_and_keeps_ties():
    lin = torch.nn.Linear(4, 4)
    tree = {"a": lin.weight.detach(), "tied": lin.weight.detach(), "b": [lin.bias.detach(), 3, "x"], "s": torch.tensor(2.0)}
    stager = Stager()
    out1 = stager.stage(tree)
    assert out1["a"] is out1["tied"]  # shared storage stays shared (one buffer)
    assert out1["a"].data_ptr() != lin.weight.data_ptr()
    assert out1["b"][1:] == [3, "x"]
    ptr = out1["a"].data_ptr()
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert not torch.equal(out1["a"], lin.weight)
    out2 = stager.stage(tree)
    assert out2["a"].data_ptr() == ptr and torch.equal(out2["a"], lin.weight)  # warm buffer reused
    assert stager.buffer_bytes == (16 + 4 + 1) * 4


def test_stager_wraps_dtensor_shards_without_copying(tmp_path):
    """A staged DTensor keeps the source's spec (mesh, placements, global shape) around the stager's
    buffer itself (built directly; the first async save used to copy every shard once more for it)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        src = distribute_tensor(torch.arange(12.0).reshape(4, 3), mesh, [Shard(0)])
        stager = Stager()
        out = stager.stage({"w": src})["w"]
        buf = out._local_tensor
        assert type(out) is type(src) and out.placements == src.placements and out.device_mesh == src.device_mesh
        assert out.shape == src.shape and out.stride() == src.stride() and torch.equal(out.full_tensor(), src.full_tensor())
        assert buf.data_ptr() != src._local_tensor.data_ptr() and stager.buffer_bytes == 12 * 4
        assert buf is next(iter(stager._buffers.values()))  # the wrapper holds the buffer, not a copy of it
        with torch.no_grad():
            src._local_tensor.add_(1.0)
        assert torch.equal(out._local_tensor, torch.arange(12.0).reshape(4, 3))  # a snapshot
        again = stager.stage({"w": src})["w"]
        assert again is out and again._local_tensor is buf and torch.equal(buf, src._local_tensor)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2", "fsdp2_full", "fsdp2_error"])
def test_two_processes(tmp_path, scenario):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "async_worker.py"), scenario, str(tmp_path)],
                          capture_output=True, text=True, timeout=240, env=env)
    results = {}
    for rank in range(2):
        path = tmp_path / f"result_rank{rank}.json"
        assert path.exists(), (proc.returncode, proc.stdout[-3000:], proc.stderr[-5000:])
        results[rank] = json.loads(path.read_text())
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    for rank, res in results.items():
        bad = {k: v for k, v in res.items() if v is not True}
        assert not bad, f"rank {rank}: {bad}"
    assert len(results[0]) >= 3


# --------------------------------------------------------------------------- async_overlap_copy
def _hold_background(mgr, seconds: float):
    """Occupy the manager's (one-thread) background executor for ``seconds``, so the next save's
    deferred copies cannot have started when the test changes the live state."""
    import time

    return mgr._executor().submit(time.sleep, seconds)


def test_overlap_copy_defers_params_until_the_optimizer_step(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    role = Role(name="policy", model=model, optimizers=[opt], schedulers=[])

    def fwd_bwd():
        model(torch.randn(6, 8)).pow(2).mean().backward()  # also updates BatchNorm's running stats

    fwd_bwd()
    opt.step()
    opt.zero_grad()
    expected = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optim": _clone(opt.state_dict())}
    mgr = CheckpointManager(cfg(tmp_path, async_overlap_copy=True))
    held = _hold_background(mgr, 0.6)
    result = mgr.save(1, [role])
    stager = mgr._stagers["policy"]
    assert result.pending and not mgr._pending.copied.is_set()
    # parameters and Adam state wait for the background; the BatchNorm buffers were copied now
    assert stager.deferred_bytes > 0 and stager.deferred_bytes < stager.last_bytes
    fwd_bwd()  # the next step's forward/backward overlaps the copy (running stats change here)
    assert not mgr._pending.copied.is_set()
    opt.step()  # the step pre-hook waits for the deferred copies before the weights change
    assert held.done() and mgr._pending.copied.is_set()
    opt.zero_grad()
    done = mgr.wait()
    assert done.step == 1 and done.seconds_blocked >= 0.3  # the wait in the hook counts as blocked time

    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    CheckpointManager(cfg(tmp_path, resume_mode="latest")).resume(
        [Role(name="policy", model=fresh, optimizers=[fresh_opt], schedulers=[])])
    assert_same({"model": fresh.state_dict(), "optim": _clone(fresh_opt.state_dict())}, expected)
    mgr.close()
    assert opt._optimizer_step_pre_hooks == {} or len(opt._optimizer_step_pre_hooks) == 0  # hooks removed


def test_overlap_copy_without_step_hooks_is_what_lightning_relies_on(tmp_path):
    # the Lightning callback turns the torch hooks off and calls wait_snapshot() itself
    role = make_role()
    train(role, 1)
    expected = snapshot_of(role)
    mgr = CheckpointManager(cfg(tmp_path, async_overlap_copy=True))
    mgr.step_hooks = False
    _hold_background(mgr, 0.4)
    mgr.save(1, [role])
    assert len(role.optimizers[0]._optimizer_step_pre_hooks) == 0
    assert mgr.wait_snapshot() >= 0.2 and mgr._pending.copied.is_set()
    assert mgr.wait_snapshot() == 0.0
    train(role, 1)
    mgr.wait()
    fresh = make_role(seed=5)
    CheckpointManager(cfg(tmp_path, resume_mode="latest")).resume([fresh])
    assert_same(snapshot_of(fresh), expected)
    mgr.close()


def test_overlap_copy_needs_torch_optimizers_and_async_save(tmp_path):
    from skyrl_callbacks.errors import ConfigError
    from skyrl_callbacks.staging import deferrable_storages

    with pytest.raises(ConfigError, match="async_overlap_copy=true.*async_save=true"):
        CheckpointManager(cfg(tmp_path, async_save=False, async_overlap_copy=True))
    role = make_role()
    train(role, 1)
    keys = deferrable_storages(role.optimizers)
    assert len(keys) == 4 * 4  # 4 parameters + their exp_avg, exp_avg_sq and step
    assert deferrable_storages([]) is None and deferrable_storages([object()]) is None
    # a role without a torch optimizer is copied whole before save returns
    mgr = CheckpointManager(cfg(tmp_path, async_overlap_copy=True))
    mgr.save(1, [Role(name="policy", model=role.model)])
    assert mgr._pending.copied.is_set() and mgr._stagers["policy"].deferred_bytes == 0
    mgr.close()


def test_blocking_and_async_saves_share_one_set_of_buffers(tmp_path):
    # the writer stages CUDA state for its sync (blocking) saves into the same Stager the async
    # saves use, so a save at preemption finds warm pinned buffers instead of pinning a second copy
    role = make_role()
    train(role, 1)
    mgr = CheckpointManager(dict(ckpt_path=str(tmp_path / "ck"), async_save=True, run_lock=False))
    mgr.save(1, [role])
    mgr.wait()
    stager = mgr._stagers["policy"]
    assert mgr.writer_for(role)._gpu_stager is stager and stager.buffer_bytes > 0
    train(role, 1)
    mgr.save(2, [role], blocking=True)
    assert mgr.writer_for(role)._gpu_stager is stager
    mgr.close()
    assert mgr.writer_for(role)._gpu_stager is None and not mgr._stagers  # close frees both


def test_prewarm_allocates_the_buffers_the_first_save_copies_into(tmp_path):
    """prewarm (after the first optimizer step) allocates the async buffers on a background thread;
    the first save then copies into those very buffers and its checkpoint holds the saved step."""
    role = make_role()
    mgr = CheckpointManager(cfg(tmp_path))
    assert mgr.wants_prewarm
    train(role, 1)
    mgr.prewarm([role])
    assert not mgr.wants_prewarm
    mgr._prewarm_thread.join()
    stager = mgr._stagers["policy"]
    reserved = {path: buf for path, buf in stager._buffers.items()}
    state_bytes = sum(t.numel() * t.element_size() for t in role.model.state_dict().values())
    state_bytes += sum(t.numel() * t.element_size() for st in role.optimizers[0].state.values() for t in st.values())
    assert stager.buffer_bytes == state_bytes  # model + AdamW state (+ the step scalars)
    expected = snapshot_of(role)
    mgr.save(1, [role])
    assert set(stager._buffers) == set(reserved)
    assert all(stager._buffers[path] is buf for path, buf in reserved.items())  # the very buffers, no new ones
    train(role, 1)  # the live state moves on while the background writes
    mgr.close()
    fresh = make_role(seed=1)
    CheckpointManager(cfg(tmp_path)).load([fresh], str(tmp_path / "ckpts" / "global_step_1"))
    assert_same(snapshot_of(fresh), expected)


def test_prewarm_does_nothing_for_sync_saves(tmp_path):
    role = make_role()
    train(role, 1)
    mgr = CheckpointManager(cfg(tmp_path, async_save=False))
    assert not mgr.wants_prewarm
    mgr.prewarm([role])
    assert mgr._stagers == {} and mgr._prewarm_thread is None


def test_prewarm_before_any_optimizer_step_leaves_the_rest_to_the_first_save(tmp_path):
    """Called too early (no optimizer state yet) it allocates what exists (the model's buffers);
    the first save allocates the optimizer's and writes the right checkpoint."""
    role = make_role()
    mgr = CheckpointManager(cfg(tmp_path))
    mgr.prewarm([role])
    mgr._prewarm_thread.join()
    stager = mgr._stagers["policy"]
    model_bytes = sum(t.numel() * t.element_size() for t in role.model.state_dict().values())
    assert stager.buffer_bytes == model_bytes
    train(role, 1)
    expected = snapshot_of(role)
    mgr.save(1, [role])
    assert stager.buffer_bytes > model_bytes
    mgr.close()
    fresh = make_role(seed=1)
    CheckpointManager(cfg(tmp_path)).load([fresh], str(tmp_path / "ckpts" / "global_step_1"))
    assert_same(snapshot_of(fresh), expected)
