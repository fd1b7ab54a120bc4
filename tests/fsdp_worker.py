"""Multi-process helper of tests/test_fsdp_writer.py (CPU, gloo).

    python tests/fsdp_worker.py PHASE WORKDIR --nproc N

forks N ranks, runs one phase of scenarios on each and writes ``WORKDIR/results_PHASE_rank{R}.json``
(a list of ``{"name", "ok", "detail"}``). Phases: ``save2`` (world size 2: train, save in every
layout, load back at 2, HF export, shared-storage check, FSDP1), ``load1`` (world size 1: load
the world-size-2 checkpoints, then save one at 1), ``load2`` (world size 2: load that one).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import traceback
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

STEPS = 3
LR = 1e-2


# --------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(torch.tanh(self.lin(x))) + x


class MLP(nn.Module):
    """Uneven shapes (13 rows over 2 ranks), a buffer, nested blocks."""

    def __init__(self, width: int = 13) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.out = nn.Linear(width, 5)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h) * self.scale


class Wrapper(nn.Module):
    """A LightningModule-like holder: fully_shard is applied to submodules of ``policy`` only."""

    def __init__(self, width: int = 13) -> None:
        super().__init__()
        self.policy = MLP(width)


def build_fsdp2(seed: int, width: int = 13):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    wrapper = Wrapper(width)
    for b in wrapper.policy.blocks:
        fully_shard(b)
    fully_shard(wrapper.policy.inp)
    fully_shard(wrapper.policy.out)
    return wrapper


def build_fsdp1(seed: int, mesh: bool = False):
    import torch.distributed as tdist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(seed)
    kwargs = {}
    if mesh:
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["device_mesh"] = init_device_mesh("cpu", (tdist.get_world_size(),))
    return FSDP(MLP(), auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=False,
                device_id=torch.device("cpu"), **kwargs)


def build_llama(seed: int):
    """A tiny Llama (from a config, no download): fully_shard per decoder layer and on the root."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def train_llama(role, steps: int) -> None:
    for step in range(steps):
        g = torch.Generator().manual_seed(2000 + step)
        ids = torch.randint(0, 128, (2, 16), generator=g)
        role.model(input_ids=ids, labels=ids).loss.backward()
        role.optimizers[0].step()
        role.optimizers[0].zero_grad()
        role.schedulers[0].step()


def make_role(model):
    from skyrl_callbacks.roles import Role

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return Role(name="policy", model=model, optimizers=[opt], schedulers=[sched])


def train(role, steps: int, start: int = 0) -> None:
    """Same batch on every rank, so the FSDP run equals a single-process run."""
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(6, 8, generator=g)
        loss = role.model(x).pow(2).mean()
        loss.backward()
        for opt in role.optimizers:
            opt.step()
            opt.zero_grad()
        for s in role.schedulers:
            s.step()


# --------------------------------------------------------------------------- gathering / comparing
def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_flat_param", "")


