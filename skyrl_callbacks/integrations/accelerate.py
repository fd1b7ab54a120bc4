"""Accelerate / plain-loop glue for :class:`~skyrl_callbacks.SkyRLCheckpoint`.

A hand-written loop binds the callback once, before its first step, and reports every
completed iteration::

    accelerator = Accelerator()
    policy, opt, sched, train_dl = accelerator.prepare(policy, opt, sched, train_dl)
    ckpt = SkyRLCheckpoint(cfg)
    state = ckpt.bind(accelerator, policy=policy, optimizers=[opt], schedulers=[sched],
                      dataloader=train_dl, tokenizer=tokenizer)   # resumes here
    batches = state.batches()                 # endless, resumes mid-epoch
    for step in range(state.step + 1, total_steps + 1):
        train_one_iteration(next(batches))
        ckpt.step()                           # ckpt_interval / hf_save_interval rules
    ckpt.finish()                             # final save + export

What :func:`bind` does:

* builds the ``policy`` (and ``critic``) roles from the models as returned by
  ``accelerator.prepare`` (DDP is unwrapped for the state dicts; an FSDP model keeps its
  wrapper so that ``select_writer`` picks the FSDP writer), and attaches the optimizers
  and LR schedulers to the role whose parameters they update (``AcceleratedOptimizer`` /
  ``AcceleratedScheduler`` are unwrapped to the torch objects);
* makes the dataloader resumable at the exact batch (see :class:`DataState`);
* resumes from the checkpoint ``resume_mode`` selects: weights, optimizer and scheduler
  states, the step, the dataloader position, the GradScaler, ``accelerator.step`` and
  every process's RNG states; then prints ``[skyrl-ckpt] resumed from ...``;
* installs the preemption handlers (``preemption_signals``, default SIGTERM and SIGUSR1).

Preemption: the handler only records the signal. At the end of the iteration in progress,
:func:`step` agrees on it across ranks (one small all-reduce per step when there are several
processes, so a signal that reached one rank stops them all), saves and commits that step
(unless it was just saved), releases the ``ckpt_path`` lock and raises :class:`Preempted`, a
``SystemExit`` with code 0, on every rank: an unmodified loop exits cleanly and a rerun
resumes at the next step. With ``bind(..., exit_on_preemption=False)`` :func:`step` returns
instead and ``state.should_stop`` is true; break out of the loop (``finish()`` then neither
saves again nor exports). The previous signal handlers come back at :func:`finish` or when the
run stops.

Data position: a loader returned by ``accelerator.prepare`` (``DataLoaderShard``) keeps
its sharding, device placement and RNG synchronisation, but its inner ``DataLoader`` is
swapped for a resumable ``DataLoader`` built from the same dataset and
batch sampler (the torch-only engine, :class:`~skyrl_callbacks.DataLoaderStateMixin`). Its
state (taken by accelerate at the batch the loop holds, i.e. not one
batch ahead) replays the shuffle RNG of the interrupted epoch and carries accelerate's
epoch counter, so a resumed run sees exactly the batches the uninterrupted run saw.
``DataLoaderConfiguration(use_stateful_dataloader=...)`` may be either value:
accelerate's stateful loader on its own restores the position but not the shuffle RNG nor
the epoch counter; with ``True`` ``accelerator.save_state``/``load_state`` store this
state too. A loader that was not prepared is used as is when it has
``state_dict``/``load_state_dict`` (``ResumableDataLoader``, ``DataLoaderStateMixin``,
torchdata's ``StatefulDataLoader``); a plain ``DataLoader`` restarts its epoch (warning).

The objects :func:`bind` returns (:class:`LoopState`, also ``ckpt.loop_state``) and
:class:`DataState` (``ckpt.data_state``) have ``state_dict``/``load_state_dict``, so
``accelerator.register_for_checkpointing(...)`` and ``accelerator.save_state()`` keep
working next to SkyRL's checkpoints.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
import warnings
import weakref
from typing import Any, Iterator, Mapping, Optional, Sequence

from skyrl_callbacks.dist import DistContext
from skyrl_callbacks.errors import ConfigError
from skyrl_callbacks.manager import CheckpointManager, SaveResult
from skyrl_callbacks.rng import restore_rng
from skyrl_callbacks.roles import (
    REF_ATTRS,
    ROLE_ALIASES,
    SOLE_POLICY_ATTR,
    Role,
    assign_optimizers,
    choose_roles,
    clean_name,
    describe_roles,
    load_unowned_state,
    unowned_state,
)

logger = logging.getLogger(__name__)

__all__ = ["bind", "step", "finish", "LoopState", "DataState", "Preempted", "unwrap_optimizer", "unwrap_scheduler"]


class Preempted(SystemExit):
    """Raised by ``ckpt.step()`` on every rank once a preempted step is saved and committed.

    A ``SystemExit`` with code 0: uncaught, the process exits cleanly. ``signal`` is the name of
    the signal (``"SIGTERM"``...; ``"signal"`` on ranks that did not receive it themselves) and
    ``step`` the committed step.
    """

    def __init__(self, signal_name: str, step: int) -> None:
        super().__init__(0)
        self.signal = signal_name
        self.step = step

    def __str__(self) -> str:
        return f"preempted ({self.signal}) after step {self.step}, which is saved"


#: the keywords naming models: the role names of :mod:`skyrl_callbacks.roles` (``actor=`` is the policy...)
_MODEL_KEYS = (*ROLE_ALIASES["policy"], SOLE_POLICY_ATTR, *ROLE_ALIASES["critic"], *REF_ATTRS)
_BIND_KEYS = (*_MODEL_KEYS, "optimizers", "schedulers", "dataloader", "tokenizer", "extra_state", "exit_on_preemption")
_ITERATION_KEY = "accelerate_iteration"


# --------------------------------------------------------------------------- unwrapping
def unwrap_optimizer(opt: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or ``opt``)."""
    inner = getattr(opt, "optimizer", None)
    while inner is not None and hasattr(inner, "param_groups") and inner is not opt:
        opt, inner = inner, getattr(inner, "optimizer", None)
    return opt


