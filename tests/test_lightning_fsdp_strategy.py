"""Lightning's FSDPStrategy (FSDP1 wrapping the whole LightningModule) on CPU.

Two levels:

* writer: ``tests/fsdp_worker.py`` phase ``view2`` (2 gloo ranks) builds
  exactly what ``FSDPStrategy`` builds (an FSDP1 root, ``use_orig_params=True``, around a module
  holding ``policy``/``critic``; no auto-wrap, decoder layers wrapped, policy wrapped) and save/load
  the roles as views on that root (``Role(model=root, include_prefix="policy.")``); then this process
  (no process group) loads those checkpoints into a plain, unwrapped policy;
* callback: a real ``lightning.pytorch.Trainer`` with ``FSDPStrategy`` in this process (world size
  1). Lightning refuses ``FSDPStrategy`` on CPU only for the exact class and FSDP1 wants a device
  id there, so a subclass passes ``device_id=cpu`` when it wraps; everything else is Lightning's.
"""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from skyrl_callbacks import ResumableDataLoader, SkyRLCheckpoint  # noqa: E402
from skyrl_callbacks.errors import ConfigError  # noqa: E402
from tests.hf_utils import tiny_llama  # noqa: E402
from tests.test_fsdp_writer import _logs, _run_phase, check  # noqa: E402


# --------------------------------------------------------------------------- writer, 2 ranks
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("fsdp_views"))
    phases = {"view2": _run_phase("view2", work, 2)}
    results: dict = {}
    for info in phases.values():
        for name, entries in info["results"].items():
            results.setdefault(name, []).extend(entries)
    # world size 1 without a process group, in this process
    import sys

    from skyrl_callbacks.dist import DistContext

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import fsdp_worker as W
    finally:
        sys.path.pop(0)
    res = W.Results(0)
    if os.path.exists(os.path.join(work, "ref_view.pt")):
        res.run("view_into_plain", lambda: W.view_into_plain(work, DistContext(), res))
    assert not torch.distributed.is_initialized()
    for item in res.items:
        results.setdefault(item["name"], []).append((0, item["ok"], item["detail"]))
    return {"work": work, "phases": phases, "results": results}


def test_view_phases_exit_cleanly(runs):
    for phase, info in runs["phases"].items():
        assert info["rc"] == 0 and not info["leaked"], f"{phase}\n{_logs(runs)}"
        crashed = [n for n in info["results"] if n.endswith("_phase")]
        assert not crashed, f"{phase} raised: {[info['results'][n] for n in crashed]}"
        assert len({r for e in info["results"].values() for r, _, _ in e}) == info["nproc"]


def test_roles_are_views_on_the_root_with_optimizers_by_identity(runs):
    check(runs, "view_roles_built", "view_nowrap_param_identity", "view_layers_param_identity",
          "view_pc_param_identity", "view_oneopt_param_identity")


@pytest.mark.parametrize("tag", ["view_nowrap", "view_layers", "view_pc", "view_oneopt"])
def test_view_checkpoint_has_the_plain_policy_keys(runs, tag):
    check(runs, f"{tag}_keys_like_plain_policy")
    if tag in ("view_pc", "view_oneopt"):
        check(runs, f"{tag}_full_keys_like_plain_policy", f"{tag}_full_model_equals_gathered")


@pytest.mark.parametrize("tag", ["view_nowrap", "view_layers", "view_pc", "view_oneopt"])
def test_view_roundtrip_at_world_size_2_is_bitwise(runs, tag):
    names = [f"{tag}_sharded_2to2", f"{tag}_resume_next_step_bitwise_policy"]
    if tag in ("view_pc", "view_oneopt"):
        names.append(f"{tag}_full_2to2")
    if tag in ("view_pc", "view_oneopt"):
        names += [f"{tag}_sharded_2to2_critic", f"{tag}_full_2to2_critic", f"{tag}_resume_next_step_bitwise_critic"]
    if tag == "view_pc":  # loading one role leaves the other role's part of the root as it was
        names += ["view_pc_sharded_other_role_untouched", "view_pc_full_other_role_untouched"]
    check(runs, *names)


def test_view_checkpoint_loads_into_another_fsdp_structure(runs):
    check(runs, "view_sharded_into_other_wrap", "view_full_into_other_wrap")


def test_view_checkpoint_loads_into_plain_policy_and_back(runs):
    check(runs, "view_sharded_into_plain_policy", "view_full_into_plain_policy", "view_full_torch_load_into_plain",
          "plain_sharded_into_view", "plain_full_into_view", "plain_and_view_checkpoints_same_keys")


