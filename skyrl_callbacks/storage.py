"""Storage: a checkpoint root on the local disk or behind an fsspec URL.

Paths stay ``str`` URLs end to end (``pathlib.Path("s3://b/k")`` silently becomes
``s3:/b/k``). The atomic commit lives here and only here:

* local (POSIX) file systems: write into a temporary sibling ``.tmp-global_step_N-<id>``,
  fsync every file and directory, then one atomic ``rename``;
* object stores (no rename): write in place, and commit by writing the manifest last.
  A directory without a manifest is invisible to resume, retention and listing.

On object stores every request goes through :func:`skyrl_callbacks.cloud.retrying`
(backoff on 5xx/SlowDown/resets, bounded by ``retry_deadline_s``), so a failure that
persists surfaces as :class:`~skyrl_callbacks.errors.StorageError`. Reads download the
file once (``cat``/``get``, retried) instead of issuing many small ranged reads; writes go
through a streaming writer that aborts (never commits a truncated object) on error and
records the size and checksum of what it wrote, so the manifest needs no read-back.
Staged saves write into a local directory (:func:`make_local_stage`) and upload it with
:meth:`Storage.upload_files` (concurrent, multipart).
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
import uuid
from typing import IO, Any, Callable, Iterable, Optional, TypeVar

from skyrl_callbacks.errors import MissingDependencyError, StorageError

logger = logging.getLogger(__name__)

__all__ = ["Storage", "MANIFEST_FILE", "TMP_PREFIX", "TRASH_PREFIX", "make_local_stage", "remove_local_stage",
           "looks_native"]

T = TypeVar("T")

MANIFEST_FILE = "skyrl_manifest.json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
#: Local staging directories of cloud saves: ``skyrl-stage-<host>-<pid>-<token>-r<rank>``.
LOCAL_STAGE_PREFIX = "skyrl-stage-"
#: Files up to this size are read into memory; larger ones are downloaded to a temp file.
READ_IN_MEMORY_MAX = 64 << 20
#: Default retry budget of one object-store operation, in seconds.
DEFAULT_RETRY_DEADLINE_S = 120.0
#: Default number of files one rank uploads at once.
DEFAULT_UPLOAD_CONCURRENCY = 8

_PROTOCOL_EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
}


def split_protocol(url: str) -> tuple[str, str]:
    """``("s3", "bucket/key")`` for ``s3://bucket/key``; ``("file", path)`` for local paths."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        return proto.lower(), rest
    return "file", url