def unwrap_scheduler(sched: Any) -> Any:
    """The torch LR scheduler inside accelerate's ``AcceleratedScheduler`` (or ``sched``)."""
    inner = getattr(sched, "scheduler", None)
    if inner is not None and hasattr(inner, "state_dict") and hasattr(inner, "step"):
        return inner
    return sched


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    return [value]


def _model_for_role(model: Any) -> Any:
    """DDP/DataParallel/compile wrappers off (their state-dict keys carry ``module.``); FSDP kept."""
    from skyrl_callbacks.writers.plain import unwrap_model

    return unwrap_model(model)


# --------------------------------------------------------------------------- state objects
class LoopState:
    """The loop's position, returned by :meth:`SkyRLCheckpoint.bind`.

    Attributes:
        step: completed iterations (SkyRL's global step); the loop continues at ``step + 1``.
        resumed: whether :meth:`~SkyRLCheckpoint.bind` restored a checkpoint.
        resumed_from: the checkpoint directory it restored, or None.
        data: the :class:`DataState` of the bound dataloader, or None.

    ``state_dict``/``load_state_dict`` make it usable with
    ``accelerator.register_for_checkpointing``.
    """

    def __init__(self, callback: Any) -> None:
        self._callback = callback
        self.resumed_from: Optional[str] = None
        self.data: Optional["DataState"] = None
        #: the signal that preempted the run (``"signal"`` on ranks that only agreed), or None
        self.preempted: Optional[str] = None

    @property
    def should_stop(self) -> bool:
        """True once a preemption signal was handled: the current step is saved; leave the loop."""
        return self.preempted is not None

    @property
    def step(self) -> int:
        return int(self._callback.step)

    @property
    def resumed(self) -> bool:
        return self.resumed_from is not None

    @property
    def epoch(self) -> Optional[int]:
        """Accelerate's epoch counter of a prepared dataloader (None for other loaders)."""
        return None if self.data is None else self.data.epoch

    def batches(self) -> Iterator[Any]:
        """Endless iterator over the bound dataloader, epoch after epoch.

        After a resume its first epoch is the rest of the interrupted one. Keep one such
        iterator for the whole run (one live iterator per loader).
        """
        if self.data is None:
            raise ConfigError("LoopState.batches(): bind(...) was called without a dataloader.")
        loader = self.data.loader
        empty_in_a_row = 0
        while True:
            empty_in_a_row += 1
            for batch in loader:
                empty_in_a_row = 0
                yield batch
            # one empty pass is the rest of an epoch that was finished when it was saved
            if empty_in_a_row >= 2:
                raise RuntimeError("LoopState.batches(): the dataloader yields no batches.")

    def state_dict(self) -> dict:
        cb = self._callback
        manager = getattr(cb, "manager", None)
        return {
            "step": int(cb.step),
            "last_saved_step": None if manager is None else manager.last_saved_step,
            "last_exported_step": None if manager is None else manager.last_exported_step,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        cb = self._callback
        cb.step = int(state_dict.get("step", cb.step))
        manager = getattr(cb, "manager", None)
        if manager is not None:
            manager.last_saved_step = state_dict.get("last_saved_step", manager.last_saved_step)
            manager.last_exported_step = state_dict.get("last_exported_step", manager.last_exported_step)

    def __repr__(self) -> str:
        return f"LoopState(step={self.step}, resumed_from={self.resumed_from!r})"


class DataState:
    """Exact position of the bound dataloader, with ``state_dict``/``load_state_dict``.

    For a loader prepared by accelerate the state is the one accelerate snapshots when it
    hands out a batch (its inner loader runs one batch ahead), plus accelerate's epoch
    counter; for any other loader it is the loader's own ``state_dict()``.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.prepared = _is_accelerate_loader(loader)
        self.resumable = self.prepared or _has_state(loader)

    @property
    def epoch(self) -> Optional[int]:
        return getattr(self.loader, "iteration", None) if self.prepared else None

    def state_dict(self) -> Optional[dict]:
        if not self.resumable:
            return None
        state = self.loader.state_dict()
        return dict(state) if state is not None else None

    def load_state_dict(self, state_dict: Optional[Mapping[str, Any]]) -> None:
        if not state_dict or not self.resumable:
            return
        self.loader.load_state_dict(dict(state_dict))


def _is_accelerate_loader(loader: Any) -> bool:
    try:
        from accelerate.data_loader import DataLoaderAdapter
    except ImportError:  # pragma: no cover - accelerate is optional
        return False
    return isinstance(loader, DataLoaderAdapter) or any(
        c.__name__ == "DataLoaderAdapter" for c in type(loader).__mro__
    )


def _has_state(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


# --------------------------------------------------------------------------- prepared loaders
def _make_base_class() -> type:
    from torch.utils.data import DataLoader

    from skyrl_callbacks.data import DataLoaderStateMixin

    # The mixin engine (not torchdata's): it replays the interrupted epoch's whole index order
    # and leaves every sampler generator in its end-of-epoch state, which a sharded batch
    # sampler (accelerate's BatchSamplerShard over a RandomSampler with a generator) needs.
    class AccelerateResumableDataLoader(DataLoaderStateMixin, DataLoader):
        """The inner loader of a prepared ``DataLoaderShard``: exact state + accelerate's epoch."""

        _skyrl_shard: Optional[weakref.ref] = None

        def _shard(self) -> Any:
            return self._skyrl_shard() if self._skyrl_shard is not None else None

        def state_dict(self) -> dict:
            state = dict(super().state_dict())
            shard = self._shard()
            if shard is not None and _ITERATION_KEY not in state:
                # accelerate snapshots the state on every batch it hands out; on the last batch
                # of an epoch its end_of_dataloader is set and the epoch counter not yet advanced
                state[_ITERATION_KEY] = int(shard.iteration) + (1 if getattr(shard, "end_of_dataloader", False) else 0)
            return state

        def load_state_dict(self, state_dict: Any) -> None:
            if not state_dict:
                return
            super().load_state_dict(state_dict)
            shard = self._shard()
            if shard is not None:
                if _ITERATION_KEY in state_dict:
                    shard.iteration = int(state_dict[_ITERATION_KEY])
                shard.dl_state_dict = dict(state_dict)  # what shard.state_dict() returns until it iterates

    return AccelerateResumableDataLoader


_BASE_CLASS: Optional[type] = None


def _resumable_base(shard: Any) -> None:
    """Swap the inner ``DataLoader`` of a prepared loader for a resumable one (same pieces)."""
    global _BASE_CLASS
    base = shard.base_dataloader
    if _BASE_CLASS is None:
        _BASE_CLASS = _make_base_class()
    if isinstance(base, _BASE_CLASS):
        return
    if not hasattr(shard, "iteration"):
        raise ConfigError(f"dataloader: {type(shard).__name__} (accelerate) is not supported for exact resume.")
    from torch.utils.data import BatchSampler, IterableDataset

    params = inspect.signature(_BASE_CLASS.__init__).parameters
    skip = {"self", "dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"}
    kwargs = {
        name: getattr(base, name)
        for name, param in params.items()
        if name not in skip and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD) and hasattr(base, name)
    }
    if kwargs.get("prefetch_factor") is not None and not kwargs.get("num_workers"):
        kwargs["prefetch_factor"] = None
    if isinstance(base.dataset, IterableDataset):
        new = _BASE_CLASS(base.dataset, batch_size=base.batch_size, drop_last=base.drop_last, **kwargs)
    elif isinstance(base.sampler, BatchSampler):
        raise ConfigError(
            "dataloader: a DataLoader whose sampler is a BatchSampler is not supported for exact resume; "
            "pass it as batch_sampler=."
        )
    else:
        batch_sampler = base.batch_sampler
        inner = getattr(batch_sampler, "batch_sampler", None)
        if inner is not None and not hasattr(batch_sampler, "sampler") and hasattr(inner, "sampler"):
            # BatchSamplerShard: expose the shuffling sampler (and its generator) the way
            # accelerate's own set_sampler()/get_sampler() expect it, so that its RNG is saved
            batch_sampler.sampler = inner.sampler
        new = _BASE_CLASS(base.dataset, batch_sampler=batch_sampler, **kwargs)
    new._skyrl_shard = weakref.ref(shard)
    shard.base_dataloader = new
    shard.dl_state_dict = new.state_dict()