def gathered_state(role, dist) -> dict:
    """Full model + FQN-keyed optimizer state on rank 0, by other means than the writer's load path."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from skyrl_callbacks.writers import fsdp as F

    strategy = F.fsdp_strategy_of(role.model)
    if strategy == "fsdp2":
        msd, osd = get_state_dict(role.model, role.optimizers,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:  # FSDP1: its full-state-dict path crashes on CPU; summon params, gather optimizer shards
        with F._quiet(), FSDP.summon_full_params(role.model, writeback=False):
            msd = {_clean(n): p.detach().clone() for n, p in role.model.named_parameters()}
            msd.update({_clean(n): b.detach().clone() for n, b in role.model.named_buffers()})
        osd = F._map_tensors(F._optim_sd(role, role.optimizers[0]), lambda t: F._gather_full(t, dist))
    if not dist.is_main:
        return {}
    return {"model": msd, "optim": osd, "sched": [s.state_dict() for s in role.schedulers]}


def diff(a, b, path="") -> list:
    out = []
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            out.append(f"{path}: tensors differ ({a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)})")
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        if path.endswith("param_groups") or "param_groups[" in path:
            # FQN-keyed groups list their names per FSDP unit (FSDP1) or in module order (FSDP2)
            a = {k: (sorted(v) if k == "params" else v) for k, v in a.items()}
            b = {k: (sorted(v) if k == "params" else v) for k, v in b.items()}
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))[:6]} differ"]
        for k in a:
            out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} vs {len(b)}"]
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


class Results:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        if os.environ.get("FSDP_WORKER_DEBUG"):
            print(f"[rank{self.rank}] {'ok ' if ok else 'BAD'} {name} {'' if ok else detail[-800:]}", flush=True)
        self.items.append({"name": name, "ok": bool(ok), "detail": str(detail)[:3000]})

    def same(self, name: str, got: dict, ref: dict, rank0_only: bool = True) -> None:
        if rank0_only and self.rank != 0:
            self.add(name, True)
            return
        problems = diff(got, ref)
        self.add(name, not problems, "; ".join(problems[:8]))

    def run(self, name: str, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - recorded as a failed check
            self.add(name, False, "".join(traceback.format_exception(exc))[-3000:])

    def raises(self, name: str, fn, cls, *needles: str) -> None:
        try:
            fn()
        except cls as exc:
            missing = [n for n in needles if n not in str(exc)]
            self.add(name, not missing, f"{type(exc).__name__}: {exc}" + (f" (missing {missing})" if missing else ""))
        except BaseException as exc:  # noqa: BLE001
            self.add(name, False, "wrong exception: " + "".join(traceback.format_exception(exc))[-2000:])
        else:
            self.add(name, False, "no exception raised")


# --------------------------------------------------------------------------- phases
def phase_save2(work: str, dist, res: Results) -> None:
    from skyrl_callbacks.errors import IncompatibleCheckpointError, StorageError
    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers import fsdp as F
    from skyrl_callbacks.writers.base import select_writer

    st = Storage(work)
    rank = dist.rank

    # ---- FSDP2 ---------------------------------------------------------------
    wrapper = build_fsdp2(seed=0)
    role = make_role(wrapper.policy)
    w = select_writer(wrapper.policy)
    res.add("detect_fsdp2_nested", F.is_fsdp_model(wrapper) and F.fsdp_strategy_of(wrapper) == "fsdp2"
            and isinstance(w, F.FSDPWriter) and w.state_dict_type == "sharded" and not F.is_fsdp_model(MLP()),
            repr(w))
    train(role, STEPS)
    ref = gathered_state(role, dist)
    if dist.is_main:
        torch.save(ref, os.path.join(work, "ref_fsdp2.pt"))

    # sharded save at 2, load at 2
    d = st.join(work, "fsdp2_sharded_w2", "policy")
    files = F.FSDPWriter("sharded").save(st, d, role, dist)
    all_files = dist.all_gather(files)
    on_disk = sorted(st.walk_files(d))
    union = sorted(f for fs in all_files for f in fs)
    expect_own = {f"{sub}/__{rank}_0.distcp" for sub in ("model_state.dcp", "optimizer_state.dcp")}
    if rank == 0:
        expect_own |= {"model_state.dcp/.metadata", "optimizer_state.dcp/.metadata", "fsdp_config.json",
                       "lr_scheduler_state.pt"}
    res.add("sharded_files_listed", set(files) == expect_own and union == on_disk and len(set(union)) == len(union),
            f"rank files {files}; on disk {on_disk}")
    cfg = json.loads(st.read_text(st.join(d, "fsdp_config.json")))
    res.add("fsdp_config_fields", cfg["fsdp_strategy"] == "fsdp2" and cfg["world_size"] == 2
            and cfg["state_dict_type"] == "sharded" and cfg["format_version"] == 1
            and cfg["skyrl_callbacks_format"] is True, json.dumps(cfg))

    def _load_sharded_w2():
        fresh = make_role(build_fsdp2(seed=123).policy)
        F.FSDPWriter().load(st, d, fresh, dist)
        res.same("fsdp2_sharded_2to2", gathered_state(fresh, dist), ref)
        # training continues identically after the load
        train(fresh, 1, start=STEPS)
        train(role_copy_for_continue, 1, start=STEPS)
        res.same("fsdp2_sharded_2to2_continue", gathered_state(fresh, dist), gathered_state(role_copy_for_continue, dist))

    # an identical run to compare "one more step" against
    role_copy_for_continue = make_role(build_fsdp2(seed=0).policy)
    train(role_copy_for_continue, STEPS)
    res.run("fsdp2_sharded_2to2", _load_sharded_w2)

    # full save (rank 0 single files), load at 2, compare with a non-FSDP reference run
    dfull = st.join(work, "fsdp2_full_w2", "policy")

    def _full():
        files = F.FSDPWriter("full").save(st, dfull, role, dist)
        expect = {"model_state.pt", "optimizer_state.pt", "lr_scheduler_state.pt", "fsdp_config.json"} if rank == 0 else set()
        res.add("full_files_listed", set(files) == expect, str(files))
        fresh = make_role(build_fsdp2(seed=7).policy)
        F.FSDPWriter("sharded").load(st, dfull, fresh, dist)  # layout comes from fsdp_config.json
        res.same("fsdp2_full_2to2", gathered_state(fresh, dist), ref)
        if dist.is_main:
            res.run("fsdp2_full_plain", lambda: check_full_files_against_plain(dfull, res, "fsdp2"))

    res.run("fsdp2_full", _full)

    # SkyRL native per-rank layout, written the way SkyRL's FSDPStrategy.save_ckpt does
    dnat = os.path.join(work, "native_fsdp2_w2", "policy")
    write_native(dnat, role, dist, "fsdp2")

    def _native():
        fresh = make_role(build_fsdp2(seed=9).policy)
        w = F.FSDPWriter()
        w.load(st, dnat, fresh, dist)
        res.same("native_fsdp2_2to2", gathered_state(fresh, dist), ref)
        res.add("native_extra_state_rng", w.native_extra_state is not None and "rng" in w.native_extra_state,
                str(None if w.native_extra_state is None else sorted(w.native_extra_state)))

    res.run("native_fsdp2_2to2", _native)

    # HF export: one tensor at a time
    def _hf():
        fresh = make_role(build_fsdp2(seed=11).policy)
        F.FSDPWriter().load(st, d, fresh, dist)
        got, biggest = {}, 0
        for name, tensor in F.FSDPWriter().full_state_dict(fresh, dist):
            got[name] = tensor.clone()
            biggest = max(biggest, tensor.numel())
        if dist.is_main:
            res.same("hf_export_fsdp2", got, ref["model"])
            res.add("hf_export_fsdp2_one_at_a_time",
                    biggest == max(t.numel() for t in ref["model"].values()), str(biggest))
        else:
            res.add("hf_export_fsdp2", True)
            res.add("hf_export_fsdp2_one_at_a_time", True)

    res.run("hf_export_fsdp2", _hf)

    # shared storage check
    def _shared():
        staging = st.join(work, "shared_ok")
        F.check_shared_storage(st, staging, dist)
        left = [n for n in st.listdir(staging) if n.startswith(F.SHARED_MARKER_PREFIX)]
        res.add("shared_storage_ok", not left, str(left))
        own = Storage(os.path.join(work, f"node_local_{rank}"))
        res.raises("shared_storage_not_shared",
                   lambda: F.check_shared_storage(own, own.join(own.root, "staging"), dist),
                   StorageError, "not shared between nodes", "s3://")

    res.run("shared_storage", _shared)

    # incompatible model: another width
    def _incompat():
        other = make_role(build_fsdp2(seed=0, width=11).policy)
        res.raises("fsdp2_wrong_architecture", lambda: F.FSDPWriter().load(st, d, other, dist),
                   IncompatibleCheckpointError, "another shape")

    res.run("fsdp2_wrong_architecture", _incompat)

    # ---- tiny Llama (FSDP2 on every decoder layer and the root) ----------------
    def _llama():
        lrole = make_role(build_llama(0))
        train_llama(lrole, 2)
        lref = gathered_state(lrole, dist)
        if dist.is_main:
            torch.save(lref, os.path.join(work, "ref_llama.pt"))
        F.FSDPWriter().save(st, st.join(work, "llama_sharded_w2", "policy"), lrole, dist)
        got = {}
        for name, tensor in F.FSDPWriter().full_state_dict(lrole, dist):
            got[name] = tensor.clone()
        if dist.is_main:
            from transformers import AutoModelForCausalLM

            res.same("hf_export_llama", got, lref["model"])
            plain = AutoModelForCausalLM.from_config(lrole.model.config)
            res.add("hf_export_llama_hf_names", set(got) == set(plain.state_dict()),
                    str(sorted(set(got) ^ set(plain.state_dict()))[:6]))
        else:
            res.add("hf_export_llama", True)
            res.add("hf_export_llama_hf_names", True)

    res.run("llama", _llama)

    # ---- FSDP1 ---------------------------------------------------------------
    def _fsdp1():
        model1 = build_fsdp1(seed=0)
        role1 = make_role(model1)
        res.add("detect_fsdp1", F.fsdp_strategy_of(model1) == "fsdp" and isinstance(select_writer(model1), F.FSDPWriter))
        train(role1, STEPS)
        ref1 = gathered_state(role1, dist)
        if dist.is_main:
            torch.save(ref1, os.path.join(work, "ref_fsdp1.pt"))
            res.same("fsdp1_matches_fsdp2_run", ref1["model"], ref["model"])
        d1 = st.join(work, "fsdp1_sharded_w2", "policy")
        F.FSDPWriter("sharded").save(st, d1, role1, dist)
        fresh = make_role(build_fsdp1(seed=5))
        F.FSDPWriter().load(st, d1, fresh, dist)
        res.same("fsdp1_sharded_2to2", gathered_state(fresh, dist), ref1)

        d1f = st.join(work, "fsdp1_full_w2", "policy")
        F.FSDPWriter("full").save(st, d1f, role1, dist)
        if dist.is_main:
            res.run("fsdp1_full_plain", lambda: check_full_files_against_plain(d1f, res, "fsdp1"))
        fresh = make_role(build_fsdp1(seed=6))
        F.FSDPWriter().load(st, d1f, fresh, dist)
        res.same("fsdp1_full_2to2", gathered_state(fresh, dist), ref1)

        got = {}
        for name, tensor in F.FSDPWriter().full_state_dict(fresh, dist):
            got[name] = tensor.clone()
        res.same("hf_export_fsdp1", got, ref1.get("model", {}))

    res.run("fsdp1", _fsdp1)

    def _fsdp1_native():
        # SkyRL's FSDP1: use_orig_params=False, a device mesh (DTensor shards), SHARDED_STATE_DICT
        model1 = build_fsdp1(seed=0, mesh=True)
        role1 = make_role(model1)
        train(role1, STEPS)
        ref1 = gathered_state(role1, dist)
        if dist.is_main:
            torch.save(ref1, os.path.join(work, "ref_fsdp1_mesh.pt"))
        dn = os.path.join(work, "native_fsdp1_w2", "policy")
        write_native(dn, role1, dist, "fsdp")
        fresh = make_role(build_fsdp1(seed=3, mesh=True))
        F.FSDPWriter().load(st, dn, fresh, dist)
        res.same("native_fsdp1_2to2", gathered_state(fresh, dist), ref1)
        # online conversion (FSDP1 optimizer state needs the live model): load natively, save sharded
        fresh = make_role(build_fsdp1(seed=4, mesh=True))
        F.convert_skyrl_native(dn, st.join(work, "converted_fsdp1_online", "policy"), storage=st, dst_storage=st,
                               role=fresh, dist=dist)
        res.same("converted_fsdp1_online_state", gathered_state(fresh, dist), ref1)

    res.run("native_fsdp1_2to2", _fsdp1_native)


def write_native(d: str, role, dist, strategy: str) -> None:
    """Per-rank files exactly as SkyRL's FSDPStrategy.save_ckpt writes them."""
    import random
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedOptimStateDictConfig, ShardedStateDictConfig, StateDictType

    W, r = dist.world_size, dist.rank
    if dist.is_main:
        os.makedirs(d, exist_ok=True)
    dist.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = (FSDP.state_dict_type(role.model, StateDictType.SHARDED_STATE_DICT,
                                    ShardedStateDictConfig(), ShardedOptimStateDictConfig())
               if strategy == "fsdp" else _null())
        with ctx:
            torch.save(role.model.state_dict(), os.path.join(d, f"model_world_size_{W}_rank_{r}.pt"))
            torch.save(role.optimizers[0].state_dict(), os.path.join(d, f"optim_world_size_{W}_rank_{r}.pt"))
            extra = {"lr_scheduler": role.schedulers[0].state_dict(), "client_state": {}, "tag": None,
                     "fsdp_strategy": strategy, "world_size": W, "rank": r, "global_step": STEPS,
                     "rng": {"cpu": torch.get_rng_state(), "random": random.getstate()}}
            torch.save(extra, os.path.join(d, f"extra_state_world_size_{W}_rank_{r}.pt"))
    if dist.is_main:
        with open(os.path.join(d, "fsdp_config.json"), "w") as fh:
            json.dump({"fsdp_strategy": strategy, "world_size": W}, fh)
    dist.barrier()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def check_full_files_against_plain(d: str, res: Results, tag: str) -> None:
    """Rank 0: the full files are plain torch, equal to a non-FSDP run of the same steps."""
    torch.manual_seed(0)
    plain = MLP()
    prole = make_role(plain)
    train(prole, STEPS)
    msd = torch.load(os.path.join(d, "model_state.pt"), map_location="cpu", weights_only=True)
    osd = torch.load(os.path.join(d, "optimizer_state.pt"), map_location="cpu", weights_only=False)
    res.same(f"{tag}_full_model_equals_plain_run", msd, plain.state_dict())
    ref_osd = prole.optimizers[0].state_dict()
    res.same(f"{tag}_full_optim_equals_plain_run", osd, ref_osd)
    aliased = [k for k, v in osd["state"].items()
               if v["exp_avg"].data_ptr() == v["exp_avg_sq"].data_ptr() or torch.equal(v["exp_avg"], v["exp_avg_sq"])]
    ptrs = [t.untyped_storage().data_ptr() for st in osd["state"].values() for t in st.values()]
    if len(set(ptrs)) != len(ptrs):
        aliased.append("tensors of different states share storage")
    res.add(f"{tag}_full_exp_avg_not_aliased", not aliased and len(osd["state"]) == len(list(plain.parameters())),
            str(aliased))
    # plain torch.load -> load_state_dict on a non-FSDP model/optimizer, then one more identical step
    torch.manual_seed(99)
    other = MLP()
    other.load_state_dict(msd)
    orole = make_role(other)
    orole.optimizers[0].load_state_dict(osd)
    orole.schedulers[0].load_state_dict(torch.load(os.path.join(d, "lr_scheduler_state.pt"), weights_only=False))
    train(orole, 1, start=STEPS)
    train(prole, 1, start=STEPS)
    res.same(f"{tag}_full_loads_into_plain_model", other.state_dict(), plain.state_dict())


