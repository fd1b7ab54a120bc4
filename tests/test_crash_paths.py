"""Crash and corruption cases on the cloud (S3) and FSDP (2 gloo ranks, FSDP2 sharded) paths.

* S3 (moto server): a save loop to ``s3://`` SIGKILLed at random moments; after each kill resume
  picks the newest committed step with exactly that step's bytes (tests/scripts/save_loop.py and
  the checks of tests/test_crash_safety.py, pointed at the bucket through ``AWS_ENDPOINT_URL``);
  a truncated / bit-flipped / deleted object of the newest checkpoint falls back to the previous one.
* FSDP2, 2 ranks on gloo: the whole process group SIGKILLed while it saves sharded checkpoints in a
  loop; a fresh 2-rank run resumes from the newest committed step (every rank's shards hold that
  step's values); a truncated or bit-flipped ``.distcp`` shard of the newest checkpoint is caught
  by verification and ``latest`` falls back to the previous step.

This file is also the FSDP worker: ``python tests/test_crash_paths.py fsdp-loop|fsdp-check ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WIDTH = 64  # FSDP model width: a few hundred KB per checkpoint, so kills land inside saves


# =========================================================================== FSDP worker (subprocess)
def _fsdp_model(step: int):
    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 3))
    for layer in model:
        fully_shard(layer)
    fill(model, step)
    return model


def fill(model, step: int) -> None:
    """Every element of parameter i is step * 1000 + i (a pure function of the step)."""
    import torch

    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            (p.to_local() if hasattr(p, "to_local") else p).fill_(step * 1000 + i)


def _role(model):
    import torch

    from skyrl_callbacks.roles import Role

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Role(name="policy", model=model, optimizers=[opt])


def _rank_main(rank: int, mode: str, ckpt: str, start: int, steps: int, out: str, port: int) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                             timeout=timedelta(seconds=60))
    from skyrl_callbacks import CheckpointConfig, CheckpointManager
    from skyrl_callbacks.dist import DistContext

    cfg = CheckpointConfig(ckpt_path=ckpt, max_ckpts_to_keep=2, verify_on_resume=True, ckpt_interval=1)
    mgr = CheckpointManager(cfg, DistContext())
    if mode == "loop":
        role = _role(_fsdp_model(0))
        mgr.resume([role])
        for step in range(start, start + steps):
            fill(role.model, step)
            mgr.save(step, [role], data_state={"step": step, "rank": rank})
            if rank == 0:
                print(f"saved {step}", flush=True)
    else:  # check: resume and report what every rank holds
        role = _role(_fsdp_model(-1))
        result = {"rank": rank}
        try:
            state = mgr.resume([role])
            result["step"] = state.step
            result["path"] = state.path
            result["data"] = state.data_state
            bad = []
            for i, p in enumerate(role.model.parameters()):
                local = p.to_local() if hasattr(p, "to_local") else p
                if not torch.equal(local, torch.full_like(local, state.step * 1000 + i)):
                    bad.append(i)
            result["bad_params"] = bad
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result["error"] = f"{type(exc).__name__}: {exc}"
        with open(f"{out}.rank{rank}", "w") as fh:
            json.dump(result, fh)
    mgr.close()
    tdist.barrier()
    os._exit(0)  # gloo's destroy_process_group can hang at exit (pytorch#75097); everything is written


def worker_main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["fsdp-loop", "fsdp-check"])
    ap.add_argument("ckpt")
    ap.add_argument("--start", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--out", default="")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(args.mode.split("-")[1], args.ckpt, args.start, args.steps, args.out,
                                         args.port), nprocs=2, join=True, start_method="fork")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker_main()
    sys.exit(0)

# =========================================================================== tests
import pytest  # noqa: E402
import torch  # noqa: E402

from skyrl_callbacks import CheckpointConfig, CheckpointManager  # noqa: E402

sys.path.insert(0, str(HERE / "scripts"))
from tests.test_corruption import roles_at  # noqa: E402
from tests.test_crash_safety import SCRIPT as SAVE_LOOP  # noqa: E402
from tests.test_crash_safety import check_resumable  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
           PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_saved(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Read the child's output until its first "saved N" line (other lines, e.g. warnings, are skipped);
    kill it if that takes longer than ``timeout``."""
    import threading

    timer = threading.Timer(timeout, _kill_group, args=(proc,))
    timer.start()
    seen = []
    try:
        for line in proc.stdout:
            if line.startswith("saved"):
                return
            seen.append(line)
    finally:
        timer.cancel()
    raise AssertionError("the save loop never saved:\n" + "".join(seen)[-3000:])


