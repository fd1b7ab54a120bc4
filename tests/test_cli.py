"""``skyrl-ckpt`` driven as a subprocess on real checkpoints, locally and on a moto S3 server.

Checkpoints come from the library itself: :class:`CheckpointManager` saves of a tiny Llama with a
plain role (local and ``s3://``), and FSDP2 checkpoints from a 2-process gloo run
(``tests/scripts/cli_fsdp_ckpt.py``: sharded DCP through the manager, plus the same state in
SkyRL's native per-rank layout). Usage errors that need no checkpoint call ``main()`` in process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from skyrl_callbacks import CheckpointConfig, CheckpointManager  # noqa: E402
from skyrl_callbacks.cli import main  # noqa: E402
from skyrl_callbacks.roles import Role  # noqa: E402
from skyrl_callbacks.storage import MANIFEST_FILE  # noqa: E402
from tests.hf_utils import dtype_kw  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FSDP_SCRIPT = os.path.join(HERE, "scripts", "cli_fsdp_ckpt.py")
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
IDS = torch.arange(24).reshape(2, 12) % 128
LEFTOVER = ".tmp-global_step_9-abc123def456"


# --------------------------------------------------------------------------- helpers
def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Result:
    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.rc, self.out, self.err = proc.returncode, proc.stdout, proc.stderr

    def json(self):
        try:
            return json.loads(self.out)
        except ValueError as exc:  # pragma: no cover - a failure message
            raise AssertionError(f"not JSON (rc={self.rc}):\n{self.out}\n--- stderr ---\n{self.err}") from exc

    def __repr__(self) -> str:
        return f"rc={self.rc}\n--- stdout ---\n{self.out[-3000:]}\n--- stderr ---\n{self.err[-3000:]}"


def _cmd(args, storage_options: dict | None) -> list[str]:
    cmd = [sys.executable, "-m", "skyrl_callbacks", *map(str, args)]
    if storage_options is not None:
        cmd += ["--storage-options", json.dumps(storage_options)]
    return cmd


def cli(*args: str, storage_options: dict | None = None) -> Result:
    return Result(subprocess.run(_cmd(args, storage_options), capture_output=True, text=True, env=_env(), timeout=180))


def cli_many(*calls: tuple, storage_options: dict | None = None) -> list[Result]:
    """Independent invocations run concurrently (each one mostly waits for ``import torch``)."""
    procs = [subprocess.Popen(_cmd(c, storage_options), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for c in calls]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        out.append(Result(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)))
    return out


def tree(path: str) -> dict[str, int]:
    out = {}
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, path)] = os.path.getsize(full)
        for d in _dirs:
            out[os.path.relpath(os.path.join(dirpath, d), path) + "/"] = 0
    return out


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def load_hf(path: str, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def llama_from_state(sd: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
    model.load_state_dict(sd)
    return model.eval()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(126)}
    vocab.update({"<unk>": 126, "<pad>": 127})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def plain_run(ckpt_path: str, storage_options: dict | None = None):
    """A tiny Llama trained 3 steps, saved at each step by CheckpointManager (plain role, HF model)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    role = Role(name="policy", model=model, optimizers=[opt], schedulers=[sched], tokenizer=make_tokenizer())
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=ckpt_path, export_path=ckpt_path + "_exports",
                                             max_ckpts_to_keep=3, storage_options=storage_options))
    for step in (1, 2, 3):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 128, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        mgr.save(step, [role], trainer_state={"epoch": 0}, data_state={"epoch": 0, "batches_seen": step})
    mgr.close()  # the run is over: its lock goes (prune keeps leftovers while a live run holds it)
    return model.eval()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def fsdp_job(tmp_path_factory):
    """Starts the 2-rank FSDP run in the background (it overlaps the plain fixture's work)."""
    work = str(tmp_path_factory.mktemp("cli_fsdp"))
    proc = subprocess.Popen([sys.executable, FSDP_SCRIPT, work], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_env(), start_new_session=True)
    yield work, proc
    if proc.poll() is None:  # pragma: no cover - only after a failure
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


