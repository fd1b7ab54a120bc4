"""The manifest: every file of a committed checkpoint with its size and a fast checksum.

On object stores the manifest is the commit marker; everywhere it is what ``verify``
checks. The checksum is xxh3-64 when ``xxhash`` is installed (it runs far faster than the
disk), else zlib's crc32.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from typing import TYPE_CHECKING, Any, Iterable, Optional

from skyrl_callbacks.storage import MANIFEST_FILE

if TYPE_CHECKING:
    from skyrl_callbacks.storage import Storage

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "checksum_algo", "hash_file", "build_manifest", "read_manifest", "verify_dir"]

FORMAT_VERSION = 1
_CHUNK = 8 << 20


def checksum_algo() -> str:
    try:
        import xxhash  # noqa: F401

        return "xxh3_64"
    except ImportError:
        return "crc32"


def _hasher(algo: str):
    if algo == "xxh3_64":
        import xxhash

        return xxhash.xxh3_64()
    if algo == "crc32":
        return _Crc32()
    raise ValueError(f"unknown checksum algorithm {algo!r}")


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def hash_file(storage: "Storage", path: str, algo: Optional[str] = None) -> tuple[int, str]:
    """``(size, hexdigest)`` of one file."""
    algo = algo or checksum_algo()
    h = _hasher(algo)
    size = 0
    with storage.open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()


def hash_files(storage: "Storage", top: str, rel_paths: Iterable[str], algo: Optional[str] = None) -> dict[str, dict]:
    """``{rel: {"size", "hash"}}`` for files below ``top``."""
    algo = algo or checksum_algo()
    out = {}
    for rel in rel_paths:
        size, digest = hash_file(storage, storage.join(top, rel), algo)
        out[rel] = {"size": size, "hash": digest}
    return out


def build_manifest(
    files: dict[str, dict], *, step: int, world_size: int, strategies: dict[str, str], algo: str, extra: Optional[dict] = None
) -> dict[str, Any]:
    """The manifest document (JSON-serialisable)."""
    from skyrl_callbacks import __version__

    doc = {
        "format": "skyrl-callbacks",
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "step": int(step),
        "world_size": int(world_size),
        "strategies": dict(strategies),
        "checksum_algo": algo,
        "created_unix": time.time(),
        "files": dict(sorted(files.items())),
    }
    if extra:
        doc.update(extra)
    return doc


def read_manifest(storage: "Storage", step_dir: str) -> Optional[dict]:
    """The manifest of ``step_dir`` or None when it has none (e.g. a SkyRL-native checkpoint)."""
    path = storage.join(step_dir, MANIFEST_FILE)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def verify_dir(storage: "Storage", step_dir: str, *, checksums: bool = True, manifest: Optional[dict] = None) -> list[str]:
    """Problems found in ``step_dir`` against its manifest ([] means it verified).

    Sizes are always checked; checksums when ``checksums`` is true. ``manifest``: the manifest
    already read by the caller (not fetched again).
    """
    try:
        if manifest is None:
            manifest = read_manifest(storage, step_dir)
    except (ValueError, OSError) as exc:
        return [f"{MANIFEST_FILE}: unreadable ({exc})"]
    if manifest is None:
        return [f"{MANIFEST_FILE}: missing"]
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{MANIFEST_FILE}: no file list"]
    problems = []
    present = storage.walk_files(step_dir)
    algo = manifest.get("checksum_algo", "crc32")
    for rel, info in files.items():
        if rel not in present:
            problems.append(f"{rel}: missing")
            continue
        if present[rel] != info.get("size"):
            problems.append(f"{rel}: size {present[rel]} != {info.get('size')} in the manifest")
            continue
        if checksums and info.get("hash"):
            _size, digest = hash_file(storage, storage.join(step_dir, rel), algo)
            if digest != info["hash"]:
                problems.append(f"{rel}: checksum mismatch ({algo})")
    return problems


def dumps(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
