"""No load executes code from the checkpoint store (issue 17 item 3).

An attacker who can write to the checkpoint directory, but not to the training code, plants a
pickle whose ``__reduce__`` runs ``os.system`` in one file of a committed checkpoint and fixes
up ``skyrl_manifest.json`` (size and checksum of the planted file) so that verification passes.
Every load path must refuse it without running it: the marker file never appears, and the error
names the file, the refused global and the opt-in (``trust_checkpoint_code``).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from skyrl_callbacks import CheckpointManager, UntrustedCheckpointError
from skyrl_callbacks.manifest import hash_file
from skyrl_callbacks.storage import MANIFEST_FILE, Storage
from tests.test_manager import cfg, make_roles, train


@pytest.fixture(autouse=True)
def _no_process_wide_safe_globals():
    """Other libraries widen weights-only loads process-wide: importing megatron-core registers
    numpy arrays, paths and its config classes with ``torch.serialization.add_safe_globals`` (data
    classes, no code). These tests check our own refusals, so they run without any such globals,
    whatever an earlier test imported."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        if saved:
            torch.serialization.add_safe_globals(saved)

GLOBAL = f"GLOBAL {os.system.__module__}.system"  # posix.system


class Payload:
    """Unpickling this runs ``touch MARKER`` (what an attacker would plant)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def fix_manifest(step_dir: str, rel: str) -> None:
    """What the attacker does after planting: the manifest's size and checksum of ``rel`` match."""
    path = os.path.join(step_dir, MANIFEST_FILE)
    with open(path) as fh:
        manifest = json.load(fh)
    size, digest = hash_file(Storage(step_dir), os.path.join(step_dir, rel), manifest["checksum_algo"])
    manifest["files"][rel].update(size=size, hash=digest)
    with open(path, "w") as fh:
        json.dump(manifest, fh)


def plant(step_dir: str, rel: str, marker: str) -> None:
    """Add a payload to the (dict) content of ``rel`` and fix up the manifest."""
    path = os.path.join(step_dir, rel)
    obj = torch.load(path, weights_only=True)
    assert isinstance(obj, dict)
    obj["payload"] = Payload(marker)
    torch.save(obj, path)
    fix_manifest(step_dir, rel)


def saved_checkpoint(tmp_path, **kw):
    """A committed plain checkpoint (policy + critic roles, AdamW/SGD, StepLR) at step 3."""
    m, roles = make_roles()
    train(m, roles)
    manager = CheckpointManager(cfg(tmp_path, **kw))
    manager.save(3, roles, trainer_state={"framework": "plain", "skyrl_step": 3}, data_state={"epoch": 0})
    manager.close()
    return os.path.join(str(tmp_path / "ckpts"), "global_step_3")


def assert_refused(exc_info, path: str, marker: str) -> None:
    msg = str(exc_info.value)
    assert path in msg and GLOBAL in msg and "trust_checkpoint_code" in msg, msg
    assert exc_info.value.refused == GLOBAL and exc_info.value.path == path
    assert not os.path.exists(marker), "the planted pickle ran"


FILE_KINDS = ["trainer_state.pt", "data.pt", "policy/model_state.pt", "policy/optimizer_state.pt",
              "critic/optimizer_state.pt", "policy/lr_scheduler_state.pt"]


@pytest.mark.parametrize("rel", FILE_KINDS)
def test_planted_pickle_in_each_file_is_never_executed_on_resume(tmp_path, rel):
    step_dir = saved_checkpoint(tmp_path)
    marker = str(tmp_path / "pwned")
    plant(step_dir, rel, marker)
    manager = CheckpointManager(cfg(tmp_path, verify_on_resume=True))  # the fixed-up manifest verifies
    assert manager.verify(step_dir) == []
    _, roles = make_roles(seed=1)
    with pytest.raises(UntrustedCheckpointError) as exc_info:
        manager.resume(roles)  # resume_mode="latest": a refused file is an error, not a silent fallback
    assert_refused(exc_info, os.path.join(step_dir, rel), marker)


def test_the_payload_is_real_and_trust_checkpoint_code_opts_in(tmp_path):
    """The same planted file runs its code when (and only when) the opt-in is set: the refusal
    above is what keeps it from running."""
    step_dir = saved_checkpoint(tmp_path)
    marker = str(tmp_path / "pwned")
    plant(step_dir, "trainer_state.pt", marker)
    _, roles = make_roles(seed=1)
    state = CheckpointManager(cfg(tmp_path, trust_checkpoint_code=True)).resume(roles)
    assert state.step == 3 and os.path.exists(marker)