def test_view_hf_export(runs):
    check(runs, "view_hf_export")


def test_view_refuses_native_layout_and_uncovered_optimizers(runs):
    check(runs, "view_native_refused", "view_coverage_detected", "view_coverage_error")


# --------------------------------------------------------------------------- callback, real Lightning
class CPUFSDPStrategy(pl.strategies.FSDPStrategy):
    """Lightning's FSDPStrategy; only the wrap passes ``device_id=cpu`` (Lightning passes the
    device index, None on CPU, which FSDP1 refuses without an accelerator)."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                        mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                        **self.kwargs)


class PolicyModule(pl.LightningModule):
    def __init__(self, stray: bool = False):
        super().__init__()
        self.policy = tiny_llama(0)
        self.register_buffer("batches_seen", torch.zeros(2))
        if stray:
            self.scale = nn.Parameter(torch.ones(1))  # trainable, outside every role

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        self.batches_seen += 1
        return self.policy(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(ckpt, steps, module=None, **strategy_kwargs):
    pl.seed_everything(0)
    data = torch.randint(0, 128, (16, 8), generator=torch.Generator().manual_seed(0))
    module = module or PolicyModule()
    cb = SkyRLCheckpoint({"ckpt_interval": 2, "ckpt_path": str(ckpt), "preemption_signals": []})
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, strategy=CPUFSDPStrategy(**strategy_kwargs),
                         callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, ResumableDataLoader(TensorDataset(data), batch_size=2, shuffle=True))
    return trainer, module, cb


def _weights(trainer, module):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
        return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


def test_lightning_fsdp_strategy_resumes_bitwise(tmp_path):
    # FSDPStrategy() defaults (no auto-wrap: one FSDP unit); auto-wrapped roots are covered by the
    # writer tests above (fresh roots loaded before their first forward) and by tests/gpu
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    kwargs: dict = {}
    trainer, module, cb = _fit(tmp_path / "a", 4, **kwargs)  # "killed" after step 4 (saved at 2 and 4)
    root = trainer.strategy.model
    assert isinstance(root, FSDP) and root.module is module
    roles = cb._roles(trainer, module)
    assert [(r.name, r.model is root, r.include_prefix) for r in roles] == [("policy", True, "policy.")]
    # Lightning's optimizer holds the module's own Parameter objects (use_orig_params=True)
    assert roles[0].optimizers == trainer.optimizers and len(roles[0].schedulers) == 1
    assert {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]} == \
        {id(p) for p in module.policy.parameters()}
    policy_dir = tmp_path / "a" / "global_step_4" / "policy"
    keys = sorted(FileSystemReader(str(policy_dir / "model_state.dcp")).read_metadata().state_dict_metadata)
    assert keys == sorted(tiny_llama(0).state_dict())  # no "policy." prefix: same as a plain policy's
    # the policy's HF config is found through the view (the root itself is no PreTrainedModel)
    assert json.loads((policy_dir / "huggingface" / "config.json").read_text())["model_type"] == "llama"
    torch.distributed.destroy_process_group()

    trainer_b, module_b, cb_b = _fit(tmp_path / "a", 6, **kwargs)  # resumes (through the root, before a forward)
    assert cb_b.resumed_step == 4 and trainer_b.global_step == 6
    assert torch.equal(module_b.batches_seen, torch.full((2,), 6.0))  # buffer outside the roles restored
    wb = _weights(trainer_b, module_b)
    torch.distributed.destroy_process_group()

    trainer_c, module_c, _ = _fit(tmp_path / "c", 6, **kwargs)  # uninterrupted
    wc = _weights(trainer_c, module_c)
    torch.distributed.destroy_process_group()
    assert wb.keys() == wc.keys() and all(torch.equal(wb[k], wc[k]) for k in wb)
    assert sorted(os.listdir(tmp_path / "a")) == ["global_step_2", "global_step_4", "global_step_6",
                                                  "latest_ckpt_global_step.txt"]


def test_lightning_fsdp_strategy_refuses_parameters_outside_the_roles(tmp_path):
    with pytest.raises(ConfigError, match=r"\['scale'\].*Move them into the policy"):
        _fit(tmp_path / "s", 2, module=PolicyModule(stray=True))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    assert not (tmp_path / "s").exists() or not any(p.startswith("global_step_") for p in os.listdir(tmp_path / "s"))