class Storage:
    """File operations under one root URL, with the commit protocol of that kind of store.

    Args:
        url: local path or fsspec URL (``s3://``, ``gs://``, ``gcs://``, ``memory://``...).
        storage_options: keyword arguments for the fsspec filesystem (endpoint,
            credentials, region...); the backends also read their usual environment
            variables (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``...).
        local_tmp_dir: where downloads of large files go while they are read (object
            stores); default: the system temp dir.
        retry_deadline_s: retry budget of one object-store operation (see
            :func:`skyrl_callbacks.cloud.retrying`).
        upload_concurrency: files uploaded at once by :meth:`upload_files`.

    Raises:
        MissingDependencyError: the URL needs s3fs/gcsfs and it is not installed.
    """

    def __init__(
        self,
        url: str,
        storage_options: Optional[dict] = None,
        *,
        local_tmp_dir: Optional[str] = None,
        retry_deadline_s: float = DEFAULT_RETRY_DEADLINE_S,
        upload_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY,
    ) -> None:
        if not isinstance(url, str):
            url = os.fspath(url)
        self.protocol, rest = split_protocol(url)
        self.is_local = self.protocol in ("file", "local")
        self.storage_options = dict(storage_options or {})
        self.local_tmp_dir = local_tmp_dir
        self.retry_deadline_s = float(retry_deadline_s)
        self.upload_concurrency = int(upload_concurrency)
        from skyrl_callbacks.cloud import DEFAULT_CHUNK_SIZE, DEFAULT_MULTIPART_THRESHOLD

        #: files at least this large are uploaded in parts (staged saves)
        self.multipart_threshold = DEFAULT_MULTIPART_THRESHOLD
        #: part size of multipart uploads, and block size of streamed writes
        self.chunk_size = DEFAULT_CHUNK_SIZE
        # {normalised remote path: (size, algo, digest)} of files this process wrote
        self._known: dict[str, tuple[int, str, str]] = {}
        if self.is_local:
            self.root = os.path.abspath(os.path.expanduser(rest))
            self.fs = None
        else:
            self.root = f"{self.protocol}://{rest.rstrip('/')}"
            from skyrl_callbacks.cloud import endpoint_of, tune_client, with_network_defaults

            # every request gets connect/read timeouts and bounded client retries (the user's
            # storage_options win), so a silent store fails within the retry deadline; DCP's
            # FsspecWriter/Reader get the same options (and so fsspec's cached instance of self.fs)
            self.storage_options = with_network_defaults(self.protocol, self.storage_options, self.retry_deadline_s)
            self.fs = _make_fs(self.protocol, self.storage_options)
            tune_client(self.fs)
        #: the store's address, named in errors ("" for local paths)
        self.endpoint = "" if self.is_local else endpoint_of(self.protocol, self.storage_options)

    # ------------------------------------------------------------------ paths
    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def join(self, *parts: str) -> str:
        """Join path parts with ``/`` (never ``os.path`` for URLs)."""
        if self.is_local:
            return os.path.join(*parts)
        out = parts[0].rstrip("/")
        for p in parts[1:]:
            out = f"{out}/{p.strip('/')}"
        return out

    def child(self, *parts: str) -> str:
        """A path below the root."""
        return self.join(self.root, *parts)

    @staticmethod
    def basename(path: str) -> str:
        return posixpath.basename(path.rstrip("/"))

    # ------------------------------------------------------------------ object-store plumbing
    def _retry(self, fn: Callable[[], T], what: str) -> T:
        """Run an object-store operation with backoff on transient errors (local: plain call)."""
        if self.is_local:
            return fn()
        from skyrl_callbacks.cloud import retrying

        return retrying(fn, what=self._at(what), deadline_s=self.retry_deadline_s)

    def _at(self, what: str) -> str:
        """``what`` with the store's endpoint, for error messages."""
        return f"{what} (endpoint {self.endpoint})" if self.endpoint else what

    def _name_endpoint(self, exc: StorageError) -> StorageError:
        """``exc`` naming the store's endpoint (errors of the transfer helpers of ``cloud``)."""
        if not self.endpoint or self.endpoint in str(exc):
            return exc
        return StorageError(f"{exc} (endpoint {self.endpoint})")

    def _norm(self, path: str) -> str:
        return split_protocol(path)[1].strip("/")

    def _fresh(self, path: str) -> None:
        """Forget fsspec's cached listings of ``path`` (another rank/process may have written)."""
        try:
            self.fs.invalidate_cache(path)
        except Exception:  # noqa: BLE001 - a backend without a listings cache
            pass

    # ------------------------------------------------------------------ queries
    def exists(self, path: str) -> bool:
        if self.is_local:
            return os.path.exists(path)

        def check() -> bool:
            self._fresh(path)
            return bool(self.fs.exists(path))

        return self._retry(check, f"stat {path}")

    def isdir(self, path: str) -> bool:
        if self.is_local:
            return os.path.isdir(path)

        def check() -> bool:
            self._fresh(path)
            return bool(self.fs.isdir(path))

        return self._retry(check, f"stat {path}")

    def listdir(self, path: str) -> list[str]:
        """Base names directly under ``path`` ([] if it does not exist)."""
        if self.is_local:
            try:
                return sorted(os.listdir(path))
            except FileNotFoundError:
                return []

        def ls() -> list:
            try:
                return self.fs.ls(path, detail=False, refresh=True)
            except FileNotFoundError:
                return []

        entries = self._retry(ls, f"list {path}")
        bare = self._norm(path)
        names = set()
        for e in entries:
            name = posixpath.basename(str(e).rstrip("/"))
            if name and self._norm(str(e)) != bare:
                names.add(name)
        return sorted(names)

    def size(self, path: str) -> int:
        if self.is_local:
            return os.path.getsize(path)

        def get() -> int:
            self._fresh(path)
            return int(self.fs.size(path))

        return self._retry(get, f"stat {path}")

    def walk_files(self, top: str) -> dict[str, int]:
        """Every file below ``top`` as ``{relative posix path: size}``."""
        out: dict[str, int] = {}
        if self.is_local:
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    full = os.path.join(dirpath, name)
                    rel = os.path.relpath(full, top).replace(os.sep, "/")
                    out[rel] = os.path.getsize(full)
            return out
        prefix = top.rstrip("/")
        bare = self._norm(prefix)

        def find() -> dict:
            self._fresh(prefix)
            try:
                return self.fs.find(prefix, detail=True)
            except FileNotFoundError:
                return {}

        for path, info in self._retry(find, f"list {prefix}").items():
            rel = self._norm(str(path))
            rel = rel[len(bare):].lstrip("/") if rel.startswith(bare) else rel
            if info.get("type") == "directory" or not rel:
                continue
            out[rel] = int(info.get("size") or 0)
        return out

    # ------------------------------------------------------------------ IO
    def open(self, path: str, mode: str = "rb") -> IO[Any]:
        """Open a file.

        Object stores: ``"rb"`` downloads the object once (retried) into memory, or into a
        temporary file under ``local_tmp_dir`` when larger than ``READ_IN_MEMORY_MAX``, and
        returns a seekable handle; ``"wb"`` returns a streaming writer that uploads as it
        is written (multipart), aborts on error and records the size and checksum.
        """
        if self.is_local:
            if mode == "wb":
                self.makedirs(os.path.dirname(path) or ".")
                # checksummed as it is written: the manifest needs no read-back of the file
                return _LocalWriter(path, on_close=lambda size, algo, digest: self._remember(path, size, algo, digest))
            if "w" in mode or "a" in mode:
                self.makedirs(os.path.dirname(path) or ".")
            return open(path, mode)
        if mode in ("rb", "r"):
            fh = self._open_read(path)
            return io.TextIOWrapper(fh, encoding="utf-8") if mode == "r" else fh
        if mode == "wb":
            return self._open_write(path)
        return self.fs.open(path, mode)

    def _open_read(self, path: str) -> IO[bytes]:
        size = self.size(path)  # FileNotFoundError for a missing object (not retried)
        if size <= READ_IN_MEMORY_MAX:
            return io.BytesIO(self._retry(lambda: self.fs.cat_file(path), f"read {path}"))
        from skyrl_callbacks.cloud import download_files

        tmp_dir = self.local_tmp_dir or tempfile.gettempdir()
        os.makedirs(tmp_dir, exist_ok=True)
        local = os.path.join(tmp_dir, f".skyrl-read-{uuid.uuid4().hex[:12]}-{posixpath.basename(path)}")
        try:
            try:
                download_files(self.fs, {path: local}, max_concurrency=1, deadline_s=self.retry_deadline_s)
            except StorageError as exc:
                raise self._name_endpoint(exc) from exc
            fh = open(local, "rb")
        finally:
            try:
                os.unlink(local)  # the open handle keeps the data until it is closed
            except FileNotFoundError:
                pass
        return fh

    def _open_write(self, path: str) -> IO[bytes]:
        from skyrl_callbacks.cloud import open_for_write

        try:
            inner = open_for_write(self.fs, path, block_size=self.chunk_size, deadline_s=self.retry_deadline_s)
        except FileNotFoundError as exc:
            raise self._no_bucket(path, exc) from exc
        return _HashingWriter(
            inner,
            on_close=lambda size, algo, digest: self._remember(path, size, algo, digest),
        )

    def _remember(self, path: str, size: int, algo: str, digest: str) -> None:
        self._known[self._norm(path)] = (int(size), algo, digest)

    def read_bytes(self, path: str) -> bytes:
        if self.is_local:
            with open(path, "rb") as fh:
                return fh.read()
        return self._retry(lambda: self.fs.cat_file(path), f"read {path}")

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    def write_bytes(self, path: str, data: bytes, *, fsync: bool = True) -> None:
        """Write a whole file (not atomic on its own; see :meth:`atomic_write`)."""
        if self.is_local:
            self.makedirs(os.path.dirname(path) or ".")
            try:
                with open(path, "wb") as fh:
                    fh.write(data)
                    if fsync:
                        fh.flush()
                        os.fsync(fh.fileno())
            except OSError as exc:
                raise local_io_error(exc, path, "writing") from exc
            return
        self._put_bytes(path, data)

    def _put_bytes(self, path: str, data: bytes) -> None:
        def put() -> None:
            self.fs.pipe_file(path, data)
            self._fresh(path)

        try:
            self._retry(put, f"write {path} ({len(data)} bytes)")
        except FileNotFoundError as exc:
            raise self._no_bucket(path, exc) from exc

    def _no_bucket(self, path: str, exc: BaseException) -> StorageError:
        """A write that found no such object container: on an object store that means the bucket."""
        bucket = self._norm(path).split("/", 1)[0]
        return StorageError(
            f"writing {path}: the bucket {bucket!r} does not exist, or these credentials cannot see it ({exc}). "
            f"Create the bucket {self.protocol}://{bucket}, or fix the bucket name of the configured path "
            f"(ckpt_path/export_path {self.root!r})."
        )

    def atomic_write(self, path: str, data: bytes) -> None:
        """Replace ``path`` atomically: temp file + fsync + ``os.replace`` locally; a single
        PUT on object stores (readers see the old or the new object, never a torn one)."""
        if self.is_local:
            directory = os.path.dirname(path) or "."
            self.makedirs(directory)
            tmp = os.path.join(directory, f"{TMP_PREFIX}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except OSError as exc:
                raise local_io_error(exc, path, "writing") from exc
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            _fsync_dir(directory)
            return
        self._put_bytes(path, data)

    def makedirs(self, path: str) -> None:
        if self.is_local:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise local_io_error(exc, path, "creating the directory") from exc
        # object stores have no directories

    def rm(self, path: str, recursive: bool = True) -> None:
        """Remove a file or tree; a missing path is not an error."""
        if self.is_local:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=False)
            elif os.path.lexists(path):
                os.unlink(path)
            return

        def remove() -> None:
            self._fresh(path)
            try:
                if recursive:
                    self.fs.rm(path, recursive=True)
                else:
                    self.fs.rm_file(path)
            except FileNotFoundError:
                pass
            self._fresh(path)

        self._retry(remove, f"delete {path}")

    # ------------------------------------------------------------------ transfers
    def upload_files(self, local_top: str, remote_top: str, rel_paths: Iterable[str]) -> dict[str, int]:
        """Upload ``local_top/<rel>`` to ``remote_top/<rel>`` for each ``rel``, concurrently.

        ``upload_concurrency`` files at a time, large files as multipart uploads, each file
        retried within ``retry_deadline_s`` (see :func:`skyrl_callbacks.cloud.upload_files`).

        Returns:
            ``{rel: size}``.

        Raises:
            StorageError: a file could not be uploaded within its deadline.
        """
        rels = list(dict.fromkeys(rel_paths))
        if self.is_local:
            out = {}
            for rel in rels:
                dst = os.path.join(remote_top, *rel.split("/"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(os.path.join(local_top, *rel.split("/")), dst)
                out[rel] = os.path.getsize(dst)
            return out
        from skyrl_callbacks.cloud import upload_files

        pairs = [(os.path.join(local_top, *rel.split("/")), self.join(remote_top, rel)) for rel in rels]
        try:
            sizes = upload_files(
                self.fs,
                pairs,
                max_concurrency=self.upload_concurrency,
                multipart_threshold=self.multipart_threshold,
                chunk_size=self.chunk_size,
                deadline_s=self.retry_deadline_s,
            )
        except StorageError as exc:
            raise self._name_endpoint(exc) from exc
        except FileNotFoundError as exc:
            if any(not os.path.exists(local) for local, _remote in pairs):
                raise
            raise self._no_bucket(remote_top, exc) from exc
        self._fresh(remote_top)
        return {rel: sizes[remote] for rel, (_local, remote) in zip(rels, pairs)}

    def describe_files(self, top: str, rel_paths: Iterable[str], algo: str) -> dict[str, dict]:
        """``{rel: {"size", "hash"}}`` of files below ``top`` for the manifest.

        Local: every file is read and checksummed. Object stores: the size and checksum
        recorded when this process wrote or uploaded the file are used (no read-back);
        a file written by other means (DCP's fsspec writer) gets its size from a listing
        and ``hash: None`` (sizes are always verified, checksums only where recorded).

        Raises:
            StorageError: a file is not in the store.
        """
        from skyrl_callbacks.manifest import hash_file

        rels = list(rel_paths)
        out: dict[str, dict] = {}
        if self.is_local:
            for rel in rels:
                path = self.join(top, rel)
                known = self._known.pop(self._norm(path), None)
                try:
                    size_now = os.path.getsize(path)
                except OSError as exc:
                    raise local_io_error(exc, path, "checksumming") from exc
                if known is not None and known[1] == algo and known[0] == size_now:
                    out[rel] = {"size": known[0], "hash": known[2]}  # hashed while it was written
                else:  # written by other means (DCP, shutil): read it back
                    size, digest = hash_file(self, path, algo)
                    out[rel] = {"size": size, "hash": digest}
            return out
        missing = []
        for rel in rels:
            known = self._known.pop(self._norm(self.join(top, rel)), None)
            if known is not None and known[1] == algo:
                out[rel] = {"size": known[0], "hash": known[2]}
            else:
                missing.append(rel)
        if missing:
            listing = self.walk_files(top)
            for rel in missing:
                if rel not in listing:
                    raise StorageError(f"{self.join(top, rel)}: not found in the store after it was written.")
                out[rel] = {"size": listing[rel], "hash": None}
        return out

    def sync_files(self, top: str, rel_paths: Iterable[str]) -> None:
        """Local stores: flush these files to disk now (concurrently), so a later commit's fsync
        finds nothing left to write. Async saves call it in the background thread, keeping the
        writeback off the training loop. Object stores: nothing to do."""
        if not self.is_local:
            return
        paths = [self.join(top, rel) for rel in rel_paths]
        try:
            if len(paths) > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=min(8, len(paths)), thread_name_prefix="skyrl-fsync") as pool:
                    list(pool.map(_fsync_file, paths))
            else:
                for path in paths:
                    _fsync_file(path)
        except OSError as exc:
            raise local_io_error(exc, top, "flushing") from exc

    def forget_written(self, top: str) -> None:
        """Drop the recorded sizes/checksums of files below ``top``."""
        bare = self._norm(top) + "/"
        for key in [k for k in self._known if k.startswith(bare)]:
            del self._known[key]

    # ------------------------------------------------------------------ commit protocol
    @property
    def supports_rename(self) -> bool:
        return self.is_local

    def staging_dir(self, final_dir: str, token: str) -> str:
        """Where the files of ``final_dir`` are written before the commit."""
        if self.supports_rename:
            parent, name = os.path.split(final_dir.rstrip("/"))
            return os.path.join(parent, f"{TMP_PREFIX}{name}-{token}")
        return final_dir

    def prepare_staging(self, staging: str) -> None:
        """Make the staging directory empty and ready (object stores: remove crash leftovers)."""
        if self.supports_rename:
            if os.path.exists(staging):
                self.rm(staging)
            self.makedirs(staging)
            return
        self.forget_written(staging)
        if self.exists(staging):
            if self.exists(self.join(staging, MANIFEST_FILE)):
                # Re-saving a step that is already committed: un-commit it first so a crash in
                # between never leaves a manifest describing objects we are overwriting.
                self.rm(self.join(staging, MANIFEST_FILE), recursive=False)
            self.rm(staging)

    def commit(self, staging: str, final_dir: str, manifest: dict) -> None:
        """Publish ``staging`` as ``final_dir``. Only after this returns is it visible.

        Local: manifest written and every file fsynced, then one rename (a previous
        directory of the same name is moved aside first and removed after). Object stores:
        every file of the manifest is checked against a listing (present, same size), then
        the manifest is written last: it is the commit marker.

        Raises:
            StorageError: (object stores) a file of the manifest is missing or has another size.
        """
        data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        if not self.supports_rename:
            present = self.walk_files(final_dir)
            bad = []
            for rel, info in (manifest.get("files") or {}).items():
                if rel not in present:
                    bad.append(f"{rel} (missing)")
                elif present[rel] != info.get("size"):
                    bad.append(f"{rel} ({present[rel]} bytes, {info.get('size')} written)")
            if bad:
                raise StorageError(
                    f"{final_dir}: not committed, the store does not hold what was written: {', '.join(bad[:5])}"
                    f"{' ...' if len(bad) > 5 else ''}. The previous checkpoint is untouched."
                )
            self._put_bytes(self.join(final_dir, MANIFEST_FILE), data)
            self.forget_written(final_dir)
            return
        self.write_bytes(os.path.join(staging, MANIFEST_FILE), data)
        parent = os.path.dirname(final_dir.rstrip("/"))
        trash = None
        try:
            _fsync_tree(staging)  # a full disk can surface here (delayed allocation)
            if os.path.exists(final_dir):
                trash = os.path.join(parent, f"{TRASH_PREFIX}{os.path.basename(final_dir)}-{uuid.uuid4().hex[:8]}")
                os.rename(final_dir, trash)
            os.rename(staging, final_dir)
        except OSError as exc:
            raise local_io_error(exc, final_dir, "committing") from exc
        _fsync_dir(parent)
        if trash is not None:
            self.rm(trash)

    def delete_checkpoint(self, step_dir: str, *, remove: Optional[Callable[[str], None]] = None) -> None:
        """Delete a committed checkpoint so that a crash midway never leaves a partial one visible.

        Local: one rename to a ``.trash-`` sibling (atomic), then the tree is removed. Object
        stores: the manifest (the commit marker) goes first, then the objects. Once this returns
        the checkpoint is gone for every reader; ``remove`` (default :meth:`rm`, at once) is
        handed what is left to delete (the trash directory, the objects), e.g. to delete it in
        the background: a crash before it is done leaves a leftover that the next save removes.
        """
        remove = remove or self.rm
        if self.supports_rename:
            parent = os.path.dirname(step_dir.rstrip("/"))
            trash = os.path.join(parent, f"{TRASH_PREFIX}{os.path.basename(step_dir.rstrip('/'))}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(step_dir, trash)
            except FileNotFoundError:
                return
            _fsync_dir(parent)
            remove(trash)
            return
        self.rm(self.join(step_dir, MANIFEST_FILE), recursive=False)
        remove(step_dir)

    def is_committed(self, step_dir: str) -> bool:
        """True when ``step_dir`` is a complete, published checkpoint directory.

        Object stores: its manifest exists. A store that keeps failing raises
        :class:`StorageError` rather than answering False (an outage must not make a
        committed checkpoint look absent).
        """
        if self.supports_rename:
            if not os.path.isdir(step_dir):
                return False
            if os.path.exists(os.path.join(step_dir, MANIFEST_FILE)):
                return True
            # A checkpoint written by SkyRL itself has no manifest; its trainer_state.pt is
            # written last, and the directory exists only under its final name. A directory
            # holding only a trainer_state.pt (a stray copy) is not one: it needs model files too.
            return looks_native(self.walk_files(step_dir))
        return self.exists(self.join(step_dir, MANIFEST_FILE))

    def mtime(self, path: str) -> Optional[float]:
        """When ``path`` was last written (seconds since the epoch), or None when unknown."""
        if self.is_local:
            try:
                return os.stat(path).st_mtime_ns / 1e9
            except OSError:
                return None
        try:
            return float(self._retry(lambda: self.fs.modified(path), f"stat {path}").timestamp())
        except Exception:  # noqa: BLE001 - a backend without modification times, or no such object
            return None

    def set_aside(self, step_dir: str, tag: str = "superseded") -> str:
        """Move ``step_dir`` to ``{step_dir}.{tag}-<id>`` (a name resume, retention and the leftover
        cleanup never touch) and return the new path: the directory is kept, not replaced.

        Local: one rename. Object stores: every object is copied, then the original is deleted
        manifest first; an interruption leaves the original intact or a complete copy.
        """
        target = f"{step_dir.rstrip('/')}.{tag}-{new_token()}"
        if self.supports_rename:
            try:
                os.rename(step_dir, target)
            except OSError as exc:
                raise local_io_error(exc, step_dir, "moving aside") from exc
            _fsync_dir(os.path.dirname(step_dir.rstrip("/")))
            return target
        src = step_dir.rstrip("/")
        for rel in self.walk_files(src):
            self._retry(lambda rel=rel: self.fs.copy(self.join(src, rel), self.join(target, rel)), f"copy {src}/{rel}")
        self._fresh(target)
        self.delete_checkpoint(src)
        return target

    def leftovers(self) -> list[str]:
        """Staging/trash directories of interrupted saves directly under the root."""
        return [
            self.child(n)
            for n in self.listdir(self.root)
            if n.startswith(TMP_PREFIX) or n.startswith(TRASH_PREFIX)
        ]


#: Names inside a role directory that hold model state, in SkyRL's layouts (plain/FSDP, FSDP per-rank,
#: DCP, Megatron dist_checkpointing) and ours.
_NATIVE_MODEL_RE = re.compile(
    r"^(model_state\.pt|model_world_size_\d+_rank_\d+\.pt|model_state\.dcp|metadata\.json|\.metadata|common\.pt"
    r"|.+\.distcp|.+\.safetensors)$"
)


def looks_native(files: Iterable[str]) -> bool:
    """Whether the relative file paths of a ``global_step_N`` directory without a manifest make a
    committed SkyRL-native checkpoint: ``trainer_state.pt`` (SkyRL writes it last) and at least one
    role directory with model files."""
    files = list(files)
    if "trainer_state.pt" not in files:
        return False
    for rel in files:
        parts = rel.split("/")
        if len(parts) >= 2 and not parts[0].startswith(".") and parts[0] != "huggingface":
            if any(_NATIVE_MODEL_RE.match(p) for p in parts[1:]):
                return True
    return False


def local_io_error(exc: OSError, path: str, action: str) -> OSError:
    """A :class:`StorageError` that names the cause and the fix, for the local errors a user can act
    on (full disk, read-only or unwritable directory, a file where a directory should be); other
    errors are returned unchanged."""
    import errno as _errno

    if isinstance(exc, StorageError):
        return exc
    code = exc.errno
    where = f"{action} {path}"
    if code in (_errno.ENOSPC, getattr(_errno, "EDQUOT", -1)):
        msg = (f"{where}: no space left on the device (or the disk quota is exhausted). Free space there, point "
               f"ckpt_path/export_path at a larger volume, or keep fewer checkpoints (max_ckpts_to_keep). "
               f"Checkpoints committed earlier are untouched.")
    elif code in (_errno.EROFS, _errno.EACCES, _errno.EPERM):
        msg = (f"{where}: the location is not writable ({exc.strerror}). Make the directory writable for this user "
               f"(uid {os.getuid() if hasattr(os, 'getuid') else '?'}), or point ckpt_path/export_path at a "
               f"writable directory.")
    elif code == _errno.EFBIG:
        msg = (f"{where}: file too large: the file exceeds the largest file this process may write (the "
               f"RLIMIT_FSIZE limit, `ulimit -f`) or the file system's maximum file size. Raise the limit "
               f"(`ulimit -f unlimited`) or point ckpt_path/export_path at a file system without it. "
               f"Checkpoints committed earlier are untouched.")
    elif code in (_errno.ENOTDIR, _errno.EEXIST):
        msg = (f"{where}: a part of the path is a file, not a directory ({exc.strerror}). ckpt_path/export_path "
               f"must name directories: move the file away or choose another path.")
    elif code == _errno.EISDIR:
        msg = (f"{where}: {exc.filename or path} is a directory where a file belongs ({exc.strerror}). Move that "
               f"directory away (it is not something this package writes), then run again.")
    elif code == _errno.ENAMETOOLONG:
        msg = (f"{action} {path[:80]}...{path[-80:]} ({len(os.fsencode(path))} bytes): the path is too long for the "
               f"file system ({exc.strerror}; at most 255 bytes per name, 4096 per path). Use a shorter "
               f"ckpt_path/export_path.") if len(path) > 200 else (
               f"{where}: the path is too long for the file system ({exc.strerror}). Use a shorter "
               f"ckpt_path/export_path.")
    else:
        return exc
    out = StorageError(msg)
    out.errno = code  # (no filename/strerror: str() stays the message)
    return out


class _LocalRaw(io.RawIOBase):
    """Unbuffered local file that loops over short writes and keeps the first OS error."""

    def __init__(self, path: str, algo: Optional[str] = None) -> None:
        super().__init__()
        self.path = path
        self.error: Optional[OSError] = None
        self.size = 0
        self.algo = algo
        self._hash = None
        if algo is not None:
            from skyrl_callbacks.manifest import _hasher

            self._hash = _hasher(algo)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)

    @property
    def digest(self) -> Optional[str]:
        return None if self._hash is None else self._hash.hexdigest()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data) -> int:  # type: ignore[override]
        mv = memoryview(data).cast("B")
        done = 0
        while done < mv.nbytes:
            try:
                n = os.write(self._fd, mv[done:])
            except OSError as exc:
                if self.error is None:
                    self.error = exc
                raise
            if n == 0:  # pragma: no cover - write(2) returns 0 only for a zero-length request
                break
            done += n
        if self._hash is not None:
            self._hash.update(mv[:done])  # strictly sequential: no seek() on this file
        self.size += done
        return done

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