def test_everything_we_write_loads_weights_only(tmp_path):
    step_dir = saved_checkpoint(tmp_path)
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs if f.endswith(".pt")]
    assert len(files) >= 7
    for f in files:
        torch.load(f, weights_only=True)  # no safe globals registered
    ts = torch.load(os.path.join(step_dir, "trainer_state.pt"), weights_only=True)
    name, keys, pos, has_gauss, gauss = ts["rng_per_rank"][0]["numpy"]
    assert name == "MT19937" and keys.dtype == torch.int64 and isinstance(pos, int)


def test_old_format_numpy_rng_needs_opt_in_and_still_restores(tmp_path):
    """trainer_state.pt of older versions held numpy's raw get_state() (an ndarray): refused by
    default (naming numpy's global), restored exactly with trust_checkpoint_code."""
    step_dir = saved_checkpoint(tmp_path)
    path = os.path.join(step_dir, "trainer_state.pt")
    ts = torch.load(path, weights_only=True)
    np.random.seed(7)
    old = np.random.get_state()
    expected = np.random.rand(4)
    ts["rng_per_rank"][0]["numpy"] = old
    torch.save(ts, path)
    fix_manifest(step_dir, "trainer_state.pt")
    _, roles = make_roles(seed=1)
    with pytest.raises(UntrustedCheckpointError, match=r"GLOBAL numpy\.\S*_reconstruct.*trust_checkpoint_code"):
        CheckpointManager(cfg(tmp_path)).resume(roles)
    state = CheckpointManager(cfg(tmp_path, trust_checkpoint_code=True)).resume(roles)
    from skyrl_callbacks.rng import restore_rng

    np.random.seed(0)
    restore_rng(state.rng)
    assert np.array_equal(np.random.rand(4), expected)


def test_rng_roundtrip_weights_only():
    from skyrl_callbacks.rng import capture_rng, restore_rng

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn(3)  # has_gauss / cached gaussian set
    state = capture_rng()
    expected = (random.random(), np.random.randn(5), torch.rand(3))
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rng-{os.getpid()}.pt")
    torch.save(state, path)
    try:
        loaded = torch.load(path, weights_only=True)
    finally:
        os.unlink(path)
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    restore_rng(loaded)
    assert random.random() == expected[0]
    assert np.array_equal(np.random.randn(5), expected[1])
    assert torch.equal(torch.rand(3), expected[2])


def test_config_key_is_validated():
    from skyrl_callbacks import CheckpointConfig, ConfigError

    with pytest.raises(ConfigError, match="trust_checkpoint_code='yes': must be true or false"):
        CheckpointConfig(trust_checkpoint_code="yes")
    assert CheckpointConfig().trust_checkpoint_code is False


# --------------------------------------------------------------------------- DCP (FSDP sharded / Megatron)
def dcp_checkpoint(path: str, extra: object) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.arange(6.0), "extra": extra}, checkpoint_id=path, no_dist=True)


def test_dcp_metadata_pickle_is_never_executed(tmp_path):
    from skyrl_callbacks.writers.fsdp import _dcp_load, _dcp_metadata

    path = str(tmp_path / "model")
    dcp_checkpoint(path, "clean")
    md_path = os.path.join(path, ".metadata")
    with open(md_path, "rb") as fh:
        md = pickle.load(fh)
    marker = str(tmp_path / "pwned")
    md.payload = Payload(marker)  # dataclass __dict__: unpickled with the metadata
    with open(md_path, "wb") as fh:
        pickle.dump(md, fh)
    st = Storage(str(tmp_path))
    with pytest.raises(UntrustedCheckpointError) as exc_info:
        _dcp_metadata(st, path)
    assert_refused(exc_info, md_path, marker)
    with pytest.raises(UntrustedCheckpointError) as exc_info:
        _dcp_load({"w": torch.zeros(6), "extra": None}, st, path, None)
    assert_refused(exc_info, md_path, marker)