def _data_state(loader: Any) -> Optional[DataState]:
    if loader is None:
        return None
    if _is_accelerate_loader(loader):
        _resumable_base(loader)
        return DataState(loader)
    state = DataState(loader)
    if not state.resumable:
        warnings.warn(
            f"dataloader: {type(loader).__name__} has no state_dict/load_state_dict, so a resumed run starts "
            "its epoch over. Prepare it with accelerator.prepare(...) or use skyrl_callbacks.ResumableDataLoader "
            "for an exact data position.",
            UserWarning,
            stacklevel=3,
        )
    return state


# --------------------------------------------------------------------------- binding
class _Binding:
    """What :func:`bind` learnt about the loop; kept on the callback as ``_binding``."""

    def __init__(self, accelerator: Any, models: dict, optimizers: list, schedulers: list, tokenizer: Any,
                 data: Optional[DataState], extra_state: dict, exit_on_preemption: bool = True,
                 sources: Optional[dict] = None, not_saved: Optional[dict] = None) -> None:
        self.accelerator = accelerator
        self.exit_on_preemption = exit_on_preemption
        #: name of the preemption signal this process received (set by the handler), or None
        self.signal_received: Optional[str] = None
        self.previous_handlers: dict = {}
        self.models = models
        self.optimizers = optimizers
        self.schedulers = schedulers
        self.tokenizer = tokenizer
        self.data = data
        self.extra_state = extra_state
        #: role -> the keyword it came from (``"actor="``); keyword -> why it is not saved
        self.sources = dict(sources or {name: f"{name}=" for name in models})
        self.not_saved = dict(not_saved or {})
        self.roles = self._build_roles()

    def _build_roles(self) -> list[Role]:
        roles = [Role(name=name, model=model) for name, model in self.models.items()]
        names = {id(p): f"{self.sources.get(name, name + '=').rstrip('=')}.{clean_name(n)}"
                 for name, model in self.models.items() for n, p in model.named_parameters()}
        self.assignment = assign_optimizers(roles, self.optimizers, self.schedulers, names)
        for role in roles:
            if role.name == "policy":
                role.tokenizer = self.tokenizer
        return roles

    @property
    def is_main(self) -> bool:
        acc = self.accelerator
        if acc is not None:
            return bool(acc.is_main_process)
        return DistContext().is_main

    def trainer_state(self, callback: Any, loop: LoopState) -> dict:
        acc = self.accelerator
        accel: dict = {"loop": loop.state_dict(), "extra_state": {k: v.state_dict() for k, v in self.extra_state.items()}}
        if acc is not None:
            scaler = getattr(acc, "scaler", None)
            accel["scaler"] = scaler.state_dict() if scaler is not None else None
            accel["accelerator_step"] = int(getattr(acc, "step", 0))
            accel["num_processes"] = int(getattr(acc, "num_processes", 1))
            accel["distributed_type"] = str(getattr(acc, "distributed_type", ""))
            accel["mixed_precision"] = str(getattr(acc, "mixed_precision", ""))
        state = {"framework": "accelerate" if acc is not None else "plain", "accelerate": accel,
                 "skyrl_step": int(callback.step)}
        if self.assignment.unowned_optimizers or self.assignment.unowned_schedulers:
            state["no_role"] = unowned_state(self.assignment)
        return state

    def apply_trainer_state(self, state: Mapping[str, Any], path: str = "") -> None:
        load_unowned_state(self.assignment, state.get("no_role"), path)
        accel = state.get("accelerate") or {}
        acc = self.accelerator
        if acc is not None:
            scaler = getattr(acc, "scaler", None)
            if scaler is not None and accel.get("scaler"):
                scaler.load_state_dict(accel["scaler"])
            if "accelerator_step" in accel and hasattr(acc, "step"):
                acc.step = int(accel["accelerator_step"])
        saved = accel.get("extra_state") or {}
        for name, obj in self.extra_state.items():
            if name in saved:
                obj.load_state_dict(saved[name])
            else:
                logger.warning("resume: the checkpoint holds no state for extra_state[%r]; left as is", name)


