"""HF export: from_pretrained loads it with the same logits; sharding; atomic publish; huggingface/ dir."""

from __future__ import annotations

import json

import pytest
import torch

from skyrl_callbacks import CheckpointConfig, CheckpointManager
from skyrl_callbacks.roles import Role
from tests.hf_utils import dtype_kw, tiny_llama, tiny_tokenizer


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_with_same_logits(tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_llama(tie=tie)
    tok = tiny_tokenizer()
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(tmp_path / "c"), export_path=str(tmp_path / "e")))
    out = mgr.export_hf(7, Role("policy", model, tokenizer=tok))
    assert out == str(tmp_path / "e" / "global_step_7" / "policy")
    names = sorted(p.name for p in (tmp_path / "e" / "global_step_7" / "policy").iterdir())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not [p for p in (tmp_path / "e" / "global_step_7").iterdir() if p.name.startswith(".")]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    assert AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"] == tok("w1 w2")["input_ids"]


def test_sharded_export_and_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(tmp_path / "c"), export_path=str(tmp_path / "e")))
    out = mgr.export_hf(3, Role("policy", model), max_shard_size=60_000, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "e" / "global_step_3" / "policy" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all(s.startswith("model-") and "-of-" in s for s in shards)
    loaded = AutoModelForCausalLM.from_pretrained(out, **dtype_kw(torch.bfloat16))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k


def test_checkpoint_has_huggingface_dir(tmp_path):
    model = tiny_llama()
    tok = tiny_tokenizer()
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(tmp_path / "c")))
    mgr.save(1, [Role("policy", model, tokenizer=tok)])
    hf = tmp_path / "c" / "global_step_1" / "policy" / "huggingface"
    assert (hf / "config.json").is_file() and (hf / "tokenizer_config.json").is_file()
    assert (hf / "generation_config.json").is_file()
    manifest = json.loads((tmp_path / "c" / "global_step_1" / "skyrl_manifest.json").read_text())
    assert "policy/huggingface/config.json" in manifest["files"]


def test_non_hf_model_exports_state_dict(tmp_path):
    from safetensors.torch import load_file

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(tmp_path / "c"), export_path=str(tmp_path / "e")))
    out = mgr.export_hf(2, Role("policy", model))
    sd = load_file(f"{out}/model.safetensors")
    assert set(sd) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v)
