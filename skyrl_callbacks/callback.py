"""SkyRLCheckpoint: one callback for Lightning (hooks) and Accelerate loops (``bind``/``step``).

``Trainer(callbacks=[SkyRLCheckpoint(cfg)])`` saves in SkyRL's layout on
``on_train_batch_end``, resumes by itself inside ``trainer.fit`` (no ``ckpt_path``
argument), exports HF weights and saves a final checkpoint at the end of ``fit``.

The step is SkyRL's global step, one completed training iteration:

* automatic optimization: ``trainer.global_step``; with gradient accumulation the rules are
  applied on accumulation boundaries only (when ``global_step`` moved);
* manual optimization (RL modules stepping a policy and a critic optimizer): Lightning's
  ``global_step`` counts every ``optimizer.step()`` of every optimizer, so the step is the
  number of completed training batches instead.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from skyrl_callbacks.config import CheckpointConfig
from skyrl_callbacks.dist import DistContext
from skyrl_callbacks.manager import CheckpointManager, SaveResult
from skyrl_callbacks.rng import restore_rng
from skyrl_callbacks.safe_load import to_portable
from skyrl_callbacks.roles import (
    REF_ATTRS,
    OptimizerAssignment,
    Role,
    RoleChoice,
    assign_optimizers,
    clean_name,
    describe_roles,
    discover_roles,
    load_unowned_state,
    module_role_choice,
    outside_roles_state,
    unowned_state,
)

try:  # Lightning is optional: without it SkyRLCheckpoint still drives Accelerate/plain loops
    from lightning.pytorch import Callback as _CallbackBase
except ImportError:  # pragma: no cover - exercised in a venv without lightning
    _CallbackBase = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    import lightning.pytorch as pl

logger = logging.getLogger(__name__)

__all__ = ["SkyRLCheckpoint"]


class _StepValue(int):
    """``SkyRLCheckpoint.step``: the current step (an ``int``) that, called, ends an iteration
    of a bound (Accelerate/plain) loop. Pickles and copies as a plain ``int``."""

    def __new__(cls, value: int, owner: "SkyRLCheckpoint") -> "_StepValue":
        obj = super().__new__(cls, value)
        obj._owner = owner
        return obj

    def __call__(self, step: Optional[int] = None) -> Any:
        """Call once after every completed training iteration of a bound loop."""
        from skyrl_callbacks.integrations import accelerate as _acc

        return _acc.step(self._owner, step)

    def __reduce__(self) -> tuple:
        return (int, (int(self),))

    def __repr__(self) -> str:
        return int.__repr__(self)


class _StepAttribute:
    """Data descriptor behind ``SkyRLCheckpoint.step``: stores a plain int, reads a :class:`_StepValue`."""

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return _StepValue(obj.__dict__.get("_step_count", 0), obj)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__["_step_count"] = int(value)


class SkyRLCheckpoint(_CallbackBase):
    """Checkpoint a Lightning run the way SkyRL does, with exact resume.

    Args:
        config: a :class:`~skyrl_callbacks.CheckpointConfig`, a dict of its keys, a YAML path,
            or an OmegaConf node (e.g. SkyRL's ``cfg.trainer``).
        roles: role name -> attribute of the LightningModule (dotted paths allowed; ``None``
            turns a role off). Roles not named are found by name: ``policy``/``actor``/
            ``actor_model``/``policy_model`` (or ``model``, when it is the only trainable
            module) and ``critic``/``value_model``/``value_net``/``value_head``; two candidates
            for one role are refused. A module matching no role name is saved whole as ``policy``.
        ref_attrs: attributes holding reference or reward models, never saved (modules whose
            parameters are all frozen are not saved either).
        tokenizer: saved under ``huggingface/`` and in HF exports (default: the module's
            ``tokenizer`` attribute, if any).
        export_dtype: dtype of HF exports (default: the training dtype).
        max_shard_size: largest safetensors shard of an HF export (``"5GB"``).
    """

    def __init__(
        self,
        config: Any = None,
        *,
        roles: Optional[Mapping[str, str]] = None,
        ref_attrs: Sequence[str] = REF_ATTRS,
        tokenizer: Any = None,
        export_dtype: Any = None,
        max_shard_size: Any = "5GB",
    ) -> None:
        super().__init__()
        self.config = CheckpointConfig.coerce(config)
        self.role_attrs = dict(roles) if roles is not None else None
        self.ref_attrs = tuple(ref_attrs)
        self.tokenizer = tokenizer
        self.export_dtype = export_dtype
        self.max_shard_size = max_shard_size
        self.manager: Optional[CheckpointManager] = None
        self.step = 0
        self._last_global_step: Optional[int] = None
        self.last_save: Optional[SaveResult] = None
        self.resumed_step: Optional[int] = None
        #: the roles decided at the start of ``fit`` (kept for the whole run)
        self._role_choice: Optional[RoleChoice] = None
        self._assignment: Optional[OptimizerAssignment] = None

    @property
    def state_key(self) -> str:
        return "SkyRLCheckpoint"

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _fsdp1_root(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Any:
        """The FSDP1 ``FullyShardedDataParallel`` root that wraps the whole ``pl_module``
        (Lightning's ``FSDPStrategy``: ``trainer.strategy.model``), or None."""
        root = getattr(getattr(trainer, "strategy", None), "model", None)
        if root is None or root is pl_module:
            return None
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
        except ImportError:  # pragma: no cover - torch without distributed
            return None
        if isinstance(root, FullyShardedDataParallel) and root.module is pl_module:
            return root
        return None

    def _roles(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[Role]:
        # Under Lightning's FSDPStrategy the LightningModule is wrapped whole in one FSDP1 root:
        # its policy/critic hold flat shard views, so each role is a view on the root (keys under
        # "policy." etc.), saved and loaded through the root. With use_orig_params=True (the
        # strategy's default) the optimizers hold the same Parameter objects as pl_module, so the
        # assignment by parameter identity below still works.
        roles = discover_roles(pl_module, root=self._fsdp1_root(trainer, pl_module), choice=self._choice(pl_module))
        schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
        names = {id(p): f"module.{clean_name(n)}" for n, p in pl_module.named_parameters()}
        self._assignment = assign_optimizers(roles, trainer.optimizers, schedulers, names)
        tok = self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
        for role in roles:
            if role.name == "policy":
                role.tokenizer = tok
        return roles

    def _choice(self, pl_module: "pl.LightningModule") -> RoleChoice:
        """Which attribute is which role, decided once per ``fit`` (see :mod:`skyrl_callbacks.roles`)."""
        if self._role_choice is None:
            self._role_choice = module_role_choice(pl_module, self.role_attrs, self.ref_attrs)
        return self._role_choice

    def _announce_roles(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", roles: list[Role]) -> None:
        """Rank 0: the mapping line, and a warning for each optimizer or parameter outside the rules."""
        if not trainer.is_global_zero:
            return
        import warnings

        choice = self._choice(pl_module)
        sources = {name: (f"module.{attr}" if attr else f"module (whole, {type(pl_module).__name__})")
                   for name, attr in choice.attrs.items()}
        not_saved = {f"module.{attr}": why for attr, why in choice.not_saved.items()}
        schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
        unowned = [f"module.{a}" for a in choice.unowned_attrs()]
        _announce(describe_roles(roles, sources, not_saved, trainer.optimizers, schedulers, self._assignment, unowned))
        if choice.unowned:
            attrs = choice.unowned_attrs()
            names = ", ".join(f"module.{n}" for n in choice.unowned[:8]) + (" ..." if len(choice.unowned) > 8 else "")
            warnings.warn(
                f"[skyrl-ckpt] trainable parameters outside every role: {names} (attribute(s) "
                f"{', '.join(attrs)}). They are saved in trainer_state.pt, not under policy/ or critic/, so "
                f"SkyRL's tools and HF exports do not see them. If {attrs[0]!r} is the policy or the critic, say so: "
                f"SkyRLCheckpoint(cfg, roles={{'policy': {attrs[0]!r}}}).",
                UserWarning, stacklevel=2)
        for line in (self._assignment.warnings if self._assignment is not None else []):
            warnings.warn(f"[skyrl-ckpt] {line}", UserWarning, stacklevel=2)

    def _current_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Optional[int]:
        """SkyRL's step after this batch, or None when this batch did not complete an iteration."""
        if pl_module.automatic_optimization:
            gs = trainer.global_step
            if gs == self._last_global_step:
                return None  # gradient accumulation: no optimizer step in this batch
            self._last_global_step = gs
            self.step = gs
            return gs
        self.step += 1
        return self.step

    def _extra_module_state(self, pl_module: "pl.LightningModule", roles: list[Role]) -> dict:
        """Parameters/buffers of the module that belong to no role (and to no reference model);
        frozen modules keep only their buffers."""
        choice = self._choice(pl_module)
        if any(r.is_view for r in roles):
            if len(roles) == 1 and roles[0].include_prefix == "":
                return {}
            return self._extra_buffers_under_root(pl_module, choice.role_prefixes() + choice.unsaved_prefixes())
        return outside_roles_state(pl_module, choice)

    def _check_fsdp1_root(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", roles: list[Role]) -> None:
        """Refuse, before training, what cannot be saved under an FSDP1 root."""
        from skyrl_callbacks.errors import ConfigError
        from skyrl_callbacks.writers.fsdp import fsdp1_optimizer_coverage

        self._extra_module_state(pl_module, roles)  # trainable parameters outside every role
        problems = fsdp1_optimizer_coverage(roles[0].model, list(trainer.optimizers))
        if problems:
            raise ConfigError(
                f"strategy: under Lightning's FSDPStrategy, FSDP1 can only save an optimizer that holds all trainable "
                f"parameters of each FSDP unit it touches: {'; '.join(problems[:3])}. Give the policy and critic FSDP "
                f"units of their own, e.g. FSDPStrategy(auto_wrap_policy={{<policy class>, <critic class>}}) (layer "
                f"classes may be added), or use one optimizer for all parameters."
            )

    @staticmethod
    def _extra_buffers_under_root(pl_module: "pl.LightningModule", prefixes: tuple) -> dict:
        """Under an FSDP1 root ``pl_module.state_dict()`` is a collective (or hands out flat shard
        views), so only buffers (never sharded) outside the roles are kept; a trainable parameter
        outside every role cannot be saved this way and is refused."""
        from skyrl_callbacks.errors import ConfigError
        from skyrl_callbacks.roles import clean_name

        stray = [clean_name(n) for n, p in pl_module.named_parameters() if p.requires_grad]
        stray = [n for n in stray if not n.startswith(prefixes)]
        if stray:
            raise ConfigError(
                f"roles: under Lightning's FSDPStrategy the trainable parameters {stray[:8]} of "
                f"{type(pl_module).__name__} belong to no role (roles are the attributes "
                f"{[p[:-1] for p in prefixes]}), so SkyRLCheckpoint cannot save them. Move them into the policy "
                f"(or critic) module, or map a role to the module holding them with SkyRLCheckpoint(roles=...)."
            )
        return {clean_name(n): b.detach().cpu().clone() for n, b in pl_module.named_buffers()
                if not clean_name(n).startswith(prefixes)}

    def _trainer_state(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", roles: list[Role]) -> tuple[dict, Any]:
        loop_sd = trainer.fit_loop.state_dict()
        data_state = loop_sd.get("state_dict", {}).pop("combined_loader", None)
        callbacks = {}
        for cb in trainer.callbacks:
            if cb is self:
                continue
            try:
                state = cb.state_dict()
            except Exception:  # noqa: BLE001 - a callback without state
                continue
            if state:
                callbacks[cb.state_key] = state
        extras: dict = {}
        pl_module.on_save_checkpoint(extras)
        lightning_state = {
            "fit_loop": loop_sd,
            "callbacks": callbacks,
            "trainer_global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "module_extra_state": self._extra_module_state(pl_module, roles),
            "module_checkpoint": extras,
            "hparams": to_portable(dict(getattr(pl_module, "hparams", {}) or {})),  # recorded, not restored
            "automatic_optimization": pl_module.automatic_optimization,
        }
        generators = _module_generators(pl_module)
        if generators:
            lightning_state["module_generators"] = {k: g.get_state() for k, g in generators.items()}
        state = {"framework": "lightning", "lightning": lightning_state, "skyrl_step": int(self.step)}
        assignment = self._assignment
        if assignment is not None and (assignment.unowned_optimizers or assignment.unowned_schedulers):
            state["no_role"] = unowned_state(assignment)
        return state, data_state

    # ------------------------------------------------------------------ hooks
    def _new_manager(self) -> CheckpointManager:
        manager = CheckpointManager(self.config, DistContext())
        # Lightning runs the forward/backward closure inside optimizer.step(), after torch's step
        # pre-hooks: deferred snapshot copies are awaited in on_before_optimizer_step instead, so
        # they overlap the next step's forward and backward
        manager.step_hooks = False
        return manager

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and self.manager is None:
            self.manager = self._new_manager()

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        # async_overlap_copy: the in-flight snapshot's copies must be made before the weights change
        if self.manager is not None:
            self.manager.wait_snapshot()

    def _install_preemption_handlers(self) -> None:
        """Flag preemption on the configured signals (called after Lightning set its handlers).

        The handler only sets a flag; every rank agrees on it at the end of the step, outside
        the handler. Lightning's own SIGTERM handler is replaced while ``fit`` runs: in 2.6 it
        runs a collective broadcast inside the signal handler, which deadlocks DDP ranks that
        are in another collective at that moment. The previous handlers come back at teardown.
        """
        import signal
        import threading

        self._preempted = None
        self._previous_handlers: dict = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.config.preemption_signals:
            signum = getattr(signal, name)

            def handler(sig: int, frame: Any, _name: str = name) -> None:
                self._preempted = _name

            self._previous_handlers[signum] = signal.signal(signum, handler)

    def _restore_signal_handlers(self) -> None:
        import signal

        for signum, previous in (getattr(self, "_previous_handlers", None) or {}).items():
            try:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # not the main thread
                pass
        self._previous_handlers = {}

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.config.preemption_signals:
            self._install_preemption_handlers()
        _fetch_on_demand(trainer)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._restore_signal_handlers()
        if self.manager is not None:
            self.manager.close()

    def _preemption_requested(self, trainer: "pl.Trainer") -> Optional[str]:
        """The signal that asked this run to stop (any rank), agreed on by every rank."""
        mine = getattr(self, "_preempted", None)
        if trainer.world_size > 1:
            return "signal" if trainer.strategy.reduce_boolean_decision(mine is not None, all=False) else None
        return mine

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.manager is None:
            self.manager = self._new_manager()
        self.manager.dist = DistContext()  # the process group exists now
        self._role_choice = None  # decided again for this fit (the module may be another one)
        roles = self._roles(trainer, pl_module)
        if any(r.is_view for r in roles):
            self._check_fsdp1_root(trainer, pl_module, roles)
        self._announce_roles(trainer, pl_module, roles)
        self.manager.acquire_lock()  # fail before training if another live run owns ckpt_path
        state = self.manager.resume(roles)
        if state is None:
            self.step = 0
            self._last_global_step = trainer.global_step
            return
        lt = state.trainer_state.get("lightning", {})
        loop_sd = copy.deepcopy(lt.get("fit_loop"))
        if loop_sd is not None:
            if isinstance(state.data_state, list):
                data_states = state.data_state
                if (loop_sd.get("epoch_loop.batch_progress") or {}).get("is_last_batch"):
                    # Saved on the last batch of an epoch: Lightning restarts with the next epoch
                    # and uses the iterator it creates right away, so the loader must start that
                    # epoch (not yield the empty rest of this one, which would skip an epoch).
                    from skyrl_callbacks.data import finish_epoch_state

                    next_epoch = int(lt.get("epoch", 0)) + 1
                    data_states = [finish_epoch_state(s, next_epoch) for s in data_states]
                loop_sd.setdefault("state_dict", {})["combined_loader"] = data_states
            trainer.fit_loop.load_state_dict(loop_sd)
        by_key = {cb.state_key: cb for cb in trainer.callbacks}
        for key, cb_state in (lt.get("callbacks") or {}).items():
            if key in by_key:
                by_key[key].load_state_dict(cb_state)
        extra = lt.get("module_extra_state") or {}
        if extra and any(r.is_view for r in roles):
            _load_buffers(pl_module, extra)  # no load_state_dict inside an FSDP1 root (collective hooks)
        elif extra:
            pl_module.load_state_dict(extra, strict=False)
        if lt.get("module_checkpoint"):
            pl_module.on_load_checkpoint(lt["module_checkpoint"])
        generators = _module_generators(pl_module)
        for name, gen_state in (lt.get("module_generators") or {}).items():
            if name in generators:
                generators[name].set_state(gen_state)
        load_unowned_state(self._assignment, state.trainer_state.get("no_role"), state.path)
        self.step = int(state.trainer_state.get("skyrl_step", state.step))
        self._last_global_step = trainer.global_step
        self.resumed_step = self.step
        # RNG states go back before Lightning creates the train iterator: at an epoch boundary
        # that iterator starts the next epoch and must draw what the original run drew there.
        if state.rng is not None:
            restore_rng(state.rng)
        if trainer.is_global_zero:
            _announce(f"[skyrl-ckpt] resumed from {state.path}; continuing at step {self.step + 1}")

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self._current_step(trainer, pl_module)
        if step is None or self.manager is None:
            return
        # an async save started at an earlier step commits once every rank has written it
        self._report(trainer, pl_module, self.manager.poll())
        save = self.manager.should_save(step)
        export = self.manager.should_export(step)
        preempted = self._preemption_requested(trainer) if self.config.preemption_signals else None
        roles = None
        if save or export or preempted:
            roles = self._roles(trainer, pl_module)
            if save or (preempted and self.manager.last_saved_step != step):
                self._save(trainer, pl_module, roles, step, blocking=bool(preempted))
            if export:
                self._export(roles, step)
        if not save and not preempted and self.manager.wants_prewarm:
            # after the first optimizer step: the async saves' buffers are allocated in the background
            self.manager.prewarm(roles or self._roles(trainer, pl_module))
        if preempted:
            self._report(trainer, pl_module, self.manager.wait())
            # The step is committed: stop like a finished run (exit code 0) instead of letting
            # Lightning raise SIGTERMException after this batch.
            _announce(f"[skyrl-ckpt] preempted ({preempted}): step {step} is saved; stopping. Rerun to resume.")
            trainer.should_stop = True
            connector = getattr(trainer, "_signal_connector", None)
            if connector is not None:
                connector.received_sigterm = False
            self._stopped_by_preemption = True

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.manager is None or not self.config.save_on_train_end or self.step <= 0:
            return
        if getattr(self, "_stopped_by_preemption", False):
            return  # saved at the preempted step; no final export of an unfinished run
        roles = None
        if self.manager.last_saved_step != self.step:
            roles = self._roles(trainer, pl_module)
            self._save(trainer, pl_module, roles, self.step)
        if self.config.hf_save_interval > 0 and self.manager.last_exported_step != self.step:
            self._export(roles or self._roles(trainer, pl_module), self.step)
        self._report(trainer, pl_module, self.manager.wait())  # the run ends with its last save committed

    # ------------------------------------------------------------------ actions
    def _save(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", roles: list[Role], step: int,
              blocking: bool = False) -> None:
        # at most one save in flight: commit (and report) the previous one first
        self._report(trainer, pl_module, self.manager.wait())
        t0 = time.perf_counter()
        trainer_state, data_state = self._trainer_state(trainer, pl_module, roles)
        result = self.manager.save(step, roles, trainer_state=trainer_state, data_state=data_state, blocking=blocking)
        self._report(trainer, pl_module, result, time.perf_counter() - t0)

    def _report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", result: Optional[SaveResult],
                seconds: Optional[float] = None) -> None:
        """Print and log a save (a started async save logs its stall; its commit logs the rest)."""
        if result is None:
            return
        self.last_save = result
        if trainer.is_global_zero:
            _print_summary(trainer, result, result.seconds_total if seconds is None else seconds)
        if trainer.loggers:
            try:
                pl_module.log_dict(result.as_metrics(), on_step=True, on_epoch=False, rank_zero_only=True)
            except Exception:  # noqa: BLE001 - logging is best effort (e.g. outside a loop)
                for lg in trainer.loggers:
                    lg.log_metrics(result.as_metrics(), step=result.step)

    def _export(self, roles: list[Role], step: int) -> None:
        policy = next((r for r in roles if r.name == "policy"), roles[0])
        dtype = self.export_dtype
        if isinstance(dtype, str):
            import torch

            dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                     "fp32": torch.float32, "float32": torch.float32}[dtype]
        self.manager.export_hf(step, policy, max_shard_size=self.max_shard_size, dtype=dtype)

    # ------------------------------------------------------------------ Accelerate / plain loops
    def bind(self, accelerator: Any = None, **roles_and_state: Any) -> Any:
        """Bind to a hand-written (Accelerate) loop and resume; see
        :func:`skyrl_callbacks.integrations.accelerate.bind` for the arguments."""
        from skyrl_callbacks.integrations import accelerate as _acc

        return _acc.bind(self, accelerator, **roles_and_state)

    #: The current SkyRL step (an ``int``); *called* in a bound loop, ``ckpt.step()`` ends an
    #: iteration: it counts it and saves/exports when the intervals say so (see
    #: :func:`skyrl_callbacks.integrations.accelerate.step`).
    step = _StepAttribute()

    def finish(self) -> Any:
        """Call once at the end of a bound loop: final checkpoint and export."""
        from skyrl_callbacks.integrations import accelerate as _acc

        return _acc.finish(self)

    # ------------------------------------------------------------------ callback state
    def state_dict(self) -> dict:
        return {"step": int(self.step)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = int(state_dict.get("step", self.step))


def _fetch_on_demand(trainer: "pl.Trainer") -> None:
    """Stop Lightning from fetching a batch ahead from a loader without a length.

    For such loaders (``IterableDataset`` rollouts) Lightning keeps one batch in hand to learn
    that the epoch ended, so at ``on_train_batch_end`` of step N the batch of step N+1 has already
    been drawn: a checkpoint would hold the loader's position, the RNG and the generators of the
    module one batch ahead of the step, and a resumed run would skip that batch. From
    ``on_train_start`` on, the batch fetched when the iterator was created is handed out first and
    every later one is fetched when the step asks for it (Lightning's own no-prefetch path: an
    epoch ends when the loader raises ``StopIteration``). Sized loaders are not prefetched anyway.

    Not with validation on: Lightning needs the look-ahead to run validation on the last batch
    of a finite epoch; a warning says that a resume is then one batch off.
    """
    try:
        from lightning.pytorch.loops.fetchers import _DataFetcher, _PrefetchDataFetcher
    except ImportError:  # pragma: no cover - another Lightning layout: keep its fetching
        return
    fetcher = getattr(getattr(trainer, "fit_loop", None), "_data_fetcher", None)
    if type(fetcher) is not _PrefetchDataFetcher or fetcher.length is not None:
        return
    if getattr(trainer, "enable_validation", False):
        if trainer.is_global_zero:
            import warnings

            warnings.warn(
                "[skyrl-ckpt] the train loader has no length and validation is on, so Lightning fetches each batch "
                "before the previous step ends: a checkpoint holds the data position and RNG states one batch ahead, "
                "and a resumed run is not bitwise the uninterrupted one. Give the loader a length, or validate from "
                "a callback, for an exact resume.", UserWarning, stacklevel=2)
        return

    global _ON_DEMAND_FETCHER
    if _ON_DEMAND_FETCHER is None:

        class _OnDemandDataFetcher(_PrefetchDataFetcher):
            def __next__(self) -> Any:
                if self.batches:  # fetched when the iterator was created, before on_train_start
                    return self.batches.pop(0)
                if self.done:
                    raise StopIteration
                return _DataFetcher.__next__(self)

        _ON_DEMAND_FETCHER = _OnDemandDataFetcher
    fetcher.__class__ = _ON_DEMAND_FETCHER
    fetcher.prefetch_batches = 0


_ON_DEMAND_FETCHER: Optional[type] = None


def _module_generators(module: Any) -> dict:
    """``torch.Generator`` attributes of the LightningModule (rollout samplers...): module state."""
    import torch

    return {k: v for k, v in vars(module).items() if isinstance(v, torch.Generator)}


def _load_buffers(module: Any, extra: dict) -> None:
    """Copy saved buffers (clean names) into ``module``'s buffers in place."""
    import torch

    buffers = {clean_name(n): b for n, b in module.named_buffers()}
    with torch.no_grad():
        for name, value in extra.items():
            buf = buffers.get(name)
            if buf is not None and isinstance(value, torch.Tensor) and buf.shape == value.shape:
                buf.copy_(value.to(device=buf.device, dtype=buf.dtype))
            else:
                logger.warning("module_extra_state: %s does not match a buffer of %s; not restored",
                               name, type(module).__name__)


def summary_line(result: SaveResult, seconds: float) -> str:
    """The one-line summary of a save: ``[skyrl-ckpt] step N: X MB in S s (G GB/s) -> path``."""
    if result.pending:
        return (
            f"[skyrl-ckpt] step {result.step}: state copied in {result.seconds_blocked:.2f} s; "
            f"writing in the background -> {result.path}"
        )
    if result.seconds_blocked < result.seconds_total - 1e-6:
        return (
            f"[skyrl-ckpt] step {result.step}: committed {result.bytes / 1e6:.1f} MB in {result.seconds_total:.2f} s "
            f"({result.gbps:.2f} GB/s; training blocked {result.seconds_blocked:.2f} s) -> {result.path}"
        )
    return (
        f"[skyrl-ckpt] step {result.step}: {result.bytes / 1e6:.1f} MB in {seconds:.2f} s "
        f"({result.gbps:.2f} GB/s) -> {result.path}"
    )


def _print_summary(trainer: "pl.Trainer", result: SaveResult, seconds: float) -> None:
    line = summary_line(result, seconds)
    bar = getattr(trainer, "progress_bar_callback", None)
    tqdm_bar = getattr(bar, "_train_progress_bar", None) if getattr(bar, "is_enabled", False) else None
    if tqdm_bar is not None and not getattr(tqdm_bar, "disable", True):
        logger.debug(line)
        tqdm_bar.write(line)  # above Lightning's live progress bar instead of through it
        return
    _announce(line)


def _announce(line: str) -> None:
    """A user-facing line: through Lightning's console logger (rank 0), and our logger."""
    logger.debug(line)
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(line)