def phase_load1(work: str, dist, res: Results) -> None:
    from skyrl_callbacks.errors import IncompatibleCheckpointError
    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers import fsdp as F

    st = Storage(work)
    ref = torch.load(os.path.join(work, "ref_fsdp2.pt"), weights_only=False)

    def _load(name, d, build, refd):
        def fn():
            fresh = make_role(build())
            F.FSDPWriter().load(st, d, fresh, dist)
            res.same(name, gathered_state(fresh, dist), refd)
        res.run(name, fn)

    _load("fsdp2_sharded_2to1", st.join(work, "fsdp2_sharded_w2_moved", "policy"), lambda: build_fsdp2(1).policy, ref)
    _load("fsdp2_full_2to1", st.join(work, "fsdp2_full_w2", "policy"), lambda: build_fsdp2(2).policy, ref)
    _load("converted_native_fsdp2_to1", st.join(work, "converted_fsdp2", "policy"), lambda: build_fsdp2(3).policy, ref)
    res.raises("native_fsdp2_other_world_size",
               lambda: F.FSDPWriter().load(st, st.join(work, "native_fsdp2_w2", "policy"),
                                           make_role(build_fsdp2(4).policy), dist),
               IncompatibleCheckpointError, "skyrl-ckpt convert", "world size 2")
    if os.path.exists(os.path.join(work, "ref_llama.pt")):
        _load("llama_sharded_2to1", st.join(work, "llama_sharded_w2", "policy"), lambda: build_llama(1),
              torch.load(os.path.join(work, "ref_llama.pt"), weights_only=False))
    if os.path.exists(os.path.join(work, "ref_fsdp1.pt")):
        ref1 = torch.load(os.path.join(work, "ref_fsdp1.pt"), weights_only=False)
        _load("fsdp1_sharded_2to1", st.join(work, "fsdp1_sharded_w2", "policy"), lambda: build_fsdp1(1), ref1)
        # cross strategy: an FSDP2 checkpoint into an FSDP1 model (names and optimizer keys are FQNs)
        _load("fsdp2_sharded_into_fsdp1", st.join(work, "fsdp2_sharded_w2_moved", "policy"), lambda: build_fsdp1(2), ref)
    if os.path.exists(os.path.join(work, "ref_fsdp1_mesh.pt")):
        ref1m = torch.load(os.path.join(work, "ref_fsdp1_mesh.pt"), weights_only=False)
        # weights-only offline conversion of an FSDP1 native checkpoint
        def _w():
            fresh = make_role(build_fsdp1(4))
            fresh.optimizers, fresh.schedulers = [], []
            F.FSDPWriter().load(st, st.join(work, "converted_fsdp1_weights", "policy"), fresh, dist)
            got = gathered_state(fresh, dist) if False else None  # noqa: F841 - optimizer-less gather below
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            with F._quiet(), FSDP.summon_full_params(fresh.model, writeback=False):
                msd = {_clean(n): p.detach().clone() for n, p in fresh.model.named_parameters()}
                msd.update({_clean(n): b.detach().clone() for n, b in fresh.model.named_buffers()})
            res.same("converted_native_fsdp1_weights_to1", msd, ref1m["model"])
        res.run("converted_native_fsdp1_weights_to1", _w)
        _load("converted_fsdp1_online_to1", st.join(work, "converted_fsdp1_online", "policy"),
              lambda: build_fsdp1(5), ref1m)

    # save at world size 1 (one more step first) for the 1 -> 2 case
    def _save1():
        role = make_role(build_fsdp2(5).policy)
        F.FSDPWriter().load(st, st.join(work, "fsdp2_sharded_w2_moved", "policy"), role, dist)
        train(role, 1, start=STEPS)
        torch.save(gathered_state(role, dist), os.path.join(work, "ref_w1.pt"))
        F.FSDPWriter().save(st, st.join(work, "fsdp2_sharded_w1", "policy"), role, dist)
        # fsspec path (memory://) through FsspecWriter/FsspecReader
        mem = Storage("memory://skyrl-fsdp-test")
        md = mem.join(mem.root, "global_step_1", "policy")
        files = F.FSDPWriter().save(mem, md, role, dist)
        fresh = make_role(build_fsdp2(6).policy)
        F.FSDPWriter().load(mem, md, fresh, dist)
        res.same("fsspec_memory_roundtrip", gathered_state(fresh, dist), gathered_state(role, dist))
        # (Storage.walk_files keeps memory://'s leading "/" in its relative names: compare suffixes)
        listed = sorted(p.split("/policy/", 1)[-1] for p in mem.walk_files(md))
        res.add("fsspec_memory_files", sorted(files) == listed, f"{files} vs {listed}")

    res.run("fsdp2_save_w1", _save1)


