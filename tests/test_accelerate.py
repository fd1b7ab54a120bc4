"""SkyRLCheckpoint driving a hand-written Accelerate loop (bind / step / finish).

Exact resume: tests/scripts/accelerate_loop.py run straight vs SIGKILLed mid-run and rerun,
in one process and in two CPU processes under torchrun; final weights, optimizer and
scheduler states, the batches every step saw, and every RNG must be bitwise identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

SCRIPT = Path(__file__).parent / "scripts" / "accelerate_loop.py"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _start(workdir: Path, name: str, args: list[str], nproc: int) -> subprocess.Popen:
    run_dir = workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    script = [str(SCRIPT), "--ckpt-path", str(run_dir / "ckpts"), "--batch-log", str(run_dir / "batches"),
              "--out", str(run_dir / "final.pt"), *args]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        torchrun = shutil.which("torchrun")
        launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        cmd = [*launcher, "--nproc_per_node", str(nproc), "--master_port", str(_free_port()), *script]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait(proc: subprocess.Popen, name: str, nproc: int, expect_kill: bool = False) -> str:
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"{name}: timed out\n{out[-4000:]}") from None
    if expect_kill:
        if nproc == 1:
            assert proc.returncode == -signal.SIGKILL, (name, proc.returncode, out[-4000:])
        else:
            assert proc.returncode != 0, (name, out[-4000:])
    else:
        assert proc.returncode == 0, (name, proc.returncode, out[-6000:])
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, doomed = [pid], []
    while todo:
        p = todo.pop()
        doomed.append(p)
        todo += children.get(p, [])
    for p in doomed:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(log: Path) -> dict[int, dict]:
    """step -> what that step saw; a step redone after a resume replaces the lost attempt,
    which must have seen the same thing."""
    seen: dict[int, dict] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry["step"] in seen:
            assert seen[entry["step"]] == entry, f"step {entry['step']} saw something else when redone"
        seen[entry["step"]] = entry
    return seen


def _assert_same(a: dict, b: dict) -> None:
    for role in ("policy", "critic"):
        assert a[role].keys() == b[role].keys()
        for k in a[role]:
            assert torch.equal(a[role][k], b[role][k]), f"{role}.{k} differs"
    for oa, ob in zip(a["optimizers"], b["optimizers"], strict=True):
        assert oa["param_groups"] == ob["param_groups"]
        assert oa["state"].keys() == ob["state"].keys()
        for pid, st in oa["state"].items():
            for key, val in st.items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(ob["state"][pid][key])), f"optimizer {pid}.{key}"
    assert a["schedulers"] == b["schedulers"]
    assert torch.equal(a["rng"], b["rng"]), "torch RNG differs at the end"
    if a.get("cuda_rng") is not None:
        assert torch.equal(a["cuda_rng"], b["cuda_rng"]), "CUDA RNG differs at the end"
    assert a["py_rng"] == b["py_rng"], "python RNG differs at the end"
    assert a["np_rng"] == b["np_rng"], "numpy RNG differs at the end"
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]


def _straight_vs_killed(tmp_path: Path, args: list[str], kill_at: int, resume_from: int, nproc: int = 1) -> str:
    # the uninterrupted run and the run that gets killed go side by side, then the rerun
    straight = _start(tmp_path, "straight", args, nproc)
    crashed = _start(tmp_path, "crashed", args + ["--kill-at-step", str(kill_at)], nproc)
    _wait(crashed, "crashed", nproc, expect_kill=True)
    _wait(straight, "straight", nproc)
    out = _wait(_start(tmp_path, "crashed", args, nproc), "rerun", nproc)
    assert f"resumed from {tmp_path / 'crashed' / 'ckpts' / f'global_step_{resume_from}'}" in out, out[-3000:]
    assert f"continuing at step {resume_from + 1}" in out
    for rank in range(nproc):
        straight = _steps(tmp_path / "straight" / f"batches.rank{rank}")
        crashed = _steps(tmp_path / "crashed" / f"batches.rank{rank}")
        assert straight == crashed, f"rank {rank}: batches differ"
        a = torch.load(tmp_path / "straight" / f"final.pt.rank{rank}", weights_only=False)
        b = torch.load(tmp_path / "crashed" / f"final.pt.rank{rank}", weights_only=False)
        _assert_same(a, b)
        assert a["resumed_step"] is None and b["resumed_step"] == resume_from
    return out


def test_exact_resume_single_process(tmp_path: Path) -> None:
    # 24 samples / batch 4 = 6 batches an epoch; 14 steps cross two epoch boundaries. The resume
    # point (step 6) is the last batch of epoch 0: the next epoch must be reshuffled as it was.
    out = _straight_vs_killed(tmp_path, ["--steps", "14", "--interval", "3"], kill_at=7, resume_from=6)
    assert "[skyrl-ckpt] step 9: " in out and " MB in " in out and "GB/s) -> " in out
    layout = tmp_path / "crashed" / "ckpts" / "global_step_14"
    for name in ("policy/model_state.pt", "policy/optimizer_state.pt", "policy/lr_scheduler_state.pt",
                 "critic/model_state.pt", "critic/optimizer_state.pt", "data.pt", "trainer_state.pt"):
        assert (layout / name).is_file(), name
    assert not (layout / "ref").exists()
    policy = torch.load(layout / "policy" / "model_state.pt", weights_only=True)
    assert set(policy) == {"0.weight", "0.bias", "3.weight", "3.bias"}  # no DDP "module." prefix


def test_exact_resume_two_processes_torchrun(tmp_path: Path) -> None:
    # 2 ranks x 3 batches an epoch; the resume point (step 4) is inside epoch 1.
    # accelerate's own stateful dataloader underneath (DataLoaderConfiguration(use_stateful_dataloader=True))
    args = ["--steps", "8", "--interval", "4", "--loader", "prepared-stateful"]
    _straight_vs_killed(tmp_path, args, kill_at=6, resume_from=4, nproc=2)
    data = torch.load(tmp_path / "crashed" / "ckpts" / "global_step_8" / "data.pt", weights_only=False)
    assert data["world_size"] == 2 and len(data["per_rank"]) == 2


def test_exact_resume_async_save_two_processes(tmp_path: Path) -> None:
    # async_save: ckpt.step() at 6 commits step 3 (at most one save in flight) and starts step 6's
    # save; the kill right after it leaves step 6 uncommitted, so the rerun resumes from 3.
    # async_overlap_copy: parameters and optimizer state are copied while the next step runs; the
    # optimizer step pre-hook waits for the copy (the plain async path is covered by test_exact_resume)
    args = ["--steps", "8", "--interval", "3", "--async-overlap"]
    out = _straight_vs_killed(tmp_path, args, kill_at=6, resume_from=3, nproc=2)
    assert "writing in the background" in out and "training blocked" in out, out[-3000:]
    assert (tmp_path / "crashed" / "ckpts" / "latest_ckpt_global_step.txt").read_text() == "8"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_exact_resume_fsdp2_two_gpus(tmp_path: Path) -> None:
    """accelerate's FSDP2 plugin on 2 GPUs: bind picks the FSDP writer (sharded DCP files)."""
    args = ["--steps", "8", "--interval", "4", "--gpu", "--fsdp"]
    _straight_vs_killed(tmp_path, args, kill_at=6, resume_from=4, nproc=2)
    final = torch.load(tmp_path / "crashed" / "final.pt.rank0", weights_only=False)
    assert final["writer"] == "fsdp"
    policy_dir = tmp_path / "crashed" / "ckpts" / "global_step_8" / "policy"
    assert (policy_dir / "fsdp_config.json").is_file() and (policy_dir / "model_state.dcp").is_dir()