class _LocalWriter(io.BufferedWriter):
    """A local ``"wb"`` file for writers such as ``torch.save``.

    ``torch.save`` swallows the ``OSError`` of a failed write and raises an unreadable
    ``RuntimeError`` ("unexpected pos ..."); leaving the ``with`` block, this writer replaces
    that with the OS error it hit, as a :class:`StorageError` naming the cause and the fix.
    """

    def __init__(self, path: str, on_close: Optional[Callable[[int, str, str], None]] = None) -> None:
        from skyrl_callbacks.manifest import checksum_algo

        try:
            raw = _LocalRaw(path, checksum_algo() if on_close is not None else None)
        except OSError as exc:
            raise local_io_error(exc, path, "writing") from exc
        super().__init__(raw, buffer_size=1 << 20)
        self._path = path
        self._on_close = on_close

    def __exit__(self, et, ev, tb) -> bool:
        error = None
        try:
            self.close()
        except OSError as exc:  # the final flush
            error = exc
        error = self.raw.error or error
        if error is not None:
            raise local_io_error(error, self._path, "writing") from error
        if et is None and self._on_close is not None:
            self._on_close(self.raw.size, self.raw.algo, self.raw.digest)
        return False


class _HashingWriter(io.RawIOBase):
    """Forwards writes to a :class:`~skyrl_callbacks.cloud.StreamingWriter`, checksumming them;
    reports ``(size, algo, digest)`` after a successful close. An exception inside its
    ``with`` block aborts the upload."""

    def __init__(self, inner: Any, on_close: Callable[[int, str, str], None]) -> None:
        super().__init__()
        from skyrl_callbacks.manifest import _hasher, checksum_algo

        self._inner = inner
        self._on_close = on_close
        self._algo = checksum_algo()
        self._hash = _hasher(self._algo)
        self._size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._size

    def write(self, data) -> int:  # type: ignore[override]
        mv = memoryview(data).cast("B")
        n = self._inner.write(mv)
        self._hash.update(mv)
        self._size += mv.nbytes
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._inner.close()
            self._on_close(self._size, self._algo, self._hash.hexdigest())
        finally:
            super().close()

    def abort(self) -> None:
        if not self.closed:
            self._inner.abort()
            super().close()

    def __exit__(self, et, ev, tb) -> None:
        if et is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        try:
            if not self.closed:
                self.abort()
        except Exception:  # noqa: BLE001
            pass