def phase_load2(work: str, dist, res: Results) -> None:
    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers import fsdp as F

    st = Storage(work)
    ref = torch.load(os.path.join(work, "ref_fsdp2.pt"), weights_only=False)
    ref_w1 = torch.load(os.path.join(work, "ref_w1.pt"), weights_only=False)

    def _load(name, d, build, refd):
        def fn():
            fresh = make_role(build())
            F.FSDPWriter().load(st, d, fresh, dist)
            res.same(name, gathered_state(fresh, dist), refd)
        res.run(name, fn)

    _load("fsdp2_sharded_1to2", st.join(work, "fsdp2_sharded_w1", "policy"), lambda: build_fsdp2(1).policy, ref_w1)
    _load("converted_native_fsdp2_to2", st.join(work, "converted_fsdp2", "policy"), lambda: build_fsdp2(2).policy, ref)


# --------------------------------------------------------------------------- Lightning FSDPStrategy views
# Lightning's FSDPStrategy wraps the whole LightningModule in one FSDP1 root (use_orig_params=True,
# optionally an auto-wrap policy); the roles are views on that root (Role(model=root,
# include_prefix="policy.")). These phases emulate exactly that on CPU/gloo.
VIEW_STEPS = 3


class Container(nn.Module):
    """A LightningModule-like holder: ``policy`` (tiny Llama), optionally ``critic`` (small MLP), a buffer."""

    def __init__(self, seed: int, critic: bool) -> None:
        super().__init__()
        self.policy = _tiny_llama(seed)
        if critic:
            self.critic = Critic()
        self.register_buffer("seen", torch.zeros(2))

    def forward(self, ids):
        out = self.policy(input_ids=ids, labels=ids, output_hidden_states=True)
        if not hasattr(self, "critic"):
            return out.loss
        return out.loss + self.critic(out.hidden_states[-1].detach()).pow(2).mean()


