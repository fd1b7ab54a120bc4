"""MegatronWriter on CPU: real megatron-core GPTModels in 1 and 2 gloo processes.

The multi-process scenarios live in ``tests/megatron_worker.py``; a module fixture runs its three
phases (world size 2 at TP2/PP2/DP2, then 1, then 2 at TP2; each a fresh
``python tests/megatron_worker.py`` forking its ranks) and the tests below read their results.
megatron-core's few CUDA calls on the checkpoint path are shimmed in ``tests/megatron_helpers.py``
(tests only); everything else runs as on GPUs. The GPU run of the same scenarios plus megatron's
DistributedOptimizer is ``tests/gpu/run_megatron.sh``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core")

from skyrl_callbacks.errors import ConfigError, IncompatibleCheckpointError  # noqa: E402
from skyrl_callbacks.storage import Storage  # noqa: E402
from skyrl_callbacks.writers import megatron as M  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "megatron_worker.py")
PHASE_TIMEOUT = 240


def _run_phase(phase: str, work: str, nproc: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, WORKER, phase, work, "--nproc", str(nproc)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    try:
        out, _ = proc.communicate(timeout=PHASE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out = (out or b"") + f"\n[killed after {PHASE_TIMEOUT}s]".encode()
    # megatron-core's results-queue manager (a spawned child) shuts down just after the worker exits
    leaked = True
    for _ in range(100):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            leaked = False
            break
        time.sleep(0.1)
    if leaked:  # megatron's writer processes / manager must be gone with the phase
        os.killpg(proc.pid, signal.SIGKILL)
    results: dict[str, list] = {}
    for rank in range(nproc):
        path = os.path.join(work, f"results_{phase}_rank{rank}.json")
        if os.path.exists(path):
            with open(path) as fh:
                for item in json.load(fh):
                    results.setdefault(item["name"], []).append(item)
    return {"rc": proc.returncode, "out": (out or b"").decode("utf-8", "replace")[-6000:], "results": results,
            "leaked": leaked}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("megatron"))
    phases = {}
    for phase, nproc in (("save2", 2), ("load1", 1), ("load2", 2)):
        phases[phase] = _run_phase(phase, work, nproc)
    return {"work": work, **phases}


def _check(runs, phase: str, *names: str) -> None:
    run = runs[phase]
    results = run["results"]
    assert results, f"phase {phase} wrote no results (rc {run['rc']}):\n{run['out']}"
    for name in names:
        items = results.get(name)
        assert items, f"{phase}: no result {name!r} (rc {run['rc']}); have {sorted(results)}\n{run['out'][-3000:]}"
        bad = [i for i in items if not i["ok"]]
        assert not bad, f"{phase}/{name}: {bad[0]['detail']}"


# --------------------------------------------------------------------------- multi-process
def test_phases_exit_cleanly_without_leaks(runs):
    for phase in ("save2", "load1", "load2"):
        assert runs[phase]["rc"] == 0, f"{phase}: rc {runs[phase]['rc']}\n{runs[phase]['out']}"
        assert not runs[phase]["leaked"], f"{phase}: processes left behind"
        _check(runs, phase, f"{phase}_phase")


def test_select_writer_picks_megatron_for_gpt_model(runs):
    _check(runs, "save2", "select_writer_picks_megatron")


def test_manager_save_files_manifest_and_config_tp2(runs):
    """Through CheckpointManager + Role: every rank's files are in the manifest, exactly the files on disk."""
    _check(runs, "save2", "tp2_manager_save", "tp2_files_manifest_config")


def test_same_layout_roundtrip_bitwise(runs):
    _check(runs, "save2", "tp2_to_tp2_bitwise")


def test_per_rank_rng_each_rank_gets_its_own(runs):
    _check(runs, "save2", "tp2_per_rank_rng")


def test_reshard_tp2_to_tp1_model_and_optimizer(runs):
    _check(runs, "load1", "tp2_to_1_load", "tp2_to_1_bitwise")


def test_reshard_tp1_to_tp2_model_and_optimizer(runs):
    _check(runs, "load2", "tp1_to_2_load", "tp1_to_2_bitwise")


def test_reshard_pp2_to_pp1(runs):
    _check(runs, "save2", "pp2_save")
    _check(runs, "load1", "pp2_to_1_load", "pp2_to_1_bitwise")


def test_reshard_dp2_to_dp1_and_fully_parallel_save(runs):
    _check(runs, "save2", "dp2_save_fully_parallel")
    _check(runs, "load1", "dp2_to_1_load", "dp2_to_1_bitwise")


