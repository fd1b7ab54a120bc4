"""2-rank gloo scenarios of async_save (run by tests/test_async_save.py).

``python tests/async_worker.py SCENARIO WORKDIR`` forks 2 ranks; each writes
``WORKDIR/result_rank{R}.json`` mapping check names to True or a failure detail.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _equal(a, b) -> bool:
    from fsdp_worker import diff

    return not diff(a, b)


def scenario_ddp(work: str, dist, res: dict) -> None:
    from skyrl_callbacks import CheckpointManager
    from skyrl_callbacks.rng import capture_rng
    from test_async_save import make_role, snapshot_of, train

    from skyrl_callbacks.roles import Role

    role = make_role(seed=0)
    inner = role.model
    role.model = torch.nn.parallel.DistributedDataParallel(inner)
    torch.manual_seed(1)  # same data on both ranks: replicated weights, as under DDP
    train(role, 2)
    expected = snapshot_of(Role("policy", inner, role.optimizers, role.schedulers))
    torch.manual_seed(100 + dist.rank)  # per-rank RNG state that must come back per rank
    rng_at_save = capture_rng()
    mgr = CheckpointManager(dict(ckpt_path=os.path.join(work, "ckpts"), async_save=True, run_lock=False))
    started = mgr.save(2, [role], data_state={"rank": dist.rank})
    res["pending"] = started.pending or f"not pending: {started}"
    train(role, 1)  # training goes on while the background writes
    committed = None
    for _ in range(2000):  # poll once per "step", as the callback does
        committed = mgr.poll()
        if committed is not None:
            break
        train(role, 1)
    res["committed_by_poll"] = committed is not None and committed.step == 2 or f"{committed}"
    res["pointer"] = mgr.read_pointer() == 2 or f"pointer {mgr.read_pointer()}"
    fresh = make_role(seed=5)
    state = CheckpointManager(dict(ckpt_path=os.path.join(work, "ckpts"), resume_mode="latest", run_lock=False)).resume([fresh])
    res["weights_of_step_2"] = _equal(snapshot_of(fresh), expected) or "differs"
    res["per_rank_rng"] = torch.equal(state.rng["torch"], rng_at_save["torch"]) or "rng differs"
    res["per_rank_data"] = state.data_state == {"rank": dist.rank} or f"{state.data_state}"
    mgr.close()


def _fsdp(work: str, dist, res: dict, mode: str, overlap: bool = False) -> None:
    from fsdp_worker import build_fsdp2, gathered_state, make_role, train

    from skyrl_callbacks import CheckpointManager

    role = make_role(build_fsdp2(seed=0).policy)
    train(role, 3)
    import copy

    expected = copy.deepcopy(gathered_state(role, dist))  # DSD hands out the live "step" tensors
    ckpts = os.path.join(work, f"ckpts_{mode}")
    mgr = CheckpointManager(dict(ckpt_path=ckpts, async_save=True, run_lock=False, state_dict_type=mode,
                                 async_overlap_copy=overlap))
    if overlap:  # keep the background busy so the deferred copies are still pending when training goes on
        import time

        mgr._executor().submit(time.sleep, 0.5)
    res[f"{mode}_pending"] = mgr.save(3, [role]).pending
    if overlap:
        stager = mgr._stagers["policy"]
        res["overlap_deferred_shards"] = (0 < stager.deferred_bytes < stager.last_bytes + 1
                                          and not mgr._pending.copied.is_set()) or \
            f"deferred {stager.deferred_bytes} of {stager.last_bytes} bytes, copied={mgr._pending.copied.is_set()}"
    train(role, 2, start=3)  # weights and optimizer state change under the background write
    if overlap:
        res["overlap_step_waited"] = mgr._pending.copied.is_set() or "the optimizer step did not wait"
    done = mgr.wait()
    res[f"{mode}_committed"] = done is not None and done.step == 3 and done.bytes > 0 or f"{done}"
    problems = mgr.verify(mgr.step_dir(3), checksums=True) if dist.is_main else []
    res[f"{mode}_verified"] = problems == [] or str(problems)
    fresh = make_role(build_fsdp2(seed=42).policy)
    CheckpointManager(dict(ckpt_path=ckpts, resume_mode="latest", run_lock=False)).resume([fresh])
    got = gathered_state(fresh, dist)
    from fsdp_worker import diff

    res[f"{mode}_state_of_step_3"] = (not dist.is_main) or not diff(got, expected) or str(diff(got, expected)[:8])
    # a second async save (warm buffers) after more training commits too
    res[f"{mode}_second_pending"] = mgr.save(5, [role]).pending
    mgr.close()
    res[f"{mode}_second_committed"] = mgr.committed_steps() == [3, 5] or str(mgr.committed_steps())


def scenario_fsdp2(work: str, dist, res: dict) -> None:
    # sharded, with async_overlap_copy: each rank's DTensor shards and Adam state are copied in the
    # background while training goes on; the optimizer step waits (plain staging: fsdp2_full, ddp)
    _fsdp(work, dist, res, "sharded", overlap=True)


def scenario_fsdp2_full(work: str, dist, res: dict) -> None:
    _fsdp(work, dist, res, "full")


def scenario_fsdp2_error(work: str, dist, res: dict) -> None:
    from fsdp_worker import build_fsdp2, make_role, train

    from skyrl_callbacks import CheckpointManager
    from skyrl_callbacks.errors import CheckpointError

    role = make_role(build_fsdp2(seed=0).policy)
    train(role, 1)
    ckpts = os.path.join(work, "ckpts_err")
    mgr = CheckpointManager(dict(ckpt_path=ckpts, async_save=True, run_lock=False))
    mgr.save(1, [role])
    mgr.wait()
    role.optimizers[0].param_groups[0]["hook"] = lambda: None  # unpicklable: the DCP write fails for real
    train(role, 1, start=1)
    res["foreground_ok"] = mgr.save(2, [role]).pending
    try:
        while mgr.poll() is None:
            train(role, 1, start=2)
        res["raised"] = "no error"
    except CheckpointError as exc:
        res["raised"] = "async save of global_step_2 failed" in str(exc) or str(exc)[:500]
    res["nothing_committed"] = mgr.committed_steps() == [1] and mgr.read_pointer() == 1 or str(mgr.committed_steps())
    del role.optimizers[0].param_groups[0]["hook"]
    mgr.close()


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def _rank_main(rank: int, scenario: str, work: str, port: int) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                             timeout=timedelta(seconds=90))
    from skyrl_callbacks.dist import DistContext

    res: dict = {}
    try:
        SCENARIOS[scenario](work, DistContext(), res)
    except Exception:  # noqa: BLE001 - reported to the test
        res["exception"] = traceback.format_exc()[-3000:]
    finally:
        with open(os.path.join(work, f"result_rank{rank}.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        tdist.destroy_process_group()


def main() -> int:
    scenario, work = sys.argv[1], sys.argv[2]
    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(scenario, work, port), nprocs=2, join=True, start_method="fork")
    return 0


if __name__ == "__main__":
    sys.exit(main())
