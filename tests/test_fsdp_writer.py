"""FSDPWriter on real process groups: FSDP2/FSDP1 on CPU with gloo, 1 and 2 ranks.

The multi-process scenarios live in ``tests/fsdp_worker.py``; a module fixture runs its three
phases (world size 2, then 1, then 2 again; each a fresh ``python tests/fsdp_worker.py`` forking
its ranks, killed as a process group on timeout) and the offline SkyRL-native conversion in this
process (no process group) in between. Each test below asserts the checks of one behaviour.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from skyrl_callbacks.errors import ConfigError, IncompatibleCheckpointError  # noqa: E402
from skyrl_callbacks.storage import Storage  # noqa: E402
from skyrl_callbacks.writers import fsdp as F  # noqa: E402
from skyrl_callbacks.writers.base import select_writer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fsdp_worker.py")
PHASE_TIMEOUT = 150


def _run_phase(phase: str, work: str, nproc: int, extra_phase: str = "") -> dict[str, Any]:
    """Run ``fsdp_worker.py PHASE`` on ``nproc`` forked ranks. ``extra_phase``: the name of a phase
    function of this module (``fn(work, dist, res)``), registered as ``phase`` in the worker first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, WORKER]
    if extra_phase:
        cmd = [sys.executable, "-c",
               f"import sys; sys.path.insert(0, {HERE!r}); import fsdp_worker as W; "
               f"from tests.test_fsdp_writer import {extra_phase} as fn; W.PHASES[{phase!r}] = fn; sys.exit(W.main())",
               ]
    proc = subprocess.Popen(
        cmd + [phase, work, "--nproc", str(nproc)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    try:
        out, _ = proc.communicate(timeout=PHASE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out = (out or b"") + f"\n[killed after {PHASE_TIMEOUT}s]".encode()
    # every rank (forked children in the worker's session) must be gone
    leaked = True
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        leaked = False
    if leaked:  # pragma: no cover - clean up before failing
        os.killpg(proc.pid, signal.SIGKILL)
    results: dict[str, list] = {}
    for rank in range(nproc):
        path = os.path.join(work, f"results_{phase}_rank{rank}.json")
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            for item in json.load(fh):
                results.setdefault(item["name"], []).append((rank, item["ok"], item["detail"]))
    return {"rc": proc.returncode, "log": (out or b"").decode("utf-8", "replace")[-6000:], "leaked": leaked,
            "results": results, "nproc": nproc}


def _convert_offline(work: str) -> dict[str, Any]:
    """SkyRL native -> reshardable layout, in this process, with no process group."""
    out: dict[str, Any] = {"pg_initialized": torch.distributed.is_initialized()}
    try:
        out["fsdp2"] = F.convert_skyrl_native(
            os.path.join(work, "native_fsdp2_w2", "policy"), os.path.join(work, "converted_fsdp2", "policy"))
    except Exception as exc:  # noqa: BLE001 - asserted by the tests
        out["fsdp2"] = exc
    try:
        F.convert_skyrl_native(os.path.join(work, "native_fsdp1_w2", "policy"), os.path.join(work, "x", "policy"))
        out["fsdp1_refused"] = None
    except Exception as exc:  # noqa: BLE001
        out["fsdp1_refused"] = exc
    try:
        out["fsdp1_weights"] = F.convert_skyrl_native(
            os.path.join(work, "native_fsdp1_w2", "policy"),
            os.path.join(work, "converted_fsdp1_weights", "policy"), include_optimizer=False)
    except Exception as exc:  # noqa: BLE001
        out["fsdp1_weights"] = exc
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("fsdp_writer"))
    phases = {"save2": _run_phase("save2", work, 2)}
    conv = _convert_offline(work)
    # the manager publishes a staging directory by renaming it: DCP's .metadata must only hold
    # relative file names
    os.rename(os.path.join(work, "fsdp2_sharded_w2"), os.path.join(work, "fsdp2_sharded_w2_moved"))
    phases["load1"] = _run_phase("load1", work, 1)
    phases["load2"] = _run_phase("load2", work, 2)
    results: dict[str, list] = {}
    for info in phases.values():
        for name, entries in info["results"].items():
            results.setdefault(name, []).extend(entries)
    return {"work": work, "phases": phases, "conv": conv, "results": results}


def _logs(runs) -> str:
    return "\n".join(f"--- {p} (rc={i['rc']}) ---\n{i['log'][-2500:]}" for p, i in runs["phases"].items())


def check(runs, *names: str) -> None:
    for name in names:
        entries = runs["results"].get(name)
        assert entries, f"check {name!r} did not run.\n{_logs(runs)}"
        bad = [f"rank {r}: {d}" for r, ok, d in entries if not ok]
        assert not bad, f"{name} failed:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- process hygiene
def test_phases_exit_cleanly_without_leaks(runs):
    for phase, info in runs["phases"].items():
        assert info["rc"] == 0, f"{phase} exited {info['rc']}\n{info['log']}"
        assert not info["leaked"], f"{phase} left processes behind"
        failed = [n for n, e in info["results"].items() if any(not ok for _, ok, _ in e)]
        crashed = [n for n in info["results"] if n.endswith("_phase")]
        assert not crashed, f"{phase} raised: {[info['results'][n] for n in crashed]}"
        assert len({r for e in info["results"].values() for r, _, _ in e}) == info["nproc"], failed
    assert not torch.distributed.is_initialized()


# --------------------------------------------------------------------------- detection / config
def test_detects_fsdp2_nested_in_plain_wrapper_and_fsdp1(runs):
    check(runs, "detect_fsdp2_nested", "detect_fsdp1")


def test_plain_modules_are_not_fsdp():
    assert not F.is_fsdp_model(torch.nn.Linear(2, 2))
    assert not F.is_fsdp_model("not a module")
    assert type(select_writer(torch.nn.Linear(2, 2))).__name__ == "PlainWriter"


def test_bad_state_dict_type_is_a_config_error():
    with pytest.raises(ConfigError, match="state_dict_type"):
        F.FSDPWriter(state_dict_type="local")
    assert F.FSDPWriter("full").state_dict_type == "full"


def test_dcp_thread_count_default_and_bad_values():
    assert F.FSDPWriter().dcp_thread_count == F.DEFAULT_DCP_THREAD_COUNT == 4
    for bad in (0, -2, 1.5, "4", True):
        with pytest.raises(ConfigError, match="dcp_thread_count") as info:
            F.FSDPWriter(dcp_thread_count=bad)
        assert repr(bad) in str(info.value) and ">= 1" in str(info.value)


# --------------------------------------------------------------------------- sharded layout
def test_sharded_save_lists_each_ranks_files_and_config(runs):
    check(runs, "sharded_files_listed", "fsdp_config_fields")


def test_sharded_roundtrip_same_world_size(runs):
    check(runs, "fsdp2_sharded_2to2", "fsdp2_sharded_2to2_continue")


def test_reshard_2_to_1(runs):
    check(runs, "fsdp2_sharded_2to1", "llama_sharded_2to1")


def test_reshard_1_to_2(runs):
    check(runs, "fsdp2_sharded_1to2")


def test_wrong_architecture_is_incompatible_on_every_rank(runs):
    check(runs, "fsdp2_wrong_architecture")


def test_fsspec_url_roundtrip(runs):
    check(runs, "fsspec_memory_roundtrip", "fsspec_memory_files")


def test_validate_dir_rejects_newer_format(tmp_path):
    st = Storage(str(tmp_path))
    role_dir = st.join(str(tmp_path), "policy")
    os.makedirs(role_dir)
    with open(os.path.join(role_dir, F.FSDP_CONFIG_FILE), "w") as fh:
        json.dump({"skyrl_callbacks_format": True, "format_version": F.FORMAT_VERSION + 1,
                   "state_dict_type": "sharded", "fsdp_strategy": "fsdp2", "world_size": 2}, fh)
    reason = F.FSDPWriter().validate_dir(st, role_dir)
    assert reason and "newer skyrl-callbacks" in reason
    assert "no FSDP checkpoint" in F.FSDPWriter().validate_dir(st, st.join(str(tmp_path), "empty"))


# --------------------------------------------------------------------------- full layout
def test_full_mode_files_and_roundtrip(runs):
    check(runs, "full_files_listed", "fsdp2_full_2to2", "fsdp2_full_2to1")


def test_full_mode_equals_non_fsdp_reference_run(runs):
    # Same batch on every rank: FSDP's averaged gradient (g+g)/2 is exactly g, and AdamW is
    # elementwise, so the FSDP run matches a single-process run bit for bit.
    check(runs, "fsdp2_full_model_equals_plain_run", "fsdp2_full_optim_equals_plain_run",
          "fsdp2_full_exp_avg_not_aliased", "fsdp2_full_loads_into_plain_model")


# --------------------------------------------------------------------------- FSDP1
def test_fsdp1_sharded_and_reshard(runs):
    check(runs, "fsdp1_matches_fsdp2_run", "fsdp1_sharded_2to2", "fsdp1_sharded_2to1", "fsdp2_sharded_into_fsdp1")


def test_fsdp1_full_mode(runs):
    check(runs, "fsdp1_full_2to2", "fsdp1_full_model_equals_plain_run", "fsdp1_full_optim_equals_plain_run",
          "fsdp1_full_exp_avg_not_aliased", "fsdp1_full_loads_into_plain_model")


# --------------------------------------------------------------------------- SkyRL native layout
def test_native_layout_loads_at_same_world_size(runs):
    check(runs, "native_fsdp2_2to2", "native_extra_state_rng", "native_fsdp1_2to2")


def test_native_layout_at_other_world_size_says_how_to_convert(runs):
    check(runs, "native_fsdp2_other_world_size")


def test_native_layout_info(runs):
    info = F.native_layout_info(Storage(runs["work"]), os.path.join(runs["work"], "native_fsdp2_w2", "policy"))
    assert info == {"world_size": 2, "fsdp_strategy": "fsdp2",
                    "ranks": {"model": [0, 1], "optim": [0, 1], "extra_state": [0, 1]}}


def test_convert_native_offline_then_load_at_1_and_2(runs):
    conv = runs["conv"]
    assert conv["pg_initialized"] is False
    assert isinstance(conv["fsdp2"], dict), conv["fsdp2"]
    assert conv["fsdp2"]["optimizer"] is True and conv["fsdp2"]["world_size"] == 2
    assert "model_state.dcp/.metadata" in conv["fsdp2"]["files"]
    check(runs, "converted_native_fsdp2_to1", "converted_native_fsdp2_to2")


def test_sharded_layout_loads_into_unsharded_model_without_process_group(runs):
    # the converted checkpoint is a DCP directory: one process, no process group, plain module
    sys.path.insert(0, HERE)
    try:
        from fsdp_worker import MLP, make_role
    finally:
        sys.path.remove(HERE)
    from skyrl_callbacks.dist import DistContext

    ref = torch.load(os.path.join(runs["work"], "ref_fsdp2.pt"), weights_only=False)
    role = make_role(MLP())
    st = Storage(runs["work"])
    F.FSDPWriter().load(st, os.path.join(runs["work"], "converted_fsdp2", "policy"), role, DistContext())
    assert not torch.distributed.is_initialized()
    for k, v in ref["model"].items():
        assert torch.equal(role.model.state_dict()[k], v), k
    osd = role.optimizers[0].state_dict()
    names = [n for n, _ in role.model.named_parameters()]
    for i, name in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(osd["state"][i][key], ref["optim"]["state"][name][key]), (name, key)
    assert role.schedulers[0].state_dict() == ref["sched"][0]


def test_convert_native_fsdp1(runs):
    conv = runs["conv"]
    assert isinstance(conv["fsdp1_refused"], IncompatibleCheckpointError), conv["fsdp1_refused"]
    assert "include_optimizer=False" in str(conv["fsdp1_refused"])
    assert isinstance(conv["fsdp1_weights"], dict), conv["fsdp1_weights"]
    check(runs, "converted_native_fsdp1_weights_to1", "converted_fsdp1_online_state", "converted_fsdp1_online_to1")


# --------------------------------------------------------------------------- HF export / storage
def test_hf_export_streams_one_tensor_at_a_time(runs):
    check(runs, "hf_export_fsdp2", "hf_export_fsdp2_one_at_a_time", "hf_export_fsdp1", "hf_export_llama",
          "hf_export_llama_hf_names")


def test_shared_storage_check(runs):
    check(runs, "shared_storage_ok", "shared_storage_not_shared")


# --------------------------------------------------------------------------- writer threads
THREADS = 3


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the helper thread's own report
def test_failure_on_a_dcp_writer_thread_fails_the_save(tmp_path):
    """DCP's helper writer threads lose their exceptions (pytorch/pytorch#191391): without a check the
    save returned normally and wrote a .metadata naming entries no file holds. One unpicklable entry
    lands in one of 4 files, written by whichever thread takes it (mostly a helper thread)."""
    from skyrl_callbacks.errors import StorageError

    st = Storage(str(tmp_path))
    for trial in range(3):
        state = {f"t{i}": torch.full((64,), float(i)) for i in range(8)}
        state["extra"] = {"hook": lambda: None}  # torch.save cannot pickle it
        with pytest.raises(StorageError, match="writing the sharded checkpoint failed") as info:
            F._dcp_save(state, st, str(tmp_path / f"t{trial}.dcp"), None, 4)
        assert "PicklingError" in str(info.value) or "pickle" in str(info.value), str(info.value)
    # the guard on DCP's own threaded writer (object stores still write through it; local saves
    # go through _parallel_file_writer, whose threads only pwrite)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    for trial in range(3):
        state = {f"t{i}": torch.full((64,), float(i)) for i in range(8)}
        state["extra"] = {"hook": lambda: None}
        writer = FileSystemWriter(str(tmp_path / f"dcp{trial}"), thread_count=4)
        F._fail_on_lost_writes(writer)
        with pytest.raises(BaseException) as info:  # DCP wraps it in CheckpointException (a BaseException)
            dcp.save(state, storage_writer=writer, no_dist=True)
        assert "a checkpoint writer thread failed" in str(info.value) and "were not written" in str(info.value)


def test_sharded_rank_file_is_byte_identical_to_dcp_single_thread(tmp_path):
    """The threaded local writer writes the file DCP's FileSystemWriter(thread_count=1) writes (zip CRC
    off, as all our saves), records the same offsets in .metadata, checksums the file on the way, and
    DCP reads it back."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from skyrl_callbacks.manifest import _hasher
    from skyrl_callbacks.writers.plain import _no_zip_crc

    torch.manual_seed(0)
    state = {"w": torch.randn(300, 70), "b": torch.randn(70), "empty": torch.empty(0), "i": torch.arange(5),
             "view": torch.randn(100, 10)[:, 2], "bf16": torch.randn(33).bfloat16(), "extra": {"x": 1, "s": "hi"}}
    st = Storage(str(tmp_path))
    ref, ours = str(tmp_path / "ref"), str(tmp_path / "ours")
    with _no_zip_crc():
        # per_thread_copy_ahead=0: the serial loader (in file order) also where CUDA is available
        dcp.save(state, storage_writer=dcp.FileSystemWriter(ref, thread_count=1, per_thread_copy_ahead=0), no_dist=True)
    F._dcp_save(state, st, ours, None, 3)
    assert sorted(os.listdir(ours)) == sorted(os.listdir(ref)) == [".metadata", "__0_0.distcp"]
    data = open(os.path.join(ours, "__0_0.distcp"), "rb").read()
    assert data == open(os.path.join(ref, "__0_0.distcp"), "rb").read()
    with open(os.path.join(ref, ".metadata"), "rb") as a, open(os.path.join(ours, ".metadata"), "rb") as b:
        meta_ref, meta_ours = pickle.load(a), pickle.load(b)
    assert meta_ours.storage_data == meta_ref.storage_data
    size, algo, digest = st._known[st._norm(os.path.join(ours, "__0_0.distcp"))]
    h = _hasher(algo)
    h.update(data)
    assert (size, digest) == (len(data), h.hexdigest())
    out = {k: torch.zeros_like(v) for k, v in state.items() if k != "extra"}
    out["extra"] = {"x": 0, "s": ""}
    dcp.load(out, checkpoint_id=ours, no_dist=True)
    assert all(torch.equal(out[k], state[k]) for k in state if k != "extra") and out["extra"] == state["extra"]


def phase_threads(work: str, dist, res) -> None:
    """World size 2 (run by :func:`threads` through fsdp_worker's plumbing): a sharded save through
    CheckpointManager with ``dcp_thread_count=3``, loaded back at 2 (checksums verified)."""
    from fsdp_worker import STEPS, build_fsdp2, gathered_state, make_role, train

    from skyrl_callbacks.manager import CheckpointManager

    role = make_role(build_fsdp2(seed=0).policy)
    train(role, STEPS)
    ref = gathered_state(role, dist)
    if dist.is_main:
        torch.save(ref, os.path.join(work, "ref_threads.pt"))
    mgr = CheckpointManager({"ckpt_path": os.path.join(work, "ckpts"), "export_path": os.path.join(work, "exports"),
                             "dcp_thread_count": THREADS, "verify_on_resume": True}, dist)

    def _save_load():
        mgr.save(STEPS, [role])
        w = mgr.writer_for(role)
        res.add("threads_writer", isinstance(w, F.FSDPWriter) and w.dcp_thread_count == THREADS, repr(w))
        fresh = make_role(build_fsdp2(seed=123).policy)
        mgr.load([fresh], mgr.step_dir(STEPS))
        res.same("threads_2to2", gathered_state(fresh, dist), ref)

    try:
        res.run("threads_2to2", _save_load)
    finally:
        mgr.close()


@pytest.fixture(scope="module")
def threads(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("fsdp_threads"))
    info = _run_phase("threads", work, 2, extra_phase="phase_threads")
    return {"work": work, "phases": {"threads": info}, "results": info["results"],
            "step_dir": os.path.join(work, "ckpts", "global_step_3")}


def test_dcp_thread_count_files_manifest_and_roundtrip(threads):
    from skyrl_callbacks.manifest import read_manifest, verify_dir
    from skyrl_callbacks.storage import MANIFEST_FILE

    info = threads["phases"]["threads"]
    assert info["rc"] == 0 and not info["leaked"], info["log"]
    check(threads, "threads_writer", "threads_2to2")
    st = Storage(threads["work"])
    step_dir = threads["step_dir"]
    policy = os.path.join(step_dir, "policy")
    for sub in (F.MODEL_DCP_DIR, F.OPTIMIZER_DCP_DIR):
        names = sorted(os.listdir(os.path.join(policy, sub)))
        # one file per rank, whatever the thread count (the threads share the file)
        want = sorted([".metadata"] + [f"__{r}_0.distcp" for r in range(2)])
        assert names == want, (sub, names)
    # every file on disk (all ranks' shards) is in the manifest with size and checksum, and verifies
    manifest = read_manifest(st, step_dir)
    on_disk = set(st.walk_files(step_dir)) - {MANIFEST_FILE}
    listed = set(manifest["files"])
    assert listed == on_disk, sorted(listed ^ on_disk)
    assert len([f for f in listed if f.endswith(".distcp")]) == 2 * 2
    assert all(manifest["files"][f]["hash"] for f in listed if f.endswith(".distcp"))
    assert verify_dir(st, step_dir, checksums=True) == []
    assert F.FSDPWriter().validate_dir(st, policy) is None


def test_dcp_thread_count_checkpoint_loads_at_world_size_1(threads):
    """The world-size-2 checkpoint written with 3 threads per rank into an unsharded model, one process, no group."""
    sys.path.insert(0, HERE)
    try:
        from fsdp_worker import MLP, make_role
    finally:
        sys.path.remove(HERE)
    from skyrl_callbacks.dist import DistContext

    check(threads, "threads_2to2")
    ref = torch.load(os.path.join(threads["work"], "ref_threads.pt"), weights_only=False)
    role = make_role(MLP())
    F.FSDPWriter().load(Storage(threads["work"]), os.path.join(threads["step_dir"], "policy"), role, DistContext())
    assert not torch.distributed.is_initialized()
    for k, v in ref["model"].items():
        assert torch.equal(role.model.state_dict()[k], v), k
    osd = role.optimizers[0].state_dict()
    for i, (name, _) in enumerate(role.model.named_parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(osd["state"][i][key], ref["optim"]["state"][name][key]), (name, key)
    assert role.schedulers[0].state_dict() == ref["sched"][0]


def test_sharded_reader_reads_whole_entries_in_place_and_deserialises_the_rest(tmp_path, monkeypatch):
    """Our local DCP reader: entries loaded whole into a matching destination are read straight into
    it (no deserialisation); others (a non-contiguous layout, byte entries) take the general path; the
    values are exact either way, and a truncated file is a CorruptCheckpointError naming it."""
    import torch.distributed.checkpoint as dcp

    from skyrl_callbacks.errors import CorruptCheckpointError

    torch.manual_seed(0)
    state = {"w": torch.randn(300, 70), "b": torch.randn(70), "bf16": torch.randn(33).bfloat16(),
             "t": torch.randn(20, 30).t(), "extra": {"x": 1, "s": "hi"}}
    st = Storage(str(tmp_path))
    path = str(tmp_path / "ckpt")
    F._dcp_save(state, st, path, None, 2)
    direct = {}
    real = F._direct_read

    def observed(fd, key, req, planner):  # the real function, plus what it decided
        hit = real(fd, key, req, planner)
        direct[req.storage_index.fqn] = hit is not None
        return hit

    monkeypatch.setattr(F, "_direct_read", observed)
    out = {"w": torch.zeros(300, 70), "b": torch.zeros(70), "bf16": torch.zeros(33, dtype=torch.bfloat16),
           "t": torch.zeros(30, 20), "extra": {"x": 0, "s": ""}}
    ptr = out["w"].data_ptr()
    reader = F._dcp_reader(st, path)
    assert type(reader).__name__ == "_ParallelFileReader"
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert direct == {"w": True, "b": True, "bf16": True, "t": False}, direct
    assert out["w"].data_ptr() == ptr
    assert all(torch.equal(out[k], state[k]) for k in ("w", "b", "bf16", "t")) and out["extra"] == state["extra"]
    data = os.path.join(path, "__0_0.distcp")
    os.truncate(data, os.path.getsize(data) - 100)
    with pytest.raises(CorruptCheckpointError, match="__0_0.distcp: ends inside tensor data"):
        F._dcp_load(out, st, path, None)
