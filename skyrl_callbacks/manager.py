"""CheckpointManager: applies the rules, orders the phases of a save, runs resume.

Framework-agnostic: the Lightning callback and the Accelerate glue hand it a step, the
roles, and the trainer/dataloader state; it never imports a training framework.

Phases of a save (every rank calls :meth:`CheckpointManager.save`):

1. rank 0 picks a token and prepares the staging directory ``.tmp-global_step_N-<token>``;
2. every rank writes its files of every role (writers), rank 0 writes ``data.pt`` and
   ``trainer_state.pt`` (per-rank RNG and dataloader state gathered to it);
3. every rank checksums its own files; rank 0 writes the manifest and commits (one rename
   locally, manifest-last on object stores);
4. rank 0 moves the pointer ``latest_ckpt_global_step.txt`` (temp file + replace);
5. rank 0 applies retention and removes leftovers of interrupted saves.

An error on any rank in any phase is raised on every rank; the pointer is not moved and
the previous checkpoints are untouched.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from skyrl_callbacks import rules
from skyrl_callbacks.config import CheckpointConfig, check_export_path
from skyrl_callbacks.dist import DistContext
from skyrl_callbacks.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StorageError,
)
from skyrl_callbacks.lock import RunLock
from skyrl_callbacks.manifest import build_manifest, checksum_algo, read_manifest, verify_dir
from skyrl_callbacks.rng import capture_rng
from skyrl_callbacks.safe_load import to_portable, trusting, warn_non_portable
from skyrl_callbacks.storage import MANIFEST_FILE, Storage, make_local_stage, new_token, remove_local_stage
from skyrl_callbacks.verify import LoadVerification, part_classes, streamable
from skyrl_callbacks.verify import active as active_verification
from skyrl_callbacks.writers.base import HF_DIR, RoleWriter, select_writer
from skyrl_callbacks.writers.plain import torch_load, torch_save

if TYPE_CHECKING:
    from skyrl_callbacks.roles import Role

logger = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "SaveResult", "ResumeState", "DATA_FILE", "TRAINER_STATE_FILE"]

DATA_FILE = "data.pt"
TRAINER_STATE_FILE = "trainer_state.pt"
_SHARED_MARKER = ".skyrl_shared_storage_check"
#: error classes re-raised as themselves (with the async context added to the message)
_SIMPLE_ERRORS = (CheckpointError, StorageError, CorruptCheckpointError, IncompatibleCheckpointError)


@dataclass
class SaveResult:
    """What one save did, for the log line and the loggers."""

    step: int
    path: str
    bytes: int
    seconds_total: float
    seconds_blocked: float
    files: int
    #: an async save that is still being written (``bytes``/``seconds_total`` not known yet)
    pending: bool = False

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / self.seconds_total if self.seconds_total > 0 else 0.0

    def as_metrics(self) -> dict[str, float]:
        if self.pending:  # own keys: the commit of the previous save may be logged at the same step
            return {"ckpt/async_started_step": float(self.step), "ckpt/async_stall_seconds": self.seconds_blocked}
        return {
            "ckpt/step": float(self.step),
            "ckpt/bytes": float(self.bytes),
            "ckpt/seconds_total": self.seconds_total,
            "ckpt/seconds_blocked": self.seconds_blocked,
            "ckpt/gbps": self.gbps,
        }


@dataclass
class ResumeState:
    """What :meth:`CheckpointManager.load` restored and what the caller still has to apply."""

    step: int
    path: str
    trainer_state: dict = field(default_factory=dict)
    rng: Optional[dict] = None
    data_state: Any = None


@dataclass
class _SaveJob:
    """One save on its way: where it writes, and (async) the snapshot and the background future."""

    step: int
    roles: list
    t0: float
    final: str
    staging: str
    wstore: Storage
    wstaging: str
    parent: Optional[int]
    local_stage: Optional[str] = None
    snaps: Any = None
    gathered: Any = None
    trainer_state: Any = None
    bg: Any = None
    future: Any = None
    algo: Optional[str] = None
    seconds_blocked: float = 0.0
    t_written: float = 0.0
    t_done: float = 0.0
    #: set once every deferred copy of the snapshot is made (async_overlap_copy)
    copied: Any = None
    stagers: list = field(default_factory=list)

    def cleanup(self, storage: Storage) -> None:
        if self.local_stage is not None:
            remove_local_stage(self.local_stage)
            self.local_stage = None
        if not storage.is_local:
            storage.forget_written(self.final)


class CheckpointManager:
    """Save, export, retain and resume checkpoints in SkyRL's layout.

    Args:
        config: a :class:`CheckpointConfig` or anything :meth:`CheckpointConfig.coerce` takes.
        dist: collectives; defaults to ``torch.distributed``'s world when initialised.
    """

    def __init__(self, config: Any = None, dist: Optional[DistContext] = None) -> None:
        self.config = CheckpointConfig.coerce(config)
        self.dist = dist or DistContext()
        self.storage = self._open_storage(self.config.ckpt_path)
        self.export_storage = self._open_storage(self.config.export_path)
        self.last_saved_step: Optional[int] = None
        self.last_exported_step: Optional[int] = None
        self.resumed_from: Optional[str] = None
        self.last_result: Optional[SaveResult] = None
        self._storage_checked = False
        self._writers: dict[str, RoleWriter] = {}
        self._lock: Optional[RunLock] = RunLock(self.storage) if self.config.run_lock else None
        self._lock_taken = False
        #: steps this manager committed (a later save of the same step may replace them)
        self._own_steps: set[int] = set()
        #: the step resumed from a checkpoint outside ckpt_path (recorded as no parent: a new lineage here)
        self._outside_parent: Optional[int] = None
        #: ``{step dir: (manifest read, parent_step)}`` of committed checkpoints (manifests never change)
        self._parents: dict[str, tuple[bool, Optional[int]]] = {}
        #: during :meth:`resume`: manifests read to find the lineage, used once by ``load`` (not fetched again)
        self._manifests: Optional[dict[str, dict]] = None
        self._pending: Optional[_SaveJob] = None
        self._stagers: dict[str, Any] = {}
        self._pool: Any = None
        self._bg_dist: Optional[DistContext] = None
        self._prewarmed = False
        self._prewarm_thread: Optional[threading.Thread] = None
        #: rank 0's background deleter of retired checkpoints (retention) and the paths it has queued
        self._reaper: Any = None
        self._reaping: dict[str, Any] = {}
        #: register ``optimizer.step`` pre-hooks that wait for deferred copies (async_overlap_copy);
        #: the Lightning callback turns this off and waits in ``on_before_optimizer_step`` instead
        #: (Lightning runs the forward/backward closure inside ``optimizer.step``, after the hooks)
        self.step_hooks = True
        self._hooks: dict[int, Any] = {}

    def acquire_lock(self) -> None:
        """Own ``ckpt_path`` (rank 0) before writing; collective.

        Every save takes it; a training run takes it at its start to fail early. Reading
        (resume, verify) does not need it.

        Raises:
            CheckpointLockError: on every rank, when another live run owns ``ckpt_path``.
        """
        # Every rank must take the same branch (the acquisition is collective), so the flag is
        # kept on every rank, not read from the lock that only rank 0 holds.
        if self._lock is not None and not self._lock_taken:
            self.dist.run_on_main("lock ckpt_path", self._lock.acquire)
            self._lock_taken = True
            self.dist.run_on_main("check ckpt_path", self._check_pointer_is_a_file)

    def _check_pointer_is_a_file(self) -> None:
        """Fail before training, not at the first save's pointer move, when the pointer is a directory."""
        if self.storage.is_local and self.storage.isdir(self.pointer_path):
            raise StorageError(
                f"{self.pointer_path}: is a directory, but it must be the pointer file SkyRL writes (one line: the "
                f"step of the latest checkpoint). Move that directory away (it is not something this package "
                f"writes); the next save writes the pointer."
            )

    def close(self) -> None:
        """Commit an in-flight async save, then release the run lock and the staging buffers.
        Call when the run ends (the integrations do). Collective while a save is in flight."""
        try:
            self.wait()
        finally:
            if self._prewarm_thread is not None:
                self._prewarm_thread.join()
                self._prewarm_thread = None
            if self._lock is not None and self.dist.is_main:
                self._lock.release()
            self._lock_taken = False
            self._stagers.clear()
            for writer in self._writers.values():
                if getattr(writer, "_gpu_stager", None) is not None:
                    writer._gpu_stager = None  # the sync saves' pinned buffers go too
            for handle in self._hooks.values():
                handle.remove()
            self._hooks.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._reaper is not None:  # old checkpoints being deleted: finish before the run ends
                self._reaper.shutdown(wait=True)
                self._reaper = None
                self._reaping.clear()

    def _open_storage(self, url: str) -> Storage:
        return Storage(
            url,
            self.config.storage_options,
            local_tmp_dir=self.config.cloud_staging_dir,
            retry_deadline_s=self.config.cloud_retry_deadline_s,
        )

    # ------------------------------------------------------------------ layout
    def step_dir(self, step: int) -> str:
        return self.storage.child(rules.step_dirname(step))

    @property
    def pointer_path(self) -> str:
        return self.storage.child(rules.POINTER_FILE)

    def writer_for(self, role: "Role") -> RoleWriter:
        if role.name not in self._writers:
            self._writers[role.name] = select_writer(role.model, self.config)
        return self._writers[role.name]

    def committed_steps(self) -> list[int]:
        """Steps of the committed checkpoints under ``ckpt_path`` (ascending; local IO only)."""
        steps = []
        for name in self.storage.listdir(self.storage.root):
            step = rules.parse_step_dirname(name)
            if step is not None and self.storage.is_committed(self.storage.child(name)):
                steps.append(step)
        return sorted(steps)

    def read_pointer(self) -> Optional[int]:
        try:
            return rules.parse_pointer(self.storage.read_text(self.pointer_path))
        except StorageError:
            raise  # the store kept failing: not the same as "no pointer"
        except (FileNotFoundError, OSError, UnicodeDecodeError):
            return None

    # ------------------------------------------------------------------ rules
    def should_save(self, step: int) -> bool:
        return rules.should_save(step, self.config.ckpt_interval) and step != self.last_saved_step

    def should_export(self, step: int) -> bool:
        return rules.should_export(step, self.config.hf_save_interval) and step != self.last_exported_step

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        roles: Sequence["Role"],
        *,
        trainer_state: Optional[dict] = None,
        data_state: Any = None,
        blocking: bool = False,
    ) -> SaveResult:
        """Write, commit and publish the checkpoint of ``step``. Collective: call on every rank.

        With ``async_save`` (and not ``blocking``) this returns once the state is copied into
        host buffers (``SaveResult.pending``); a background thread writes it, and :meth:`poll`
        (every step), :meth:`wait`, the next save, :meth:`load` and :meth:`close` commit it.
        At most one save is in flight: a new save first waits for the previous one.

        Args:
            step: the global step (SkyRL's: completed training iterations).
            roles: the roles to save (``policy`` and optionally ``critic``).
            trainer_state: framework state to store in ``trainer_state.pt`` (rank 0's is used).
            data_state: this rank's dataloader state (gathered into ``data.pt``).
            blocking: save synchronously even when ``async_save`` is on (e.g. on preemption).

        Raises:
            CheckpointError: on every rank, when any rank failed; nothing committed is touched.
        """
        self.wait()  # at most one save in flight: the previous one commits first
        t0 = time.perf_counter()
        dist, storage = self.dist, self.storage
        self.acquire_lock()
        token = dist.broadcast(new_token())
        final = self.step_dir(step)
        if _basename(final) in self._being_removed():
            # the same step, retired by retention and still being deleted in the background (on an
            # object store the staging directory is the final one): let that finish first
            self.wait_retention()
        staging = storage.staging_dir(final, token)
        parent = self.last_saved_step
        dist.run_on_main("prepare staging", lambda: self._prepare(staging, final, step, parent))
        if not self._storage_checked:
            self._check_shared(staging)
            self._storage_checked = True
        # Object stores, cloud_upload="staged": every rank writes into its own local stage,
        # then uploads exactly the files it wrote (below); the manifest is still written last.
        job = _SaveJob(step=step, roles=list(roles), t0=t0, final=final, staging=staging,
                       wstore=storage, wstaging=staging, parent=parent)
        handed_off = False
        try:
            if not storage.is_local and self.config.cloud_upload == "staged":
                stage: list[str] = []
                dist.run(
                    "prepare local stage",
                    lambda: stage.append(make_local_stage(self.config.cloud_staging_dir, token, dist.rank)),
                )
                job.local_stage = stage[0]
                job.wstore = Storage(stage[0])
                job.wstaging = job.wstore.join(stage[0], rules.step_dirname(step))
            if self.config.async_save and not blocking:
                result = self._submit(job, trainer_state, data_state)
                handed_off = True
                return result
            return self._save_sync(job, trainer_state, data_state)
        finally:
            if not handed_off:
                job.cleanup(storage)

    def _save_sync(self, job: "_SaveJob", trainer_state: Optional[dict], data_state: Any) -> SaveResult:
        """Phases 2-5 of :meth:`save`: write (writers), checksum, upload, commit, retention."""
        dist = self.dist
        wstore, wstaging = job.wstore, job.wstaging

        def write_roles() -> list[str]:
            files: list[str] = []
            for role in job.roles:
                role_dir = wstore.join(wstaging, role.name)
                wstore.makedirs(role_dir)
                written = self.writer_for(role).save(wstore, role_dir, role, dist)
                files += [f"{role.name}/{f}" for f in written]
            return files

        my_files = dist.run("write model/optimizer state", write_roles)
        gathered = dist.gather_to_main({"rng": capture_rng(), "data": data_state})
        main_files = dist.run_on_main("write trainer state", lambda: self._write_main(job, trainer_state, gathered)) or []
        algo = checksum_algo()
        my_hashes = dist.run("checksum", lambda: wstore.describe_files(wstaging, my_files + main_files, algo))
        job.t_written = time.perf_counter()
        if wstore is not self.storage:
            # staged cloud save: each rank uploads its own files, concurrently, with retries
            dist.run("upload", lambda: self.storage.upload_files(wstaging, job.final, my_files + main_files))
        job.t_done = time.perf_counter()
        return self._publish(job, my_hashes, algo, blocked=True)

    def _write_main(self, job: "_SaveJob", trainer_state: Optional[dict], gathered: Optional[list]) -> list[str]:
        """Rank 0: ``huggingface/`` metadata, ``data.pt`` and ``trainer_state.pt``."""
        wstore, wstaging, dist = job.wstore, job.wstaging, self.dist
        files = []
        for role in job.roles:
            files += self._write_hf_dir(wstore, wstore.join(wstaging, role.name, HF_DIR), role, f"{role.name}/{HF_DIR}")
        gathered = gathered or []
        data = {"format": "skyrl-callbacks", "world_size": dist.world_size, "per_rank": [g["data"] for g in gathered]}
        warn_non_portable(data, DATA_FILE, "")  # what we write must load weights-only
        torch_save(wstore, wstore.join(wstaging, DATA_FILE), data)
        state = dict(trainer_state or {})
        state.update(
            global_step=int(job.step),
            config=to_portable(self.config.to_dict()),
            world_size=dist.world_size,
            rng_per_rank=[g["rng"] for g in gathered],
            strategies={r.name: self.writer_for(r).kind for r in job.roles},
            roles=[r.name for r in job.roles],
        )
        warn_non_portable(state, TRAINER_STATE_FILE, "")
        torch_save(wstore, wstore.join(wstaging, TRAINER_STATE_FILE), state)
        return files + [DATA_FILE, TRAINER_STATE_FILE]

    def _publish(self, job: "_SaveJob", my_hashes: dict, algo: str, *, blocked: bool) -> SaveResult:
        """Collective: gather every rank's file list, commit (manifest last), move the pointer,
        apply retention. Nothing is committed unless every rank's files are in place."""
        dist, storage = self.dist, self.storage
        all_hashes = dist.gather_to_main(my_hashes)
        step = job.step

        def commit() -> int:
            files: dict[str, dict] = {}
            for h in all_hashes:
                files.update(h)
            manifest = build_manifest(
                files,
                step=step,
                world_size=dist.world_size,
                strategies={r.name: self.writer_for(r).kind for r in job.roles},
                algo=algo,
                extra={"parent_step": self._lineage_parent(job.parent),
                       "classes": {r.name: part_classes(r) for r in job.roles}},
            )
            storage.commit(job.staging, job.final, manifest)
            self._own_steps.add(int(step))
            self._parents[job.final] = (True, manifest.get("parent_step"))
            storage.atomic_write(self.pointer_path, f"{int(step)}".encode())
            return sum(f["size"] for f in files.values())

        t_commit = time.perf_counter()
        nbytes = dist.run_on_main("commit", commit)
        nbytes = dist.broadcast(nbytes)
        self.last_saved_step = step
        t_retention = time.perf_counter()
        dist.run_on_main("retention", lambda: self._retention_after_commit(step))
        now = time.perf_counter()
        logger.debug("checkpoint step %d: commit %.3f s (fsync, manifest, rename, pointer), retention %.3f s",
                     step, t_retention - t_commit, now - t_retention)
        if blocked:
            total = now - job.t0
            stalled = total
        else:  # background write end + the foreground commit, not the poll's lag
            total = (job.t_done - job.t0) + (now - t_commit)
            stalled = job.seconds_blocked + (now - t_commit)
        result = SaveResult(
            step=step,
            path=job.final,
            bytes=int(nbytes or 0),
            seconds_total=total,
            seconds_blocked=stalled,
            files=sum(len(h) for h in (all_hashes or [])),
        )
        self.last_result = result
        if dist.is_main:
            logger.info(
                "checkpoint step %d: %.1f MB in %.2f s (%.2f GB/s, write %.2f s, blocked %.2f s) -> %s",
                step,
                result.bytes / 1e6,
                total,
                result.gbps,
                job.t_written - job.t0,
                stalled,
                job.final,
            )
        return result

    # ------------------------------------------------------------------ async save
    def _submit(self, job: "_SaveJob", trainer_state: Optional[dict], data_state: Any) -> SaveResult:
        """Foreground part of an async save: snapshot, then hand the write to the background."""
        import copy

        dist = self.dist

        def prepare_dirs() -> None:
            for role in job.roles:
                job.wstore.makedirs(job.wstore.join(job.wstaging, role.name))

        dist.run("prepare role directories", prepare_dirs)
        overlap = self.config.async_overlap_copy
        stagers = [self._stager(r) for r in job.roles]

        def snapshot() -> list:
            from skyrl_callbacks.staging import deferrable_storages

            snaps = []
            for role, stager in zip(job.roles, stagers):
                stager.defer = deferrable_storages(role.optimizers) if overlap else None
                try:
                    snaps.append(self.writer_for(role).snapshot(role, dist, stager))
                finally:
                    stager.defer = None
            return snaps

        job.snaps = dist.run("snapshot", snapshot)
        self._prewarmed = True  # the buffers exist now
        job.copied = threading.Event()
        job.stagers = [s for s in stagers if s.pending]
        if job.stagers:
            if self.step_hooks:
                self._hook_optimizers(job.roles)
        else:
            job.copied.set()
        gathered = dist.gather_to_main({"rng": capture_rng(), "data": data_state})
        job.gathered = copy.deepcopy(gathered) if dist.is_main else None
        job.trainer_state = copy.deepcopy(trainer_state) if dist.is_main else None
        job.bg = self._background_dist()
        job.seconds_blocked = time.perf_counter() - job.t0
        job.future = self._executor().submit(self._write_in_background, job)
        self._pending = job
        self.last_saved_step = job.step  # should_save/finish see the step as taken
        return SaveResult(step=job.step, path=job.final, bytes=0, seconds_total=0.0,
                          seconds_blocked=job.seconds_blocked, files=0, pending=True)

    def _write_in_background(self, job: "_SaveJob") -> dict:
        """Background thread, every rank: write this rank's files, checksum them, upload them.

        Collectives only through ``job.bg`` (a gloo group of its own), never the training group.
        """
        wstore, wstaging = job.wstore, job.wstaging
        try:  # deferred copies first: the next optimizer step waits for them
            for stager in job.stagers:
                stager.finish()
        finally:
            job.copied.set()
        files: list[str] = []
        for role, snap in zip(job.roles, job.snaps):
            role_dir = wstore.join(wstaging, role.name)
            written = self.writer_for(role).write_snapshot(wstore, role_dir, snap, job.bg)
            files += [f"{role.name}/{f}" for f in written]
        if self.dist.is_main:
            files += self._write_main(job, job.trainer_state, job.gathered)
        job.algo = checksum_algo()
        hashes = wstore.describe_files(wstaging, files, job.algo)
        # the writeback happens here, not in the foreground commit's fsync
        wstore.sync_files(wstaging, files)
        job.t_written = time.perf_counter()
        if wstore is not self.storage:
            self.storage.upload_files(wstaging, job.final, files)
        job.t_done = time.perf_counter()
        return hashes

    def _finalize(self, blocking: bool) -> Optional[SaveResult]:
        job = self._pending
        if job is None:
            return None
        dist = self.dist
        if not blocking and not all(dist.all_gather(job.future.done())):
            return None  # some rank is still writing: commit at a later step
        error: Optional[BaseException] = None
        my_hashes: dict = {}
        try:
            my_hashes = job.future.result()
        except Exception as exc:  # noqa: BLE001 - raised collectively below
            error = exc
        self._pending = None
        try:
            try:
                dist.agree(f"async save of global_step_{job.step} (background write)", error)

                def finalize_roles() -> dict:
                    extra: list[str] = []
                    for role, snap in zip(job.roles, job.snaps):
                        role_dir = job.wstore.join(job.wstaging, role.name)
                        written = self.writer_for(role).finalize_snapshot(job.wstore, role_dir, snap, dist)
                        extra += [f"{role.name}/{f}" for f in written]
                    if not extra:
                        return {}
                    hashes = job.wstore.describe_files(job.wstaging, extra, job.algo)
                    if job.wstore is not self.storage:
                        self.storage.upload_files(job.wstaging, job.final, extra)
                    return hashes

                my_hashes = {**my_hashes, **dist.run("finalize async save", finalize_roles)}
                job.snaps = None
                return self._publish(job, my_hashes, job.algo or checksum_algo(), blocked=False)
            except Exception as exc:
                self.last_saved_step = job.parent
                kept = "no earlier checkpoint" if job.parent is None else f"global_step_{job.parent}"
                cls = type(exc) if type(exc) in _SIMPLE_ERRORS else CheckpointError
                raise cls(
                    f"async save of global_step_{job.step} failed: {type(exc).__name__}: {exc}. Nothing of it "
                    f"was committed; the pointer still names {kept}."
                ) from exc
        finally:
            job.cleanup(self.storage)

    def poll(self) -> Optional[SaveResult]:
        """Commit the in-flight async save if every rank has finished writing it.

        Call once per training step on every rank (the integrations do); collective only while
        a save is in flight (one small all-gather). Returns the committed save's result.

        Raises:
            CheckpointError: on every rank, when the background write failed on any rank.
        """
        return self._finalize(blocking=False) if self._pending is not None else None

    def wait(self) -> Optional[SaveResult]:
        """Block until the in-flight async save (if any) is written, then commit it. Collective."""
        return self._finalize(blocking=True) if self._pending is not None else None

    def wait_snapshot(self) -> float:
        """Block until the in-flight save's snapshot is complete (``async_overlap_copy``), so the
        parameters and optimizer state may change. Not collective. Returns the seconds waited,
        which count as blocked time of that save."""
        job = self._pending
        if job is None or job.copied is None or job.copied.is_set():
            return 0.0
        t0 = time.perf_counter()
        job.copied.wait()
        waited = time.perf_counter() - t0
        job.seconds_blocked += waited
        return waited

    def _step_pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.wait_snapshot()  # a step pre-hook must return None

    def _hook_optimizers(self, roles: Sequence["Role"]) -> None:
        import torch

        for role in roles:
            for opt in role.optimizers:
                if isinstance(opt, torch.optim.Optimizer) and id(opt) not in self._hooks:
                    self._hooks[id(opt)] = opt.register_step_pre_hook(self._step_pre_hook)

    @property
    def save_in_flight(self) -> bool:
        """An async save has been started and not committed yet."""
        return self._pending is not None

    @property
    def wants_prewarm(self) -> bool:
        """:meth:`prewarm` has something left to do (``async_save`` is on and it has not run)."""
        return bool(self.config.async_save) and not self._prewarmed

    def prewarm(self, roles: list["Role"]) -> None:
        """Allocate the async saves' host buffers now, on a background thread, so that the first
        save copies into warm memory instead of allocating (and, for GPU state, pinning) a copy
        of the state inside its stall: at 2.9 GiB per rank on an H200 host the first async save
        stalled 1.3-1.9 s cold against 0.076 s prewarmed. Call it once, after the first optimizer
        step (so the optimizer state exists and is sized; buffers of state created later are
        allocated by the first save); the integrations do. Collective (every rank, the same
        step), like a save. The training loop waits while the state dicts are listed (for FSDP2
        and DDP references, 0.03-0.06 s); FSDP1, whose sharded state dicts are fresh GPU copies,
        allocates in the foreground rather than keep those copies alive for the seconds pinning
        takes. A save that comes while the thread runs waits for it. Does nothing when
        ``async_save`` is off or after the first call (or the first async save).
        """
        if not self.wants_prewarm:
            return
        jobs: list = []

        def collect() -> None:
            for role in roles:
                writer = self.writer_for(role)
                tree = writer.prewarm_tree(role, self.dist)
                if tree is None:
                    continue
                if getattr(writer, "prewarm_in_foreground", lambda r: False)(role):
                    _reserve([(role.name, self._stager(role), tree)])
                else:
                    jobs.append((role.name, self._stager(role), tree))

        self.dist.run("prewarm staging buffers", collect)
        self._prewarmed = True
        if jobs:
            import torch

            # the thread pins on this rank's GPU, not on the default device 0 of a new thread
            device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
            self._prewarm_thread = threading.Thread(target=_reserve, args=(jobs, device), name="skyrl-prewarm",
                                                    daemon=True)
            self._prewarm_thread.start()

    def _stager(self, role: "Role") -> Any:
        from skyrl_callbacks.staging import Stager

        if role.name not in self._stagers:
            writer = self.writer_for(role)
            stager = getattr(writer, "_gpu_stager", None) or Stager()
            if hasattr(writer, "_gpu_stager"):
                # one set of pinned buffers per role: a blocking save (preemption, end of fit) reuses
                # the async saves' warm buffers instead of pinning a second copy of the state when
                # time is short, and vice versa (never both at once: a save first waits for the last)
                writer._gpu_stager = stager
            self._stagers[role.name] = stager
        return self._stagers[role.name]

    def _executor(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyrl-ckpt-save")
        return self._pool

    def _background_dist(self) -> DistContext:
        """A DistContext on a gloo group of its own (created collectively at the first async
        save): background collectives (DCP planning) never interleave with training's."""
        if self._bg_dist is None:
            if self.dist.enabled:
                import torch.distributed as tdist

                ranks = None if self.dist.group is None else tdist.get_process_group_ranks(self.dist.group)
                self._bg_dist = DistContext(group=tdist.new_group(ranks=ranks, backend="gloo"))
            else:
                self._bg_dist = self.dist
        return self._bg_dist

    def _prepare(self, staging: str, final: str, step: int, parent: Optional[int]) -> None:
        self.storage.makedirs(self.storage.root)
        self._keep_foreign(final, step, parent)
        self.storage.prepare_staging(staging)

    def _keep_foreign(self, final: str, step: int, parent: Optional[int]) -> None:
        """Rank 0, before a save of ``step``: a ``global_step_N`` already there that is not of this
        run's lineage (not saved by this manager, not the checkpoint it resumed from) is
        moved aside to ``global_step_N.superseded-<id>``, never replaced: e.g. the same step of an
        older run after ``resume_mode: none``, or of the branch a rollback abandoned."""
        storage = self.storage
        resumed = (self.resumed_from or "").rstrip("/")
        if step in self._own_steps or resumed == final.rstrip("/"):
            return  # this run's own checkpoint, or the one it resumed from: replacing it loses nothing
        if storage.is_local:
            if not os.path.lexists(final):
                return
        elif not storage.is_committed(final):
            return  # an upload that never committed: prepare_staging removes it, as before
        kept = storage.set_aside(final)
        self._parents.pop(final, None)
        logger.warning(
            "%s already holds a checkpoint that is not of this run's lineage (this run %s); it is kept as %s "
            "and not replaced by this run's global_step_%d. Delete it when you no longer need it.",
            final, f"continues global_step_{parent}" if parent is not None else "started fresh", kept, step,
        )

    def _check_shared(self, staging: str) -> None:
        """Every rank must see rank 0's files: a node-local ``ckpt_path`` silently loses shards."""
        if self.dist.world_size == 1:
            return
        marker = self.storage.join(staging, _SHARED_MARKER)
        token = self.dist.broadcast(new_token())
        self.dist.run_on_main("storage check", lambda: self.storage.write_bytes(marker, token.encode()))

        def check() -> None:
            try:
                seen = self.storage.read_text(marker)
            except (FileNotFoundError, OSError):
                seen = None
            if seen != token:
                raise CheckpointError(
                    f"ckpt_path={self.config.ckpt_path!r} is not shared between ranks: rank {self.dist.rank} "
                    f"cannot see the files rank 0 wrote in {staging}. Use a shared file system or an "
                    f"object store (s3://, gs://) for ckpt_path."
                )

        self.dist.run("storage check", check)
        self.dist.run_on_main("storage check", lambda: self.storage.rm(marker, recursive=False))

    def _write_hf_dir(self, store: Storage, out_dir: str, role: "Role", rel_prefix: str) -> list[str]:
        """``huggingface/`` (config, generation config, tokenizer) of an HF model (rank 0)."""
        from skyrl_callbacks.writers.hf import hf_model_of, write_hf_metadata

        hf = hf_model_of(role.module)
        if hf is None and role.tokenizer is None:
            return []
        import os
        import tempfile

        local = out_dir if store.is_local else tempfile.mkdtemp(prefix="skyrl-hfmeta-", dir=self.config.cloud_staging_dir)
        write_hf_metadata(local, hf, role.tokenizer)
        names = []
        for dirpath, _dirs, fnames in os.walk(local):
            for fname in fnames:
                names.append(os.path.relpath(os.path.join(dirpath, fname), local).replace(os.sep, "/"))
        if not store.is_local:
            from skyrl_callbacks.storage import upload_local_dir

            upload_local_dir(store, local, out_dir)
            import shutil

            shutil.rmtree(local, ignore_errors=True)
        return [f"{rel_prefix}/{n}" for n in names]

    def _retention_after_commit(self, step: int) -> None:
        """Retention once ``step`` is committed: an object store that keeps failing here does
        not fail the save (the checkpoint is published); the next save retries the cleanup."""
        try:
            self._retention(step)
        except StorageError as exc:
            logger.warning(
                "retention after global_step_%d failed (%s); old checkpoints and leftovers are kept "
                "and removed after a later save", step, exc,
            )

    def _retention(self, step: int) -> None:
        doomed: list[int] = []
        if self.config.max_ckpts_to_keep > 0:
            # only this run's lineage counts: checkpoints of a branch abandoned by a rollback, or of an
            # older run after resume_mode none, are neither counted nor deleted
            line = rules.lineage(step, self.committed_steps(), self._lazy_parents())
            doomed = rules.steps_to_delete(line, self.config.max_ckpts_to_keep, protected=[step])
        for old in doomed:
            path = self.step_dir(old)
            self._parents.pop(path, None)
            logger.info("retention: deleting %s (max_ckpts_to_keep=%d)", path, self.config.max_ckpts_to_keep)
            # retired at once (renamed away / manifest removed), its bytes deleted in the background
            self.storage.delete_checkpoint(path, remove=self._remove_in_background)
        busy = self._being_removed()
        for leftover in self.storage.leftovers():
            if _basename(leftover) in busy:
                continue
            logger.info("removing leftover of an interrupted save: %s", leftover)
            self.storage.rm(leftover)
        if not self.storage.supports_rename:
            for name in self.storage.listdir(self.storage.root):
                s = rules.parse_step_dirname(name)
                if name.rstrip("/") in busy:
                    continue
                if s is not None and s < step and not self.storage.is_committed(self.storage.child(name)):
                    logger.info("removing uncommitted upload %s", self.storage.child(name))
                    self.storage.rm(self.storage.child(name))

    def _remove_in_background(self, path: str) -> None:
        """Delete a retired checkpoint's bytes on a background thread (rank 0).

        Deleting gigabytes is not free (1.6-2.2 s for a 5.8 GiB checkpoint on an H200 host's local
        disk, 2026-11-30): done in the commit it stalled every save, async ones included. The
        checkpoint is already gone for every reader (renamed to ``.trash-``, or its manifest
        removed); a crash before this finishes leaves a leftover that a later save removes.
        :meth:`close` waits for it.
        """
        if self._reaper is None:
            from concurrent.futures import ThreadPoolExecutor

            self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skyrl-retention")

        def remove() -> None:
            try:
                self.storage.rm(path)
            except Exception as exc:  # noqa: BLE001 - the next retention removes it as a leftover
                logger.warning("deleting the retired checkpoint %s failed (%s); a later save removes it", path, exc)

        self._reaping[path] = self._reaper.submit(remove)

    def wait_retention(self) -> None:
        """Wait until the checkpoints retention retired are deleted from the disk or store (rank 0
        deletes them in the background; other ranks return at once). Not collective."""
        for fut in list(self._reaping.values()):
            fut.result()
        self._being_removed()

    def _being_removed(self) -> set:
        """Names (under ``ckpt_path``) the background deleter has not finished with."""
        for path in [p for p, fut in self._reaping.items() if fut.done()]:
            del self._reaping[path]
        return {_basename(p) for p in self._reaping}

    # ------------------------------------------------------------------ export
    def export_hf(self, step: int, role: "Role", *, max_shard_size: Any = "5GB", dtype: Any = None) -> str:
        """Publish ``{export_path}/global_step_N/policy/`` atomically. Collective."""
        from skyrl_callbacks.writers.hf import export_role

        t0 = time.perf_counter()
        dist, storage = self.dist, self.export_storage
        check_export_path(self.config.ckpt_path, self.config.export_path)  # a symlink made since construction
        final = storage.child(rules.step_dirname(step), role.name)
        token = dist.broadcast(new_token())
        staging = storage.staging_dir(final, token)
        dist.run_on_main("prepare export", lambda: (storage.makedirs(storage.child(rules.step_dirname(step))), storage.prepare_staging(staging)))
        files = dist.run(
            "export",
            lambda: export_role(storage, staging, role, self.writer_for(role), dist, max_shard_size=max_shard_size, dtype=dtype),
        )

        def commit() -> None:
            hashes = storage.describe_files(staging, files or [], checksum_algo())
            manifest = build_manifest(hashes, step=step, world_size=dist.world_size, strategies={role.name: "hf"}, algo=checksum_algo())
            storage.commit(staging, final, manifest)

        dist.run_on_main("commit export", commit)
        self.last_exported_step = step
        if dist.is_main:
            logger.info("HF export step %d in %.2f s -> %s", step, time.perf_counter() - t0, final)
        return final

    # ------------------------------------------------------------------ resume
    def resume_candidates(self) -> list[str]:
        """Checkpoint dirs to try, best first, for the configured ``resume_mode`` (rank 0 decides).

        Raises:
            CheckpointNotFoundError: ``from_path`` names something that is not a committed checkpoint.
        """

        def decide() -> list[str]:
            mode = self.config.resume_mode
            if mode == "from_path":
                path = self.config.resume_path.rstrip("/")
                store = self._open_storage(path)
                if not store.is_committed(store.root):
                    raise CheckpointNotFoundError(
                        f"resume_path={self.config.resume_path!r}: not a committed checkpoint directory "
                        f"(missing, or an interrupted save). Committed steps under ckpt_path: "
                        f"{self.committed_steps() or 'none'}."
                    )
                return [store.root]
            committed = self.committed_steps()
            self._warn_strays(committed)
            if mode == "none":
                if committed:
                    logger.warning(
                        "resume_mode none: starting fresh in %s, which holds committed checkpoints %s of an earlier "
                        "run. They are kept: they do not count for max_ckpts_to_keep, are never resumed as a "
                        "fallback of this run, and a step this run saves again moves the old one aside "
                        "(global_step_N.superseded-<id>). Use a new ckpt_path to keep runs apart.",
                        self.storage.root, committed,
                    )
                return []
            pointer = self.read_pointer()
            if pointer is None and self.storage.is_local and self.storage.isdir(self.pointer_path):
                logger.warning(
                    "resume: %s is a directory, not the pointer file; move it away (saves refuse to start until "
                    "then)", self.pointer_path,
                )
            step, warning = rules.select_resume_step(pointer, committed)
            if warning:
                logger.warning("resume: %s (ckpt_path=%s)", warning, self.storage.root)
            if step is None:
                return []
            parents = self._lazy_parents()
            if warning is None and any(s > step for s in committed):
                newer = rules.follow_commits_after_pointer(step, committed, parents)
                if newer != step:
                    child = min(s for s in committed if s > step and parents.get(s) == step)
                    if self._pointer_moved_back(step, child):
                        logger.warning(
                            "resume: the pointer names global_step_%d and was written after global_step_%d (its "
                            "child) was committed: it was moved back by hand, so it is honoured; the newer "
                            "checkpoints %s are kept but not used", step, child, [s for s in committed if s > step],
                        )
                    else:
                        logger.warning(
                            "resume: global_step_%d was committed after the pointer (global_step_%d) was last moved; "
                            "resuming from it", newer, step,
                        )
                        step = newer
            # fallbacks: the chosen checkpoint's own ancestors only, never an abandoned branch
            order = rules.lineage(step, committed, parents)
            return [self.step_dir(s) for s in order]

        return self.dist.broadcast(self.dist.run_on_main("find checkpoint", decide))

    def _parent(self, step: int) -> tuple[bool, Optional[int]]:
        """``(known, parent_step)`` from the manifest of ``step`` (unknown: no manifest, unreadable,
        or written without the key)."""
        path = self.step_dir(step)
        if path not in self._parents:
            try:
                manifest = read_manifest(self.storage, path)
            except (ValueError, OSError):
                manifest = None
            if isinstance(manifest, dict) and self._manifests is not None:
                self._manifests[path] = manifest
            if isinstance(manifest, dict) and "parent_step" in manifest:
                parent = manifest.get("parent_step")
                known = parent is None or (isinstance(parent, int) and not isinstance(parent, bool))
                self._parents[path] = (known, parent if known else None)
            else:
                self._parents[path] = (False, None)
        return self._parents[path]

    def _lineage_parent(self, parent: Optional[int]) -> Optional[int]:
        """``parent_step`` for the manifest of a save continuing from ``parent``: None when ``parent`` is
        a checkpoint of another ``ckpt_path`` (the same step here belongs to someone else)."""
        if parent is not None and parent == self._outside_parent and parent not in self._own_steps:
            return None
        return parent

    def _lazy_parents(self) -> "_Parents":
        return _Parents(self)

    def _pointer_moved_back(self, pointer: int, child: int) -> bool:
        """A committed ``child`` of the pointer's step is newer than the pointer: a crash between its
        commit and the pointer move, or a pointer moved back by hand (``echo N > latest_ckpt_global_step.txt``,
        SkyRL's way to roll back). The pointer moves only after a commit, so in a crash it is older
        than the child's manifest; written after it, it was moved back. Ties (coarse store clocks)
        count as a crash."""
        pointer_t = self.storage.mtime(self.pointer_path)
        child_t = self.storage.mtime(self.storage.join(self.step_dir(child), MANIFEST_FILE))
        return pointer_t is not None and child_t is not None and pointer_t > child_t

    def _warn_strays(self, committed: list[int]) -> None:
        """Report ``global_step_N`` directories that are not checkpoints (local: interrupted saves
        never have that name, so someone put them there); resume and retention ignore them."""
        if not self.storage.is_local:
            return
        for name in self.storage.listdir(self.storage.root):
            step = rules.parse_step_dirname(name)
            if step is not None and step not in committed and os.path.isdir(self.storage.child(name)):
                logger.warning(
                    "ignoring %s: not a committed checkpoint (no %s, and as a SkyRL-native checkpoint it lacks "
                    "%s or a role directory with model files). Move it away if it is not needed.",
                    self.storage.child(name), MANIFEST_FILE, TRAINER_STATE_FILE,
                )

    def verify(self, step_dir: str, *, checksums: Optional[bool] = None) -> list[str]:
        """Problems of ``step_dir`` against its manifest ([] when fine; legacy dirs pass)."""
        store = self._store_for(step_dir)
        try:
            legacy = read_manifest(store, step_dir) is None
        except (ValueError, OSError) as exc:
            return [f"manifest unreadable ({exc})"]
        if legacy and store.supports_rename:
            return []  # a SkyRL-native checkpoint: nothing to verify against
        return verify_dir(store, step_dir, checksums=self.config.verify_on_resume if checksums is None else checksums)

    def _check_sizes(self, store: Storage, step_dir: str) -> tuple[list[str], Optional[dict]]:
        """Rank 0: ``(problems, manifest)`` of ``step_dir``, sizes only (a SkyRL-native checkpoint
        without a manifest: no problems, no manifest). The manifest is fetched once per load."""
        try:
            cached = (self._manifests or {}).pop(step_dir, None) if store is self.storage else None
            manifest = cached if cached is not None else read_manifest(store, step_dir)
        except (ValueError, OSError) as exc:
            return [f"manifest unreadable ({exc})"], None
        if manifest is None and store.supports_rename:
            return [], None
        problems = verify_dir(store, step_dir, checksums=False, manifest=manifest)
        if manifest is not None and not isinstance(manifest.get("files"), dict):
            manifest = None
        return problems, manifest

    def _start_verification(self, store: Storage, step_dir: str, manifest: Optional[dict],
                            staged: Optional[Any] = None) -> Optional[LoadVerification]:
        """verify_on_resume: the checksums to check while loading, and the files no reader of ours
        hashes as it reads (small files, Megatron's) hashed now, spread over the ranks. Collective.
        ``staged``: files prefetched from an object store, hashed as they were downloaded (every
        rank's, gathered): their checksums count, a mismatch raises before anything is loaded.

        Raises:
            CorruptCheckpointError: on every rank, when one of those files does not match.
        """
        if not self.config.verify_on_resume or manifest is None:
            return None
        files = manifest["files"]
        verification = LoadVerification(store, step_dir, files, manifest.get("checksum_algo", "crc32"))
        if staged is not None:
            problems: dict[str, str] = {}
            for digests in self.dist.all_gather(staged.digests):
                for rel, digest in digests.items():
                    verification.record(store.join(step_dir, rel), digest)
            problems.update(verification.problems)
            if problems:
                listed = [f"{problems[k]} (downloaded)" for k in sorted(problems)]
                raise CorruptCheckpointError(f"{step_dir}: failed verification: {'; '.join(listed[:5])}")
        strategies = manifest.get("strategies") or {}
        before = [rel for rel in verification.tracked if not streamable(rel, strategies) and rel not in verification.verified]
        self._hash_shared(verification, before, step_dir)
        return verification

    def _finish_verification(self, verification: LoadVerification, cause: Optional[BaseException] = None) -> None:
        """Collective: every rank's checksums of what it read; the tracked files no rank hashed
        while reading (object stores, resharded loads, unusual trees) are hashed now.

        Raises:
            CorruptCheckpointError: on every rank, when any file does not match.
        """
        gathered = self.dist.all_gather((sorted(verification.verified), verification.problems))
        problems: dict[str, str] = {}
        for verified, probs in gathered:
            verification.verified.update(verified)
            problems.update(probs)
        rest = [rel for rel in verification.tracked if rel not in verification.verified]
        if rest and cause is None:
            logger.info("verify_on_resume: %d file(s) not hashed while loading, hashed now: %s", len(rest), rest[:5])
        try:
            self._hash_shared(verification, rest, verification.step_dir, problems)
        except CorruptCheckpointError as exc:
            raise exc from cause

    def _hash_shared(self, verification: LoadVerification, rels: list, step_dir: str,
                     problems: Optional[dict] = None) -> None:
        """Collective: hash ``rels`` (each rank a share, largest first, 4 threads per rank) against
        the manifest; raise on every rank if any of them, or ``problems``, failed."""
        from concurrent.futures import ThreadPoolExecutor

        from skyrl_callbacks.manifest import hash_file

        dist, store = self.dist, verification.storage
        load = [0] * dist.world_size
        mine = []
        for rel in sorted(rels, key=lambda r: (-verification.size_of(r), r)):
            owner = load.index(min(load))
            load[owner] += verification.size_of(rel) + 1
            if owner == dist.rank:
                mine.append(rel)

        def check(rel: str) -> Optional[str]:
            path = store.join(step_dir, rel)
            try:
                _size, digest = hash_file(store, path, verification.algo)
            except (OSError, ValueError) as exc:
                return f"{rel}: cannot be read ({exc})"
            verification.record(path, digest)
            return verification.problems.get(rel)

        local: dict[str, str] = {}
        if mine:
            with ThreadPoolExecutor(max_workers=min(4, len(mine)), thread_name_prefix="skyrl-verify") as pool:
                for rel, problem in zip(mine, pool.map(check, mine)):
                    if problem:
                        local[rel] = problem
        found = dict(problems or {})
        if rels:
            for part in dist.all_gather(local):
                found.update(part)
        if found:
            listed = [found[k] for k in sorted(found)]
            raise CorruptCheckpointError(f"{step_dir}: failed verification: {'; '.join(listed[:5])}")

    def _check_parts(self, roles: Sequence["Role"], step_dir: str, store: Storage, manifest: Optional[dict]) -> None:
        """The optimizer and scheduler classes against those recorded at save (checkpoints
        without the record: skipped); parts of the checkpoint this run has no place for are
        named in a warning (rank 0).

        Raises:
            IncompatibleCheckpointError: an optimizer or scheduler of another class than saved.
        """
        recorded = (manifest or {}).get("classes") or {}
        if manifest is not None:
            files = list(manifest.get("files") or {})
            saved_roles = set(manifest.get("strategies") or {}) or {f.split("/", 1)[0] for f in files if "/" in f}
        else:
            saved_roles = {n.rstrip("/") for n in store.listdir(step_dir) if "." not in n}
            files = []
        dropped = [f"{name}/ (the {name} role)" for name in sorted(saved_roles - {r.name for r in roles})
                   if not name.startswith(".") and name not in (TRAINER_STATE_FILE, DATA_FILE)]
        for role in roles:
            saved = recorded.get(role.name)
            live = part_classes(role)
            if isinstance(saved, dict):
                for what, label in (("optimizers", "optimizer"), ("schedulers", "lr_scheduler")):
                    old, new = list(saved.get(what) or []), live[what]
                    if old and not new:
                        dropped.append(f"{role.name}'s {label} state ({', '.join(old)})")
                    elif len(old) == len(new):
                        for i, (a, b) in enumerate(zip(old, new)):
                            if a != b:
                                raise IncompatibleCheckpointError(
                                    f"{step_dir}: {role.name} {label} {i} was saved as {a} but this run has {b}. "
                                    f"Resume with a {a}, or start fresh with resume_mode='none' (or another "
                                    f"ckpt_path) to train with {b}."
                                )
                continue
            if role.name not in saved_roles:
                continue
            names = files or [f"{role.name}/{n}" for n in store.listdir(store.join(step_dir, role.name))]
            for prefix, label, objs in (("optimizer_state", "optimizer", role.optimizers),
                                        ("lr_scheduler_state", "lr_scheduler", role.schedulers)):
                if not objs and any(n.startswith(f"{role.name}/{prefix}") for n in names):
                    dropped.append(f"{role.name}'s {label} state")
        if dropped and self.dist.is_main:
            logger.warning(
                "resume from %s: the checkpoint holds %s, which this run has no place for: not loaded "
                "(the next save will not have them)", step_dir, "; ".join(dropped),
            )

    def _store_for(self, path: str) -> Storage:
        root = self.storage.root.rstrip("/")
        if path.startswith(root):
            return self.storage
        return self._open_storage(path)

    def load(self, roles: Sequence["Role"], step_dir: str) -> ResumeState:
        """Restore ``roles`` from ``step_dir`` and return the rest of the state. Collective.

        Raises:
            CorruptCheckpointError: a file failed verification or cannot be read.
            IncompatibleCheckpointError: the checkpoint does not fit the roles.
        """
        self.wait()  # an in-flight async save commits before anything is read
        with trusting(self.config.trust_checkpoint_code):  # no load executes code unless trusted
            return self._load(roles, step_dir)

    def _load(self, roles: Sequence["Role"], step_dir: str) -> ResumeState:
        dist = self.dist
        store = self._store_for(step_dir)
        # rank 0: sizes against the manifest (no file read); the checksums are checked below
        problems, manifest = dist.broadcast(dist.run_on_main("verify", lambda: self._check_sizes(store, step_dir)))
        if problems:
            raise CorruptCheckpointError(f"{step_dir}: failed verification: {'; '.join(problems[:5])}")
        staged = self._prefetch(roles, store, step_dir, manifest)
        try:
            return self._load_checked(roles, step_dir, store, manifest, staged)
        finally:
            if staged is not None:
                staged.remove()

    def _rank_files(self, roles: Sequence["Role"], manifest: dict) -> tuple[list[str], list[str]]:
        """``(files, roles)``: what this rank reads from the checkpoint and can download first
        (``trainer_state.pt``, ``data.pt``, the plain writer's files of its roles), and the roles
        loaded from those copies. Other writers' files (FSDP's DCP shards, Megatron, HF) are read
        by their readers from the store."""
        from skyrl_callbacks.writers.base import MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE

        files = manifest.get("files") or {}
        strategies = manifest.get("strategies") or {}
        rels = [rel for rel in (TRAINER_STATE_FILE, DATA_FILE) if rel in files]
        local_roles = []
        for role in roles:
            if strategies.get(role.name) != "plain" or self.writer_for(role).kind != "plain":
                continue
            need = [MODEL_FILE] + ([OPTIMIZER_FILE] if role.optimizers else []) + ([SCHEDULER_FILE] if role.schedulers else [])
            need = [f"{role.name}/{name}" for name in need]
            if all(rel in files for rel in need):  # else the remote load names what is missing
                rels += need
                local_roles.append(role.name)
        return rels, local_roles

    def _prefetch(self, roles: Sequence["Role"], store: Storage, step_dir: str, manifest: Optional[dict]) -> Optional[Any]:
        """Object stores: this rank's files downloaded concurrently into a local staging directory
        (hashed on the way with verify_on_resume), or None (local store, no manifest). Collective."""
        if store.is_local or manifest is None or not isinstance(manifest.get("files"), dict):
            return None
        from skyrl_callbacks.prefetch import LocalCopyError, ShortObject, stage

        rels, local_roles = self._rank_files(roles, manifest)
        if not rels:
            return None
        files = manifest["files"]
        sizes = {rel: int((files[rel] or {}).get("size") or 0) if isinstance(files[rel], dict) else 0 for rel in rels}
        algo = manifest.get("checksum_algo", "crc32") if self.config.verify_on_resume else None
        out: list = []

        def fetch() -> None:
            try:
                out.append(stage(store, step_dir, rels, sizes, staging_dir=self.config.cloud_staging_dir, algo=algo))
            except ShortObject as exc:
                raise CorruptCheckpointError(f"{step_dir}: cannot be read ({exc}).") from exc
            except LocalCopyError as exc:
                # the local disk, not the checkpoint: no fallback to an older checkpoint
                raise StorageError(
                    f"resume from {step_dir}: cannot write the local copies of this rank's files ({exc}). Point "
                    f"cloud_staging_dir (now {self.config.cloud_staging_dir!r}, null: the temp dir) at a local disk "
                    f"with room for {sum(sizes.values())} bytes."
                ) from exc
            except FileNotFoundError as exc:  # the object (deleted since the size check)
                raise CorruptCheckpointError(f"{step_dir}: a file is missing ({exc}).") from exc

        try:
            self.dist.run("download checkpoint files", fetch)
        except BaseException:
            for staged in out:
                staged.remove()
            raise
        staged = out[0]
        staged.roles = set(local_roles)
        return staged

    def _load_checked(self, roles: Sequence["Role"], step_dir: str, store: Storage, manifest: Optional[dict],
                      staged: Optional[Any]) -> ResumeState:
        dist = self.dist
        verification = self._start_verification(store, step_dir, manifest, staged)
        self._check_parts(roles, step_dir, store, manifest)

        def load_roles() -> None:
            present = set(store.listdir(step_dir))
            for role in roles:
                if role.name not in present:
                    raise IncompatibleCheckpointError(
                        f"{step_dir}: has no {role.name}/ directory but this run has a {role.name} role "
                        f"(it holds {sorted(p for p in present if '.' not in p) or 'no roles'}). "
                        f"Resume with the same roles, or start fresh with resume_mode='none'."
                    )
            for role in roles:
                if staged is not None and role.name in staged.roles:  # the local copies
                    try:
                        self.writer_for(role).load(staged.storage, staged.path(role.name), role, dist)
                    except Exception as exc:
                        staged.rename_in(exc, step_dir)
                        raise
                else:
                    self.writer_for(role).load(store, store.join(step_dir, role.name), role, dist)

        try:
            with active_verification(verification):
                dist.run("load model/optimizer state", load_roles)
        except Exception as exc:
            if verification is not None:
                # a bit flip can look like a mismatch or a torn file: a checksum that fails says which
                self._finish_verification(verification, cause=exc)
            raise
        if verification is not None:
            self._finish_verification(verification)
        if staged is not None and staged.has(TRAINER_STATE_FILE):
            trainer_state = torch_load(staged.storage, staged.path(TRAINER_STATE_FILE))
        else:
            trainer_state = torch_load(store, store.join(step_dir, TRAINER_STATE_FILE))
        data_path = store.join(step_dir, DATA_FILE)
        if staged is not None and staged.has(DATA_FILE):
            data = torch_load(staged.storage, staged.path(DATA_FILE))
        elif staged is not None:
            data = None  # not in the manifest
        else:
            data = torch_load(store, data_path) if store.exists(data_path) else None
        step = int(trainer_state.get("global_step", rules.parse_step_dirname(step_dir) or 0))
        saved_ws = int(trainer_state.get("world_size", 1))
        rng = None
        rngs = trainer_state.get("rng_per_rank")
        if rngs and saved_ws == dist.world_size:
            rng = rngs[dist.rank]
        elif rngs and dist.is_main:
            logger.warning(
                "checkpoint was saved with world size %d, running with %d: RNG states are not restored", saved_ws, dist.world_size
            )
        data_state = None
        if isinstance(data, dict) and data.get("format") == "skyrl-callbacks":
            per_rank = data.get("per_rank") or []
            if len(per_rank) == dist.world_size:
                data_state = per_rank[dist.rank]
            elif per_rank and dist.is_main:
                logger.warning(
                    "data.pt holds %d rank states, running with %d ranks: dataloader position not restored",
                    len(per_rank),
                    dist.world_size,
                )
        elif data is not None:
            data_state = data  # SkyRL writes the dataloader's state_dict directly
        self.resumed_from = step_dir
        self.last_saved_step = step
        # resumed from another ckpt_path: this ckpt_path's global_step_N is not the parent of our saves
        self._outside_parent = None if self._store_for(step_dir) is self.storage else step
        return ResumeState(step=step, path=step_dir, trainer_state=trainer_state, rng=rng, data_state=data_state)

    def resume(self, roles: Sequence["Role"]) -> Optional[ResumeState]:
        """Find the checkpoint for ``resume_mode`` and load it; None when starting fresh.

        In ``latest`` mode a checkpoint that fails verification or loading is reported and the
        previous committed one is used; in ``from_path`` mode it is an error.
        """
        self._manifests = {}  # the manifests resume_candidates reads are not fetched again by load
        try:
            return self._resume(roles)
        finally:
            self._manifests = None

    def _resume(self, roles: Sequence["Role"]) -> Optional[ResumeState]:
        candidates = self.resume_candidates()
        last_error: Optional[Exception] = None
        for path in candidates:
            try:
                state = self.load(roles, path)
            except CorruptCheckpointError as exc:
                if self.config.resume_mode == "from_path":
                    raise
                logger.warning("resume: skipping %s: %s", path, exc)
                last_error = exc
                continue
            if self.dist.is_main:
                newer = [s for s in self.committed_steps() if s > state.step]
                if newer:
                    logger.warning(
                        "resumed from step %d but ckpt_path also holds newer checkpoints %s from an abandoned run; "
                        "they are kept, and the pointer will name this run's saves",
                        state.step,
                        newer,
                    )
                logger.info("resumed from %s (step %d)", path, state.step)
            return state
        if last_error is not None:
            raise CorruptCheckpointError(
                f"no usable checkpoint under {self.storage.root}: every committed checkpoint failed ({last_error}). "
                f"Set resume_mode='none' to start fresh."
            ) from last_error
        return None


def _reserve(jobs: list, device: Optional[int] = None) -> None:
    """Background thread of :meth:`CheckpointManager.prewarm` (``device``: the rank's CUDA device)."""
    if device is not None:
        import torch

        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    total = 0
    for name, stager, tree in jobs:
        try:
            total += stager.reserve(tree)
        except Exception as exc:  # noqa: BLE001 - e.g. pinning refused: the first save allocates instead
            logger.warning("prewarming the %s staging buffers failed (%s); the first save allocates them", name, exc)
    logger.info("prewarmed %.1f MB of staging buffers in %.2f s", total / 1e6, time.perf_counter() - t0)


class _Parents(Mapping):
    """``{step: parent_step}`` for :func:`rules.lineage`, read from manifests on first use; steps
    with no known parent are absent."""

    def __init__(self, manager: CheckpointManager) -> None:
        self._manager = manager

    def __getitem__(self, step: int) -> Optional[int]:
        known, parent = self._manager._parent(int(step))
        if not known:
            raise KeyError(step)
        return parent

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and self._manager._parent(step)[0]

    def __iter__(self):  # not needed by the rules; listing would read every manifest
        return iter(())

    def __len__(self) -> int:
        return 0


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
