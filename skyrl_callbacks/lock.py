"""RunLock: one live run per ``ckpt_path``.

A second run that starts writing into a ``ckpt_path`` owned by a live run is refused. The
lock file ``.skyrl_lock.json`` records the owner (a run id), host, pid and a heartbeat that
rank 0 refreshes while the run lives. A lock whose process is gone (same host) or whose
heartbeat is older than ``stale_after_s`` belongs to a dead run and is taken over, with a
warning. Works on local disks and object stores (the lock is one small object); on object
stores two runs that start within the same second can race, which the read-back after the
write narrows but cannot close without conditional writes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Optional

from skyrl_callbacks.errors import CheckpointLockError
from skyrl_callbacks.storage import _pid_alive

if TYPE_CHECKING:
    from skyrl_callbacks.storage import Storage

logger = logging.getLogger(__name__)

__all__ = ["RunLock", "LOCK_FILE", "stop_heartbeats"]

LOCK_FILE = ".skyrl_lock.json"
_LIVE: "weakref.WeakSet[RunLock]" = weakref.WeakSet()


def stop_heartbeats() -> None:
    """Stop the heartbeat threads of every lock of this process (locks stay on disk)."""
    for lock in list(_LIVE):
        lock._stop_heartbeat()


class RunLock:
    """The lock of one run on one checkpoint root (used on rank 0 only).

    Args:
        storage: the checkpoint root.
        stale_after_s: a heartbeat older than this means the owner is dead.
        heartbeat_s: how often the background thread refreshes the heartbeat.
    """

    def __init__(self, storage: "Storage", *, stale_after_s: float = 300.0, heartbeat_s: float = 30.0) -> None:
        self.storage = storage
        self.path = storage.child(LOCK_FILE)
        self.run_id = uuid.uuid4().hex
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self) -> dict:
        return {"owner": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def read(self) -> Optional[dict]:
        """The current lock record, or None."""
        try:
            return json.loads(self.storage.read_text(self.path))
        except (FileNotFoundError, ValueError):
            return None
        except OSError:
            return None

    def _is_live(self, rec: dict) -> bool:
        if rec.get("host") == socket.gethostname() and rec.get("pid") == os.getpid():
            return False  # an earlier manager of this same process (e.g. a second trainer.fit)
        beat = _heartbeat(rec)
        if beat is None:  # a damaged lock: a pid of this host still tells; otherwise nothing does
            if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
                return _pid_alive(rec["pid"])
            raise CheckpointLockError(
                f"{self.path}: the lock's heartbeat {rec.get('heartbeat')!r} is not a time (a damaged lock file; "
                f"owner host {rec.get('host')!r}, pid {rec.get('pid')!r}). If no other run is using "
                f"ckpt_path={self.storage.root!r}, delete {self.path} and start again; otherwise use another ckpt_path."
            )
        age = time.time() - beat
        if age > self.stale_after_s:
            return False
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
            return _pid_alive(rec["pid"])
        return True

    def acquire(self) -> None:
        """Take the lock, or raise :class:`CheckpointLockError` naming the live owner.

        Raises:
            CheckpointLockError: another live run owns ``ckpt_path``.
        """
        if self.held:
            return
        rec = self.read()
        if rec is not None and rec.get("owner") != self.run_id:
            if self._is_live(rec):
                age = time.time() - (_heartbeat(rec) or time.time())
                raise CheckpointLockError(
                    f"ckpt_path={self.storage.root!r} is in use by another live run (host {rec.get('host')}, "
                    f"pid {rec.get('pid')}, heartbeat {age:.0f} s ago). Two runs writing one ckpt_path would "
                    f"corrupt each other's checkpoints: wait for it to finish, use another ckpt_path, or, if that "
                    f"run is dead, delete {self.path}."
                )
            logger.warning(
                "taking over the lock of a dead run on %s (host %s, pid %s)", self.storage.root, rec.get("host"), rec.get("pid")
            )
        self.storage.makedirs(self.storage.root)
        self.storage.atomic_write(self.path, json.dumps(self._record()).encode())
        back = self.read()
        if back is None or back.get("owner") != self.run_id:
            raise CheckpointLockError(
                f"ckpt_path={self.storage.root!r}: another run took the lock at the same moment "
                f"(owner now {back}). Use one ckpt_path per run."
            )
        self.held = True
        _LIVE.add(self)
        if self.heartbeat_s > 0:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="skyrl-lock-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        failures = 0
        while not self._stop.wait(self.heartbeat_s):
            try:
                rec = self.read()
                if rec is not None and rec.get("owner") != self.run_id:
                    logger.error("lock on %s was taken by another run: %s", self.storage.root, rec)
                    return
                self.storage.atomic_write(self.path, json.dumps(self._record()).encode())
                failures = 0
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is not fatal
                failures += 1
                logger.warning("lock heartbeat failed (%d in a row): %s", failures, exc)
                if failures >= 3:  # the store is gone: stop rather than retry forever
                    logger.error("lock heartbeat on %s stopped after %d failures", self.storage.root, failures)
                    return

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def release(self) -> None:
        """Drop the lock (only if we still own it)."""
        self._stop_heartbeat()
        _LIVE.discard(self)
        if not self.held:
            return
        self.held = False
        rec = self.read()
        if rec is not None and rec.get("owner") == self.run_id:
            try:
                self.storage.rm(self.path, recursive=False)
            except OSError as exc:
                logger.warning("could not remove the lock %s: %s", self.path, exc)


def _heartbeat(rec: dict) -> Optional[float]:
    """The heartbeat (seconds since the epoch) of a lock record; None when it is not a number."""
    value = rec.get("heartbeat", 0)
    if isinstance(value, bool):
        return None
    try:
        beat = float(value)
    except (TypeError, ValueError):
        return None
    return beat if beat == beat else None  # NaN


def live_owner(storage: "Storage") -> Optional[dict]:
    """The lock record of the live run that owns ``storage``'s root, or None (no lock, a dead
    owner's, or this process's own). Read-only: for tools such as ``skyrl-ckpt prune``.

    Raises:
        CheckpointLockError: the lock file is damaged and its owner cannot be told dead.
    """
    lock = RunLock(storage)
    rec = lock.read()
    if not isinstance(rec, dict) or not lock._is_live(rec):
        return None
    return rec