def test_dcp_clean_metadata_and_bytes_load(tmp_path):
    from skyrl_callbacks.writers.fsdp import _dcp_load

    path = str(tmp_path / "model")
    dcp_checkpoint(path, {"lr": 0.1, "betas": (0.9, 0.95), "name": "adamw"})
    state = {"w": torch.zeros(6), "extra": {"lr": 0.0, "betas": None, "name": None}}
    _dcp_load(state, Storage(str(tmp_path)), path, None)
    assert torch.equal(state["w"], torch.arange(6.0))
    assert state["extra"] == {"lr": 0.1, "betas": (0.9, 0.95), "name": "adamw"}


def test_dcp_byte_entry_pickle_is_never_executed(tmp_path):
    """Byte entries (param_groups, Megatron's ShardedObjects) are unpickled by DCP's planner with
    weights_only=False; ours go through a weights-only load first."""
    from skyrl_callbacks.safe_load import check_dcp_bytes, guard_dcp_reader
    from skyrl_callbacks.writers.fsdp import _dcp_load

    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "optim")
    dcp_checkpoint(path, Payload(marker))  # a non-tensor entry: stored as bytes
    assert not os.path.exists(marker)
    with pytest.raises(UntrustedCheckpointError) as exc_info:
        _dcp_load({"w": torch.zeros(6), "extra": None}, Storage(str(tmp_path)), path, None)
    msg = str(exc_info.value)
    assert path in msg and "'extra'" in msg and GLOBAL in msg and "trust_checkpoint_code" in msg, msg
    assert not os.path.exists(marker)
    # the pre-check of loaders whose DCP reader we do not build (Megatron's)
    from torch.distributed.checkpoint import FileSystemReader

    md = guard_dcp_reader(FileSystemReader(path), path).read_metadata()
    with pytest.raises(UntrustedCheckpointError, match=r"__0_0\.distcp \(entry 'extra'\).*GLOBAL posix\.system"):
        check_dcp_bytes(path, md)
    assert not os.path.exists(marker)


def test_megatron_common_file_check(tmp_path):
    from skyrl_callbacks.safe_load import check_torch_file

    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "common.pt")
    torch.save({"checkpoint_version": 3.0, "x": Payload(marker)}, path)
    with pytest.raises(UntrustedCheckpointError) as exc_info:
        check_torch_file(path)
    assert_refused(exc_info, path, marker)
    torch.save({"checkpoint_version": 3.0}, path)
    check_torch_file(path)


# --------------------------------------------------------------------------- CLI
def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "skyrl_callbacks", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def test_cli_inspect_and_export_never_execute_a_planted_pickle(tmp_path):
    step_dir = saved_checkpoint(tmp_path)
    marker = str(tmp_path / "pwned")
    for rel in ("trainer_state.pt", "data.pt", "policy/lr_scheduler_state.pt"):
        plant(step_dir, rel, marker)
    res = cli("inspect", step_dir, "--json")
    doc = json.loads(res.stdout)
    errors = [doc["trainer_state"]["error"], doc["data"]["error"], doc["roles"]["policy"]["lr_scheduler"]["error"]]
    for err, rel in zip(errors, ("trainer_state.pt", "data.pt", "policy/lr_scheduler_state.pt")):
        assert os.path.join(step_dir, rel) in err and GLOBAL in err and "--trust-checkpoint-code" in err, err
    res = cli("ls", str(tmp_path / "ckpts"), "--json")
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(marker)
    plant(step_dir, "policy/model_state.pt", marker)
    for args in (("inspect", step_dir), ("export-hf", step_dir, str(tmp_path / "hf"), "--role", "policy")):
        res = cli(*args)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        path = os.path.join(step_dir, "policy", "model_state.pt")
        assert path in res.stderr and GLOBAL in res.stderr and "--trust-checkpoint-code" in res.stderr, res.stderr
        assert not os.path.exists(marker)
    # the opt-in is real: with it, the same file runs its payload
    res = cli("inspect", step_dir, "--trust-checkpoint-code")
    assert res.returncode == 0, res.stderr
    assert os.path.exists(marker)