# --------------------------------------------------------------------------- S3
@pytest.fixture
def s3_env(s3_server, s3_bucket, monkeypatch):
    """Point s3fs (here and in subprocesses) at the moto server through the environment."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    env = dict(ENV, AWS_ENDPOINT_URL=s3_server.endpoint_url, AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    return env, f"s3://{s3_bucket}/run"


def test_s3_random_sigkill_trials(s3_env):
    env, url = s3_env
    rng = random.Random(4321)
    trials = int(os.environ.get("SKYRL_S3_CRASH_TRIALS", "3"))
    width = 256
    subprocess.run([sys.executable, str(SAVE_LOOP), "--ckpt-path", url, "--steps", "1", "--width", str(width)],
                   env=env, check=True, capture_output=True, timeout=120)
    start = 2
    for _ in range(trials):
        proc = subprocess.Popen([sys.executable, str(SAVE_LOOP), "--ckpt-path", url, "--start", str(start),
                                 "--steps", "1000", "--width", str(width)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            _wait_saved(proc)
            time.sleep(rng.uniform(0.0, 0.6))
        finally:
            _kill_group(proc)
            proc.communicate(timeout=30)
        start = check_resumable(url, width) + 1  # type: ignore[arg-type]  (str URLs work too)
    assert start > 2 + trials  # each trial committed at least its first save


@pytest.mark.parametrize("how", ["truncate", "bitflip", "delete"])
def test_s3_corrupt_newest_falls_back(s3_env, caplog, how):
    import fsspec

    _env, url = s3_env
    cfg = dict(ckpt_path=url, verify_on_resume=True)
    mgr = CheckpointManager(CheckpointConfig(**cfg))
    for step in (1, 2):
        mgr.save(step, roles_at(step)[1], data_state={"pos": step})
    mgr.close()
    fs = fsspec.filesystem("s3")
    target = f"{url}/global_step_2/policy/model_state.pt"
    data = fs.cat_file(target)
    if how == "truncate":
        fs.pipe_file(target, data[: len(data) // 2])
    elif how == "bitflip":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        fs.pipe_file(target, bytes(flipped))
    else:
        fs.rm_file(target)
    fs.invalidate_cache()
    m, roles = roles_at(0)
    state = CheckpointManager(CheckpointConfig(**cfg)).resume(roles)
    assert state.step == 1, how
    assert torch.equal(m.policy.weight, roles_at(1)[0].policy.weight)
    assert "global_step_2" in caplog.text and "model_state.pt" in caplog.text
    from skyrl_callbacks import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError, match="global_step_2"):
        CheckpointManager(CheckpointConfig(**cfg, resume_mode="from_path",
                                           resume_path=f"{url}/global_step_2")).resume(roles_at(0)[1])


# --------------------------------------------------------------------------- FSDP2, 2 ranks
def _fsdp(mode: str, ckpt: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(Path(__file__)), mode, str(ckpt), "--port", str(_free_port()), *args]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"{mode} timed out:\n{out[-3000:]}") from None
    assert proc.returncode == 0, f"{mode} rc={proc.returncode}:\n{out[-3000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _fsdp_check(ckpt: Path, tmp: Path) -> list[dict]:
    out = tmp / f"check-{time.monotonic_ns()}"
    _fsdp("fsdp-check", ckpt, "--out", str(out))
    results = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    for res in results:
        assert "error" not in res, res
        assert res["bad_params"] == [], f"rank {res['rank']}: parameters {res['bad_params']} do not hold step {res['step']}"
        assert res["data"] == {"step": res["step"], "rank": res["rank"]}
    assert results[0]["step"] == results[1]["step"]
    return results


def _committed(ckpt: Path) -> list[int]:
    return CheckpointManager(CheckpointConfig(ckpt_path=str(ckpt), run_lock=False)).committed_steps()


def test_fsdp2_sigkill_during_sharded_saves(tmp_path):
    rng = random.Random(99)
    ckpt = tmp_path / "ckpts"
    _fsdp("fsdp-loop", ckpt, "--steps", "1")
    start = 2
    trials = int(os.environ.get("SKYRL_FSDP_CRASH_TRIALS", "1"))
    for _ in range(trials):
        cmd = [sys.executable, str(Path(__file__)), "fsdp-loop", str(ckpt), "--start", str(start),
               "--port", str(_free_port())]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            _wait_saved(proc)
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            _kill_group(proc)  # every rank at once, as a lost node does
            proc.communicate(timeout=30)
        committed = _committed(ckpt)
        pointer = int((ckpt / "latest_ckpt_global_step.txt").read_text())
        assert pointer in committed
        results = _fsdp_check(ckpt, tmp_path)
        assert results[0]["step"] == max(committed)
        start = max(committed) + 1


def test_fsdp2_corrupt_shards_fall_back(tmp_path):
    """Rank 1's model shard and rank 0's optimizer shard bit-flipped (same size: only the checksum
    sees it) in the newest checkpoint: each rank finds its own while reading it for the load, both
    are reported, ``latest`` resumes the previous step on both ranks. (A truncated shard fails the
    size check before anything is read: ``tests/test_dist_corruption.py``.)"""
    ckpt = tmp_path / "ckpts"
    _fsdp("fsdp-loop", ckpt, "--steps", "2")
    policy = ckpt / "global_step_2" / "policy"
    flipped = next(policy.glob("model_state.dcp/__1_*.distcp"))
    flipped_opt = next(policy.glob("optimizer_state.dcp/__0_*.distcp"))
    for path in (flipped, flipped_opt):
        with open(path, "r+b") as fh:
            size = path.stat().st_size
            fh.seek(size // 2)
            b = fh.read(1)
            fh.seek(size // 2)
            fh.write(bytes([b[0] ^ 0x01]))
    proc = _fsdp("fsdp-check", ckpt, "--out", str(tmp_path / "fb"))
    res = [json.loads(Path(f"{tmp_path / 'fb'}.rank{r}").read_text()) for r in range(2)]
    assert [r.get("step") for r in res] == [1, 1], (res, proc.stdout[-3000:])
    assert all(r["bad_params"] == [] for r in res)
    log = proc.stdout
    assert "global_step_2" in log and f"model_state.dcp/{flipped.name}: checksum mismatch" in log, log[-3000:]
    assert f"optimizer_state.dcp/{flipped_opt.name}: checksum mismatch" in log, log[-3000:]