def _make_fs(protocol: str, storage_options: dict):
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is a hard dependency
        raise MissingDependencyError("fsspec", "all", "cloud storage") from exc
    if protocol in _PROTOCOL_EXTRAS:
        module, extra = _PROTOCOL_EXTRAS[protocol]
        try:
            __import__(module)
        except ImportError as exc:
            raise MissingDependencyError(module, extra, f"{protocol}:// checkpoint paths") from exc
    try:
        return fsspec.filesystem(protocol, **storage_options)
    except (ImportError, ValueError) as exc:
        raise StorageError(
            f"cannot open a {protocol}:// filesystem: {exc}. Use a local path, s3://, gs:// or the URL of an "
            f"installed fsspec filesystem (check the scheme for typos), with its options in storage_options."
        ) from exc


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: str) -> None:
    """fsync every file and directory below ``top`` (files first, then their directories).

    Files are flushed concurrently (a deeper device queue; the files of many ranks flush in
    parallel), the directories after all of them.
    """
    files, dirs = [], []
    for dirpath, _dirs, names in os.walk(top, topdown=False):
        files += [os.path.join(dirpath, n) for n in names]
        dirs.append(dirpath)
    if len(files) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, len(files)), thread_name_prefix="skyrl-fsync") as pool:
            list(pool.map(_fsync_file, files))  # re-raises the first error
    else:
        for path in files:
            _fsync_file(path)
    for dirpath in dirs:
        _fsync_dir(dirpath)