def _check_world(accelerator: Any) -> None:
    """Refuse a launcher world the loop does not see: every process would write as rank 0."""
    import os

    try:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    if accelerator is not None:
        running = int(getattr(accelerator, "num_processes", 1))
    else:
        running = DistContext().world_size
    if launched > 1 and running != launched:
        hint = (
            "On a machine without GPUs build Accelerator(cpu=True)." if accelerator is not None
            else "Call torch.distributed.init_process_group() before bind()."
        )
        raise ConfigError(
            f"bind(): the launcher started {launched} processes (WORLD_SIZE={launched}) but the loop runs as "
            f"{running} process(es), so every process would write the same checkpoints as rank 0. {hint}"
        )


def bind(callback: Any, accelerator: Any = None, **roles_and_state: Any) -> LoopState:
    """Bind ``callback`` to a hand-written loop and resume it. Collective: call on every rank.

    Args:
        callback: the :class:`~skyrl_callbacks.SkyRLCheckpoint`.
        accelerator: the ``accelerate.Accelerator`` (None for a plain torch loop; the process
            group, if any, is torch.distributed's world).
        policy: the policy model, as returned by ``accelerator.prepare`` (required; also
            accepted as ``actor=``, ``actor_model=``, ``policy_model=`` or ``model=``).
        critic: the critic (value) model, if any (also ``value_model=``, ``value_net=``,
            ``value_head=``).
        ref: a frozen reference model (also ``ref_model=``, ``reference=``, ``reward_model=``,
            ``rm=``); accepted for clarity, never saved.
        optimizers: optimizer(s) (``AcceleratedOptimizer`` or torch); each goes to the role
            whose parameters it updates.
        schedulers: LR scheduler(s) (``AcceleratedScheduler`` or torch).
        dataloader: the training dataloader (prepared or not); its position is saved.
        tokenizer: saved under ``policy/huggingface/`` and in HF exports.
        extra_state: ``{name: obj}`` of further objects with ``state_dict``/``load_state_dict``
            stored in ``trainer_state.pt`` (reward normalisers, KL controllers...).

    Returns:
        A :class:`LoopState`: ``.step`` is the last completed step (0 for a fresh run); the
        loop continues at ``.step + 1``.

    Raises:
        ConfigError: a missing policy, two keywords for one role (``policy=`` and ``actor=``),
            an unknown keyword, or an object of the wrong kind.
        CheckpointError: resuming failed (see :meth:`CheckpointManager.resume`).
    """
    import torch

    _check_world(accelerator)
    unknown = sorted(set(roles_and_state) - set(_BIND_KEYS))
    if unknown:
        raise ConfigError(f"bind(): unknown argument(s) {unknown}; valid: {', '.join(_BIND_KEYS)}.")
    given = {k: roles_and_state[k] for k in _MODEL_KEYS if roles_and_state.get(k) is not None}
    for key, obj in given.items():
        if key not in REF_ATTRS and not isinstance(obj, torch.nn.Module):
            role = "critic" if key in ROLE_ALIASES["critic"] else "policy"
            raise ConfigError(f"bind(): {key}= must be the {role} torch.nn.Module, got {type(obj).__name__}.")
    policy_keys = [k for k in (*ROLE_ALIASES["policy"], SOLE_POLICY_ATTR) if k in given]
    if len(policy_keys) > 1:  # choose_roles would take model= as a module of no role
        raise ConfigError(
            f"bind(): {policy_keys[0]}= and {policy_keys[1]}= both name the policy; pass only one of them.")
    choice = choose_roles(
        {k: _model_for_role(v) if isinstance(v, torch.nn.Module) else v for k, v in given.items()},
        label=lambda a: f"{a}=", fix=lambda role, keys: f"pass only one of {keys[0]}= and {keys[1]}= to bind()",
        sole_model=False, owner="bind()",
    )
    if "policy" not in choice.attrs:
        raise ConfigError(
            f"bind(): policy= must be the policy torch.nn.Module (or actor=, model=...); got "
            f"{', '.join(f'{k}=' for k in given) or 'no model'}.")
    models = {role: _model_for_role(given[key]) for role, key in choice.attrs.items()}
    exit_on_preemption = roles_and_state.get("exit_on_preemption", True)
    if not isinstance(exit_on_preemption, bool):
        raise ConfigError(
            f"bind(): exit_on_preemption={exit_on_preemption!r} must be true (ckpt.step() exits the process with "
            f"code 0 after saving a preempted step) or false (check state.should_stop and leave the loop)."
        )
    extra_state = dict(roles_and_state.get("extra_state") or {})
    for name, obj in extra_state.items():
        if not _has_state(obj):
            raise ConfigError(f"bind(): extra_state[{name!r}] ({type(obj).__name__}) has no state_dict/load_state_dict.")
    optimizers = [unwrap_optimizer(o) for o in _as_list(roles_and_state.get("optimizers"))]
    schedulers = [unwrap_scheduler(s) for s in _as_list(roles_and_state.get("schedulers"))]
    binding = _Binding(
        accelerator,
        models,
        optimizers,
        schedulers,
        roles_and_state.get("tokenizer"),
        _data_state(roles_and_state.get("dataloader")),
        extra_state,
        exit_on_preemption,
        sources={role: f"{key}=" for role, key in choice.attrs.items()},
        not_saved={f"{key}=": why for key, why in choice.not_saved.items()},
    )
    loop = LoopState(callback)
    loop.data = binding.data
    callback._binding = binding
    callback.loop_state = loop
    callback.data_state = binding.data
    callback.manager = CheckpointManager(callback.config, DistContext())
    callback.step = 0
    callback.resumed_step = None

    _restore_signal_handlers(getattr(callback, "_binding_previous", None))  # a second bind() on this callback
    _announce_roles(binding)
    callback.manager.acquire_lock()  # fail before training if another live run owns ckpt_path
    if callback.config.preemption_signals:
        _install_signal_handlers(binding, callback.config.preemption_signals)
    callback._binding_previous = binding
    try:
        state = callback.manager.resume(binding.roles)
    except BaseException:
        _restore_signal_handlers(binding)
        raise
    if state is not None:
        binding.apply_trainer_state(state.trainer_state, state.path)
        if binding.data is not None:
            if binding.data.resumable and state.data_state:
                binding.data.load_state_dict(state.data_state)
            elif binding.is_main and not state.data_state:
                logger.warning("resume: %s holds no dataloader state; the data order restarts", state.path)
        callback.step = int(state.trainer_state.get("skyrl_step", state.step))
        callback.resumed_step = int(callback.step)
        _note_existing_export(callback.manager, int(callback.step))
        loop.resumed_from = state.path
        if state.rng is not None:
            restore_rng(state.rng)  # last: nothing after it may draw
        _say(binding, f"[skyrl-ckpt] resumed from {state.path}; continuing at step {int(callback.step) + 1}")
    return loop


