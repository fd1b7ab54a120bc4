"""RunLock: one live run per ``ckpt_path``.

A second run that starts writing into a ``ckpt_path`` owned by a live run is refused. The
lock file ``.skyrl_lock.json`` records the owner (a run id), host, pid and a heartbeat that
rank 0 refreshes while the run lives. A lock whose process is gone (same host) or whose
heartbeat is older than ``stale_after_s`` belongs to a dead run and is taken over, with a
warning.

The lock is taken with an atomic primitive, so two runs that start at the same moment never
both hold it:

* local/POSIX disks: the record is written and fsynced under a unique name, then
  ``link()``-ed to ``.skyrl_lock.json`` (fails if it exists; where hard links are not
  supported, ``open(O_CREAT | O_EXCL)``). A dead run's lock is renamed away to a unique name
  first; if the file renamed is not the one judged dead (its owner wrote a heartbeat, or
  another run took it over in between) it is put back and the lock is not taken;
* S3: ``PutObject`` with ``If-None-Match: *``; a takeover is ``PutObject`` with
  ``If-Match: <ETag of the dead lock>``, and the heartbeat ``If-Match`` its own last ETag;
* GCS: the create uses ``ifGenerationMatch=0``; takeover and heartbeat are plain writes;
* stores without conditional writes (GCS takeovers, other fsspec stores, S3-compatible stores
  that answer 501 to the conditions): a plain write, then a read-back, which narrows the race
  to runs that start within a few milliseconds but cannot close it.

docs/reliability.md ("One writer per ckpt_path") has the details.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Optional

from skyrl_callbacks.errors import CheckpointLockError, StorageError
from skyrl_callbacks.storage import _fsync_dir, _pid_alive, local_io_error

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
        #: the ETag of our lock object (S3), for conditional heartbeats
        self._etag: Optional[str] = None

    def _record(self) -> dict:
        return {"owner": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def read(self) -> Optional[dict]:
        """The current lock record, or None."""
        try:
            return json.loads(self.storage.read_text(self.path))
        except (FileNotFoundError, ValueError):
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
            StorageError: the store does not answer (within ``retry_deadline_s``).
        """
        if self.held:
            return
        self.storage.makedirs(self.storage.root)
        data = json.dumps(self._record()).encode()
        rec: Optional[dict] = None
        for attempt in range(_ATTEMPTS):
            if attempt:
                time.sleep(random.uniform(0.02, 0.1))  # another run changed the lock under us
            rec, version = self._read_versioned()
            if rec is None and version is None:  # no lock: create it, unless another run does first
                if self._create(data):
                    break
                continue
            if rec is not None and rec.get("owner") == self.run_id:
                if isinstance(version, str):
                    self._etag = version
                break  # ours: a write whose answer was lost and that was retried
            if rec is None and self._being_written():
                continue  # another run is writing its lock (O_EXCL fallback): read it again
            if rec is not None and self._is_live(rec):
                age = time.time() - (_heartbeat(rec) or time.time())
                raise CheckpointLockError(
                    f"ckpt_path={self.storage.root!r} is in use by another live run (host {rec.get('host')}, "
                    f"pid {rec.get('pid')}, heartbeat {age:.0f} s ago). Two runs writing one ckpt_path would "
                    f"corrupt each other's checkpoints: wait for it to finish, use another ckpt_path, or, if that "
                    f"run is dead, delete {self.path}."
                )
            rec = rec or {}
            logger.warning(
                "taking over the lock of a dead run on %s (host %s, pid %s)", self.storage.root, rec.get("host"), rec.get("pid")
            )
            if self._take_over(version, data):
                break
        else:
            raise CheckpointLockError(
                f"ckpt_path={self.storage.root!r}: could not take the lock, other runs changed it {_ATTEMPTS} times "
                f"(owner now host {(rec or {}).get('host')}, pid {(rec or {}).get('pid')}). Use one ckpt_path per run."
            )
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

    # ------------------------------------------------------------------ atomic primitives
    def _kind(self) -> str:
        if self.storage.is_local:
            return "local"
        from skyrl_callbacks.cloud import _is_gcs, _is_s3

        return "s3" if _is_s3(self.storage.fs) else "gcs" if _is_gcs(self.storage.fs) else "other"

    def _read_versioned(self) -> tuple[Optional[dict], Any]:
        """``(record, version)`` of one and the same lock file: ``(None, None)`` when there is
        none; ``(None, version)`` when it cannot be parsed. ``version`` is ``(st_dev, st_ino)``
        locally, the ETag on S3, ``True`` elsewhere."""
        kind = self._kind()
        if kind == "local":
            try:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                return None, None
            except OSError as exc:
                raise local_io_error(exc, self.path, "reading") from exc
            try:
                st = os.fstat(fd)
                chunks = []
                while True:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
            finally:
                os.close(fd)
            return _parse(b"".join(chunks)), (st.st_dev, st.st_ino)
        if kind == "s3":
            try:
                raw, etag = self.storage._retry(self._s3_get, f"read {self.path}")
            except FileNotFoundError:
                return None, None
            return _parse(raw), etag
        try:
            raw = self.storage.read_bytes(self.path)
        except FileNotFoundError:
            return None, None
        return _parse(raw), True

    def _being_written(self) -> bool:
        """An empty local lock file younger than 5 s is being written by another run
        (``O_EXCL`` fallback, no hard links): not a dead run's lock."""
        if self._kind() != "local":
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True  # gone: read again
        return st.st_size == 0 and time.time() - st.st_mtime < 5.0

    def _s3_get(self) -> tuple[bytes, Optional[str]]:
        from fsspec.asyn import sync

        fs = self.storage.fs
        bucket, key, _ = fs.split_path(self.path)

        async def get():
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with resp["Body"] as body:
                raw = await body.read()
            return raw, resp.get("ETag")

        return sync(fs.loop, get)

    def _create(self, data: bytes) -> bool:
        """Create the lock file, atomically where the store allows; False: it exists."""
        kind = self._kind()
        if kind == "local":
            return self._create_local(data)
        if kind in ("s3", "gcs"):
            try:
                out = self.storage._retry(
                    lambda: self.storage.fs.pipe_file(self.path, data, mode="create"), f"create {self.path}"
                )
            except Exception as exc:  # noqa: BLE001 - classified below
                if _precondition_failed(exc):
                    return False
                if isinstance(exc, FileNotFoundError):  # no such bucket: name it and the fix
                    raise self.storage._no_bucket(self.path, exc) from exc
                if not _unsupported(exc):
                    raise
                logger.warning("%s does not support conditional writes (%s): the lock is written plainly and read back",
                               self.storage.endpoint, exc)
                self.storage.atomic_write(self.path, data)
                return True
            finally:
                self.storage._fresh(self.path)
            self._etag = _etag_of(out)
            return True
        self.storage.atomic_write(self.path, data)  # no conditional write: read-back only
        return True

    def _create_local(self, data: bytes) -> bool:
        try:
            return self._create_local_raw(data)
        except StorageError:
            raise
        except OSError as exc:  # a full disk, a read-only ckpt_path...: the error names the cause and the fix
            raise local_io_error(exc, self.path, "writing") from exc

    def _create_local_raw(self, data: bytes) -> bool:
        directory = os.path.dirname(self.path)
        tmp = f"{self.path}.new-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as fh:  # complete and durable before it takes the lock's name
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.path)  # atomic: fails if the lock exists
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
            # no hard links on this file system: exclusive create (readers may briefly see it empty)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            _fsync_dir(directory)

    def _take_over(self, version: Any, data: bytes) -> bool:
        """Replace the dead lock of ``version`` with ours, atomically where the store allows;
        False: the lock changed since it was read (a heartbeat, or another run took it)."""
        kind = self._kind()
        if kind == "local":
            aside = f"{self.path}.dead-{uuid.uuid4().hex[:12]}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise local_io_error(exc, self.path, "taking over") from exc
            st = os.stat(aside)
            if (st.st_dev, st.st_ino) != version:
                # not the file judged dead: put it back (unless yet another run created one)
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                except OSError as exc:
                    if exc.errno not in _NO_LINK:
                        raise
                    if not os.path.exists(self.path):
                        os.rename(aside, self.path)
                if os.path.exists(aside):
                    os.unlink(aside)
                return False
            os.unlink(aside)
            return self._create_local(data)
        if kind == "s3" and isinstance(version, str):
            try:
                out = self.storage._retry(
                    lambda: self.storage.fs.pipe_file(self.path, data, IfMatch=version), f"take over {self.path}"
                )
            except FileNotFoundError:
                return False  # removed meanwhile: create it
            except Exception as exc:  # noqa: BLE001
                if _precondition_failed(exc):
                    return False
                if not _unsupported(exc):
                    raise
                self.storage.atomic_write(self.path, data)
                return True
            finally:
                self.storage._fresh(self.path)
            self._etag = _etag_of(out)
            return True
        self.storage.atomic_write(self.path, data)  # GCS, other stores: plain write + read-back
        return True

    def _refresh(self) -> bool:
        """Write a fresh heartbeat; False when another run owns the lock now."""
        data = json.dumps(self._record()).encode()
        if self._kind() == "s3" and self._etag is not None:
            etag = self._etag
            try:
                out = self.storage._retry(
                    lambda: self.storage.fs.pipe_file(self.path, data, IfMatch=etag), f"heartbeat {self.path}"
                )
            except Exception as exc:  # noqa: BLE001
                if not (_precondition_failed(exc) or isinstance(exc, FileNotFoundError)):
                    raise
                rec, version = self._read_versioned()
                if rec is None or rec.get("owner") != self.run_id:
                    logger.error("lock on %s was taken by another run: %s", self.storage.root, rec)
                    return False
                self._etag = version  # our own earlier write landed although its answer was lost
                return True
            self._etag = _etag_of(out)
            return True
        rec = self.read()
        if rec is not None and rec.get("owner") != self.run_id:
            logger.error("lock on %s was taken by another run: %s", self.storage.root, rec)
            return False
        self.storage.atomic_write(self.path, data)
        return True

    def _beat(self) -> None:
        failures = 0
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._refresh():
                    return
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
        try:
            rec = self.read()
            if rec is not None and rec.get("owner") == self.run_id:
                self.storage.rm(self.path, recursive=False)
        except OSError as exc:  # the store is gone: the lock goes stale and is taken over later
            logger.warning("could not remove the lock %s: %s", self.path, exc)


_ATTEMPTS = 8
_NO_LINK = frozenset(
    e for e in (getattr(errno, n, None) for n in ("EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS", "EMLINK", "EXDEV")) if e
)


def _parse(raw: bytes) -> Optional[dict]:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _precondition_failed(exc: BaseException) -> bool:
    """A conditional write lost: S3 412 ``PreconditionFailed`` (s3fs: ``FileExistsError`` for
    ``If-None-Match``, ``OSError(EINVAL)`` for ``If-Match``), GCS 412."""
    for e in _chain(exc):
        if isinstance(e, FileExistsError):
            return True
        code = str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return True
        if str(getattr(e, "code", "")) == "412" or "PreconditionFailed" in str(e) or "Precondition Failed" in str(e):
            return True
    return False


def _unsupported(exc: BaseException) -> bool:
    """The store does not implement conditional writes (501 / NotImplemented)."""
    for e in _chain(exc):
        if isinstance(e, NotImplementedError):
            return True
        code = str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", ""))
        if code in ("NotImplemented", "501") or str(getattr(e, "code", "")) == "501":
            return True
    return False


def _etag_of(out: Any) -> Optional[str]:
    return out.get("ETag") if isinstance(out, dict) else None


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
