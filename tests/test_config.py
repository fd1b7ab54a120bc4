"""CheckpointConfig: SkyRL keys and defaults, sources (dict, YAML, OmegaConf), validation errors."""

from __future__ import annotations


import pytest

from skyrl_callbacks import CheckpointConfig, ConfigError


def test_defaults_are_skyrls(monkeypatch):
    monkeypatch.setenv("HOME", "/home/alice")
    cfg = CheckpointConfig()
    assert cfg.ckpt_interval == 10
    assert cfg.ckpt_path == "/home/alice/ckpts/"
    assert cfg.max_ckpts_to_keep == -1
    assert cfg.resume_mode == "latest"
    assert cfg.resume_path is None
    assert cfg.hf_save_interval == -1
    assert cfg.export_path == "/home/alice/exports/"


def test_spec_keys_present():
    spec = {"ckpt_interval", "ckpt_path", "max_ckpts_to_keep", "resume_mode", "resume_path", "hf_save_interval", "export_path"}
    assert spec <= set(CheckpointConfig.field_names())


def test_from_dict_and_coerce(tmp_path):
    cfg = CheckpointConfig.coerce({"ckpt_interval": 3, "ckpt_path": str(tmp_path)})
    assert cfg.ckpt_interval == 3 and cfg.ckpt_path == str(tmp_path)
    assert CheckpointConfig.coerce(cfg) is cfg
    assert CheckpointConfig.coerce(None).ckpt_interval == 10


def test_dcp_thread_count_default_and_value(tmp_path):
    assert CheckpointConfig().dcp_thread_count == 4
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  dcp_thread_count: 2\n")
    assert CheckpointConfig.from_yaml(str(path)).dcp_thread_count == 2


@pytest.mark.parametrize("mode,expected", [(None, "none"), ("none", "none"), ("null", "none"), ("latest", "latest")])
def test_resume_modes(mode, expected):
    assert CheckpointConfig(resume_mode=mode).resume_mode == expected


def test_from_path_mode(tmp_path):
    cfg = CheckpointConfig(resume_mode="from_path", resume_path=str(tmp_path / "global_step_10") + "/")
    assert cfg.resume_path.endswith("global_step_10/")
    cfg = CheckpointConfig(resume_mode="from_path", resume_path="s3://bucket/run/global_step_7")
    assert cfg.resume_path == "s3://bucket/run/global_step_7"


def test_yaml_skyrl_trainer_section(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/bob")
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "trainer:\n"
        "  epochs: 20\n"
        "  strategy: fsdp2\n"
        "  policy:\n    model:\n      path: Qwen/Qwen2.5-0.5B\n"
        "  ckpt_interval: 5\n"
        "  ckpt_path: \"${oc.env:HOME}/ckpts/\"\n"
        "  resume_mode: null\n"
        "  max_ckpts_to_keep: 2\n"
    )
    cfg = CheckpointConfig.from_yaml(str(path))
    assert cfg.ckpt_interval == 5
    assert cfg.ckpt_path == "/home/bob/ckpts/"
    assert cfg.resume_mode == "none"
    assert cfg.max_ckpts_to_keep == 2
    assert cfg.extra["epochs"] == 20  # other keys kept for the record in trainer_state.pt
    assert CheckpointConfig.coerce(str(path)).ckpt_interval == 5


def test_omegaconf_node(monkeypatch):
    omegaconf = pytest.importorskip("omegaconf")
    monkeypatch.setenv("HOME", "/home/carol")
    node = omegaconf.OmegaConf.create(
        {"trainer": {"ckpt_path": "${oc.env:HOME}/ckpts/", "hf_save_interval": 50, "epochs": 3, "policy": {"lr": 1}}}
    )
    cfg = CheckpointConfig.coerce(node.trainer)
    assert cfg.ckpt_path == "/home/carol/ckpts/"
    assert cfg.hf_save_interval == 50
    assert CheckpointConfig.coerce(node).hf_save_interval == 50


def test_env_default_interpolation(monkeypatch):
    monkeypatch.delenv("SKYRL_TEST_UNSET", raising=False)
    cfg = CheckpointConfig(ckpt_path="${oc.env:SKYRL_TEST_UNSET,/tmp/x}/ckpts")
    assert cfg.ckpt_path == "/tmp/x/ckpts"


BAD = [
    ({"max_ckpts_to_keep": 0}, ["max_ckpts_to_keep", "0", "-1"]),
    ({"max_ckpts_to_keep": -5}, ["max_ckpts_to_keep", "-5"]),
    ({"max_ckpts_to_keep": 2.5}, ["max_ckpts_to_keep", "2.5"]),
    ({"ckpt_interval": -3}, ["ckpt_interval", "-3", "-1 to disable"]),
    ({"ckpt_interval": 0}, ["ckpt_interval", "0", "-1"]),
    ({"ckpt_interval": "10"}, ["ckpt_interval", "'10'", "integer"]),
    ({"ckpt_interval": True}, ["ckpt_interval", "True"]),
    ({"hf_save_interval": -2}, ["hf_save_interval", "-2"]),
    ({"resume_mode": "latests"}, ["resume_mode", "'latests'", "from_path"]),
    ({"resume_mode": "from_path"}, ["resume_path", "from_path"]),
    ({"resume_mode": "from_path", "resume_path": "/ckpts/step_10"}, ["resume_path", "global_step_N", "step_10"]),
    ({"resume_mode": "from_path", "resume_path": "/ckpts"}, ["resume_path", "global_step_N"]),
    ({"ckpt_pth": "/x"}, ["ckpt_pth", "ckpt_path", "Valid keys"]),
    ({"ckpt_path": ""}, ["ckpt_path", "non-empty"]),
    ({"ckpt_path": "${oc.env:SKYRL_DEFINITELY_UNSET_VAR}/x"}, ["ckpt_path", "SKYRL_DEFINITELY_UNSET_VAR"]),
    ({"storage_options": "endpoint"}, ["storage_options", "dict"]),
    ({"state_dict_type": "gathered"}, ["state_dict_type", "sharded", "full"]),
    ({"verify_on_resume": "yes"}, ["verify_on_resume", "true or false"]),
    ({"async_save": "yes"}, ["async_save", "yes", "true or false"]),
    ({"megatron_optimizer_sharding": "tp"}, ["megatron_optimizer_sharding", "tp", "fully_reshardable"]),
    ({"dcp_thread_count": 0}, ["dcp_thread_count", "0", ">= 1", "Use 1"]),
    ({"dcp_thread_count": "4"}, ["dcp_thread_count", "'4'", "integer"]),
    ({"dcp_thread_count": True}, ["dcp_thread_count", "True", "integer"]),
]


@pytest.mark.parametrize("kwargs,needles", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_values_name_key_value_and_fix(kwargs, needles):
    with pytest.raises(ConfigError) as info:
        CheckpointConfig.from_dict(kwargs)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert isinstance(info.value, ValueError)


def test_unknown_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        CheckpointConfig.from_yaml(str(tmp_path / "missing.yaml"))


def test_to_dict_hides_secrets():
    cfg = CheckpointConfig(storage_options={"key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://x"})
    d = cfg.to_dict()
    assert d["storage_options"]["secret"] == "***" and d["storage_options"]["endpoint_url"] == "http://x"
    assert cfg.storage_options["secret"] == "s3cr3t"
