"""SkyRLCheckpoint inside real Lightning runs (in process): step rules, layout, exports, retention."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from skyrl_callbacks import SkyRLCheckpoint  # noqa: E402
from tests.hf_utils import tiny_llama  # noqa: E402


class Manual(pl.LightningModule):
    def __init__(self, policy=None):
        super().__init__()
        self.policy = policy or nn.Linear(4, 4)
        self.critic = nn.Linear(4, 1)
        self.ref_model = nn.Linear(4, 4)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        (x,) = batch
        op, oc = self.optimizers()
        out = self.policy(x) if isinstance(self.policy, nn.Linear) else self.policy(input_ids=x).logits
        loss = out.float().pow(2).mean() + self.critic(torch.ones(x.shape[0], 4)).pow(2).mean()
        op.zero_grad()
        oc.zero_grad()
        self.manual_backward(loss)
        op.step()
        oc.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.critic.parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(self.policy.parameters(), lr=0.1)]


class Auto(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.ref = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def fit(module, n_batches, cb, max_steps, accumulate=1, data=None):
    data = data if data is not None else torch.randn(n_batches, 4)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                         num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(TensorDataset(data), batch_size=1))
    return trainer


def steps_on_disk(path):
    return sorted(int(p.name.split("_")[-1]) for p in path.iterdir() if p.name.startswith("global_step_"))


def test_manual_optimization_counts_batches_and_saves_final(tmp_path):
    cb = SkyRLCheckpoint({"ckpt_interval": 3, "ckpt_path": str(tmp_path / "c")})
    fit(Manual(), 7, cb, max_steps=14)  # Lightning counts 2 optimizer steps per batch
    root = tmp_path / "c"
    assert steps_on_disk(root) == [3, 6, 7]
    assert (root / "latest_ckpt_global_step.txt").read_text() == "7"
    step = root / "global_step_7"
    # the optimizers are matched to roles by parameters, not by position
    assert "exp_avg" in str(torch.load(step / "policy" / "optimizer_state.pt")["state"][0].keys())
    assert "momentum_buffer" in str(torch.load(step / "critic" / "optimizer_state.pt")["state"])
    assert set(torch.load(step / "policy" / "model_state.pt")) == {"weight", "bias"}
    ts = torch.load(step / "trainer_state.pt", weights_only=False)
    assert ts["global_step"] == 7 and ts["config"]["ckpt_interval"] == 3
    assert ts["lightning"]["trainer_global_step"] == 14


def test_gradient_accumulation_saves_on_boundaries_only(tmp_path):
    cb = SkyRLCheckpoint({"ckpt_interval": 2, "ckpt_path": str(tmp_path / "c")})
    trainer = fit(Auto(), 8, cb, max_steps=4, accumulate=2)
    assert trainer.global_step == 4
    assert steps_on_disk(tmp_path / "c") == [2, 4]
    sd = torch.load(tmp_path / "c" / "global_step_4" / "policy" / "model_state.pt")
    assert set(sd) == {"net.weight", "net.bias"}  # saved whole as policy, reference left out


def test_retention_through_callback(tmp_path):
    cb = SkyRLCheckpoint({"ckpt_interval": 1, "ckpt_path": str(tmp_path / "c"), "max_ckpts_to_keep": 2})
    fit(Auto(), 5, cb, max_steps=5)
    assert steps_on_disk(tmp_path / "c") == [4, 5]


def test_hf_exports_at_interval_and_end(tmp_path):
    from transformers import AutoModelForCausalLM

    module = Manual(policy=tiny_llama())
    cb = SkyRLCheckpoint({"ckpt_interval": 10, "ckpt_path": str(tmp_path / "c"), "hf_save_interval": 2,
                          "export_path": str(tmp_path / "e")})
    fit(module, 5, cb, max_steps=10, data=torch.randint(0, 128, (5, 6)))
    assert steps_on_disk(tmp_path / "e") == [2, 4, 5]
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "e" / "global_step_5" / "policy"))
    for k, v in module.policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert (tmp_path / "c" / "global_step_5" / "policy" / "huggingface" / "config.json").is_file()


def test_resume_continues_at_next_step(tmp_path):
    cfg = {"ckpt_interval": 2, "ckpt_path": str(tmp_path / "c")}
    data = torch.randn(6, 4)
    m1 = Auto()
    fit(m1, 6, SkyRLCheckpoint(cfg), max_steps=4, data=data)
    m2 = Auto()
    cb = SkyRLCheckpoint(cfg)
    trainer = fit(m2, 6, cb, max_steps=6, data=data)
    assert cb.resumed_step == 4 and trainer.global_step == 6
    assert steps_on_disk(tmp_path / "c") == [2, 4, 6]
    # resume_mode none ignores them
    cb3 = SkyRLCheckpoint({**cfg, "resume_mode": "none", "ckpt_path": str(tmp_path / "c")})
    fit(Auto(), 6, cb3, max_steps=1, data=data)
    assert cb3.resumed_step is None


@pytest.mark.parametrize("async_save", [False, True])
def test_save_metrics_reach_the_lightning_logger(tmp_path, async_save, caplog):
    """Each save's numbers (bytes, seconds total/blocked, GB/s) are logged; async saves commit by the end
    (and their buffers were prewarmed after step 1, before the first save at step 2)."""
    import csv
    import logging

    caplog.set_level(logging.INFO, logger="skyrl_callbacks")

    from lightning.pytorch.loggers import CSVLogger

    cb = SkyRLCheckpoint({"ckpt_path": str(tmp_path / "ck"), "ckpt_interval": 2, "async_save": async_save})
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", callbacks=[cb], logger=CSVLogger(str(tmp_path / "logs")),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(Auto(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=1))
    assert sorted(os.listdir(tmp_path / "ck")) == ["global_step_2", "global_step_4", "global_step_6",
                                                   "latest_ckpt_global_step.txt"]
    assert (tmp_path / "ck" / "latest_ckpt_global_step.txt").read_text() == "6"
    assert not cb.manager.save_in_flight
    rows = list(csv.DictReader(open(trainer.logger.experiment.metrics_file_path)))
    logged = [r for r in rows if r.get("ckpt/bytes")]
    assert logged, rows[:3]
    for r in logged:
        assert float(r["ckpt/bytes"]) > 0 and float(r["ckpt/seconds_total"]) >= float(r["ckpt/seconds_blocked"]) > 0
        assert float(r["ckpt/gbps"]) > 0
    assert {int(float(r["ckpt/step"])) for r in logged} == {2, 4, 6}
    prewarmed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prewarmed ")]
    assert len(prewarmed) == (1 if async_save else 0), prewarmed
    if async_save:  # the start of each async save logs the time the loop was blocked
        started = {int(float(r["ckpt/async_started_step"])) for r in rows if r.get("ckpt/async_started_step")}
        assert started == {2, 4, 6}, started
        assert all(float(r["ckpt/async_stall_seconds"]) > 0 for r in rows if r.get("ckpt/async_started_step"))