def _announce_roles(binding: _Binding) -> None:
    """Main process: the mapping line, and a warning for each optimizer outside the rules."""
    if not binding.is_main:
        return
    _say(binding, describe_roles(binding.roles, binding.sources, binding.not_saved, binding.optimizers,
                                 binding.schedulers, binding.assignment))
    for line in binding.assignment.warnings:
        warnings.warn(f"[skyrl-ckpt] {line}", UserWarning, stacklevel=4)


def _install_signal_handlers(binding: _Binding, names: Sequence[str]) -> None:
    """Record the configured preemption signals in ``binding`` (main thread only).

    The handler only sets a flag: saving inside a signal handler could run a collective while
    the loop is in another one. :func:`step` acts on the flag at the end of the iteration.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        logger.warning("bind() runs outside the main thread: preemption signals are not handled")
        return
    for name in names:
        signum = getattr(signal, name)

        def handler(sig: int, frame: Any, _name: str = name) -> None:
            if binding.signal_received is None:
                binding.signal_received = _name

        binding.previous_handlers[signum] = signal.signal(signum, handler)


def _restore_signal_handlers(binding: Optional[_Binding]) -> None:
    import signal

    if binding is None:
        return
    for signum, previous in binding.previous_handlers.items():
        try:
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        except (ValueError, TypeError):  # not the main thread
            pass
    binding.previous_handlers = {}


def _preemption_agreed(binding: _Binding) -> Optional[str]:
    """The preemption signal if any rank received one (every rank gets the same answer). Collective."""
    import torch
    import torch.distributed as tdist

    mine = binding.signal_received
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return mine
    acc = binding.accelerator
    if acc is not None:
        device = torch.device(acc.device)
    elif "nccl" in str(tdist.get_backend()).lower() and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    flag = torch.tensor([0 if mine is None else 1], dtype=torch.int32, device=device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return None
    return mine or "signal"


def _note_existing_export(manager: CheckpointManager, step: int) -> None:
    """After a resume at step N: when N's export is already published, finish() need not redo it."""
    from skyrl_callbacks import rules

    def check() -> bool:
        store = manager.export_storage
        return store.is_committed(store.child(rules.step_dirname(step), "policy"))

    try:
        if manager.dist.broadcast(manager.dist.run_on_main("find export", check)):
            manager.last_exported_step = step
    except Exception:  # noqa: BLE001 - an unreadable export store only costs a re-export
        logger.debug("could not check for the export of step %d", step, exc_info=True)