class Critic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(64, 13)
        self.head = nn.Linear(13, 1)

    def forward(self, h):
        return self.head(torch.tanh(self.body(h)))


def _tiny_llama(seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def build_view_root(seed: int, wrap: str = "none", critic: bool = False, one_opt: bool = False):
    """What Lightning's FSDPStrategy builds: FSDP1 around the whole module, use_orig_params=True,
    optimizers created afterwards from the module's parameters (configure_optimizers).

    ``wrap``: ``"none"`` (FSDPStrategy() defaults: one unit), ``"layers"`` (auto_wrap_policy of the
    decoder layers), ``"policy"`` (the decoder layers and the policy model: policy and critic in
    units of their own). ``one_opt``: one optimizer over everything (automatic optimization).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    container = Container(seed, critic)
    classes = {"none": None, "layers": {LlamaDecoderLayer}, "policy": {LlamaDecoderLayer, LlamaForCausalLM}}[wrap]
    kwargs = {"auto_wrap_policy": ModuleWrapPolicy(classes)} if classes else {}
    root = FSDP(container, use_orig_params=True, device_id=torch.device("cpu"), **kwargs)
    if one_opt:
        opts = [torch.optim.AdamW(container.parameters(), lr=LR, weight_decay=0.1)]
    else:
        opts = [torch.optim.AdamW(container.policy.parameters(), lr=LR, weight_decay=0.1)]
        if critic:
            opts.append(torch.optim.AdamW(container.critic.parameters(), lr=LR))
    scheds = [torch.optim.lr_scheduler.LambdaLR(opts[0], lambda s: min(1.0, (s + 1) / 4))]
    return root, container, opts, scheds


def view_roles(root, container, opts, scheds):
    from skyrl_callbacks.roles import assign_optimizers, discover_roles

    roles = discover_roles(container, root=root)
    assign_optimizers(roles, opts, scheds)
    return {r.name: r for r in roles}


def train_view(root, opts, scheds, steps: int, start: int = 0) -> None:
    """Same batch on every rank (so world size 1 and 2 compute the same thing)."""
    for step in range(start, start + steps):
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3000 + step))
        root(ids).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        for s in scheds:
            s.step()


def gathered_view(root, prefix: str, opt, sched, dist) -> dict:
    """Rank 0: full weights and FQN-keyed optimizer state of the part of ``root`` under ``prefix``
    (prefix stripped), by torch's own means: summon_full_params, DSD's sharded optimizer state
    gathered tensor by tensor."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from skyrl_callbacks.writers import fsdp as F

    with F._quiet(), FSDP.summon_full_params(root, writeback=False):
        msd = {_clean(n)[len(prefix):]: p.detach().clone() for n, p in root.named_parameters()
               if _clean(n).startswith(prefix)}
        msd.update({_clean(n)[len(prefix):]: b.detach().clone() for n, b in _persistent_buffers(root)
                    if _clean(n).startswith(prefix)})
    with F._quiet():
        osd = F._map_tensors(get_optimizer_state_dict(root, opt), lambda t: F._gather_full(t, dist))
    if not dist.is_main:
        return {}
    strip = lambda k: k[len(prefix):] if k.startswith(prefix) else k  # noqa: E731 - other roles keep their names
    osd = {"state": {strip(k): v for k, v in osd["state"].items()},
           "param_groups": [{**g, "params": [strip(k) for k in g["params"]]} for g in osd["param_groups"]]}
    return {"model": msd, "optim": osd, "sched": [s.state_dict() for s in ([sched] if sched else [])]}


def _persistent_buffers(module) -> list:
    """``named_buffers`` without non-persistent ones (those are not in ``state_dict``)."""
    out = []
    for mname, mod in module.named_modules():
        for bname, buf in mod._buffers.items():
            if buf is not None and bname not in mod._non_persistent_buffers_set:
                out.append((f"{mname}.{bname}" if mname else bname, buf))
    return out


def plain_state(model, opt, sched) -> dict:
    """An unwrapped model's state in the same form as :func:`gathered_view`."""
    names = [n for n, _ in model.named_parameters()]
    sd = opt.state_dict()
    osd = {"state": {names[i]: v for i, v in sd["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "optim": osd,
            "sched": [sched.state_dict()] if sched else []}


def _dcp_keys(path: str) -> list:
    from torch.distributed.checkpoint import FileSystemReader

    return sorted(FileSystemReader(path).read_metadata().state_dict_metadata)


def phase_view2(work: str, dist, res: Results) -> None:
    from transformers import AutoModelForCausalLM

    from skyrl_callbacks.errors import ConfigError, IncompatibleCheckpointError
    from skyrl_callbacks.manager import CheckpointManager
    from skyrl_callbacks.roles import Role
    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers import fsdp as F
    from skyrl_callbacks.writers.base import select_writer

    st = Storage(work)
    plain_keys = sorted(_tiny_llama(0).state_dict())

    def state(root, opts, scheds, name):
        i = 0 if name == "policy" or len(opts) == 1 else 1
        return gathered_view(root, f"{name}.", opts[i], scheds[0] if name == "policy" else None, dist)

    def case(tag: str, wrap: str, critic: bool, one_opt: bool = False, layouts=("sharded", "full")) -> dict:
        """Train, save every role through its view (sharded and full), load into a fresh root
        before its first forward, compare bitwise, then one more step against the uninterrupted run."""
        root, container, opts, scheds = build_view_root(0, wrap, critic, one_opt)
        ids0 = [id(p) for p in container.parameters()]
        roles = view_roles(root, container, opts, scheds)
        names = list(roles)
        train_view(root, opts, scheds, VIEW_STEPS)
        # use_orig_params=True: the optimizers hold the module's own Parameter objects, before and after training
        opt_ids = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
        res.add(f"{tag}_param_identity", ids0 == [id(p) for p in container.parameters()] and opt_ids == ids0
                and set(ids0) == {id(p) for p in root.parameters()}, "Parameter objects changed")
        refs = {n: state(root, opts, scheds, n) for n in names}
        twin, _, twin_opts, twin_scheds = build_view_root(0, wrap, critic, one_opt)  # the uninterrupted run
        train_view(twin, twin_opts, twin_scheds, VIEW_STEPS)
        dirs = {sdt: st.join(work, f"{tag}_{sdt}_w2") for sdt in layouts}
        for sdt, d in dirs.items():
            for role in roles.values():
                F.FSDPWriter(sdt).save(st, st.join(d, role.name), role, dist)
        if dist.is_main:
            dcp_keys = _dcp_keys(os.path.join(dirs["sharded"], "policy", "model_state.dcp"))
            res.add(f"{tag}_keys_like_plain_policy", dcp_keys == plain_keys, str(dcp_keys[:4]))
            if "full" in dirs:
                full = torch.load(os.path.join(dirs["full"], "policy", "model_state.pt"), weights_only=True)
                res.add(f"{tag}_full_keys_like_plain_policy", sorted(full) == plain_keys, str(sorted(full)[:4]))
                res.same(f"{tag}_full_model_equals_gathered", full, refs["policy"]["model"])
        else:
            res.add(f"{tag}_keys_like_plain_policy", True)
            if "full" in dirs:
                res.add(f"{tag}_full_keys_like_plain_policy", True)
                res.add(f"{tag}_full_model_equals_gathered", True)
        for sdt, d in dirs.items():
            def _load(sdt=sdt, d=d):
                froot, fc, fopts, fscheds = build_view_root(7, wrap, critic, one_opt)
                fresh = view_roles(froot, fc, fopts, fscheds)
                others = {n: state(froot, fopts, fscheds, n) for n in names[1:]}
                # loaded through the root, before its first forward (FSDP1 initialises lazily)
                F.FSDPWriter().load(st, st.join(d, "policy"), fresh["policy"], dist)
                res.same(f"{tag}_{sdt}_2to2", state(froot, fopts, fscheds, "policy"), refs["policy"])
                for n in names[1:]:
                    if not one_opt:  # a spanning optimizer was loaded with the policy
                        res.same(f"{tag}_{sdt}_other_role_untouched", state(froot, fopts, fscheds, n), others[n])
                    F.FSDPWriter().load(st, st.join(d, n), fresh[n], dist)
                    res.same(f"{tag}_{sdt}_2to2_{n}", state(froot, fopts, fscheds, n), refs[n])
                if sdt == "sharded":  # one more step equals the uninterrupted run's
                    train_view(froot, fopts, fscheds, 1, start=VIEW_STEPS)
                    train_view(twin, twin_opts, twin_scheds, 1, start=VIEW_STEPS)
                    for n in names:
                        res.same(f"{tag}_resume_next_step_bitwise_{n}", state(froot, fopts, fscheds, n),
                                 state(twin, twin_opts, twin_scheds, n))

            res.run(f"{tag}_{sdt}_2to2", _load)
        return {"root": root, "opts": opts, "scheds": scheds, "roles": roles, "refs": refs, "dirs": dirs}

    # Lightning's FSDPStrategy() defaults (one FSDP unit) and an auto-wrap policy of the decoder layers
    res.run("view_nowrap", lambda: case("view_nowrap", "none", critic=False, layouts=("sharded",)))
    res.run("view_layers", lambda: case("view_layers", "layers", critic=False, layouts=("sharded",)))
    # policy + critic with optimizers of their own: each in FSDP units of its own
    main: dict = {}
    res.run("view_pc", lambda: main.update(case("view_pc", "policy", critic=True)))
    # one optimizer over policy and critic (automatic optimization), saved under policy
    res.run("view_oneopt", lambda: case("view_oneopt", "none", critic=True, one_opt=True))
    if not main:
        return
    ref = main["refs"]["policy"]
    if dist.is_main:
        torch.save({"policy": ref}, os.path.join(work, "ref_view.pt"))
    res.add("view_roles_built", all(r.model is main["root"] for r in main["roles"].values())
            and main["roles"]["policy"].include_prefix == "policy." and main["roles"]["critic"].include_prefix == "critic."
            and main["roles"]["policy"].optimizers == main["opts"][:1] and main["roles"]["critic"].optimizers == main["opts"][1:]
            and main["roles"]["policy"].schedulers == main["scheds"] and isinstance(select_writer(main["root"]), F.FSDPWriter))

    # a view checkpoint loads into another FSDP structure (decoder-layer units, no critic)
    def _cross():
        for sdt in ("sharded", "full"):
            froot, fc, fopts, fscheds = build_view_root(8, "layers", critic=False)
            F.FSDPWriter().load(st, st.join(main["dirs"][sdt], "policy"), view_roles(froot, fc, fopts, fscheds)["policy"], dist)
            res.same(f"view_{sdt}_into_other_wrap", state(froot, fopts, fscheds, "policy"), ref)

    res.run("view_into_other_wrap", _cross)

    # separate optimizers inside one FSDP unit: FSDP1 has no optimizer state dict for them
    def _coverage():
        root, container, opts, scheds = build_view_root(0, "none", critic=True)
        train_view(root, opts, scheds, 1)
        res.add("view_coverage_detected", len(F.fsdp1_optimizer_coverage(root, opts)) == 2
                and not F.fsdp1_optimizer_coverage(main["root"], main["opts"]),
                str(F.fsdp1_optimizer_coverage(root, opts)))
        pol = view_roles(root, container, opts, scheds)["policy"]
        res.raises("view_coverage_error", lambda: F.FSDPWriter().save(st, st.join(work, "cov", "policy"), pol, dist),
                   ConfigError, "auto_wrap_policy", "one optimizer")

    res.run("view_coverage", _coverage)

    # a checkpoint saved from a plain (unwrapped) policy loads into the view, bitwise
    def _plain_to_view():
        plain = _tiny_llama(0)
        popt = torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=0.1)
        psched = torch.optim.lr_scheduler.LambdaLR(popt, lambda s: min(1.0, (s + 1) / 4))
        for step in range(VIEW_STEPS + 1):  # an independent single-process run
            ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5000 + step))
            plain(input_ids=ids, labels=ids).loss.backward()
            popt.step()
            popt.zero_grad()
            psched.step()
        pref = plain_state(plain, popt, psched)
        prole = Role("policy", plain, [popt], [psched])
        for sdt in ("sharded", "full"):
            d = st.join(work, f"plain_{sdt}_w2", "policy")
            F.FSDPWriter(sdt).save(st, d, prole, dist)
            froot, fc, fopts, fscheds = build_view_root(9, "policy", critic=True)
            F.FSDPWriter().load(st, d, view_roles(froot, fc, fopts, fscheds)["policy"], dist)
            res.same(f"plain_{sdt}_into_view", state(froot, fopts, fscheds, "policy"), pref)
        if dist.is_main:
            mine = os.path.join(main["dirs"]["sharded"], "policy")
            res.add("plain_and_view_checkpoints_same_keys",
                    _dcp_keys(os.path.join(work, "plain_sharded_w2", "policy", "model_state.dcp"))
                    == _dcp_keys(os.path.join(mine, "model_state.dcp"))
                    and _dcp_keys(os.path.join(work, "plain_sharded_w2", "policy", "optimizer_state.dcp"))
                    == _dcp_keys(os.path.join(mine, "optimizer_state.dcp")))
        else:
            res.add("plain_and_view_checkpoints_same_keys", True)

    res.run("plain_into_view", _plain_to_view)

    # HF export of the view through the manager (rank 0 asks for the keys alone: no collective there)
    def _export():
        mgr = CheckpointManager({"ckpt_path": st.join(work, "view_mgr"), "export_path": st.join(work, "view_export")},
                                dist)
        out = mgr.export_hf(3, main["roles"]["policy"])
        if dist.is_main:
            loaded = AutoModelForCausalLM.from_pretrained(out)
            res.same("view_hf_export", dict(loaded.state_dict()), ref["model"])
        else:
            res.add("view_hf_export", True)

    res.run("view_hf_export", _export)

    # SkyRL's native per-rank layout holds one whole model: refused for a prefixed view
    def _native():
        dn = os.path.join(work, "native_view_root", "policy")
        write_native(dn, Role("policy", main["root"], main["opts"][:1], main["scheds"]), dist, "fsdp")
        res.raises("view_native_refused", lambda: F.FSDPWriter().load(st, dn, main["roles"]["policy"], dist),
                   IncompatibleCheckpointError, "'policy.'", "skyrl-ckpt convert")

    res.run("view_native_refused", _native)