def test_virtual_pipeline_chunks_pp2_vpp2_to_pp1(runs):
    """A list of model chunks (model0/model1) saved at PP2 x VPP2 loads into one 4-layer chunk."""
    _check(runs, "save2", "vpp_save")
    _check(runs, "load1", "vpp_to_1_load", "vpp_to_1_bitwise")


def test_async_hooks_snapshot_write_finalize(runs):
    """snapshot, then training goes on, write in a thread, finalize: the checkpoint is the snapshot."""
    _check(runs, "save2", "async_tp2_hooks", "async_tp2_snapshot_is_consistent")


def test_async_save_through_checkpoint_manager(runs):
    """CheckpointManager(async_save=True): pending save, training goes on, wait() commits; the
    manifest lists exactly the files on disk and the checkpoint is the state at save time."""
    _check(runs, "save2", "async_manager_tp2", "async_manager_tp2_bitwise")


def test_mismatch_errors_name_field_value_and_fix(runs):
    _check(runs, "save2", "error_newer_format", "error_optimizer_count", "error_wrong_architecture",
           "error_not_megatron_dir")


def test_hf_export_tp2_matches_megatron_logits(runs):
    pytest.importorskip("transformers")
    _check(runs, "save2", "hf_export_tp2_logits")


def test_hf_export_tied_embeddings(runs):
    pytest.importorskip("transformers")
    _check(runs, "save2", "hf_export_tp2_tied_embeddings")


# --------------------------------------------------------------------------- in-process
def test_detection_is_false_and_does_not_import_megatron_for_plain_models():
    code = (
        "import sys, torch; from skyrl_callbacks.writers.megatron import is_megatron_model; "
        "assert not is_megatron_model(torch.nn.Linear(2, 2)); assert not is_megatron_model([1, 2]); "
        "assert not is_megatron_model(None); assert 'megatron.core' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_bad_optimizer_sharding_is_a_config_error():
    with pytest.raises(ConfigError, match="megatron_optimizer_sharding='zero'.*fully_reshardable"):
        M.MegatronWriter("zero")


def test_validate_dir_reasons(tmp_path):
    st = Storage(str(tmp_path))
    d = tmp_path / "policy"
    d.mkdir()
    (d / "model_state.pt").write_bytes(b"x")
    assert "no megatron_config.json" in M.MegatronWriter().validate_dir(st, str(d))
    (d / "megatron_config.json").write_text(json.dumps({"format_version": 99}))
    assert "format_version=99" in M.MegatronWriter().validate_dir(st, str(d))
    (d / "megatron_config.json").write_text(json.dumps({"format_version": 1}))
    assert "missing" in M.MegatronWriter().validate_dir(st, str(d))
    for name in ("metadata.json", "common.pt", ".metadata", "__0_0.distcp"):
        (d / name).write_bytes(b"x")
    assert M.MegatronWriter().validate_dir(st, str(d)) is None
    (d / "megatron_config.json").write_text("{not json")
    assert "not valid JSON" in M.MegatronWriter().validate_dir(st, str(d))


class _Cfg:
    num_attention_heads = 4
    num_query_groups = 2
    kv_channels = 3
    hidden_size = 5
    gated_linear_unit = True


def test_hf_mapping_splits_interleaved_gqa_qkv_and_swiglu():
    """Megatron's fused QKV is [q heads of group g, k_g, v_g] per query group."""
    cfg, hd, hidden = _Cfg(), 3, 5
    q = torch.arange(4 * hd * hidden, dtype=torch.float32).reshape(4 * hd, hidden)
    k = -torch.arange(2 * hd * hidden, dtype=torch.float32).reshape(2 * hd, hidden) - 1
    v = 1000 + torch.arange(2 * hd * hidden, dtype=torch.float32).reshape(2 * hd, hidden)
    fused = torch.cat([torch.cat([q[g * 2 * hd:(g + 1) * 2 * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]])
                       for g in range(2)])
    out = dict(M.megatron_to_hf_llama("decoder.layers.3.self_attention.linear_qkv.weight", fused, cfg))
    assert torch.equal(out["model.layers.3.self_attn.q_proj.weight"], q)
    assert torch.equal(out["model.layers.3.self_attn.k_proj.weight"], k)
    assert torch.equal(out["model.layers.3.self_attn.v_proj.weight"], v)
    # stacked form (leading layer axis), as in megatron-core's sharded state dict
    fc1 = torch.randn(2, 8, hidden)
    out = dict(M.megatron_to_hf_llama("decoder.layers.mlp.linear_fc1.weight", fc1, cfg))
    assert torch.equal(out["model.layers.1.mlp.gate_proj.weight"], fc1[1, :4])
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], fc1[1, 4:])
    with pytest.raises(IncompatibleCheckpointError, match="no Llama mapping.*experts"):
        list(M.megatron_to_hf_llama("decoder.layers.0.mlp.experts.linear_fc1.weight", fc1, cfg))


