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
    expect_own = {f"model_state.dcp/__{rank}_0.distcp", f"optimizer_state.dcp/__{rank}_0.distcp"}
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


PHASES = {"save2": phase_save2, "load1": phase_load1, "load2": phase_load2}


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