def test_register_for_checkpointing_round_trip(tmp_path: Path) -> None:
    """Our state objects work with accelerate's own save_state/load_state, next to SkyRL's saves."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    from skyrl_callbacks import SkyRLCheckpoint

    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dl = DataLoader(TensorDataset(torch.arange(20.0).view(10, 2)), batch_size=2, shuffle=True)
    model, opt, dl = acc.prepare(model, opt, dl)
    ckpt = SkyRLCheckpoint({"ckpt_path": str(tmp_path / "ck"), "export_path": str(tmp_path / "ex"), "ckpt_interval": 2})
    state = ckpt.bind(acc, policy=model, optimizers=opt, dataloader=dl)
    assert state.step == 0 and not state.resumed
    acc.register_for_checkpointing(state, ckpt.data_state)
    batches = state.batches()
    for _ in range(3):
        next(batches)
        ckpt.step()
    assert ckpt.step == 3 and ckpt.manager.last_saved_step == 2
    acc.save_state(str(tmp_path / "acc_state"))
    expected = [next(batches)[0].tolist() for _ in range(4)]
    ckpt.step = 99
    ckpt.manager.last_saved_step = None
    acc.load_state(str(tmp_path / "acc_state"))
    assert state.step == 3 and ckpt.step == 3 and ckpt.manager.last_saved_step == 2
    again = state.batches()
    assert [next(again)[0].tolist() for _ in range(4)] == expected  # same data position (and RNG)
    assert ckpt.data_state.state_dict()["format"] == "skyrl_callbacks.data/1"


def test_bind_errors_and_unbound_step(tmp_path: Path) -> None:
    from skyrl_callbacks import ConfigError, SkyRLCheckpoint

    ckpt = SkyRLCheckpoint({"ckpt_path": str(tmp_path / "ck"), "export_path": str(tmp_path / "ex")})
    with pytest.raises(ConfigError, match="bound loop"):
        ckpt.step()
    with pytest.raises(ConfigError, match="unknown argument"):
        ckpt.bind(None, policy=torch.nn.Linear(2, 2), polcy=1)
    with pytest.raises(ConfigError, match="policy="):
        ckpt.bind(None, critic=torch.nn.Linear(2, 2))
    assert ckpt.step == 0 and isinstance(ckpt.state_dict()["step"], int)


def test_bind_refuses_a_world_it_does_not_see(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun started 2 processes but no process group: both would write as rank 0."""
    from skyrl_callbacks import ConfigError, SkyRLCheckpoint

    monkeypatch.setenv("WORLD_SIZE", "2")
    ckpt = SkyRLCheckpoint({"ckpt_path": str(tmp_path / "ck"), "export_path": str(tmp_path / "ex")})
    with pytest.raises(ConfigError, match="WORLD_SIZE=2"):
        ckpt.bind(None, policy=torch.nn.Linear(2, 2))