@pytest.fixture(scope="module")
def plain(tmp_path_factory, fsdp_job):
    """``{root, model, logits}``: plain checkpoints of steps 1-3 plus, next to them, an incomplete
    ``global_step_7/``, a leftover of an interrupted save and a foreign directory."""
    root = str(tmp_path_factory.mktemp("cli_plain") / "ckpts")
    model = plain_run(root)
    os.makedirs(os.path.join(root, "global_step_7", "policy"))
    with open(os.path.join(root, "global_step_7", "policy", "model_state.pt"), "wb") as fh:
        fh.write(b"partial")
    os.makedirs(os.path.join(root, LEFTOVER, "policy"))
    with open(os.path.join(root, LEFTOVER, "policy", "model_state.pt"), "wb") as fh:
        fh.write(b"x" * 100)
    os.makedirs(os.path.join(root, ".tmp-mine"))  # a user's, not ours: never listed nor removed
    os.makedirs(os.path.join(root, "notes"))
    with open(os.path.join(root, "notes", "README"), "w") as fh:
        fh.write("not ours")
    return {"root": root, "model": model, "logits": logits_of(model)}


@pytest.fixture(scope="module")
def fsdp(fsdp_job):
    work, proc = fsdp_job
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:  # pragma: no cover
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    log = (out or b"").decode("utf-8", "replace")[-4000:]
    assert proc.returncode == 0 and os.path.exists(os.path.join(work, "done_rank1.json")), log
    ref = torch.load(os.path.join(work, "ref_fsdp.pt"), weights_only=False)
    return {"work": work, "ckpts": os.path.join(work, "fsdp_ckpts"), "native": os.path.join(work, "native_ckpts"),
            "ref": ref, "ref_logits": logits_of(llama_from_state(ref["model"]))}


@pytest.fixture(scope="module")
def s3(s3_server, plain, fsdp):
    """A bucket with a plain run saved by CheckpointManager straight to S3 and the FSDP run uploaded."""
    import fsspec

    opts = s3_server.storage_options
    bucket = s3_server.make_bucket("cli")
    run = f"s3://{bucket}/run"
    model = plain_run(run, storage_options=opts)
    assert torch.equal(logits_of(model), plain["logits"])
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
    fs.put(fsdp["ckpts"] + "/", f"{bucket}/fsdp/", recursive=True)
    return {"bucket": bucket, "run": run, "fsdp": f"s3://{bucket}/fsdp", "opts": opts, "fs": fs}


