"""Storage: a checkpoint root on the local disk or behind an fsspec URL.

Paths stay ``str`` URLs end to end (``pathlib.Path("s3://b/k")`` silently becomes
``s3:/b/k``). The atomic commit lives here and only here:

* local (POSIX) file systems: write into a temporary sibling ``.tmp-global_step_N-<id>``,
  fsync every file and directory, then one atomic ``rename``;
* object stores (no rename): write in place, and commit by writing the manifest last.
  A directory without a manifest is invisible to resume, retention and listing.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from typing import IO, Any, Iterable, Optional

from skyrl_callbacks.errors import MissingDependencyError, StorageError

logger = logging.getLogger(__name__)

__all__ = ["Storage", "MANIFEST_FILE", "TMP_PREFIX", "TRASH_PREFIX"]

MANIFEST_FILE = "skyrl_manifest.json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"

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
        storage_options: keyword arguments for the fsspec filesystem.

    Raises:
        MissingDependencyError: the URL needs s3fs/gcsfs and it is not installed.
    """

    def __init__(self, url: str, storage_options: Optional[dict] = None) -> None:
        if not isinstance(url, str):
            url = os.fspath(url)
        self.protocol, rest = split_protocol(url)
        self.is_local = self.protocol in ("file", "local")
        self.storage_options = dict(storage_options or {})
        if self.is_local:
            self.root = os.path.abspath(os.path.expanduser(rest))
            self.fs = None
        else:
            self.root = f"{self.protocol}://{rest.rstrip('/')}"
            self.fs = _make_fs(self.protocol, self.storage_options)

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

    def _key(self, path: str) -> str:
        # fsspec methods take paths without protocol for most backends but accept URLs too.
        return path

    # ------------------------------------------------------------------ queries
    def exists(self, path: str) -> bool:
        if self.is_local:
            return os.path.exists(path)
        return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        if self.is_local:
            return os.path.isdir(path)
        return self.fs.isdir(path)

    def listdir(self, path: str) -> list[str]:
        """Base names directly under ``path`` ([] if it does not exist)."""
        if self.is_local:
            try:
                return sorted(os.listdir(path))
            except FileNotFoundError:
                return []
        try:
            entries = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries})

    def size(self, path: str) -> int:
        if self.is_local:
            return os.path.getsize(path)
        return int(self.fs.size(path))

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
        bare = split_protocol(prefix)[1].lstrip("/")
        for path, info in self.fs.find(prefix, detail=True).items():
            rel = str(path).split("://", 1)[-1].lstrip("/")
            rel = rel[len(bare):].lstrip("/") if rel.startswith(bare) else rel
            if info.get("type") == "directory":
                continue
            out[rel] = int(info.get("size") or 0)
        return out

    # ------------------------------------------------------------------ IO
    def open(self, path: str, mode: str = "rb") -> IO[Any]:
        if self.is_local:
            if "w" in mode or "a" in mode:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            return open(path, mode)
        return self.fs.open(path, mode)

    def read_bytes(self, path: str) -> bytes:
        with self.open(path, "rb") as fh:
            return fh.read()

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    def write_bytes(self, path: str, data: bytes, *, fsync: bool = True) -> None:
        """Write a whole file (not atomic on its own; see :meth:`atomic_write`)."""
        if self.is_local:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
                if fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            return
        self.fs.pipe_file(path, data)

    def atomic_write(self, path: str, data: bytes) -> None:
        """Replace ``path`` atomically: temp file + fsync + ``os.replace`` locally; a single
        PUT on object stores (readers see the old or the new object, never a torn one)."""
        if self.is_local:
            directory = os.path.dirname(path) or "."
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f"{TMP_PREFIX}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            _fsync_dir(directory)
            return
        self.fs.pipe_file(path, data)

    def makedirs(self, path: str) -> None:
        if self.is_local:
            os.makedirs(path, exist_ok=True)
        # object stores have no directories

    def rm(self, path: str, recursive: bool = True) -> None:
        """Remove a file or tree; a missing path is not an error."""
        if self.is_local:
            import shutil

            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=False)
            elif os.path.lexists(path):
                os.unlink(path)
            return
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

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
            os.makedirs(staging, exist_ok=True)
            return
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
        the manifest is written last and is the commit marker.
        """
        data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        if not self.supports_rename:
            self.fs.pipe_file(self.join(final_dir, MANIFEST_FILE), data)
            return
        self.write_bytes(os.path.join(staging, MANIFEST_FILE), data)
        _fsync_tree(staging)
        parent = os.path.dirname(final_dir.rstrip("/"))
        trash = None
        if os.path.exists(final_dir):
            trash = os.path.join(parent, f"{TRASH_PREFIX}{os.path.basename(final_dir)}-{uuid.uuid4().hex[:8]}")
            os.rename(final_dir, trash)
        os.rename(staging, final_dir)
        _fsync_dir(parent)
        if trash is not None:
            self.rm(trash)

    def delete_checkpoint(self, step_dir: str) -> None:
        """Delete a committed checkpoint so that a crash midway never leaves a partial one visible.

        Local: one rename to a ``.trash-`` sibling (atomic), then the tree is removed. Object
        stores: the manifest (the commit marker) goes first, then the objects.
        """
        if self.supports_rename:
            parent = os.path.dirname(step_dir.rstrip("/"))
            trash = os.path.join(parent, f"{TRASH_PREFIX}{os.path.basename(step_dir.rstrip('/'))}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(step_dir, trash)
            except FileNotFoundError:
                return
            _fsync_dir(parent)
            self.rm(trash)
            return
        self.rm(self.join(step_dir, MANIFEST_FILE), recursive=False)
        self.rm(step_dir)

    def is_committed(self, step_dir: str) -> bool:
        """True when ``step_dir`` is a complete, published checkpoint directory."""
        if self.supports_rename:
            if not os.path.isdir(step_dir):
                return False
            if os.path.exists(os.path.join(step_dir, MANIFEST_FILE)):
                return True
            # A checkpoint written by SkyRL itself has no manifest; its trainer_state.pt is
            # written last, and the directory exists only under its final name.
            return os.path.exists(os.path.join(step_dir, "trainer_state.pt"))
        return self.exists(self.join(step_dir, MANIFEST_FILE))

    def leftovers(self) -> list[str]:
        """Staging/trash directories of interrupted saves directly under the root."""
        return [
            self.child(n)
            for n in self.listdir(self.root)
            if n.startswith(TMP_PREFIX) or n.startswith(TRASH_PREFIX)
        ]


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
        raise StorageError(f"cannot open a {protocol}:// filesystem: {exc}") from exc


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


def _fsync_tree(top: str) -> None:
    """fsync every file and directory below ``top`` (files first, then their directories)."""
    for dirpath, _dirs, files in os.walk(top, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
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
    """Copy a local directory tree to ``remote_dir`` of ``storage`` (concurrently, with retries)."""
    if storage.is_local:
        import shutil

        shutil.copytree(local_dir, remote_dir, dirs_exist_ok=True)
        return {}
    from skyrl_callbacks.cloud import upload_dir

    return upload_dir(storage.fs, local_dir, remote_dir)