def test_llama_config_refuses_non_llama_shapes():
    pytest.importorskip("transformers")
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, normalization="RMSNorm", gated_linear_unit=True,
                            add_bias_linear=False, use_cpu_initialization=True)
    hf = M.llama_hf_config_from_megatron(cfg, 128, max_position_embeddings=64)
    assert (hf.num_key_value_heads, hf.head_dim, hf.intermediate_size, hf.vocab_size) == (2, 16, 128, 128)
    cfg.gated_linear_unit = False
    with pytest.raises(IncompatibleCheckpointError, match="gated_linear_unit=False"):
        M.llama_hf_config_from_megatron(cfg, 128)


@pytest.mark.parametrize("name", ["megatron_torchrun.py", "megatron_lightning.py"])
def test_examples_say_they_need_gpus_on_cpu(name):
    path = os.path.join(os.path.dirname(HERE), "examples", name)
    out = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 2 and "needs CUDA GPUs" in out.stderr, (out.returncode, out.stderr[-1000:])


class _DistOptStepBehaviour:
    """The two steps of megatron-core 0.16.1's ``DistributedOptimizer.load_state_dict`` (over torch's
    Adam, no TE/apex) that the writer works around; the real class needs CUDA (GPU check:
    ``run_megatron.sh --only solo``). It sets the param groups' step into every parameter's state as
    ONE shared tensor, then copies the parameter state through ``_set_main_param_and_optimizer_states``,
    which copies every key of the destination -- here given a source without ``step``
    (fully_reshardable) or with a stale one (dp_reshardable's ``LocalNonpersistentObject``)."""

    def __init__(self, params, stale_step):
        self.optimizer = torch.optim.Adam(params, lr=1e-2)
        self.model_param_group_index_map = {p: (0, i) for i, p in enumerate(params)}
        self.stale_step = stale_step

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        group, order = self.model_param_group_index_map[model_param]
        main = self.optimizer.param_groups[group]["params"][order]
        for key, dst in {"param": main, **self.optimizer.state[main]}.items():
            dst.copy_(tensors[key])

    def load_state_dict(self, state):
        shared = torch.tensor(float(state["optimizer"]["param_groups"][0]["step"]))
        for p in self.model_param_group_index_map:
            self.optimizer.state[p]["step"] = shared
        for p, src in zip(self.model_param_group_index_map, state["param_state"]):
            src = dict(src)
            if self.stale_step is not None:
                src["step"] = torch.tensor(self.stale_step)
            self._set_main_param_and_optimizer_states(p, src)


@pytest.mark.parametrize("stale_step", [None, 0.0], ids=["fully_reshardable", "dp_reshardable"])
def test_distributed_optimizer_step_workaround(stale_step):
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    opt = _DistOptStepBehaviour(params, stale_step)
    for p in params:  # state to load into, as megatron's init_state_fn leaves it
        opt.optimizer.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    saved = {"optimizer": {"param_groups": [{"step": 7.0}]},
             "param_state": [{"param": torch.full_like(p, 2.0), "exp_avg": torch.full_like(p, 0.5),
                              "exp_avg_sq": torch.full_like(p, 0.25)} for p in params]}
    if stale_step is None:
        with pytest.raises(KeyError, match="step"), torch.no_grad():  # megatron without the workaround
            opt.load_state_dict(saved)
    with torch.no_grad():
        M._load_megatron_optimizer(opt, saved)
    assert "_set_main_param_and_optimizer_states" not in vars(opt)  # the per-load override is gone
    steps = [opt.optimizer.state[p]["step"] for p in params]
    assert [float(s) for s in steps] == [7.0, 7.0]
    assert len({id(s) for s in steps}) == 2  # each parameter its own tensor
    assert all(torch.equal(p.detach(), torch.full_like(p, 2.0)) for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.optimizer.step()
    assert [float(opt.optimizer.state[p]["step"]) for p in params] == [8.0, 8.0]