def view_into_plain(work: str, dist, res: Results) -> None:
    """World size 1, no process group needed: the view checkpoints load into a plain
    (unwrapped) policy, bitwise (called by the tests in their own process)."""
    from skyrl_callbacks.roles import Role
    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers import fsdp as F

    st = Storage(work)
    ref = torch.load(os.path.join(work, "ref_view.pt"), weights_only=False)["policy"]

    def fresh():
        plain = _tiny_llama(11)
        opt = torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        return plain, opt, sched

    for sdt in ("sharded", "full"):
        def _load(sdt=sdt):
            plain, opt, sched = fresh()
            F.FSDPWriter().load(st, st.join(work, f"view_pc_{sdt}_w2", "policy"), Role("policy", plain, [opt], [sched]), dist)
            res.same(f"view_{sdt}_into_plain_policy", plain_state(plain, opt, sched), ref)

        res.run(f"view_{sdt}_into_plain_policy", _load)

    def _torch_load():  # full files: plain torch.load -> load_state_dict, no skyrl code
        plain, opt, sched = fresh()
        d = os.path.join(work, "view_pc_full_w2", "policy")
        plain.load_state_dict(torch.load(os.path.join(d, "model_state.pt"), weights_only=True))
        opt.load_state_dict(torch.load(os.path.join(d, "optimizer_state.pt"), weights_only=False))
        sched.load_state_dict(torch.load(os.path.join(d, "lr_scheduler_state.pt"), weights_only=False))
        res.same("view_full_torch_load_into_plain", plain_state(plain, opt, sched), ref)

    res.run("view_full_torch_load_into_plain", _torch_load)


PHASES = {"save2": phase_save2, "load1": phase_load1, "load2": phase_load2, "view2": phase_view2}


# --------------------------------------------------------------------------- process plumbing
def _rank_main(rank: int, phase: str, work: str, nproc: int, port: int) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc,
                             timeout=timedelta(seconds=90))
    from skyrl_callbacks.dist import DistContext

    res = Results(rank)
    try:
        res.run(f"{phase}_phase", lambda: PHASES[phase](work, DistContext(), res))
    finally:
        with open(os.path.join(work, f"results_{phase}_rank{rank}.json"), "w") as fh:
            json.dump(res.items, fh, indent=1)
        tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=sorted(PHASES))
    ap.add_argument("work")
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    port = _free_port()
    mp.start_processes(_rank_main, args=(args.phase, args.work, args.nproc, port), nprocs=args.nproc,
                       join=True, start_method="fork")
    return 0


if __name__ == "__main__":
    sys.exit(main())