# --------------------------------------------------------------------------- usage
def test_help_and_usage_errors(tmp_path, capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("ls", "inspect", "verify", "prune", "export-hf", "convert", "examples:", "exit codes"):
        assert word in out, word
    assert main([]) == 2
    assert main(["export-hf", "--help"]) == 0
    assert "--max-shard-size" in capsys.readouterr().out
    assert main(["ls", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prune", str(tmp_path), "--keep", "0"]) == 2
    assert main(["ls", str(tmp_path), "--storage-options", "{not json"]) == 2
    assert "--storage-options" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    # a Megatron distributed checkpoint: clear "not supported yet"
    role = tmp_path / "global_step_5" / "policy"
    role.mkdir(parents=True)
    (role / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (role / "__0_0.distcp").write_bytes(b"\0" * 16)
    (tmp_path / "global_step_5" / "trainer_state.pt").write_bytes(b"")
    assert main(["export-hf", str(tmp_path / "global_step_5"), str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "Megatron" in err and "not supported yet" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- ls
def test_ls_local(plain, capsys):
    r = cli("ls", plain["root"], "--json")
    assert r.rc == 0, r
    doc = r.json()
    by = {c["step"]: c for c in doc["checkpoints"]}
    assert doc["committed"] == [1, 2, 3] and doc["pointer"] == 3
    assert {s: c["status"] for s, c in by.items()} == {1: "committed", 2: "committed", 3: "committed", 7: "incomplete"}
    # retention: max_ckpts_to_keep=3 from trainer_state.pt; nothing to delete now, the next save deletes step 1
    assert doc["keep"] == 3 and "trainer_state.pt" in doc["keep_source"]
    assert doc["retention"] == {"keep": 3, "delete_now": [], "delete_on_next_save": [1]}
    assert by[1]["retention"] == "next" and by[3]["pointer"] and not by[2]["pointer"]
    for s in (1, 2, 3):
        assert by[s]["roles"] == ["policy"] and by[s]["strategies"] == {"policy": "plain"}
        assert by[s]["layouts"] == {"policy": "plain"} and by[s]["world_size"] == 1
        on_disk = sum(tree(os.path.join(plain["root"], f"global_step_{s}")).values())
        assert by[s]["size"] == on_disk > 0
    assert [lo["name"] for lo in doc["leftovers"]] == [LEFTOVER] and doc["leftovers"][0]["size"] == 100
    assert "notes" not in {c["name"] for c in doc["checkpoints"]}

    assert main(["ls", plain["root"], "--keep", "1"]) == 0  # the text table
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert "prune --keep 1 deletes" in lines["1"] and "prune --keep 1 deletes" in lines["2"]
    assert "<- pointer" in lines["3"] and "incomplete" in lines["7"]
    assert LEFTOVER in out and "STATUS" in out


# --------------------------------------------------------------------------- inspect
def test_inspect_plain_reads_metadata(plain):
    r = cli("inspect", os.path.join(plain["root"], "global_step_3"), "--json")
    assert r.rc == 0, r
    doc = r.json()
    assert doc["manifest"]["step"] == 3 and doc["manifest"]["world_size"] == 1 and doc["manifest"]["parent_step"] == 2
    ts = doc["trainer_state"]
    assert ts["global_step"] == 3 and ts["world_size"] == 1 and ts["strategies"] == {"policy": "plain"}
    assert ts["config"]["max_ckpts_to_keep"] == 3 and ts["other_keys"] == {"epoch": "int"}
    assert doc["data"]["per_rank"] == [{"epoch": 0, "batches_seen": 3}]
    pol = doc["roles"]["policy"]
    assert pol["layout"] == "plain"
    sd = plain["model"].state_dict()
    got = {t["name"]: t for t in pol["model"]["tensors"]}
    assert set(got) == set(sd)
    for name, t in sd.items():
        assert got[name]["shape"] == list(t.shape) and got[name]["dtype"] == "float32"
        assert got[name]["bytes"] == t.numel() * 4
    (optim,) = pol["optimizer"]["optimizers"]
    assert optim["type"].startswith("Adam") and optim["params_with_state"] == len(list(plain["model"].parameters()))
    assert optim["step"] == 3
    (group,) = optim["param_groups"]
    assert group["lr"] == pytest.approx(1e-2) and group["weight_decay"] == pytest.approx(0.1)
    assert pol["lr_scheduler"]["schedulers"][0]["last_epoch"] == 3
    hf = pol["huggingface"]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(hf["files"]) and hf["model_type"] == "llama"


# --------------------------------------------------------------------------- verify / corrupt
def test_verify_and_corrupt_detection(plain, tmp_path, capsys):
    root = str(tmp_path / "ckpts")
    shutil.copytree(plain["root"], root)
    # step 2: truncated (size mismatch); step 3: one byte flipped (same size: only checksums see it)
    victim = os.path.join(root, "global_step_2", "policy", "model_state.pt")
    with open(victim, "r+b") as fh:
        fh.truncate(os.path.getsize(victim) - 10)
    flipped = os.path.join(root, "global_step_3", "policy", "optimizer_state.pt")
    with open(flipped, "r+b") as fh:
        fh.seek(os.path.getsize(flipped) // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0xFF]))

    r, ls, export = cli_many(
        ("verify", root, "--json"),
        ("ls", root, "--json"),
        ("export-hf", os.path.join(root, "global_step_2"), tmp_path / "hf"),
    )
    assert main(["verify", root]) == 1  # the text report, one line per file
    text = capsys.readouterr().out
    blocks = text.split(root + os.sep)
    step1 = next(b for b in blocks if b.startswith("global_step_1\n"))
    step2 = next(b for b in blocks if b.startswith("global_step_2\n"))
    assert "ok      policy/model_state.pt" in step1 and "OK:" in step1
    assert "FAILED  policy/model_state.pt" in step2 and "size" in step2 and "verification FAILED" in text

    assert r.rc == 1, r
    doc = r.json()
    res = {c["step"]: c for c in doc["checkpoints"]}
    assert res[1]["ok"] and not res[2]["ok"] and not res[3]["ok"] and not doc["ok"] and doc["checksums"]
    assert len(res[2]["problems"]) == 1 and res[2]["problems"][0].startswith("policy/model_state.pt: size")
    assert [f["status"] for f in res[3]["files"] if f["file"] == "policy/optimizer_state.pt"] == ["checksum_mismatch"]
    assert any("incomplete" in s["reason"] for s in doc["skipped"])

    assert ls.rc == 1, ls  # sizes only: step 2 is corrupt, step 3 looks fine
    status = {c["step"]: c["status"] for c in ls.json()["checkpoints"]}
    assert status[2] == "corrupt" and status[3] == "committed" and status[1] == "committed"

    # exporting a corrupt checkpoint is refused (exit 1) and writes nothing
    assert export.rc == 1 and "policy/model_state.pt" in export.err, export
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------- prune
def test_prune_dry_run_then_prune(plain, tmp_path):
    root = str(tmp_path / "ckpts")
    shutil.copytree(plain["root"], root)
    before = tree(root)
    r = cli("prune", root, "--keep", "1", "--dry-run", "--json")
    assert r.rc == 0, r
    doc = r.json()
    assert doc["dry_run"] and doc["delete"] == [1, 2] and doc["deleted"] == [] and doc["kept"] == [3]
    assert doc["leftovers"] == [LEFTOVER] and doc["removed_leftovers"] == []
    assert tree(root) == before

    r = cli("prune", root, "--keep", "2", "--json")
    assert r.rc == 0, r
    doc = r.json()
    assert doc["deleted"] == [1] and doc["removed_leftovers"] == [LEFTOVER] and doc["kept"] == [2, 3]
    names = sorted(n for n in os.listdir(root) if n != ".skyrl_lock.json")  # the writer's run lock
    # never anything not ours: the foreign dir and the incomplete global_step_7 stay
    assert names == [".tmp-mine", "global_step_2", "global_step_3", "global_step_7", "latest_ckpt_global_step.txt",
                     "notes"]
    assert open(os.path.join(root, "latest_ckpt_global_step.txt")).read() == "3"
    assert CheckpointManager(CheckpointConfig(ckpt_path=root)).committed_steps() == [2, 3]


# --------------------------------------------------------------------------- export-hf (plain)
def test_export_hf_plain_same_logits(plain, tmp_path, capsys):
    out, out16 = str(tmp_path / "hf"), str(tmp_path / "hf16")
    r, r16 = cli_many(
        ("export-hf", plain["root"], out, "--json"),  # a CKPT_PATH: the pointer's checkpoint (step 3)
        ("export-hf", os.path.join(plain["root"], "global_step_3"), out16, "--dtype", "bf16", "--max-shard-size",
         "100KB", "--json"),
    )
    assert r.rc == 0, r
    doc = r.json()
    assert doc["source"].endswith("global_step_3") and doc["weights"] == ["model.safetensors"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(doc["copied"])
    assert set(os.listdir(out)) == set(doc["files"]) | {MANIFEST_FILE}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    model = load_hf(out)
    assert torch.equal(logits_of(model), plain["logits"])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("t1 t5")["input_ids"] == [1, 5]

    assert main(["export-hf", os.path.join(plain["root"], "global_step_3"), out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export-hf", os.path.join(plain["root"], "global_step_2"), out, "--overwrite"]) == 0
    assert not torch.equal(logits_of(load_hf(out)), plain["logits"])  # step 2's weights replaced step 3's

    assert r16.rc == 0, r16
    doc = r16.json()
    assert len(doc["weights"]) > 2 and "model.safetensors.index.json" in doc["weights"]
    with open(os.path.join(out16, "model.safetensors.index.json")) as fh:
        index = json.load(fh)
    assert set(index["weight_map"]) == set(plain["model"].state_dict())
    model = load_hf(out16, **dtype_kw(torch.bfloat16))
    for name, t in model.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, plain["model"].state_dict()[name].to(torch.bfloat16)), name
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".tmp-", ".trash-"))]


# --------------------------------------------------------------------------- FSDP sharded / native
def test_fsdp_sharded_inspect_and_export(fsdp, tmp_path):
    step2 = os.path.join(fsdp["ckpts"], "global_step_2")
    out = str(tmp_path / "hf")
    r, export = cli_many(("inspect", step2, "--json"), ("export-hf", step2, out))
    assert r.rc == 0, r
    doc = r.json()
    assert doc["manifest"]["world_size"] == 2 and doc["trainer_state"]["world_size"] == 2
    assert doc["data"]["world_size"] == 2 and [d["rank"] for d in doc["data"]["per_rank"]] == [0, 1]
    pol = doc["roles"]["policy"]
    assert pol["layout"] == "fsdp-sharded" and pol["fsdp_config"]["world_size"] == 2
    assert pol["model"]["dcp_files"] == [".metadata"] + [f"__{r}_0.distcp" for r in range(2)]
    got = {t["name"]: t["shape"] for t in pol["model"]["tensors"]}
    assert got == {k: list(v.shape) for k, v in fsdp["ref"]["model"].items()}
    (optim,) = pol["optimizer"]["optimizers"]
    assert optim["name"] == "optimizer_0" and optim["step"] == 2 and optim["params_with_state"] == len(got)
    assert optim["param_groups"][0]["initial_lr"] == pytest.approx(1e-2)

    assert export.rc == 0 and "fsdp sharded" in export.out, export
    model = load_hf(out)
    for k, v in fsdp["ref"]["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    logits = logits_of(model)
    assert torch.equal(logits, fsdp["ref_logits"])
    torch.testing.assert_close(logits, fsdp["ref"]["logits"], rtol=1e-5, atol=1e-5)  # the FSDP model's own


def test_convert_native_and_export_native(fsdp, tmp_path, capsys):
    native = os.path.join(fsdp["native"], "global_step_2")
    out = str(tmp_path / "ckpts" / "global_step_2")
    conv, export = cli_many(("convert", native, out, "--json"), ("export-hf", native, tmp_path / "hf_native"))
    assert main(["ls", fsdp["native"], "--json"]) == 0
    (c,) = json.loads(capsys.readouterr().out)["checkpoints"]
    assert c["layouts"] == {"policy": "skyrl-native"} and c["world_size"] == 2 and c["status"] == "committed"

    r = conv
    assert r.rc == 0, r
    doc = r.json()
    assert doc["roles"]["policy"]["optimizer"] is True and doc["roles"]["policy"]["world_size"] == 2
    assert {"trainer_state.pt", "data.pt", "policy/huggingface/config.json"} <= set(doc["copied"])
    assert not [n for n in os.listdir(tmp_path / "ckpts") if n.startswith(".tmp-")]
    r = cli("verify", out, "--json")
    assert r.rc == 0 and r.json()["ok"], r
    assert main(["convert", native, out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert CheckpointManager(CheckpointConfig(ckpt_path=str(tmp_path / "ckpts"))).committed_steps() == [2]

    # the converted checkpoint resumes into an unsharded model in one process (weights, optimizer, scheduler)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from skyrl_callbacks.dist import DistContext
    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers.fsdp import FSDPWriter

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    FSDPWriter().load(Storage(out), os.path.join(out, "policy"), Role("policy", model, [opt], [sched]), DistContext())
    for k, v in fsdp["ref"]["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    assert sched.last_epoch == 2 and len(opt.state_dict()["state"]) == len(fsdp["ref"]["model"])

    assert export.rc == 0 and "SkyRL native" in export.out, export
    assert torch.equal(logits_of(load_hf(str(tmp_path / "hf_native"))), fsdp["ref_logits"])


# --------------------------------------------------------------------------- S3
def test_s3_ls_inspect_verify(s3, plain, capsys):
    r, ins, ver = cli_many(("ls", s3["run"], "--verify", "--json"), ("inspect", f"{s3['run']}/global_step_3", "--json"),
                           ("verify", s3["run"]), storage_options=s3["opts"])
    assert r.rc == 0, r
    doc = r.json()
    assert doc["committed"] == [1, 2, 3] and doc["pointer"] == 3 and doc["keep"] == 3
    assert all(c["status"] == "committed" and c["checksums_verified"] and c["world_size"] == 1 for c in doc["checkpoints"])

    assert ins.rc == 0, ins
    config = ins.json()["trainer_state"]["config"]
    assert config["ckpt_path"] == s3["run"] and config["storage_options"]["endpoint_url"] == s3["opts"]["endpoint_url"]
    assert config["storage_options"]["secret"] == "***" and config["storage_options"]["key"] == "***"  # redacted
    pol = ins.json()["roles"]["policy"]
    assert {t["name"]: t["shape"] for t in pol["model"]["tensors"]} == {
        k: list(v.shape) for k, v in plain["model"].state_dict().items()}
    assert pol["optimizer"]["optimizers"][0]["param_groups"][0]["lr"] == pytest.approx(1e-2)

    assert ver.rc == 0 and "verification passed" in ver.out, ver
    key = f"{s3['bucket']}/run/global_step_2/policy/optimizer_state.pt"
    s3["fs"].pipe_file(key, s3["fs"].cat_file(key)[:-7])
    assert main(["verify", f"{s3['run']}/global_step_2", "--json", "--storage-options", json.dumps(s3["opts"])]) == 1
    (res,) = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [p.split(":")[0] for p in res["problems"]] == ["policy/optimizer_state.pt"]


def test_s3_prune(s3):
    fs, run = s3["fs"], s3["run"]
    before = sorted(fs.find(f"{s3['bucket']}/run"))
    r = cli("prune", run, "--keep", "1", "--dry-run", "--json", storage_options=s3["opts"])
    assert r.rc == 0 and r.json()["delete"] == [1, 2], r
    fs.invalidate_cache()
    assert sorted(fs.find(f"{s3['bucket']}/run")) == before
    r = cli("prune", run, "--keep", "2", "--json", storage_options=s3["opts"])
    assert r.rc == 0 and r.json()["deleted"] == [1], r
    fs.invalidate_cache()
    assert sorted(n for n in (p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3['bucket']}/run")) if n != ".skyrl_lock.json") == [
        "global_step_2", "global_step_3", "latest_ckpt_global_step.txt"]


def test_s3_export_hf(s3, plain, fsdp, tmp_path):
    # FSDP sharded DCP on S3 -> HF folder on S3 (manifest written last), then loaded locally
    dst = f"s3://{s3['bucket']}/hf/fsdp"
    r, plain_r = cli_many(("export-hf", f"{s3['fsdp']}/global_step_2", dst),
                          ("export-hf", f"{s3['run']}/global_step_3", tmp_path / "plain_hf"), storage_options=s3["opts"])
    assert r.rc == 0, r
    assert main(["verify", dst, "--storage-options", json.dumps(s3["opts"])]) == 0
    local = tmp_path / "fsdp_hf"
    s3["fs"].get(f"{s3['bucket']}/hf/fsdp/", str(local) + "/", recursive=True)
    assert torch.equal(logits_of(load_hf(str(local))), fsdp["ref_logits"])
    # plain model_state.pt on S3 -> local HF folder
    assert plain_r.rc == 0, plain_r
    assert torch.equal(logits_of(load_hf(str(tmp_path / "plain_hf"))), plain["logits"])