def _require(callback: Any) -> "_Binding":
    binding = getattr(callback, "_binding", None)
    if binding is None or callback.manager is None:
        raise ConfigError(
            "SkyRLCheckpoint.step()/finish() need a bound loop: call ckpt.bind(accelerator, policy=..., ...) "
            "once before the first training step (with Lightning, pass the callback to Trainer(callbacks=[...]))."
        )
    return binding


def step(callback: Any, step: Optional[int] = None) -> Optional[SaveResult]:
    """End one training iteration: count it, then save/export as the intervals say. Collective.

    Args:
        callback: the bound :class:`~skyrl_callbacks.SkyRLCheckpoint`.
        step: the step just completed (default: the previous one + 1).

    Returns:
        The :class:`~skyrl_callbacks.SaveResult` when this step saved a checkpoint, else None.
    """
    binding = _require(callback)
    callback.step = int(callback.step) + 1 if step is None else int(step)
    current = int(callback.step)
    manager: CheckpointManager = callback.manager
    # an async save started at an earlier step commits once every rank has written it
    _report(callback, binding, manager.poll())
    preempted = _preemption_agreed(binding) if binding.previous_handlers else None
    result = None
    if manager.should_save(current) or (preempted and manager.last_saved_step != current):
        result = _save(callback, binding, current, blocking=bool(preempted))
    if manager.should_export(current):
        _export(callback, binding, current)
    if result is None and not preempted and manager.wants_prewarm:
        manager.prewarm(binding.roles)  # the async saves' buffers, allocated in the background
    if preempted:
        loop = callback.loop_state
        loop.preempted = preempted
        _say(binding, f"[skyrl-ckpt] preempted ({preempted}): step {current} is saved; stopping. Rerun to resume.")
        _restore_signal_handlers(binding)
        manager.close()  # the run stops here: release the ckpt_path lock
        if binding.exit_on_preemption:
            raise Preempted(preempted, current)
    return result


