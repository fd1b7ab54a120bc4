"""MegatronWriter: megatron-core models (TP/PP/DP) through ``megatron.core.dist_checkpointing``.

Layout of one role directory (``global_step_N/policy/``), see ``docs/megatron.md``::

    metadata.json               rank 0 (megatron-core: backend "torch_dist", version)
    common.pt                   rank 0 (megatron-core: every non-sharded entry, e.g. param groups)
    .metadata                   rank 0 (torch DCP coordinator: global shapes, shard offsets, files)
    __{rank}_{i}.distcp         each rank: the shards it writes (fully parallel over DP)
    megatron_config.json        rank 0 (ours: format version, TP/PP/DP/world size, sharding type)
    lr_scheduler_state.pt       rank 0 (ours: scheduler state_dict(s), plain torch.save)

State in the sharded checkpoint: the model (``model``, or ``model0``/``model1``... for virtual
pipeline chunks), the optimizer(s) (megatron ``DistributedOptimizer`` / ``MegatronOptimizer`` in
``fully_reshardable`` or ``dp_reshardable`` form, or a plain ``torch.optim`` optimizer mapped
onto the parameters' shardings), and the RNG state **of every rank** (torch CPU/CUDA, Python,
NumPy and the tensor-parallel CUDA RNG tracker) as a ``ShardedObject`` keyed by
``(pp_rank, tp_rank, dp_rank)``: every rank gets its own state back, not rank 0's.

megatron-core is imported lazily; :func:`is_megatron_model` never imports it.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

from skyrl_callbacks.errors import (
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    MissingDependencyError,
    StorageError,
)
from skyrl_callbacks.writers.base import SCHEDULER_FILE, RoleWriter, read_json_object, write_json
from skyrl_callbacks.writers.plain import pack_states, torch_load, torch_save, unpack_states

if TYPE_CHECKING:
    from skyrl_callbacks.dist import DistContext
    from skyrl_callbacks.roles import Role
    from skyrl_callbacks.storage import Storage

logger = logging.getLogger(__name__)

__all__ = [
    "MegatronWriter",
    "is_megatron_model",
    "model_chunks",
    "read_megatron_config",
    "megatron_to_hf_llama",
    "hf_mapping_problem",
    "gather_full_tensors",
    "llama_hf_config_from_megatron",
    "export_megatron_hf",
    "MEGATRON_CONFIG_FILE",
    "FORMAT_VERSION",
    "OPTIMIZER_SHARDING_TYPES",
    "RNG_KEY",
]

MEGATRON_CONFIG_FILE = "megatron_config.json"
#: version of the layout described in this module (``megatron_config.json["format_version"]``)
FORMAT_VERSION = 1
#: ``fully_reshardable``: the optimizer reshards with the model (TP/PP/DP); ``dp_reshardable``:
#: faster (no gather to DP rank 0) but loads only at the same TP/PP (DP may change)
OPTIMIZER_SHARDING_TYPES = ("fully_reshardable", "dp_reshardable")
RNG_KEY = "skyrl_rng_state"
_MEGATRON_FILES = ("metadata.json", "common.pt", ".metadata")
_DISTCP_RE = re.compile(r"^__(\d+)_(\d+)\.distcp$")


# --------------------------------------------------------------------------- detection
def _megatron_module_cls() -> Optional[type]:
    """``MegatronModule`` if megatron-core was already imported, else None (never imports it)."""
    if "megatron.core" not in sys.modules:  # no megatron model can exist before megatron.core is imported
        return None
    try:
        from megatron.core.transformer.module import MegatronModule
    except Exception:  # noqa: BLE001 - a broken install must not break detection
        return None
    return MegatronModule


def _outer_megatron_modules(model: Any, cls: type, exclude: tuple = ()) -> list:
    """The outermost ``MegatronModule`` s inside ``model`` (``model`` itself when it is one)."""
    if isinstance(model, cls):
        return [model]
    if isinstance(model, (list, tuple)):
        out = []
        for m in model:
            out += _outer_megatron_modules(m, cls, exclude)
        return out
    if not isinstance(model, torch.nn.Module):
        return []
    out: list = []

    def visit(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if exclude and (f"{full}.").startswith(exclude):
                continue
            if isinstance(child, cls):
                out.append(child)
            else:
                visit(child, f"{full}.")

    visit(model, "")
    return out


def is_megatron_model(model: Any) -> bool:
    """True for a megatron-core ``MegatronModule`` (GPTModel, DDP, Float16Module...), a list/tuple
    of model chunks, or a module holding one. False, fast and without importing anything, when
    megatron-core is not installed or not imported."""
    cls = _megatron_module_cls()
    if cls is None:
        return False
    try:
        return bool(_outer_megatron_modules(model, cls))
    except Exception:  # noqa: BLE001 - detection never raises
        return False


def model_chunks(model: Any, exclude_prefixes: tuple = ()) -> list:
    """The model chunks of a megatron role: one per virtual pipeline stage (usually one)."""
    cls = _megatron_module_cls()
    chunks = _outer_megatron_modules(model, cls, exclude_prefixes) if cls is not None else []
    # megatron's DDP / Float16Module wrappers: their inherited sharded_state_dict() prefixes every key
    # with "module." while their load_state_dict() hands the dict to the inner module unprefixed, so
    # save and load the inner model (the same keys with and without the wrappers)
    chunks = [_unwrap_megatron_wrappers(c, cls) for c in chunks]
    if not chunks:
        raise ConfigError(
            f"{type(model).__name__} holds no megatron-core MegatronModule; MegatronWriter saves GPTModel "
            f"(or its DDP/Float16Module wrappers, or a list of virtual-pipeline chunks)."
        )
    return chunks


def _init_megatron_optimizer_state(opt: Any) -> None:
    """A fresh megatron optimizer over torch's Adam (no TransformerEngine/apex) has no state, and its
    ``state_dict()`` -- called to build the loading template -- needs a ``step`` per state: allocate
    the state (megatron's own ``init_state_fn``) with a step of 0; the checkpoint overwrites both."""
    for sub in getattr(opt, "chained_optimizers", None) or [opt]:
        inner = getattr(sub, "optimizer", None)
        init = getattr(sub, "init_state_fn", None)
        if inner is None or init is None or len(getattr(inner, "state", {}) or {}) > 0:
            continue
        with torch.no_grad():
            init(inner, getattr(sub, "config", None))
        for st in inner.state.values():
            if "exp_avg" in st and "step" not in st:
                st["step"] = torch.tensor(0.0)


def _load_megatron_optimizer(opt: Any, state: dict) -> None:
    """``opt.load_state_dict(state)`` plus two fixes for megatron-core over torch's Adam (no
    TransformerEngine/apex), where every parameter's Adam state holds a ``step`` tensor:

    * ``load_state_dict`` first sets the step saved in the checkpoint's param groups into every
      parameter's state, then copies the parameter state in with ``_set_main_param_and_optimizer_states``,
      which copies every key of the destination -- ``step`` included. ``fully_reshardable`` hands it
      no ``step`` (``KeyError: 'step'``); ``dp_reshardable`` hands it a per-parameter ``step`` that
      comes back as the loading optimizer's own value, not the checkpoint's (seen on an H200: a
      resumed run trained with step 0's bias correction). During the load each sub-optimizer's
      ``_set_main_param_and_optimizer_states`` always gets the destination's own ``step``, the one
      megatron read from the checkpoint's param groups.
    * ``load_state_dict`` sets one and the same ``step`` tensor into every parameter's state, and
      torch's Adam increments each parameter's step in place: after a resume the shared tensor
      advanced once per parameter per step, so the bias correction (and every later update) drifted
      from the uninterrupted run. Each parameter gets its own copy back after the load.
    """
    subs = list(getattr(opt, "chained_optimizers", None) or [opt])
    patched = []
    for sub in subs:
        setter = getattr(sub, "_set_main_param_and_optimizer_states", None)
        index = getattr(sub, "model_param_group_index_map", None)
        inner = getattr(sub, "optimizer", None)
        precision_aware = getattr(getattr(sub, "config", None), "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
        if setter is None or index is None or inner is None or precision_aware:
            continue

        def with_step(model_param, tensors, _setter=setter, _index=index, _inner=inner):
            group, order = _index[model_param]
            own = _inner.state.get(_inner.param_groups[group]["params"][order], {})
            if "step" in own:  # the step read from the param groups, never a per-parameter copy
                tensors = {**tensors, "step": own["step"]}
            return _setter(model_param, tensors)

        sub._set_main_param_and_optimizer_states = with_step  # instance attribute, removed below
        patched.append(sub)
    try:
        opt.load_state_dict(state)
    finally:
        for sub in patched:
            del sub._set_main_param_and_optimizer_states
    for sub in subs:
        inner = getattr(sub, "optimizer", None)
        for pstate in (getattr(inner, "state", None) or {}).values():
            step = pstate.get("step") if isinstance(pstate, dict) else None
            if isinstance(step, torch.Tensor):
                pstate["step"] = step.clone()


def _unwrap_megatron_wrappers(chunk: Any, cls: type) -> Any:
    for _ in range(8):
        inner = getattr(chunk, "module", None)
        if not isinstance(inner, cls):
            return chunk
        chunk = inner
    return chunk


def _require_megatron():
    try:
        import megatron.core  # noqa: F401
        from megatron.core import dist_checkpointing  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("megatron-core", "megatron", "the Megatron checkpoint writer") from exc


def _parallel_state():
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ConfigError(
            "megatron checkpoints need torch.distributed initialised (init_process_group) and "
            "megatron.core.parallel_state.initialize_model_parallel(...) called before saving or loading."
        )
    if not ps.model_parallel_is_initialized():
        raise ConfigError(
            "megatron.core.parallel_state is not initialised: call "
            "parallel_state.initialize_model_parallel(tensor_model_parallel_size=..., "
            "pipeline_model_parallel_size=...) before saving or loading a megatron role."
        )
    return ps


def _layout() -> dict:
    """This rank's parallel coordinates and the sizes of the current parallel layout."""
    ps = _parallel_state()
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(with_context_parallel=True),
        "cp": ps.get_context_parallel_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(with_context_parallel=True),
        "world_size": torch.distributed.get_world_size(),
        "rank": torch.distributed.get_rank(),
    }


def _dp_group():
    return _parallel_state().get_data_parallel_group(with_context_parallel=True)


# --------------------------------------------------------------------------- small helpers
def _short(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


# Run on every rank; if any rank failed, every rank raises (the same class when it is one of ours).
from skyrl_callbacks.writers.fsdp import _collective as _agree  # noqa: E402


def _quiet():
    import contextlib

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*ShardedTensor.*")
            warnings.filterwarnings("ignore", message=".*torch.distributed.checkpoint.*")
            yield

    return ctx()


def _require_local(storage: "Storage", role_dir: str) -> str:
    if not storage.is_local:
        raise StorageError(
            f"{role_dir}: megatron-core dist_checkpointing writes to a local (or shared POSIX) path only. "
            f"For s3:// or gs:// keep cloud_upload='staged' (the default): every rank writes into a local "
            f"stage that is then uploaded."
        )
    return os.path.abspath(role_dir)


_write_json = write_json


def read_megatron_config(storage: "Storage", role_dir: str) -> Optional[dict]:
    """The parsed ``megatron_config.json`` of ``role_dir``, or None when there is none.

    Raises:
        CorruptCheckpointError: the file exists but is not a JSON object.
    """
    return read_json_object(storage, storage.join(role_dir, MEGATRON_CONFIG_FILE))


def _own_files(storage: "Storage", role_dir: str, rank: int) -> list[str]:
    """``__{rank}_{i}.distcp`` files of this (global) rank in ``role_dir``."""
    out = []
    for name in storage.listdir(role_dir):
        m = _DISTCP_RE.match(name)
        if m and int(m.group(1)) == rank:
            out.append(name)
    return sorted(out)


# --------------------------------------------------------------------------- RNG
def _capture_rng() -> dict:
    """This rank's RNG streams, including megatron's tensor-parallel CUDA RNG tracker."""
    state: dict = {"torch_cpu": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        from skyrl_callbacks.rng import _numpy_to_portable

        state["numpy"] = _numpy_to_portable(np.random.get_state())  # tensors/primitives: loads weights-only
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.random.get_cuda_rng_tracker()
        states = tracker.get_states()
        state["tp_rng_tracker"] = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in states.items()}
    except Exception as exc:  # noqa: BLE001 - a tracker that cannot be read is logged, not fatal
        logger.debug("tensor-parallel RNG tracker not captured: %s", exc)
    return state


def _restore_rng(state: dict) -> None:
    if not isinstance(state, dict):
        return
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"])
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        try:
            import numpy as np

            from skyrl_callbacks.rng import _numpy_from_portable

            np.random.set_state(_numpy_from_portable(state["numpy"]))  # also the raw tuple of older versions
        except ImportError:  # pragma: no cover
            pass
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    if state.get("tp_rng_tracker"):
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.random.get_cuda_rng_tracker()
        tracker.set_states({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state["tp_rng_tracker"].items()})


def _rng_object(layout: dict, data: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        RNG_KEY,
        data,
        (layout["pp"], layout["tp"], layout["dp"]),
        (layout["pp_rank"], layout["tp_rank"], layout["dp_rank"]),
        replica_id=0,
    )


# --------------------------------------------------------------------------- optimizers
def _is_megatron_optimizer(opt: Any) -> bool:
    try:
        from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer
    except Exception:  # noqa: BLE001
        return False
    return isinstance(opt, (MegatronOptimizer, ChainedOptimizer))


def _opt_params(opt: Any) -> list:
    return [p for g in opt.param_groups for p in g["params"]]


def _init_torch_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Give a fresh torch optimizer its state tensors (templates to load into) without changing
    any parameter: one step at lr 0 on zero gradients."""
    params = _opt_params(opt)
    if all(p in opt.state and opt.state[p] for p in params):
        return
    saved_grads = [p.grad for p in params]
    lrs = [g["lr"] for g in opt.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in opt.param_groups:
            g["lr"] = 0.0 if not isinstance(g["lr"], torch.Tensor) else torch.zeros_like(g["lr"])
        with torch.no_grad():
            opt.step()
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        for p, grad in zip(params, saved_grads):
            p.grad = grad


def _torch_optimizer_sharded(opt: torch.optim.Optimizer, model_sd: dict, loading: bool, where: str) -> dict:
    """A plain ``torch.optim`` optimizer's state as sharded tensors shaped like its parameters."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    if loading:
        _init_torch_optimizer_state(opt)
    sd = opt.state_dict()
    id_map = get_param_id_to_sharded_param_map(model_sd, _opt_params(opt))
    missing = [i for i in range(len(_opt_params(opt))) if i not in id_map]
    if missing:
        raise ConfigError(
            f"{where}: {len(missing)} parameter(s) of the optimizer are not parameters of the megatron model "
            f"(e.g. index {missing[:5]}); give the role the optimizer of its own model."
        )
    step = None
    for pstate in sd["state"].values():
        s = pstate.get("step")
        if s is None:
            continue
        s_val = float(s) if isinstance(s, torch.Tensor) else s
        if step is None:
            step = s_val
        elif step != s_val:
            raise ConfigError(f"{where}: the optimizer's step differs between parameters ({step} vs {s_val}); "
                              f"only a step shared by all parameters can be resharded.")
    optim_state_to_sharding_state(sd, id_map, exclude_keys=("step",))
    sd["skyrl_common_step"] = step
    return sd


def _torch_optimizer_load(opt: torch.optim.Optimizer, loaded: dict) -> None:
    step = loaded.pop("skyrl_common_step", None)
    state = loaded["state"]
    params = _opt_params(opt)
    current = opt.state_dict()
    for idx, pstate in state.items():
        if step is not None:
            ref = current["state"].get(idx, {}).get("step")
            if isinstance(ref, torch.Tensor):
                pstate["step"] = torch.tensor(step, dtype=ref.dtype, device=ref.device)
            else:
                pstate["step"] = step
    groups = loaded["param_groups"]
    if len(groups) != len(current["param_groups"]):
        raise IncompatibleCheckpointError(
            f"the checkpoint's optimizer has {len(groups)} param group(s), this one {len(current['param_groups'])}. "
            f"Configure the optimizer as in the run that saved it."
        )
    for g, cur in zip(groups, current["param_groups"]):
        params_field = g.get("params")
        g["params"] = list(cur["params"]) if not isinstance(params_field, list) else params_field
        if len(g["params"]) != len(cur["params"]):
            g["params"] = list(cur["params"])
    del params
    opt.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------- async save strategy
def _save_strategy(thread_count: int):
    """A torch_dist save strategy that remembers its last writer and plan (for async finalize),
    wrapped in the fully parallel (DP-distributed) save wrapper."""
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class _Recording(TorchDistSaveShardedStrategy):
        last: Any = None

        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
            self.last = writer
            return super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)

    base = _Recording("torch_dist", 1, thread_count=thread_count)
    return FullyParallelSaveStrategyWrapper(base, _dp_group()), base


class _MegatronSnapshot:
    """What :meth:`MegatronWriter.snapshot` hands to the background write and the finalize."""

    def __init__(self) -> None:
        self.request: Any = None
        self.base_strategy: Any = None
        self.plan_dir: str = ""
        self.rank = 0
        self.is_main = False
        self.config: dict = {}
        self.schedulers: Any = None
        self.written: list[str] = []
        self.done = False


# --------------------------------------------------------------------------- the writer
class MegatronWriter(RoleWriter):
    """Writer for megatron-core models (tensor, pipeline and data parallel).

    Args:
        optimizer_sharding: ``"fully_reshardable"`` (default): the ``DistributedOptimizer`` state is
            stored per parameter, so it loads at any TP/PP/DP (saving gathers each DP group's
            buffers on its DP rank 0). ``"dp_reshardable"``: each rank's buffers as they are
            (fastest save, no gather) but the checkpoint loads only at the same TP and PP.
            Plain ``torch.optim`` / non-distributed megatron optimizers are always per parameter.
        thread_count: files (and writer processes) per rank, as megatron-core's ``thread_count``.
        validate_access_integrity: megatron-core's check that every shard is written exactly once.
    """

    kind = "megatron"

    def __init__(
        self,
        optimizer_sharding: str = "fully_reshardable",
        *,
        thread_count: int = 2,
        validate_access_integrity: bool = True,
    ) -> None:
        if optimizer_sharding not in OPTIMIZER_SHARDING_TYPES:
            raise ConfigError(
                f"megatron_optimizer_sharding={optimizer_sharding!r}: expected one of {OPTIMIZER_SHARDING_TYPES}. "
                f"'fully_reshardable' reshards the optimizer with the model; 'dp_reshardable' saves faster "
                f"but loads only at the same tensor/pipeline parallel sizes."
            )
        if int(thread_count) < 1:
            raise ConfigError(f"thread_count={thread_count!r}: expected an integer >= 1.")
        self.optimizer_sharding = optimizer_sharding
        self.thread_count = int(thread_count)
        self.validate_access_integrity = bool(validate_access_integrity)
        #: ``{"restored": bool, "reason": str}`` after :meth:`load`: whether the per-rank RNG came back
        self.rng_restored: Optional[dict] = None

    def __repr__(self) -> str:
        return f"MegatronWriter(optimizer_sharding={self.optimizer_sharding!r})"

    # ------------------------------------------------------------------ state dicts
    def _model_state(self, role: "Role") -> dict:
        chunks = model_chunks(role.model, role.exclude_prefixes)
        with _quiet():
            if len(chunks) == 1:
                return {"model": chunks[0].sharded_state_dict()}
            return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}

    def _state(self, role: "Role", *, loading: bool, sharding: str, layout: dict, with_rng: bool) -> dict:
        _check_no_stray_parameters(role)
        state = self._model_state(role)
        model_sd = dict(state)
        for i, opt in enumerate(role.optimizers):
            key = "optimizer" if len(role.optimizers) == 1 else f"optimizer{i}"
            where = f"{role.name} optimizer {i}"
            if _is_megatron_optimizer(opt):
                metadata = {"distrib_optim_sharding_type": sharding, "chained_optim_avoid_prefix": True}
                if loading:
                    _init_megatron_optimizer_state(opt)
                with _quiet():
                    state[key] = opt.sharded_state_dict(model_sd, is_loading=loading, metadata=metadata)
            elif isinstance(opt, torch.optim.Optimizer):
                state[key] = _torch_optimizer_sharded(opt, model_sd, loading, where)
            else:
                raise ConfigError(
                    f"{where}: {type(opt).__name__} is neither a megatron-core optimizer nor a torch.optim.Optimizer."
                )
        if with_rng:
            state[RNG_KEY] = _rng_object(layout, None if loading else _capture_rng())
        return state

    def _config(self, role: "Role", layout: dict, chunks: int) -> dict:
        try:
            from importlib.metadata import version

            mcore = version("megatron-core")
        except Exception:  # noqa: BLE001
            mcore = None
        kinds = ["megatron" if _is_megatron_optimizer(o) else "torch" for o in role.optimizers]
        return {
            "format_version": FORMAT_VERSION,
            "skyrl_callbacks_format": True,
            "backend": "torch_dist",
            "tensor_model_parallel_size": layout["tp"],
            "pipeline_model_parallel_size": layout["pp"],
            "data_parallel_size": layout["dp"],
            "context_parallel_size": layout["cp"],
            "world_size": layout["world_size"],
            "model_chunks": chunks,
            "optimizer_sharding": self.optimizer_sharding,
            "optimizer_kinds": kinds,
            "num_optimizers": len(role.optimizers),
            "num_schedulers": len(role.schedulers),
            "rng": "per_rank",
            "megatron_core_version": mcore,
            "torch_version": torch.__version__.split("+")[0],
        }

    # ------------------------------------------------------------------ save
    def save(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext") -> list[str]:
        _require_megatron()
        path = _require_local(storage, role_dir)
        from megatron.core import dist_checkpointing

        layout = _layout()
        chunks = len(model_chunks(role.model, role.exclude_prefixes))
        state = _agree(dist, "build megatron sharded state", lambda: self._state(
            role, loading=False, sharding=self.optimizer_sharding, layout=layout, with_rng=True))
        strategy, _ = _save_strategy(self.thread_count)
        try:
            with _quiet():
                dist_checkpointing.save(state, path, sharded_strategy=strategy,
                                        validate_access_integrity=self.validate_access_integrity)
        except Exception as exc:  # noqa: BLE001 - megatron raises CheckpointingException/AssertionError
            raise StorageError(f"{path}: writing the megatron checkpoint failed: {_short(exc)}") from exc
        files = _own_files(storage, role_dir, layout["rank"])
        if dist.is_main:
            if role.schedulers:
                torch_save(storage, storage.join(role_dir, SCHEDULER_FILE), pack_states(role.schedulers))
                files.append(SCHEDULER_FILE)
            _write_json(storage, storage.join(role_dir, MEGATRON_CONFIG_FILE), self._config(role, layout, chunks))
            files += [MEGATRON_CONFIG_FILE] + [f for f in _MEGATRON_FILES if storage.exists(storage.join(role_dir, f))]
        return sorted(files)

    # ------------------------------------------------------------------ async save
    def snapshot(self, role: "Role", dist: "DistContext", stager: Any) -> Any:
        """Foreground, collective: plan the save and copy this rank's shards to host memory.

        megatron-core binds the directory at planning time; the plan is made against a private
        local directory and :meth:`write_snapshot` writes the same files into ``role_dir``
        (DCP's ``.metadata`` holds only relative file names). ``stager`` is not used: megatron
        stages its own tensors (``preload_fn``).
        """
        _require_megatron()
        from megatron.core import dist_checkpointing

        layout = _layout()
        chunks = len(model_chunks(role.model, role.exclude_prefixes))
        snap = _MegatronSnapshot()
        snap.rank, snap.is_main = layout["rank"], dist.is_main
        snap.config = self._config(role, layout, chunks)
        snap.schedulers = copy.deepcopy(pack_states(role.schedulers)) if role.schedulers else None
        snap.plan_dir = tempfile.mkdtemp(prefix="skyrl-megatron-plan-")
        state = _agree(dist, "build megatron sharded state", lambda: self._state(
            role, loading=False, sharding=self.optimizer_sharding, layout=layout, with_rng=True))
        strategy, base = _save_strategy(self.thread_count)
        try:
            with _quiet():
                request = dist_checkpointing.save(state, snap.plan_dir, sharded_strategy=strategy,
                                                  validate_access_integrity=self.validate_access_integrity,
                                                  async_sharded_save=True)
        except Exception as exc:  # noqa: BLE001
            shutil.rmtree(snap.plan_dir, ignore_errors=True)
            raise StorageError(f"planning the megatron checkpoint failed: {_short(exc)}") from exc
        args = list(request.async_fn_args)
        if request.preload_fn is not None and len(args) >= 2:
            originals = {t.data_ptr() for _f, _k, (_b, tensors) in args[1] for _i, t in tensors if t.device.type == "cpu"}
            staged = request.preload_fn()  # device -> host copies (megatron's own staging)
            # on the CPU ``.to("cpu")`` returns the live tensor itself: copy it, training goes on
            staged = [
                (f, k, (b, [(i, t.clone() if t.data_ptr() in originals else t) for i, t in tensors]))
                for f, k, (b, tensors) in staged
            ]
            args[1] = staged
        snap.request = request._replace(async_fn_args=tuple(args), preload_fn=None)
        snap.base_strategy = base
        return snap

    def write_snapshot(self, storage: "Storage", role_dir: str, snap: Any, dist: "DistContext") -> list[str]:
        """Background thread: write this rank's shards into ``role_dir``; no collective at all."""
        from pathlib import Path

        path = _require_local(storage, role_dir)
        os.makedirs(path, exist_ok=True)
        request = snap.request
        args = list(request.async_fn_args)
        files: list[str] = []
        if request.async_fn is not None and len(args) >= 2:
            args[1] = [(Path(path) / Path(f).name, k, data) for f, k, data in args[1]]
            request.async_fn(*args, **(request.async_fn_kwargs or {}))
        files += _own_files(storage, role_dir, snap.rank)
        if snap.is_main:
            common = os.path.join(snap.plan_dir, "common.pt")
            if os.path.exists(common):
                shutil.copyfile(common, os.path.join(path, "common.pt"))
                files.append("common.pt")
            if snap.schedulers is not None:
                torch_save(storage, storage.join(role_dir, SCHEDULER_FILE), snap.schedulers)
                files.append(SCHEDULER_FILE)
        snap.written = files
        return sorted(files)

    def finalize_snapshot(self, storage: "Storage", role_dir: str, snap: Any, dist: "DistContext") -> list[str]:
        """Foreground, collective: gather the write results, rank 0 writes ``.metadata``,
        ``metadata.json`` and ``megatron_config.json``."""
        from pathlib import Path

        path = _require_local(storage, role_dir)
        try:
            writer = getattr(snap.base_strategy, "last", None)
            if writer is not None:
                writer.path = Path(path)
            with _quiet():
                for fn in snap.request.finalize_fns:
                    fn()
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{path}: finalizing the megatron checkpoint failed: {_short(exc)}") from exc
        finally:
            snap.done = True
        files: list[str] = []
        if snap.is_main:
            produced = os.path.join(snap.plan_dir, "metadata.json")
            if os.path.exists(produced):
                shutil.copyfile(produced, os.path.join(path, "metadata.json"))
            _write_json(storage, storage.join(role_dir, MEGATRON_CONFIG_FILE), snap.config)
            files = [MEGATRON_CONFIG_FILE] + [f for f in ("metadata.json", ".metadata") if os.path.exists(os.path.join(path, f))]
        shutil.rmtree(snap.plan_dir, ignore_errors=True)
        return sorted(files)

    # ------------------------------------------------------------------ load
    def _check_config(self, cfg: Optional[dict], role: "Role", layout: dict, path: str) -> tuple[str, bool, str]:
        """(optimizer sharding to load with, whether RNG can be restored, why not)."""
        if cfg is None:
            raise IncompatibleCheckpointError(
                f"{path}: no {MEGATRON_CONFIG_FILE}, so this is not a skyrl-callbacks megatron checkpoint. "
                f"Load a checkpoint saved by MegatronWriter (or one from a non-megatron run with its own writer)."
            )
        version = cfg.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise IncompatibleCheckpointError(
                f"{path}: format_version={version!r} but this skyrl-callbacks reads up to {FORMAT_VERSION}. "
                f"Upgrade skyrl-callbacks."
            )
        sharding = cfg.get("optimizer_sharding", "fully_reshardable")
        if sharding not in OPTIMIZER_SHARDING_TYPES:
            raise IncompatibleCheckpointError(
                f"{path}: optimizer_sharding={sharding!r} is unknown (expected one of {OPTIMIZER_SHARDING_TYPES}). "
                f"Upgrade skyrl-callbacks."
            )
        n_opt = cfg.get("num_optimizers", 0)
        if role.optimizers and n_opt != len(role.optimizers):
            raise IncompatibleCheckpointError(
                f"{path}: num_optimizers={n_opt} but the {role.name} role has {len(role.optimizers)}. "
                f"Configure the same optimizers as the run that saved it, or load weights only (no optimizer)."
            )
        kinds = cfg.get("optimizer_kinds") or []
        mine = ["megatron" if _is_megatron_optimizer(o) else "torch" for o in role.optimizers]
        if role.optimizers and kinds and kinds != mine:
            raise IncompatibleCheckpointError(
                f"{path}: optimizer_kinds={kinds} but the {role.name} role's optimizers are {mine}. "
                f"Use the same optimizer type (megatron get_megatron_optimizer vs torch.optim) as the saving run."
            )
        same_mp = (cfg.get("tensor_model_parallel_size"), cfg.get("pipeline_model_parallel_size")) == (
            layout["tp"], layout["pp"])
        if role.optimizers and sharding == "dp_reshardable" and "megatron" in mine and not same_mp:
            raise IncompatibleCheckpointError(
                f"{path}: optimizer_sharding='dp_reshardable' was saved at tensor_model_parallel_size="
                f"{cfg.get('tensor_model_parallel_size')}, pipeline_model_parallel_size="
                f"{cfg.get('pipeline_model_parallel_size')}; this run has {layout['tp']}/{layout['pp']}. That "
                f"optimizer format reshards only across data parallel ranks: resume at TP={cfg.get('tensor_model_parallel_size')} "
                f"PP={cfg.get('pipeline_model_parallel_size')}, or load the weights only (role without optimizer) and "
                f"save with megatron_optimizer_sharding='fully_reshardable'."
            )
        saved = (cfg.get("pipeline_model_parallel_size"), cfg.get("tensor_model_parallel_size"),
                 cfg.get("data_parallel_size"))
        now = (layout["pp"], layout["tp"], layout["dp"])
        if saved != now:
            return sharding, False, (f"saved at (pp, tp, dp)={saved}, running at {now}: per-rank RNG states "
                                     f"belong to the old layout and are not restored")
        return sharding, True, ""

    def _check_keys(self, state: dict, metadata: Any, path: str) -> None:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        saved = metadata.state_dict_metadata
        missing, shapes = [], []
        model_parts = {k: v for k, v in state.items() if k == "model" or re.fullmatch(r"model\d+", k)}
        for value in nested_values(model_parts):
            if isinstance(value, ShardedTensorFactory):
                key, shape = value.key, None
            elif isinstance(value, ShardedTensor):
                key, shape = value.key, tuple(value.global_shape)
            else:
                continue
            md = saved.get(key)
            if md is None:
                missing.append(key)
            elif shape is not None and hasattr(md, "size") and not getattr(value, "allow_shape_mismatch", False):
                if tuple(md.size) != shape:
                    shapes.append(f"{key}: saved {tuple(md.size)}, model {shape}")
        if missing or shapes:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {sorted(set(missing))[:5]})")
            if shapes:
                parts.append(f"{len(shapes)} with another shape (e.g. {shapes[:3]})")
            raise IncompatibleCheckpointError(
                f"{path}: does not match the model: {'; '.join(parts)}. Build the same architecture "
                f"(and optimizer setup) as the run that saved it; the parallel layout may differ."
            )

    def load(self, storage: "Storage", role_dir: str, role: "Role", dist: "DistContext") -> None:
        _require_megatron()
        path = _require_local(storage, role_dir)
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

        layout = _layout()

        def prepare():
            reason = self.validate_dir(storage, role_dir)
            if reason:
                raise (CorruptCheckpointError if "cannot be read" in reason or "missing" in reason
                       else IncompatibleCheckpointError)(reason)
            cfg = read_megatron_config(storage, role_dir)
            sharding, rng_ok, why = self._check_config(cfg, role, layout, path)
            state = self._state(role, loading=True, sharding=sharding, layout=layout, with_rng=rng_ok)
            from torch.distributed.checkpoint import FileSystemReader

            from skyrl_callbacks.errors import UntrustedCheckpointError
            from skyrl_callbacks.safe_load import check_dcp_bytes, check_torch_file, guard_dcp_reader

            try:
                # no load executes code: .metadata through a restricted unpickler, byte entries and
                # common.pt weights-only (Megatron's own loader reads them afterwards)
                metadata = guard_dcp_reader(FileSystemReader(path), path).read_metadata()
                check_dcp_bytes(path, metadata)
            except UntrustedCheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise CorruptCheckpointError(f"{path}: .metadata cannot be read ({_short(exc)}).") from exc
            check_torch_file(os.path.join(path, "common.pt"))
            self._check_keys(state, metadata, path)
            return state, rng_ok, why

        state, rng_ok, why = _agree(dist, "prepare megatron load", prepare)
        try:
            with _quiet():
                strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), _dp_group())
                loaded = dist_checkpointing.load(state, path, sharded_strategy=strategy,
                                                 validate_access_integrity=self.validate_access_integrity)
        except Exception as exc:  # noqa: BLE001
            raise CorruptCheckpointError(f"{path}: reading the megatron checkpoint failed: {_short(exc)}") from exc

        def apply():
            chunks = model_chunks(role.model, role.exclude_prefixes)
            for i, chunk in enumerate(chunks):
                sd = loaded["model"] if len(chunks) == 1 else loaded[f"model{i}"]
                try:
                    chunk.load_state_dict(sd, strict=True)
                except RuntimeError as exc:
                    keys = sorted(sd)[:4] if isinstance(sd, dict) else type(sd).__name__
                    raise IncompatibleCheckpointError(
                        f"{path}: model chunk {i} ({type(chunk).__name__}) does not match: {_short(exc)} "
                        f"(loaded {len(sd) if isinstance(sd, dict) else '?'} keys, e.g. {keys})"
                    ) from exc
            for i, opt in enumerate(role.optimizers):
                key = "optimizer" if len(role.optimizers) == 1 else f"optimizer{i}"
                try:
                    if _is_megatron_optimizer(opt):
                        with torch.no_grad():  # it copies into views of leaf parameters
                            _load_megatron_optimizer(opt, loaded[key])
                    else:
                        _torch_optimizer_load(opt, loaded[key])
                except (KeyError, ValueError, RuntimeError) as exc:
                    raise IncompatibleCheckpointError(f"{path}: {key} state does not match: {_short(exc)}") from exc
            if role.schedulers:
                spath = storage.join(role_dir, SCHEDULER_FILE)
                if not storage.exists(spath):
                    raise IncompatibleCheckpointError(
                        f"{spath}: missing, but the {role.name} role has {len(role.schedulers)} lr_scheduler(s). "
                        f"Resume with the same scheduler setup as the saving run."
                    )
                states = unpack_states(torch_load(storage, spath), len(role.schedulers), "lr_scheduler", spath)
                for sched, st in zip(role.schedulers, states):
                    sched.load_state_dict(st)
            if rng_ok and RNG_KEY in loaded:
                _restore_rng(loaded[RNG_KEY])
                self.rng_restored = {"restored": True, "reason": ""}
            else:
                self.rng_restored = {"restored": False, "reason": why}
                if dist.is_main and why:
                    logger.warning("%s: %s", path, why)

        _agree(dist, "apply megatron state", apply)

    # ------------------------------------------------------------------ checks
    def validate_dir(self, storage: "Storage", role_dir: str) -> Optional[str]:
        if not storage.exists(role_dir):
            return f"{role_dir}: missing"
        names = set(storage.listdir(role_dir))
        if MEGATRON_CONFIG_FILE not in names:
            return (f"{role_dir}: no {MEGATRON_CONFIG_FILE}, so it is not a megatron checkpoint "
                    f"(it holds {sorted(names)[:8]}).")
        try:
            cfg = read_megatron_config(storage, role_dir)
        except CorruptCheckpointError as exc:
            return f"{exc} (cannot be read)"
        version = (cfg or {}).get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            return (f"{role_dir}: format_version={version!r} but this skyrl-callbacks reads up to {FORMAT_VERSION}; "
                    f"upgrade skyrl-callbacks.")
        lacking = [f for f in _MEGATRON_FILES if f not in names]
        if lacking:
            return f"{role_dir}: megatron files missing: {lacking}."
        if not any(_DISTCP_RE.match(n) for n in names):
            return f"{role_dir}: no __R_I.distcp shard files (missing)."
        return None

    # ------------------------------------------------------------------ HF export
    def full_state_dict(self, role: "Role", dist: "DistContext") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, full tensor)`` in HF Llama naming; collective on every rank.

        Each megatron tensor is assembled on rank 0 from the main replicas of all TP/PP ranks
        (gathered one tensor at a time); fused QKV and gate/up are split. Other ranks yield nothing.
        """
        chunks = model_chunks(role.model, role.exclude_prefixes)
        cfg = chunks[0].config if hasattr(chunks[0], "config") else None
        # every rank checks every key before the first gather: an unmapped tensor raises the same
        # error everywhere instead of leaving the other ranks waiting in a gather
        for key, full in gather_full_tensors(self._model_state(role), dist, check=hf_mapping_problem):
            if dist.is_main:
                yield from megatron_to_hf_llama(key, full, cfg)

    def hf_config(self, role: "Role") -> Any:
        """A ``transformers.LlamaConfig`` for the role's GPTModel (see :func:`llama_hf_config_from_megatron`)."""
        chunk = _unwrap_gpt(model_chunks(role.model, role.exclude_prefixes)[0])
        return llama_hf_config_from_megatron(
            chunk.config,
            vocab_size=getattr(chunk, "vocab_size"),
            max_position_embeddings=getattr(chunk, "max_sequence_length", 4096),
            rope_theta=float(getattr(chunk, "rotary_base", 10000)),
            tie_word_embeddings=bool(getattr(chunk, "share_embeddings_and_output_weights", False)),
        )