def iter_chunks(fh: IO[bytes], size: int = 8 << 20) -> Iterable[bytes]:
    while True:
        chunk = fh.read(size)
        if not chunk:
            return
        yield chunk


def new_token() -> str:
    return uuid.uuid4().hex[:12]


def upload_local_dir(storage: "Storage", local_dir: str, remote_dir: str) -> dict[str, int]:
    """Copy a local directory tree to ``remote_dir`` of ``storage`` (concurrently, with retries).

    On object stores the size and checksum of every file are recorded (computed from the
    local copy), so :meth:`Storage.describe_files` can build the manifest without reading
    the objects back.

    Returns:
        ``{relative posix path: size}`` (empty for a local ``storage``).
    """
    if storage.is_local:
        shutil.copytree(local_dir, remote_dir, dirs_exist_ok=True)
        return {}
    from skyrl_callbacks.manifest import checksum_algo, hash_file

    local = Storage(local_dir)
    rels = []
    algo = checksum_algo()
    for dirpath, _dirs, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), local_dir).replace(os.sep, "/")
            rels.append(rel)
    sizes = storage.upload_files(local_dir, remote_dir, rels)
    for rel in rels:
        size, digest = hash_file(local, os.path.join(local_dir, *rel.split("/")), algo)
        storage._remember(storage.join(remote_dir, rel), size, algo, digest)
    return sizes