def finish(callback: Any) -> Optional[SaveResult]:
    """End the loop: save the last step (unless already saved) and export it. Collective.

    Honours ``save_on_train_end``; the export happens when ``hf_save_interval`` > 0.

    Returns:
        The final :class:`~skyrl_callbacks.SaveResult`, or None when nothing was saved now.
    """
    binding = _require(callback)
    manager: CheckpointManager = callback.manager
    current = int(callback.step)
    result = None
    try:
        if not callback.config.save_on_train_end or current <= 0:
            return None
        if callback.loop_state is not None and callback.loop_state.should_stop:
            return None  # preempted: that step is saved; no final export of an unfinished run
        if manager.last_saved_step != current:
            result = _save(callback, binding, current)
        committed = manager.wait()  # the run ends with its last save committed (async_save)
        _report(callback, binding, committed)
        if callback.config.hf_save_interval > 0 and manager.last_exported_step != current:
            _export(callback, binding, current)
        return committed if committed is not None and committed.step == current else result
    finally:
        _restore_signal_handlers(binding)
        manager.close()  # the run is over: release the ckpt_path lock


def _save(callback: Any, binding: _Binding, current: int, blocking: bool = False) -> SaveResult:
    _report(callback, binding, callback.manager.wait())  # at most one in flight: commit and report it first
    t0 = time.perf_counter()
    data_state = binding.data.state_dict() if binding.data is not None else None
    result = callback.manager.save(
        current, binding.roles, trainer_state=binding.trainer_state(callback, callback.loop_state), data_state=data_state,
        blocking=blocking,
    )
    _report(callback, binding, result, time.perf_counter() - t0)
    return result