def _plain_loop(ckpt_dir: Path, steps: int, stop_at: int = -1) -> tuple[list, dict]:
    """A torch-only loop (accelerator=None) over an unprepared ResumableDataLoader that
    shuffles with its own generator; returns what each step saw and the final states."""
    import random

    from torch.utils.data import TensorDataset

    from skyrl_callbacks import ResumableDataLoader, SkyRLCheckpoint

    random.seed(0)
    torch.manual_seed(0)
    ds = TensorDataset(torch.arange(10))
    loader = ResumableDataLoader(ds, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(3))
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ckpt = SkyRLCheckpoint({"ckpt_path": str(ckpt_dir), "export_path": str(ckpt_dir) + "_hf", "ckpt_interval": 4})
    state = ckpt.bind(None, policy=model, optimizers=[opt], dataloader=loader)
    seen, batches = [], state.batches()
    for step in range(state.step + 1, steps + 1):
        (idx,) = next(batches)
        loss = model(idx.float().unsqueeze(-1)).pow(2).mean() + random.random() * 0  # draws python RNG
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen.append((step, idx.tolist(), float(torch.rand(1))))
        ckpt.step()
        if step == stop_at:
            return seen, {}
    ckpt.finish()
    return seen, {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                  "loader": loader.state_dict()}


def test_plain_loop_unprepared_loader_resumes_exactly(tmp_path: Path) -> None:
    """No accelerate: a torch loop binds with accelerator=None; 10 samples / batch 3 = 4 batches
    an epoch; the first run stops after step 9 and the rerun resumes from step 8, the last batch of
    epoch 1 (saved before its iterator ended)."""
    straight, a = _plain_loop(tmp_path / "straight", 14)
    first, _ = _plain_loop(tmp_path / "crashed", 14, stop_at=9)
    rest, b = _plain_loop(tmp_path / "crashed", 14)
    assert rest[0][0] == 9  # resumed from global_step_8
    assert first[:8] + rest == straight
    assert first[8] == rest[0]  # the redone step saw the same batch and the same random draw
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])
    assert torch.equal(a["rng"], b["rng"])
    assert a["opt"]["state"][0]["exp_avg"].equal(b["opt"]["state"][0]["exp_avg"])