def _check_no_stray_parameters(role: "Role") -> None:
    """A role holding parameters outside its megatron chunks would silently lose them: refuse."""
    model = role.model
    if not isinstance(model, torch.nn.Module) or _megatron_module_cls() is None:
        return
    chunks = model_chunks(model, role.exclude_prefixes)
    inside = {id(p) for c in chunks for p in c.parameters()}
    stray = [n for n, p in model.named_parameters()
             if id(p) not in inside and not (role.exclude_prefixes and n.startswith(role.exclude_prefixes))]
    if stray:
        raise ConfigError(
            f"{role.name}: {len(stray)} parameter(s) lie outside the megatron-core model and would not be saved by "
            f"the megatron writer (e.g. {stray[:5]}). Make the megatron model the role "
            f"(SkyRLCheckpoint(cfg, roles={{'{role.name}': '<attribute holding the GPTModel>'}})) and keep other "
            f"modules in their own role."
        )


def _unwrap_gpt(module: Any) -> Any:
    seen = 0
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module) and seen < 8:
        module = module.module
        seen += 1
    return module


# --------------------------------------------------------------------------- gathering
def gather_full_tensors(
    sharded_state: dict, dist: "DistContext", check: Optional[Callable[[str], Optional[str]]] = None
) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """Collective: ``(key, full tensor)`` for every ShardedTensor key of ``sharded_state`` on any
    rank, in the same order on every rank; the tensor is assembled on rank 0 (None elsewhere)
    from the main replicas of all ranks. One tensor is gathered at a time."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    apply_factories(sharded_state)
    pieces: dict[str, list] = {}
    meta: dict[str, tuple] = {}
    for value in nested_values(sharded_state):
        if not isinstance(value, ShardedTensor) or value.data is None:
            continue
        meta[value.key] = (tuple(value.global_shape), str(value.dtype).replace("torch.", ""))
        if is_main_replica(value.replica_id):
            pieces.setdefault(value.key, []).append(value)
    all_meta = dist.all_gather(meta)
    keys: dict[str, tuple] = {}
    for m in all_meta:
        for k, v in m.items():
            keys.setdefault(k, v)
    if check is not None:
        problems = [p for p in (check(k) for k in sorted(keys)) if p]
        if problems:
            raise IncompatibleCheckpointError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    for key in sorted(keys, key=_natural_key):
        mine = []
        for st in pieces.get(key, []):
            data = st.data.detach()
            flat = None
            if st.flattened_range is not None:  # a slice of the flattened local chunk (distributed optimizer)
                flat = (int(st.flattened_range.start), int(st.flattened_range.stop))
            else:
                data = data.reshape(tuple(st.local_shape))
            mine.append((tuple(st.global_offset), tuple(st.local_shape), flat, data.cpu()))
        got = dist.gather_to_main(mine)
        if not dist.is_main:
            yield key, None
            continue
        shape, dtype = keys[key]
        full = torch.empty(shape, dtype=getattr(torch, dtype))
        chunks: dict[tuple, torch.Tensor] = {}
        for rank_pieces in got or []:
            for offset, local_shape, flat, local in rank_pieces:
                lshape = (1,) * (len(shape) - len(local_shape)) + tuple(local_shape)
                index = tuple(slice(o, o + s) for o, s in zip(offset, lshape))
                if flat is None:
                    full[index] = local.reshape(lshape)
                    continue
                buf = chunks.get(index)
                if buf is None:
                    buf = chunks[index] = full[index].contiguous().reshape(-1)
                buf[flat[0]:flat[1]] = local.reshape(-1)
        for index, buf in chunks.items():
            full[index] = buf.reshape(full[index].shape)
        yield key, full


def _natural_key(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


# --------------------------------------------------------------------------- HF Llama mapping
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # TransformerEngine fused norm
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # TransformerEngine fused norm
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def _layer_rest(key: str) -> Optional[tuple[Optional[int], str]]:
    """``(layer, rest)`` of a decoder-layer key: ``decoder.layers.3.mlp...`` -> (3, "mlp..."); the
    stacked form megatron-core uses in sharded state dicts, ``decoder.layers.mlp...`` (a leading
    layer axis), -> (None, "mlp..."); other keys -> None."""
    m = _LAYER_RE.match(key)
    if m is not None:
        return int(m.group(1)), m.group(2)
    if key.startswith("decoder.layers."):
        return None, key[len("decoder.layers."):]
    return None


_QKV = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
_FC1 = "mlp.linear_fc1.weight"


def hf_mapping_problem(key: str) -> Optional[str]:
    """Why ``key`` has no HF Llama mapping, or None when it has one (a pure function of the key)."""
    if key in _TOP_MAP:
        return None
    lr = _layer_rest(key)
    if lr is not None and (lr[1] in _LAYER_MAP or lr[1] in _QKV or lr[1] == _FC1):
        return None
    return (f"HF export: no Llama mapping for megatron tensor {key!r} (covered: dense Llama/Qwen-style GPT, "
            f"see docs/megatron.md).")


def megatron_to_hf_llama(key: str, full: torch.Tensor, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """HF Llama names and tensors for one full megatron-core GPT tensor.

    Decoder-layer tensors come either per layer (``decoder.layers.3.…``) or stacked with a
    leading layer axis (``decoder.layers.…``, as megatron-core's sharded state dict stores them:
    the axis index is the global layer number); both are handled.

    Covers: embeddings, untied/tied output layer, RMSNorm/LayerNorm weights (local and
    TransformerEngine-fused names), fused QKV (weight and bias, GQA, interleaved per query group
    ``[q heads of the group, k, v]``), output projection, SwiGLU ``linear_fc1 = [gate; up]`` and
    ``linear_fc2``, QK layernorm (Qwen3-style ``q_norm``/``k_norm``).

    Raises:
        IncompatibleCheckpointError: a tensor the Llama mapping does not cover (MoE, MLA, biases
            of the MLP...), named in the message.
    """
    problem = hf_mapping_problem(key)
    if problem:
        raise IncompatibleCheckpointError(problem)
    if key in _TOP_MAP:
        yield _TOP_MAP[key], full
        return
    layer, rest = _layer_rest(key)  # type: ignore[misc]
    if layer is None:
        for i in range(full.shape[0]):
            yield from _map_layer(i, rest, full[i], config)
    else:
        yield from _map_layer(layer, rest, full, config)


def _map_layer(layer: int, rest: str, full: torch.Tensor, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_MAP:
        yield prefix + _LAYER_MAP[rest], full.contiguous()
        return
    if rest in _QKV:
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        head_dim = config.kv_channels or config.hidden_size // heads
        per_group = heads // groups
        suffix = rest.rsplit(".", 1)[1]
        tail = tuple(full.shape[1:])
        grouped = full.reshape((groups, (per_group + 2) * head_dim) + tail)
        q = grouped[:, : per_group * head_dim].reshape((heads * head_dim,) + tail)
        k = grouped[:, per_group * head_dim : (per_group + 1) * head_dim].reshape((groups * head_dim,) + tail)
        v = grouped[:, (per_group + 1) * head_dim :].reshape((groups * head_dim,) + tail)
        yield prefix + f"self_attn.q_proj.{suffix}", q.contiguous()
        yield prefix + f"self_attn.k_proj.{suffix}", k.contiguous()
        yield prefix + f"self_attn.v_proj.{suffix}", v.contiguous()
        return
    # linear_fc1: [gate; up] (SwiGLU) or up only
    if not getattr(config, "gated_linear_unit", False):
        yield prefix + "mlp.up_proj.weight", full.contiguous()
        return
    gate, up = torch.chunk(full, 2, dim=0)
    yield prefix + "mlp.gate_proj.weight", gate.contiguous()
    yield prefix + "mlp.up_proj.weight", up.contiguous()


def llama_hf_config_from_megatron(
    transformer_config: Any,
    vocab_size: int,
    *,
    max_position_embeddings: int = 4096,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool = False,
    torch_dtype: Any = None,
) -> Any:
    """A ``transformers.LlamaConfig`` matching a megatron-core ``TransformerConfig``.

    Raises:
        IncompatibleCheckpointError: the config is not Llama-shaped (no gated SiLU MLP, biases, ...).
    """
    from transformers import LlamaConfig

    c = transformer_config
    problems = []
    if not getattr(c, "gated_linear_unit", False):
        problems.append("gated_linear_unit=False (Llama uses SwiGLU)")
    if getattr(c, "add_bias_linear", False):
        problems.append("add_bias_linear=True (Llama has no linear biases)")
    if getattr(c, "normalization", "RMSNorm") != "RMSNorm":
        problems.append(f"normalization={c.normalization!r} (Llama uses RMSNorm)")
    if getattr(c, "num_moe_experts", None):
        problems.append("num_moe_experts is set (MoE is not covered)")
    if problems:
        raise IncompatibleCheckpointError("HF export as Llama: " + "; ".join(problems) + ".")
    heads = c.num_attention_heads
    head_dim = c.kv_channels or c.hidden_size // heads
    kwargs = dict(
        vocab_size=int(vocab_size),
        hidden_size=c.hidden_size,
        intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=c.num_query_groups or heads,
        head_dim=head_dim,
        max_position_embeddings=int(max_position_embeddings),
        rms_norm_eps=float(c.layernorm_epsilon),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(tie_word_embeddings),
        attention_bias=bool(getattr(c, "add_qkv_bias", False)),
        mlp_bias=False,
        hidden_act="silu",
        architectures=["LlamaForCausalLM"],
    )
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return LlamaConfig(**kwargs)


def export_megatron_hf(
    role: "Role",
    out_dir: str,
    dist: "DistContext",
    *,
    writer: Optional[MegatronWriter] = None,
    hf_config: Any = None,
    max_shard_size: Any = "5GB",
    dtype: Optional[torch.dtype] = None,
) -> list[str]:
    """Collective: write a HF Llama folder (``config.json`` + safetensors) of a megatron role into
    the LOCAL ``out_dir`` on rank 0. Returns the files rank 0 wrote (other ranks: [])."""
    from skyrl_callbacks.writers.hf import parse_size, write_safetensors_stream

    writer = writer or MegatronWriter()
    stream = writer.full_state_dict(role, dist)
    if not dist.is_main:
        for _ in stream:
            pass
        return []
    os.makedirs(out_dir, exist_ok=True)
    cfg = hf_config if hf_config is not None else writer.hf_config(role)
    skip = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    names = write_safetensors_stream(stream, out_dir, write=True, max_shard_size=parse_size(max_shard_size),
                                     dtype=dtype, skip=skip)
    cfg.save_pretrained(out_dir)
    if role.tokenizer is not None:
        role.tokenizer.save_pretrained(out_dir)
    return sorted(set(names) | {"config.json"})