def _report(callback: Any, binding: _Binding, result: Optional[SaveResult], seconds: Optional[float] = None) -> None:
    """Print and log a save (a started async save logs its stall; its commit logs the rest)."""
    if result is None:
        return
    callback.last_save = result
    from skyrl_callbacks.callback import summary_line

    _say(binding, summary_line(result, result.seconds_total if seconds is None else seconds))
    acc = binding.accelerator
    if acc is not None and getattr(acc, "trackers", None):
        try:
            acc.log(result.as_metrics(), step=result.step)
        except Exception:  # noqa: BLE001 - logging is best effort
            logger.debug("accelerator.log of the checkpoint metrics failed", exc_info=True)


def _export(callback: Any, binding: _Binding, current: int) -> str:
    t0 = time.perf_counter()
    policy = next(r for r in binding.roles if r.name == "policy")
    dtype = callback.export_dtype
    if isinstance(dtype, str):
        import torch

        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "fp32": torch.float32, "float32": torch.float32}[dtype]
    path = callback.manager.export_hf(current, policy, max_shard_size=callback.max_shard_size, dtype=dtype)
    _say(binding, f"[skyrl-ckpt] step {current}: HF export of policy in {time.perf_counter() - t0:.2f} s -> {path}")
    return path


def _say(binding: _Binding, line: str) -> None:
    """A user-facing line on the main process, above a live tqdm bar if there is one."""
    logger.debug(line)
    if not binding.is_main:
        return
    try:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stdout)
    except ImportError:  # pragma: no cover - tqdm ships with transformers/lightning/accelerate
        print(line, flush=True)
    sys.stdout.flush()
