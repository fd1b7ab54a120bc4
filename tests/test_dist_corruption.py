"""The corruption suite at 2 gloo ranks (manager API): every kind of corruption of the single-process
suite (``tests/test_corruption.py``) makes ``latest`` fall back on both ranks and ``from_path`` raise
``CorruptCheckpointError`` on both ranks; also with ``verify_on_resume: false`` (an unloadable
optimizer file of the same size) and with a corrupt FSDP2 shard that only rank 1 reads.

One 2-process run checks all cases in sequence (a few seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _rank_main(rank: int, tmp: str, port: int) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                             timeout=timedelta(seconds=60))
    from skyrl_callbacks import CheckpointManager, CorruptCheckpointError
    from skyrl_callbacks.dist import DistContext, RankFailure
    from tests.test_corruption import FILES, corrupt, flip_tensor_byte, roles_at

    results = []

    def case(name: str, cfg: dict, do_corrupt, fresh_roles, check) -> None:
        ckpt = os.path.join(tmp, name)
        cfg = dict(cfg, ckpt_path=ckpt, run_lock=False)
        mgr = CheckpointManager(cfg, DistContext())
        for step in (1, 2):
            mgr.save(step, fresh_roles(step)[1], data_state={"rank": rank, "step": step})
        mgr.close()
        if rank == 0:
            do_corrupt(os.path.join(ckpt, "global_step_2"))
        tdist.barrier()
        res = {"case": name, "rank": rank}
        try:
            model, roles = fresh_roles(0)
            state = CheckpointManager(cfg, DistContext()).resume(roles)
            res["step"] = state.step
            res["data"] = state.data_state
            res["equal"] = check(model, state.step)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            res["latest_error"] = f"{type(exc).__name__}: {exc}"
        try:
            CheckpointManager(dict(cfg, resume_mode="from_path", resume_path=os.path.join(ckpt, "global_step_2")),
                              DistContext()).resume(fresh_roles(0)[1])
            res["from_path"] = "no error"
        except CorruptCheckpointError as exc:
            res["from_path"] = "CorruptCheckpointError"
            res["from_path_rank_failure"] = isinstance(exc, RankFailure)
        except Exception as exc:  # noqa: BLE001
            res["from_path"] = f"{type(exc).__name__}: {exc}"
        results.append(res)

    def plain_equal(model, step: int) -> bool:
        want = roles_at(step)[0]
        return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))

    for rel in FILES:
        for how in ("truncate", "bitflip", "delete"):
            if rel == "skyrl_manifest.json" and how == "delete":
                continue  # a checkpoint without a manifest is SkyRL-native: loaded unverified (single-process suite)
            if rel == "policy/optimizer_state.pt" and how == "bitflip":
                def hit(d, rel=rel):  # inside Adam's moments: only the checksum sees it
                    flip_tensor_byte(os.path.join(d, rel))
            else:
                def hit(d, rel=rel, how=how):
                    corrupt(os.path.join(d, rel), how)
            case(f"{rel.replace('/', '_')}-{how}", {}, hit, roles_at, plain_equal)

    # verify_on_resume: false, optimizer_state.pt unloadable at the same size: its zip header zeroed
    def unloadable(d):
        with open(os.path.join(d, "policy/optimizer_state.pt"), "r+b") as fh:
            fh.write(b"\0" * 64)

    case("optimizer-unloadable-noverify", {"verify_on_resume": False}, unloadable, roles_at, plain_equal)

    # FSDP2 sharded, verify_on_resume: false: only rank 1 reads its model shard, whose entries'
    # zip headers are zeroed (same size): rank 1 fails, both ranks fall back
    from tests.test_crash_paths import _fsdp_model, _role, fill

    def fsdp_roles(step: int):
        model = _fsdp_model(step)
        return model, [_role(model)]

    def fsdp_equal(model, step: int) -> bool:
        ok = True
        for i, p in enumerate(model.parameters()):
            local = p.to_local() if hasattr(p, "to_local") else p
            ok = ok and torch.equal(local, torch.full_like(local, step * 1000 + i))
        return ok

    def shard_headers(d):
        path = os.path.join(d, "policy", "model_state.dcp", "__1_0.distcp")
        data = bytearray(open(path, "rb").read())
        i = data.find(b"PK\x03\x04")
        while i >= 0:
            data[i:i + 4] = b"\0\0\0\0"
            i = data.find(b"PK\x03\x04", i + 4)
        with open(path, "r+b") as fh:
            fh.write(bytes(data))

    assert fill is not None
    case("fsdp-rank1-shard-noverify", {"verify_on_resume": False}, shard_headers, fsdp_roles, fsdp_equal)

    with open(os.path.join(tmp, f"results.rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    tdist.barrier()
    os._exit(0)  # gloo's destroy_process_group can hang at exit (pytorch#75097); everything is written


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(sys.argv[1], int(sys.argv[2])), nprocs=2, join=True, start_method="fork")
    sys.exit(0)


def test_two_ranks_every_corruption_falls_back_on_both(tmp_path):
    from tests.test_crash_paths import _free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(Path(__file__)), str(tmp_path), str(_free_port())], env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, out
    ranks = [json.loads((tmp_path / f"results.rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 17 + 1 + 1, out
    for r0, r1 in zip(*ranks):
        for res in (r0, r1):
            assert res.get("step") == 1, res
            assert res["equal"], res
            assert res["from_path"] == "CorruptCheckpointError", res
            assert res["from_path_rank_failure"] or res["case"] != "fsdp-rank1-shard-noverify", res
        assert r0["data"] == {"rank": 0, "step": 1} and r1["data"] == {"rank": 1, "step": 1}, (r0, r1)
    assert "global_step_2" in proc.stderr and "skipping" in proc.stderr, out


@pytest.mark.skipif(os.environ.get("SKYRL_LIGHTNING_DDP_TESTS") == "0",
                    reason="SKYRL_LIGHTNING_DDP_TESTS=0: two Lightning DDP runs (~30 s on 2 cores) skipped")
def test_lightning_ddp_two_devices_falls_back(tmp_path):
    """Lightning ``strategy="ddp", devices=2`` (CPU, gloo), default config: the newest checkpoint's
    ``optimizer_state.pt`` made unloadable (same size); the rerun resumes the previous checkpoint on
    both ranks instead of dying with ``RankFailure``."""
    import torch

    script = HERE / "scripts" / "train_lightning.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run(steps: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(script), "--ckpt-path", str(tmp_path / "c"), "--log", str(tmp_path / "b"),
               "--out", str(tmp_path / "o.pt"), "--steps", str(steps), "--interval", "2", "--devices", "2",
               "--samples", "24"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    first = run(4)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    target = tmp_path / "c" / "global_step_4" / "policy" / "optimizer_state.pt"
    size = target.stat().st_size
    with open(target, "r+b") as fh:
        fh.write(b"\0" * 64)
    assert target.stat().st_size == size
    second = run(6)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    assert "skipping" in out and "global_step_4" in out, out[-5000:]
    final = torch.load(tmp_path / "o.pt", weights_only=False)
    assert final["resumed_step"] == 2 and final["step"] == 6, (final["resumed_step"], final["step"])


def test_rank_failure_keeps_the_kind_and_pickles():
    """``RankFailure.of(kind)`` is a RankFailure and a ``kind`` (what ``resume`` catches at every world
    size), names the ranks, keeps their kinds, and survives pickling (process pools, spawn)."""
    import pickle

    from skyrl_callbacks import CorruptCheckpointError, StorageError
    from skyrl_callbacks.dist import RankFailure

    exc = RankFailure.of(CorruptCheckpointError)("load model/optimizer state", {1: "CorruptCheckpointError: x"},
                                                 {1: "CorruptCheckpointError"})
    for e in (exc, pickle.loads(pickle.dumps(exc))):
        assert isinstance(e, RankFailure) and isinstance(e, CorruptCheckpointError)
        assert e.has(CorruptCheckpointError) and not e.has(StorageError)
        assert e.kinds == {1: "CorruptCheckpointError"} and "rank 1: CorruptCheckpointError: x" in str(e)
    assert isinstance(RankFailure.of(StorageError)("upload", {0: "y"}), OSError)