# --------------------------------------------------------------------------- Lightning, end to end
def lightning_fit(root, max_steps, extra=None, callbacks=()):
    pl = pytest.importorskip("lightning.pytorch")
    import pathlib

    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from torch.utils.data import TensorDataset

    from skyrl_callbacks import ResumableDataLoader, SkyRLCheckpoint

    class Module(pl.LightningModule):
        def __init__(self, lr=0.1, data_dir=pathlib.Path("/data")):
            super().__init__()
            self.save_hyperparameters()  # a Path among them: recorded as a string
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = self.net(batch[0]).pow(2).mean()
            self.log("loss", loss)
            return loss

        def on_save_checkpoint(self, checkpoint):
            checkpoint.update(extra or {})

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.net.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)]

    torch.manual_seed(0)
    np.random.seed(0)
    cb = SkyRLCheckpoint({"ckpt_interval": 2, "ckpt_path": root})
    early = EarlyStopping("loss", patience=1000)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[cb, ModelCheckpoint(dirpath=root + "_mc", monitor="loss"), early, *callbacks])
    module = Module()
    trainer.fit(module, ResumableDataLoader(TensorDataset(torch.randn(6, 4)), batch_size=1, shuffle=True))
    return trainer, module, cb, early


def test_lightning_checkpoint_loads_weights_only_end_to_end(tmp_path):
    root = str(tmp_path / "ckpts")
    lightning_fit(root, max_steps=4)
    step_dir = os.path.join(root, "global_step_4")
    for d, _, fs in os.walk(step_dir):
        for f in fs:
            if f.endswith(".pt"):
                torch.load(os.path.join(d, f), weights_only=True)
    ts = torch.load(os.path.join(step_dir, "trainer_state.pt"), weights_only=True)
    assert ts["lightning"]["hparams"]["data_dir"] == "/data"
    assert any(k.startswith("EarlyStopping") for k in ts["lightning"]["callbacks"])
    _, module, cb, early = lightning_fit(root, max_steps=6)  # resumes from step 4 under weights_only loads
    assert cb.resumed_step == 4 and cb.step == 6
    assert os.path.isdir(os.path.join(root, "global_step_6"))


def test_lightning_user_state_that_needs_unpickling_is_reported_at_save(tmp_path, caplog):
    root = str(tmp_path / "ckpts")
    import logging

    with caplog.at_level(logging.WARNING, logger="skyrl_callbacks.safe_load"):
        lightning_fit(root, max_steps=2, extra={"normaliser": np.float32(1.5)})
    assert "trainer_state.pt: ['lightning']['module_checkpoint']['normaliser'] is a numpy.float32" in caplog.text
    assert "trust_checkpoint_code: true" in caplog.text
    with pytest.raises(UntrustedCheckpointError, match=r"trainer_state\.pt: refused to load: it holds GLOBAL numpy"):
        lightning_fit(root, max_steps=4)


def test_no_other_code_executing_load_in_the_package():
    """Every ``torch.load`` in the package passes ``weights_only=True`` and nothing calls
    ``pickle.load(s)`` or builds an unrestricted Unpickler, except the trusted fallback in
    safe_load.py (reached only with trust_checkpoint_code)."""
    import ast
    import pathlib

    import skyrl_callbacks

    bad = []
    for path in pathlib.Path(skyrl_callbacks.__file__).parent.rglob("*.py"):
        if path.name == "safe_load.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.name}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{where} torch.load without weights_only=True")
            if owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
                bad.append(f"{where} pickle.{node.func.attr}")
    assert not bad, bad


def test_recorded_values_are_made_portable(tmp_path):
    """Hyperparameters / config extras (recorded, not restored) are converted to values a
    weights-only load accepts; non_portable finds exactly what it would refuse."""
    import enum
    import pathlib

    from skyrl_callbacks.safe_load import non_portable, to_portable

    class Mode(enum.Enum):
        A = "a"

    obj = {"path": pathlib.Path("/data"), "frozen": frozenset({1}), "set": {1}, "f32": np.float32(1.5),
           "i64": np.int64(3), "arr": np.arange(3), "mode": Mode.A, "nested": (1, [{"flag": np.bool_(True)}])}
    found = dict(non_portable(obj))
    assert found == {"['path']": "pathlib.PosixPath", "['frozen']": "builtins.frozenset", "['f32']": "numpy.float32",
                     "['i64']": "numpy.int64", "['arr']": "numpy.ndarray", "['nested'][1][0]['flag']": "numpy.bool",
                     "['mode']": f"{__name__}.{Mode.__qualname__}"}
    portable = to_portable(obj)
    assert non_portable(portable) == []
    torch.save(portable, tmp_path / "p.pt")
    back = torch.load(tmp_path / "p.pt", weights_only=True)
    assert back["path"] == "/data" and back["f32"] == 1.5 and back["mode"] == "a" and back["frozen"] == [1]
    assert torch.equal(back["arr"], torch.arange(3)) and back["nested"] == (1, [{"flag": True}])