# --------------------------------------------------------------------------- local staging
_STAGE_RE = re.compile(r"^" + re.escape(LOCAL_STAGE_PREFIX) + r"(?P<host>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)-r(?P<rank>\d+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname() or "host")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_local_stage(base_dir: Optional[str], token: str, rank: int) -> str:
    """Create this rank's local staging directory for one cloud save and return it.

    ``{base_dir}/skyrl-stage-<host>-<pid>-<token>-r<rank>`` (``base_dir`` defaults to the
    system temp dir). Stages left by dead processes of this host (a crash or SIGKILL in
    the middle of a save) are removed first.
    """
    base = os.path.abspath(os.path.expanduser(base_dir or tempfile.gettempdir()))
    os.makedirs(base, exist_ok=True)
    host = _host()
    for name in os.listdir(base):
        m = _STAGE_RE.match(name)
        if m and m.group("host") == host and not _pid_alive(int(m.group("pid"))):
            logger.info("removing the local stage of a dead process: %s", os.path.join(base, name))
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    path = os.path.join(base, f"{LOCAL_STAGE_PREFIX}{host}-{os.getpid()}-{token}-r{int(rank)}")
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def remove_local_stage(path: Optional[str]) -> None:
    """Remove a directory made by :func:`make_local_stage` (best effort)."""
    if path:
        shutil.rmtree(path, ignore_errors=True)
