"""``skyrl-ckpt``: list, inspect, verify, prune, export and convert SkyRL checkpoints.

Also available as ``python -m skyrl_callbacks``. Every command takes local paths and fsspec
URLs (``s3://``, ``gs://``, ...; ``--storage-options JSON`` passes endpoint/credentials).

Exit codes: 0 ok, 1 a check failed (corrupt checkpoint, failed verification, I/O error),
2 usage error or bad input (missing path, not a checkpoint, unsupported format).

The terms used below:

* ``CKPT_PATH``: the ``ckpt_path`` of a run, holding ``global_step_N`` directories and the
  pointer ``latest_ckpt_global_step.txt``;
* ``CKPT_DIR``: one ``global_step_N`` directory (``policy/``, ``critic/``, ``trainer_state.pt``...).

See ``docs/cli.md`` for examples of every command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from skyrl_callbacks import rules
from skyrl_callbacks.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    MissingDependencyError,
    StorageError,
    UntrustedCheckpointError,
)
from skyrl_callbacks.storage import MANIFEST_FILE, TMP_PREFIX, TRASH_PREFIX, Storage, looks_native, new_token

__all__ = ["main", "console_main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

logger = logging.getLogger("skyrl_callbacks.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

PROG = "skyrl-ckpt"
DATA_FILE = "data.pt"
TRAINER_STATE_FILE = "trainer_state.pt"
HF_DIR = "huggingface"
MODEL_FILE = "model_state.pt"
OPTIMIZER_FILE = "optimizer_state.pt"
SCHEDULER_FILE = "lr_scheduler_state.pt"
FSDP_CONFIG_FILE = "fsdp_config.json"
MODEL_DCP_DIR = "model_state.dcp"
OPTIMIZER_DCP_DIR = "optimizer_state.dcp"
DCP_METADATA = ".metadata"
MEGATRON_METADATA = "metadata.json"
_MULTI_KEY = "__skyrl_multi__"

_NATIVE_RE = re.compile(r"^(model|optim|extra_state)_world_size_(\d+)_rank_(\d+)\.pt$")
# leftovers of interrupted saves that this package writes (never anything else)
_LEFTOVER_RE = re.compile(r"^\.(tmp|trash)-(global_step_\d+|latest_ckpt_global_step\.txt)-[0-9a-f]{6,32}$")
_CHUNK = 8 << 20


class CLIError(Exception):
    """An error reported as one line, with an exit code (2 = usage/bad input by default)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# =========================================================================== small helpers
def _human(n: Optional[float]) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _jsonable(obj: Any, depth: int = 0) -> Any:
    """A JSON-safe summary of ``obj`` (tensors become shape/dtype, unknown objects their repr)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None  # type: ignore[assignment]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if torch is not None and isinstance(obj, torch.Tensor):
        try:
            if obj.numel() == 1 and not _is_fake(obj):
                return obj.item()
        except Exception:  # noqa: BLE001
            pass
        return {"tensor": {"shape": list(obj.shape), "dtype": _dtype_name(obj.dtype)}}
    if depth > 6:
        return repr(obj)[:200]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in list(obj.items())[:200]}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in list(obj)[:200]]
    if type(obj).__name__ == "ndarray":
        return {"array": {"shape": list(obj.shape), "dtype": str(obj.dtype)}}
    return repr(obj)[:200]


def _short_repr(obj: Any, limit: int = 160) -> str:
    text = json.dumps(_jsonable(obj), default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _is_fake(t: Any) -> bool:
    """A tensor without data (loaded onto the meta device, or a FakeTensor)."""
    return type(t).__name__ == "FakeTensor" or getattr(getattr(t, "device", None), "type", None) == "meta"


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence torch.distributed's chatter (no process group, deprecations)."""
    try:
        from skyrl_callbacks.writers.fsdp import _quiet as fsdp_quiet
    except ImportError:  # pragma: no cover
        fsdp_quiet = contextlib.nullcontext
    with fsdp_quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _Progress:
    """A tqdm bar on stderr when enabled and tqdm is installed; otherwise silent."""

    def __init__(self, enabled: bool, total: Optional[float] = None, desc: str = "", unit: str = "B") -> None:
        self._bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        try:
            self._bar = tqdm(
                total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                leave=False, file=sys.stderr, dynamic_ncols=True,
            )
        except Exception:  # noqa: BLE001 - a progress bar must never fail a command
            self._bar = None

    def update(self, n: float = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_description(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description(desc)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _progress_enabled(args: argparse.Namespace) -> bool:
    if getattr(args, "no_progress", False):
        return False
    if getattr(args, "progress", False):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")


def _warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


# =========================================================================== storage / paths
def _parse_storage_options(text: Optional[str]) -> dict:
    if not text:
        env = os.environ.get("SKYRL_CKPT_STORAGE_OPTIONS")
        if not env:
            return {}
        text = env
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise CLIError(f"--storage-options {text}: cannot read the file ({exc}).") from exc
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CLIError(
            f"--storage-options: not valid JSON ({exc}). Example: "
            "--storage-options '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'"
        ) from exc
    if not isinstance(value, dict):
        raise CLIError(f"--storage-options: expected a JSON object, got {type(value).__name__}.")
    return value


def _open(url: str, args: argparse.Namespace) -> Storage:
    if not url:
        raise CLIError("an empty path was given.")
    return Storage(url, args.storage_options)


def _listdir(st: Storage, path: str) -> list[str]:
    if st.is_local and os.path.isfile(path):
        raise CLIError(f"{path}: is a file, expected a directory.")
    return [n for n in st.listdir(path) if n]


def _is_role_listing(names: Iterable[str]) -> bool:
    names = set(names)
    if names & {MODEL_FILE, FSDP_CONFIG_FILE, MODEL_DCP_DIR}:
        return True
    if any(_NATIVE_RE.match(n) for n in names):
        return True
    return MEGATRON_METADATA in names and any(n.endswith(".distcp") for n in names)


def _classify(st: Storage, path: str) -> str:
    """``step``, ``root``, ``role``, ``hf`` (a HF folder), ``empty`` or ``missing``."""
    names = set(_listdir(st, path))
    if not names:
        return "empty" if st.exists(path) else "missing"
    if MANIFEST_FILE in names and any(n.endswith(".safetensors") for n in names):
        return "hf"
    if MANIFEST_FILE in names or TRAINER_STATE_FILE in names:
        return "step"
    if rules.parse_step_dirname(path) is not None and not _is_role_listing(names):
        return "step"
    if rules.POINTER_FILE in names or any(rules.parse_step_dirname(n) is not None for n in names):
        return "root"
    if _is_role_listing(names):
        return "role"
    if any(n.endswith(".safetensors") for n in names):
        return "hf"
    return "unknown"


def _not_found(path: str, kind: str) -> CLIError:
    if kind == "missing":
        return CLIError(f"{path}: does not exist.")
    if kind == "empty":
        return CLIError(f"{path}: is empty.")
    return CLIError(f"{path}: not a checkpoint directory (no global_step_N, {MANIFEST_FILE} or {TRAINER_STATE_FILE}).")


def _resolve_step_dir(st: Storage, path: str, *, allow_role: bool = False) -> tuple[str, str]:
    """``(path, kind)`` of a checkpoint directory; a CKPT_PATH resolves to the step resume would pick."""
    kind = _classify(st, path)
    if kind == "root":
        committed = _committed_steps(st, path)
        pointer = _read_pointer(st, path)
        step, note = rules.select_resume_step(pointer, committed)
        if step is None:
            raise CLIError(f"{path}: holds no committed checkpoint.")
        chosen = st.join(path, rules.step_dirname(step))
        print(f"{PROG}: using {chosen}" + (f" ({note})" if note else " (the pointer's checkpoint)"), file=sys.stderr)
        return chosen, "step"
    if kind == "step" or (allow_role and kind in ("role", "hf")):
        return path, kind
    raise _not_found(path, kind)


def _committed_steps(st: Storage, root: str) -> list[int]:
    out = []
    for name in _listdir(st, root):
        step = rules.parse_step_dirname(name)
        if step is not None and st.is_committed(st.join(root, name)):
            out.append(step)
    return sorted(out)


def _read_pointer(st: Storage, root: str) -> Optional[int]:
    try:
        return rules.parse_pointer(st.read_text(st.join(root, rules.POINTER_FILE)))
    except (FileNotFoundError, OSError, UnicodeDecodeError):
        return None


def _read_manifest(st: Storage, step_dir: str) -> tuple[Optional[dict], Optional[str]]:
    """``(manifest or None, error or None)``."""
    path = st.join(step_dir, MANIFEST_FILE)
    try:
        if not st.exists(path):
            return None, None
        doc = json.loads(st.read_text(path))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        return None, f"{MANIFEST_FILE}: unreadable ({exc})"
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        return None, f"{MANIFEST_FILE}: no file list"
    return doc, None


def _open_ranged(st: Storage, path: str) -> Any:
    """A seekable handle that reads only what is asked for (ranged GETs on object stores).

    ``Storage.open`` downloads a whole object; reading a pickle's header or a safetensors
    header of a multi-GB file must not.
    """
    if st.is_local:
        return open(path, "rb")
    return st.fs.open(path, "rb", block_size=1 << 20, cache_type="readahead")


def _torch_load_small(st: Storage, path: str) -> Any:
    """``torch.load`` of a small pickle (trainer_state.pt, data.pt, scheduler state)."""
    from skyrl_callbacks.writers.plain import torch_load

    with _quiet():
        return torch_load(st, path)


def _copy_file(src_st: Storage, src: str, dst_st: Storage, dst: str, bar: Optional[_Progress] = None) -> int:
    if src_st.is_local and dst_st.is_local:
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        shutil.copyfile(src, dst)
        size = os.path.getsize(dst)
        if bar:
            bar.update(size)
        return size
    size = 0
    with src_st.open(src, "rb") as fin, dst_st.open(dst, "wb") as fout:
        while True:
            chunk = fin.read(_CHUNK)
            if not chunk:
                break
            fout.write(chunk)
            size += len(chunk)
            if bar:
                bar.update(len(chunk))
    return size


# =========================================================================== manifest checks
def _hash(st: Storage, path: str, algo: str, bar: Optional[_Progress]) -> str:
    from skyrl_callbacks.manifest import _hasher

    try:
        h = _hasher(algo)
    except ImportError as exc:
        raise MissingDependencyError("xxhash", "fast", f"verifying {algo} checksums") from exc
    except ValueError as exc:
        raise CorruptCheckpointError(f"{MANIFEST_FILE}: {exc}") from exc
    with st.open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            if bar:
                bar.update(len(chunk))
    return h.hexdigest()


def _check_files(
    st: Storage, step_dir: str, manifest: dict, present: dict[str, int], *, checksums: bool, bar: Optional[_Progress]
) -> list[dict]:
    """One entry per file: ``{"file", "size", "status": ok|missing|size_mismatch|checksum_mismatch|extra}``."""
    algo = manifest.get("checksum_algo", "crc32")
    out = []
    for rel, info in sorted(manifest["files"].items()):
        want = info.get("size") if isinstance(info, dict) else None
        entry: dict[str, Any] = {"file": rel, "size": want, "status": "ok"}
        if rel not in present:
            entry["status"] = "missing"
            entry["detail"] = "missing"
        elif present[rel] != want:
            entry["status"] = "size_mismatch"
            entry["actual_size"] = present[rel]
            entry["detail"] = f"size {present[rel]} != {want} in the manifest"
            if bar:
                bar.update(want or 0)
        elif checksums and isinstance(info, dict) and info.get("hash"):
            digest = _hash(st, st.join(step_dir, rel), algo, bar)
            if digest != info["hash"]:
                entry["status"] = "checksum_mismatch"
                entry["detail"] = f"checksum mismatch ({algo}: {digest} != {info['hash']} in the manifest)"
        elif bar:
            bar.update(want or 0)
        out.append(entry)
    for rel in sorted(set(present) - set(manifest["files"]) - {MANIFEST_FILE}):
        out.append({"file": rel, "size": present[rel], "status": "extra", "detail": "not in the manifest"})
    return out


def _failed(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e["status"] not in ("ok", "extra")]


# =========================================================================== layouts
def _role_layout(rel_names: Iterable[str]) -> str:
    """Layout of a role directory from the names of its files (relative to it)."""
    top = {n.split("/")[0] for n in rel_names}
    if MODEL_DCP_DIR in top:
        return "fsdp-sharded"
    if any(_NATIVE_RE.match(n) for n in top):
        return "skyrl-native"
    if MEGATRON_METADATA in top and any(n.endswith(".distcp") for n in top) and FSDP_CONFIG_FILE not in top:
        return "megatron"
    if MODEL_FILE in top:
        return "fsdp-full" if FSDP_CONFIG_FILE in top else "plain"
    if any(n.endswith(".safetensors") for n in top):
        return "hf"
    return "unknown"


def _strategy_of_layout(layout: str) -> str:
    return {"fsdp-sharded": "fsdp", "fsdp-full": "fsdp", "skyrl-native": "fsdp", "plain": "plain",
            "megatron": "megatron", "hf": "hf"}.get(layout, "unknown")


def _native_world(rel_names: Iterable[str]) -> Optional[int]:
    for n in rel_names:
        m = _NATIVE_RE.match(n.split("/")[-1])
        if m:
            return int(m.group(2))
    return None


def _max_keep_from(trainer_state: Any) -> Optional[int]:
    if not isinstance(trainer_state, dict):
        return None
    config = trainer_state.get("config")
    if not isinstance(config, dict):
        return None
    for section in (config, config.get("trainer") if isinstance(config.get("trainer"), dict) else None):
        if section and section.get("max_ckpts_to_keep") is not None:
            try:
                return int(section["max_ckpts_to_keep"])
            except (TypeError, ValueError):
                return None
    return None


def _leftover_names(st: Storage, root: str, names: Optional[list[str]] = None) -> list[str]:
    names = _listdir(st, root) if names is None else names
    return [n for n in names if (n.startswith(TMP_PREFIX) or n.startswith(TRASH_PREFIX)) and _LEFTOVER_RE.match(n)]


# =========================================================================== ls
@dataclass
class _StepScan:
    step: int
    name: str
    path: str
    files: dict
    committed: bool
    manifest: Optional[dict]
    manifest_error: Optional[str]


def _scan_root(st: Storage, root: str) -> tuple[list[_StepScan], list[dict], list[str]]:
    """Steps (ascending), leftovers and the other (foreign) names under ``root``; one listing."""
    names = _listdir(st, root)
    tree = st.walk_files(root)
    by_top: dict[str, dict[str, int]] = {}
    for rel, size in tree.items():
        top, _, rest = rel.partition("/")
        by_top.setdefault(top, {})[rest] = size
    steps = []
    for name in names:
        step = rules.parse_step_dirname(name)
        if step is None:
            continue
        path = st.join(root, name)
        files = by_top.get(name, {})
        has_manifest = MANIFEST_FILE in files
        committed = has_manifest or (st.supports_rename and looks_native(files) and st.isdir(path))
        manifest, err = _read_manifest(st, path) if has_manifest else (None, None)
        steps.append(_StepScan(step, name, path, {k: v for k, v in files.items() if k}, committed, manifest, err))
    steps.sort(key=lambda s: s.step)
    leftovers = [
        {"name": n, "path": st.join(root, n), "size": sum(by_top.get(n, {}).values())}
        for n in _leftover_names(st, root, names)
    ]
    return steps, leftovers, names


def _roles_of(files: dict) -> list[str]:
    return sorted({rel.split("/")[0] for rel in files if "/" in rel})


def cmd_ls(args: argparse.Namespace) -> int:
    st = _open(args.ckpt_path, args)
    root = st.root
    kind = _classify(st, root)
    if kind == "step":
        raise CLIError(f"{root}: is one checkpoint (CKPT_DIR); `ls` takes the directory above it. "
                       f"Use `{PROG} inspect {args.ckpt_path}` for one checkpoint.")
    if kind in ("missing",):
        raise _not_found(root, kind)
    steps, leftovers, _names = _scan_root(st, root)
    pointer = _read_pointer(st, root)
    committed = [s.step for s in steps if s.committed]
    newest = committed[-1] if committed else None

    trainer_states: dict[int, Any] = {}

    def trainer_state(s: _StepScan) -> Any:
        if s.step not in trainer_states:
            trainer_states[s.step] = None
            if TRAINER_STATE_FILE in s.files:
                try:
                    trainer_states[s.step] = _torch_load_small(st, st.join(s.path, TRAINER_STATE_FILE))
                except CheckpointError as exc:
                    logger.info("cannot read %s/%s: %s", s.path, TRAINER_STATE_FILE, exc)
        return trainer_states[s.step]

    keep, keep_source = args.keep, "--keep"
    if keep is None and newest is not None:
        keep = _max_keep_from(trainer_state(next(s for s in steps if s.step == newest)))
        keep_source = f"max_ckpts_to_keep in {rules.step_dirname(newest)}/{TRAINER_STATE_FILE}" if keep is not None else None
    if keep is None:
        keep_source = None
    delete_now: list[int] = []
    delete_next: list[int] = []
    if keep is not None and committed and keep != 0:
        protected = [newest] + ([pointer] if pointer is not None else [])
        delete_now = rules.steps_to_delete(committed, keep, protected=protected)
        remaining = [s for s in committed if s not in delete_now]
        future = max(remaining) + 1
        delete_next = rules.steps_to_delete(remaining + [future], keep, protected=[future])

    total = sum(sum(s.files.values()) for s in steps if s.committed and s.manifest) if args.verify else 0
    rows, docs = [], []
    any_corrupt = False
    with _Progress(_progress_enabled(args) and args.verify, total, "verifying") as bar:
        for s in steps:
            problems: list[str] = []
            status = "committed" if s.committed else "incomplete"
            note = None
            if s.committed:
                if s.manifest_error:
                    status, problems = "corrupt", [s.manifest_error]
                elif s.manifest is not None:
                    bar.set_description(f"verifying {s.name}")
                    failed = _failed(_check_files(st, s.path, s.manifest, s.files, checksums=args.verify, bar=bar))
                    if failed:
                        status = "corrupt"
                        problems = [f"{e['file']}: {e['detail']}" for e in failed]
                else:
                    note = "no manifest (written by SkyRL): not verifiable"
            any_corrupt |= status == "corrupt"
            roles = sorted((s.manifest or {}).get("strategies", {}) or {}) or _roles_of(s.files)
            layouts = {r: _role_layout([k[len(r) + 1:] for k in s.files if k.startswith(r + "/")]) for r in roles}
            strategies = dict((s.manifest or {}).get("strategies") or {}) or {
                r: _strategy_of_layout(lay) for r, lay in layouts.items()
            }
            world = (s.manifest or {}).get("world_size")
            if world is None and s.committed:
                ts = trainer_state(s)
                world = ts.get("world_size") if isinstance(ts, dict) else None
            if world is None:
                world = _native_world(s.files)
            retention = "delete" if s.step in delete_now else ("next" if s.step in delete_next else None)
            size = sum(s.files.values())
            docs.append({
                "step": s.step, "name": s.name, "path": s.path, "status": status, "problems": problems,
                "size": size, "roles": roles, "strategies": strategies, "layouts": layouts, "world_size": world,
                "pointer": s.step == pointer, "retention": retention, "checksums_verified": bool(args.verify and s.manifest),
                "note": note,
            })
            marks = []
            if s.step == pointer:
                marks.append("<- pointer")
            if retention == "delete":
                marks.append(f"prune --keep {keep} deletes")
            elif retention == "next":
                marks.append("deleted by the next save")
            if problems:
                marks.append(problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
            if note:
                marks.append(note)
            rows.append([s.step, status, _human(size), ",".join(roles) or "-",
                         ",".join(f"{r}={layouts.get(r, strategies.get(r))}" for r in roles) or "-",
                         world if world is not None else "-", "; ".join(marks)])
    foreign_incomplete = [d["name"] for d in docs if d["status"] == "incomplete"]
    doc = {
        "path": root,
        "pointer": pointer,
        "pointer_committed": pointer in committed if pointer is not None else None,
        "committed": committed,
        "keep": keep,
        "keep_source": keep_source,
        "retention": {"keep": keep, "delete_now": delete_now, "delete_on_next_save": delete_next},
        "checkpoints": docs,
        "leftovers": leftovers,
        "verified_checksums": bool(args.verify),
    }
    if args.json:
        _emit_json(doc)
    else:
        head = f"{root}"
        head += f"  pointer: {rules.step_dirname(pointer) if pointer is not None else 'none'}"
        if pointer is not None and pointer not in committed:
            head += " (not committed!)"
        if keep is not None:
            head += f"  keep: {keep} ({keep_source})"
        print(head)
        if rows:
            print(_table(["STEP", "STATUS", "SIZE", "ROLES", "LAYOUT", "WORLD", "NOTES"], rows))
        else:
            print("no global_step_N directories")
        if leftovers:
            print("leftovers of interrupted saves (removed by `prune` and by the next save):")
            for lo in leftovers:
                print(f"  {lo['name']}  {_human(lo['size'])}")
        if foreign_incomplete and not st.supports_rename:
            print("incomplete = uploaded without a manifest (an interrupted or running save)")
    return EXIT_FAILED if any_corrupt else EXIT_OK


# =========================================================================== verify
def _verify_step(st: Storage, step_dir: str, *, checksums: bool, bar: Optional[_Progress]) -> dict:
    manifest, err = _read_manifest(st, step_dir)
    doc: dict[str, Any] = {"path": step_dir, "step": rules.parse_step_dirname(step_dir), "files": [], "problems": []}
    if err:
        doc.update(ok=False, status="corrupt", problems=[err])
        return doc
    if manifest is None:
        doc.update(ok=False, status="no_manifest", problems=[
            f"{MANIFEST_FILE}: missing (a SkyRL-native checkpoint, or an interrupted upload): nothing to verify against"
        ])
        return doc
    present = st.walk_files(step_dir)
    entries = _check_files(st, step_dir, manifest, present, checksums=checksums, bar=bar)
    failed = _failed(entries)
    doc.update(
        step=manifest.get("step", doc["step"]),
        ok=not failed,
        status="ok" if not failed else "corrupt",
        files=entries,
        problems=[f"{e['file']}: {e['detail']}" for e in failed],
        checksum_algo=manifest.get("checksum_algo"),
        bytes=sum(int(e.get("size") or 0) for e in entries if e["status"] != "extra"),
    )
    return doc


def cmd_verify(args: argparse.Namespace) -> int:
    st = _open(args.path, args)
    path = st.root
    kind = _classify(st, path)
    checksums = not args.sizes_only
    if kind in ("step", "hf"):
        targets = [path]
        skipped: list[dict] = []
    elif kind == "root":
        steps, _leftovers, _ = _scan_root(st, path)
        targets = [s.path for s in steps if s.committed and (s.manifest is not None or s.manifest_error)]
        skipped = [{"path": s.path, "reason": "incomplete (not committed)" if not s.committed else
                    "no manifest (written by SkyRL): nothing to verify against"}
                   for s in steps if not (s.committed and (s.manifest is not None or s.manifest_error))]
        if not targets:
            raise CLIError(f"{path}: holds no committed checkpoint with a manifest to verify.")
    else:
        raise _not_found(path, kind)
    total = 0
    for t in targets:
        manifest, _ = _read_manifest(st, t)
        if manifest:
            total += sum(int(i.get("size") or 0) for i in manifest["files"].values() if isinstance(i, dict))
    results = []
    with _Progress(_progress_enabled(args), total, "verifying") as bar:
        for t in targets:
            bar.set_description(f"verifying {Storage.basename(t)}")
            results.append(_verify_step(st, t, checksums=checksums, bar=bar))
    ok = all(r["ok"] for r in results)
    if args.json:
        _emit_json({"path": path, "ok": ok, "checksums": checksums, "checkpoints": results, "skipped": skipped})
    else:
        for r in results:
            print(f"{r['path']}")
            for e in r["files"]:
                if args.quiet and e["status"] in ("ok", "extra"):
                    continue
                label = {"ok": "ok", "extra": "extra"}.get(e["status"], "FAILED")
                detail = f"  {e['detail']}" if e.get("detail") else ""
                print(f"  {label:<7} {e['file']}  ({_human(e.get('size'))}){detail}")
            what = f"sizes + {r.get('checksum_algo')} checksums" if checksums else "sizes only"
            if r["ok"]:
                print(f"  OK: {len([e for e in r['files'] if e['status'] == 'ok'])} files, {_human(r.get('bytes'))} ({what})")
            else:
                for p in r["problems"] if not r["files"] else []:
                    print(f"  FAILED  {p}")
                print(f"  FAILED: {len(r['problems'])} problem(s) ({what})")
        for s in skipped:
            print(f"{s['path']}\n  skipped: {s['reason']}")
        print("verification passed" if ok else "verification FAILED")
    return EXIT_OK if ok else EXIT_FAILED


# =========================================================================== prune
def cmd_prune(args: argparse.Namespace) -> int:
    if args.keep == 0 or args.keep < -1:
        raise CLIError(f"--keep {args.keep}: expected N >= 1 (or -1 to keep everything); the newest checkpoint "
                       f"is never deleted.")
    st = _open(args.ckpt_path, args)
    root = st.root
    kind = _classify(st, root)
    if kind == "step":
        raise CLIError(f"{root}: is one checkpoint (CKPT_DIR); `prune` takes the directory above it (CKPT_PATH).")
    if kind in ("missing", "role", "hf"):
        raise _not_found(root, kind)
    steps, leftovers, _ = _scan_root(st, root)
    committed = [s.step for s in steps if s.committed]
    pointer = _read_pointer(st, root)
    doomed: list[int] = []
    if committed:
        protected = [committed[-1]] + ([pointer] if pointer is not None else [])
        doomed = rules.steps_to_delete(committed, args.keep, protected=protected)
    sizes = {s.step: sum(s.files.values()) for s in steps}
    remove_leftovers = [] if args.keep_leftovers else list(leftovers)
    if not args.keep_leftovers and not st.supports_rename and committed:
        # object stores: uploads without a manifest older than the newest commit are dead (as the callback does)
        for s in steps:
            if not s.committed and s.step < committed[-1]:
                remove_leftovers.append({"name": s.name, "path": s.path, "size": sizes[s.step]})
    skipped: list[dict] = []
    owner = _live_owner(st) if remove_leftovers else None
    if owner is not None:
        # a live run's in-flight save looks like a leftover: never remove it under the run
        skipped, remove_leftovers = remove_leftovers, []
        print(f"{PROG}: not removing {len(skipped)} leftover(s) ({', '.join(lo['name'] for lo in skipped)}): a live "
              f"run holds the lock of {root} (host {owner.get('host')}, pid {owner.get('pid')}) and they may be its "
              f"save in progress. Run prune again after that run ends; the run itself removes them after its next "
              f"save.", file=sys.stderr)
    deleted, removed = [], []
    if not args.dry_run:
        for step in doomed:
            path = st.join(root, rules.step_dirname(step))
            st.delete_checkpoint(path)
            deleted.append(step)
            if not args.json:
                print(f"deleted {path} ({_human(sizes.get(step))})")
        for lo in remove_leftovers:
            st.rm(lo["path"])
            removed.append(lo["name"])
            if not args.json:
                print(f"removed leftover {lo['path']} ({_human(lo['size'])})")
    kept = [s for s in committed if s not in doomed]
    freed = sum(sizes.get(s, 0) for s in doomed) + sum(lo["size"] for lo in remove_leftovers)
    if args.json:
        _emit_json({
            "path": root, "keep": args.keep, "dry_run": bool(args.dry_run), "committed": committed, "kept": kept,
            "pointer": pointer, "delete": doomed, "deleted": deleted,
            "leftovers": [lo["name"] for lo in remove_leftovers], "removed_leftovers": removed, "bytes": freed,
            "skipped_leftovers": [lo["name"] for lo in skipped],
            "live_run": None if owner is None else {"host": owner.get("host"), "pid": owner.get("pid")},
        })
    else:
        if args.dry_run:
            for step in doomed:
                print(f"would delete {st.join(root, rules.step_dirname(step))} ({_human(sizes.get(step))})")
            for lo in remove_leftovers:
                print(f"would remove leftover {lo['path']} ({_human(lo['size'])})")
        if not doomed and not remove_leftovers:
            print(f"nothing to prune: {len(committed)} committed checkpoint(s), --keep {args.keep}")
        else:
            verb = "would free" if args.dry_run else "freed"
            print(f"kept {', '.join(rules.step_dirname(s) for s in kept) or 'nothing'}; {verb} {_human(freed)}"
                  + (" (dry run: nothing changed)" if args.dry_run else ""))
    return EXIT_OK


def _live_owner(st: Storage) -> Optional[dict]:
    """The lock record of a live run writing into ``st``'s root, or None."""
    from skyrl_callbacks.errors import CheckpointLockError
    from skyrl_callbacks.lock import live_owner

    try:
        return live_owner(st)
    except CheckpointLockError as exc:  # a damaged lock: treat its owner as possibly live
        print(f"{PROG}: {exc}", file=sys.stderr)
        return {"host": "?", "pid": "?"}


# =========================================================================== tensor sources
@dataclass
class _Entry:
    """One tensor of a model: name, global shape, dtype and how to read it."""

    name: str
    shape: tuple
    dtype: Any
    load: Callable[[], Any]

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * _itemsize(self.dtype)


def _itemsize(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _walk_tensors(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def _load_pt_lazy(st: Storage, path: str, *, weights_only: bool = True, need_data: bool = False,
                  tmp_dir: Optional[str] = None, bar: Optional[_Progress] = None) -> Any:
    """A ``.pt`` file without reading its tensors into memory (always weights-only: ``weights_only``
    is ignored; ``--trust-checkpoint-code`` allows files that need more).

    Local files are memory-mapped (``torch.load(mmap=True)``). Remote files are loaded onto the
    ``meta`` device (only the pickle is read: shapes and dtypes, no tensor bytes) when
    ``need_data`` is false, else downloaded into ``tmp_dir`` and memory-mapped.
    """

    from skyrl_callbacks.safe_load import safe_torch_load

    def _mmap(local: str) -> Any:
        # weights-only; files that need more (SkyRL's DTensor pickles...) only with --trust-checkpoint-code
        with _quiet():
            try:
                return safe_torch_load(local, path, map_location="cpu", mmap=True)
            except UntrustedCheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise CorruptCheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc}).") from exc

    if st.is_local:
        if not os.path.exists(path):
            raise CorruptCheckpointError(f"{path}: file is missing.")
        return _mmap(path)
    if not need_data:
        try:
            with _quiet(), _open_ranged(st, path) as fh:
                return safe_torch_load(fh, path, map_location="meta")
        except UntrustedCheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - fall back to downloading the file
            logger.info("lazy read of %s failed (%s); downloading it", path, exc)
    own = tmp_dir is None
    tmp_dir = tmp_dir or tempfile.mkdtemp(prefix="skyrl-ckpt-")
    local = os.path.join(tmp_dir, f"{new_token()}-{Storage.basename(path)}")
    try:
        _copy_file(st, path, Storage(tmp_dir), local, bar)
        obj = _mmap(local)
    finally:
        if own:
            # the mapping stays valid after the file is unlinked (POSIX)
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return obj


def _raise_untrusted(exc: BaseException, reader: Any) -> None:
    """Re-raise the refusal of an untrusted file that DCP wrapped (or turned into text)."""
    from skyrl_callbacks.safe_load import find_untrusted

    untrusted = find_untrusted(exc, reader)
    if untrusted is not None:
        raise untrusted from exc


class _DcpSource:
    """Reads a DCP directory offline (one process, no process group), one key at a time."""

    def __init__(self, st: Storage, path: str) -> None:
        from skyrl_callbacks.writers.fsdp import _dcp_reader

        self.st, self.path = st, path
        if not st.exists(st.join(path, DCP_METADATA)):
            raise CorruptCheckpointError(f"{path}: {DCP_METADATA} is missing.")
        from skyrl_callbacks.safe_load import guard_dcp_reader

        self.reader = guard_dcp_reader(_dcp_reader(st, path), path)  # no load executes code from the files
        try:
            with _quiet():
                self.metadata = self.reader.read_metadata()
        except Exception as exc:  # noqa: BLE001
            raise CorruptCheckpointError(f"{path}/{DCP_METADATA}: cannot be read ({type(exc).__name__}: {exc}).") from exc
        md = self.metadata
        self.reader.read_metadata = lambda *a, **k: md  # type: ignore[method-assign] # read it once

    def tensors(self) -> dict[str, Any]:
        """``{key: TensorStorageMetadata}`` (non-tensor entries left out)."""
        return {k: v for k, v in self.metadata.state_dict_metadata.items() if hasattr(v, "size") and hasattr(v, "properties")}

    def others(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if not (hasattr(v, "size") and hasattr(v, "properties"))]

    def load_tensor(self, key: str) -> Any:
        import torch
        import torch.distributed.checkpoint as dcp

        md = self.metadata.state_dict_metadata[key]
        t = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        try:
            with _quiet():
                dcp.load({key: t}, storage_reader=self.reader, no_dist=True)
        except BaseException as exc:  # DCP raises CheckpointException (a BaseException)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            _raise_untrusted(exc, self.reader)
            raise CorruptCheckpointError(f"{self.path}: reading {key!r} failed ({type(exc).__name__}: {str(exc)[:400]}).") from exc
        return t

    def load_objects(self, keys: Iterable[str]) -> dict:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        keys = set(keys)
        if not keys:
            return {}
        try:
            with _quiet():
                return _load_state_dict_from_keys(keys, storage_reader=self.reader)
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            _raise_untrusted(exc, self.reader)
            raise CorruptCheckpointError(f"{self.path}: reading {sorted(keys)[:3]} failed ({type(exc).__name__}: {exc}).") from exc

    def entries(self) -> list[_Entry]:
        return [
            _Entry(k, tuple(v.size), v.properties.dtype, (lambda k=k: self.load_tensor(k)))
            for k, v in self.tensors().items()
        ]


def _tensor_rows(items: Iterable[tuple[str, Any, Any]]) -> list[dict]:
    """``[{"name", "shape", "dtype", "bytes"}]`` from ``(name, shape, dtype)``."""
    out = []
    for name, shape, dtype in items:
        shape = [int(s) for s in shape]
        out.append({"name": name, "shape": shape, "dtype": _dtype_name(dtype),
                    "bytes": int(math.prod(shape)) * _itemsize(dtype)})
    return out


def _model_summary(rows: list[dict], source: str) -> dict:
    return {"source": source, "num_tensors": len(rows), "bytes": sum(r["bytes"] for r in rows), "tensors": rows}


# =========================================================================== optimizer summaries
def _optim_kind(keys: set) -> str:
    if {"exp_avg", "exp_avg_sq"} <= keys:
        return "Adam-family (exp_avg, exp_avg_sq)"
    if "momentum_buffer" in keys:
        return "SGD with momentum (momentum_buffer)"
    if "square_avg" in keys:
        return "RMSprop/Adadelta (square_avg)"
    if "sum" in keys:
        return "Adagrad (sum)"
    if not keys:
        return "no per-parameter state"
    return f"unknown ({', '.join(sorted(keys))})"


def _group_summary(group: dict) -> dict:
    out: dict[str, Any] = {}
    for k, v in group.items():
        if k in ("params", "param_names"):
            continue
        out[k] = _jsonable(v)
    params = group.get("params")
    out["num_params"] = len(params) if isinstance(params, (list, tuple)) else None
    return out


def _scalar(v: Any) -> Any:
    try:
        import torch

        if isinstance(v, torch.Tensor):
            if _is_fake(v) or v.numel() != 1:
                return None
            v = v.item()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v if isinstance(v, (int, float)) else None


def _optim_summary_pt(osd: Any, source: str) -> dict:
    states = osd["states"] if isinstance(osd, dict) and osd.get(_MULTI_KEY) else [osd]
    out = []
    for sd in states:
        if not isinstance(sd, dict):
            out.append({"type": type(sd).__name__})
            continue
        state = sd.get("state", {}) or {}
        keys: set = set()
        nbytes = 0
        step = None
        for entry in state.values():
            if isinstance(entry, dict):
                keys |= set(entry)
                for k, v in entry.items():
                    if hasattr(v, "numel") and hasattr(v, "element_size"):
                        nbytes += v.numel() * v.element_size()
                    if k == "step" and step is None:
                        step = _scalar(v)
        out.append({
            "type": _optim_kind(keys), "state_keys": sorted(keys), "params_with_state": len(state),
            "state_bytes": nbytes, "step": step,
            "param_groups": [_group_summary(g) for g in sd.get("param_groups", []) if isinstance(g, dict)],
        })
    return {"source": source, "optimizers": out}


def _optim_summary_dcp(src: _DcpSource, source: str) -> dict:
    per: dict[str, dict] = {}
    tensors = src.tensors()
    for key, md in tensors.items():
        opt, _, rest = key.partition(".")
        entry = per.setdefault(opt, {"keys": set(), "params": set(), "bytes": 0, "step_key": None, "groups": set()})
        if rest.startswith("state."):
            fqn, _, skey = rest[len("state."):].rpartition(".")
            entry["keys"].add(skey)
            entry["params"].add(fqn)
            entry["bytes"] += int(math.prod(md.size)) * _itemsize(md.properties.dtype)
            if skey == "step" and entry["step_key"] is None:
                entry["step_key"] = key
    for key in src.others():
        opt, _, rest = key.partition(".")
        if rest.startswith("param_groups."):
            per.setdefault(opt, {"keys": set(), "params": set(), "bytes": 0, "step_key": None, "groups": set()})
            per[opt]["groups"].add(key)
    out = []
    for opt in sorted(per):
        e = per[opt]
        groups: list = []
        try:
            loaded = src.load_objects(e["groups"])
            groups = (loaded.get(opt) or {}).get("param_groups") or []
        except CheckpointError as exc:
            logger.info("param groups of %s: %s", opt, exc)
        step = None
        if e["step_key"]:
            try:
                step = _scalar(src.load_tensor(e["step_key"]))
            except CheckpointError:
                step = None
        out.append({
            "name": opt, "type": _optim_kind(e["keys"]), "state_keys": sorted(e["keys"]),
            "params_with_state": len(e["params"]), "state_bytes": e["bytes"], "step": step,
            "param_groups": [_group_summary(g) for g in groups if isinstance(g, dict)],
        })
    return {"source": source, "optimizers": out}


def _scheduler_summary(state: Any, source: str) -> dict:
    states = state["states"] if isinstance(state, dict) and state.get(_MULTI_KEY) else [state]
    out = []
    for s in states:
        if not isinstance(s, dict):
            out.append({"type": type(s).__name__})
            continue
        out.append({k: _jsonable(s.get(k)) for k in ("last_epoch", "_last_lr", "base_lrs", "_step_count") if k in s})
    return {"source": source, "schedulers": out}


# =========================================================================== inspect
def _inspect_role(st: Storage, role_dir: str, name: str, files: dict[str, int], tmp: str) -> dict:
    layout = _role_layout(files)
    doc: dict[str, Any] = {"name": name, "path": role_dir, "layout": layout, "size": sum(files.values()),
                           "model": None, "optimizer": None, "lr_scheduler": None, "huggingface": None}
    if FSDP_CONFIG_FILE in files:
        try:
            doc["fsdp_config"] = json.loads(st.read_text(st.join(role_dir, FSDP_CONFIG_FILE)))
        except (ValueError, OSError) as exc:
            doc["fsdp_config"] = {"error": str(exc)}
    if layout in ("plain", "fsdp-full"):
        sd = _load_pt_lazy(st, st.join(role_dir, MODEL_FILE), tmp_dir=tmp)
        doc["model"] = _model_summary(_tensor_rows((n, t.shape, t.dtype) for n, t in _walk_tensors(sd)), MODEL_FILE)
        if OPTIMIZER_FILE in files:
            doc["optimizer"] = _optim_summary_pt(_load_pt_lazy(st, st.join(role_dir, OPTIMIZER_FILE), tmp_dir=tmp),
                                                 OPTIMIZER_FILE)
    elif layout == "fsdp-sharded":
        src = _DcpSource(st, st.join(role_dir, MODEL_DCP_DIR))
        doc["model"] = _model_summary(
            _tensor_rows((k, v.size, v.properties.dtype) for k, v in src.tensors().items()), MODEL_DCP_DIR + "/"
        )
        doc["model"]["dcp_files"] = sorted(f.split("/", 1)[1] for f in files if f.startswith(MODEL_DCP_DIR + "/"))
        if f"{OPTIMIZER_DCP_DIR}/{DCP_METADATA}" in files:
            doc["optimizer"] = _optim_summary_dcp(_DcpSource(st, st.join(role_dir, OPTIMIZER_DCP_DIR)),
                                                  OPTIMIZER_DCP_DIR + "/")
    elif layout == "skyrl-native":
        world = _native_world(files)
        doc["native"] = {"world_size": world, "files": sorted(f for f in files if _NATIVE_RE.match(f))}
        sd = _load_pt_lazy(st, st.join(role_dir, f"model_world_size_{world}_rank_0.pt"), tmp_dir=tmp)
        doc["model"] = _model_summary(
            _tensor_rows((n, t.shape, t.dtype) for n, t in _walk_tensors(sd)),
            f"model_world_size_{world}_rank_0.pt (global shapes)",
        )
        optim = f"optim_world_size_{world}_rank_0.pt"
        if optim in files:
            osd = _load_pt_lazy(st, st.join(role_dir, optim), tmp_dir=tmp)
            doc["optimizer"] = _optim_summary_pt(osd, optim)
        extra = f"extra_state_world_size_{world}_rank_0.pt"
        if extra in files:
            es = _torch_load_small(st, st.join(role_dir, extra))
            if isinstance(es, dict) and es.get("lr_scheduler") is not None:
                doc["lr_scheduler"] = _scheduler_summary(es["lr_scheduler"], extra)
            doc["native"]["extra_state_keys"] = sorted(map(str, es)) if isinstance(es, dict) else None
    elif layout == "megatron":
        doc["note"] = "Megatron distributed checkpoint: listing only (export is not supported yet)"
        if DCP_METADATA in files:
            src = _DcpSource(st, role_dir)
            doc["model"] = _model_summary(
                _tensor_rows((k, v.size, v.properties.dtype) for k, v in src.tensors().items()), DCP_METADATA
            )
    elif layout == "hf":
        rows = []
        for f in sorted(files):
            if f.endswith(".safetensors") and "/" not in f:
                header = _safetensors_header(st, st.join(role_dir, f))
                rows += [{"name": k, "shape": v["shape"], "dtype": v["dtype"],
                          "bytes": v["data_offsets"][1] - v["data_offsets"][0], "file": f}
                         for k, v in header.items() if k != "__metadata__"]
        doc["model"] = {"source": "*.safetensors", "num_tensors": len(rows), "bytes": sum(r["bytes"] for r in rows),
                        "tensors": rows}
    if SCHEDULER_FILE in files:
        try:
            doc["lr_scheduler"] = _scheduler_summary(_torch_load_small(st, st.join(role_dir, SCHEDULER_FILE)),
                                                     SCHEDULER_FILE)
        except CheckpointError as exc:
            doc["lr_scheduler"] = {"source": SCHEDULER_FILE, "error": str(exc)}
    hf_files = sorted(f[len(HF_DIR) + 1:] for f in files if f.startswith(HF_DIR + "/"))
    if layout == "hf":
        hf_files = sorted(f for f in files if not f.endswith(".safetensors"))
    if hf_files:
        hf: dict[str, Any] = {"files": hf_files}
        cfg_path = st.join(role_dir, HF_DIR, "config.json") if layout != "hf" else st.join(role_dir, "config.json")
        if "config.json" in hf_files:
            try:
                cfg = json.loads(st.read_text(cfg_path))
                hf.update({k: cfg.get(k) for k in ("model_type", "architectures", "dtype", "torch_dtype",
                                                   "tie_word_embeddings") if k in cfg})
            except (ValueError, OSError) as exc:
                hf["error"] = str(exc)
        doc["huggingface"] = hf
    return doc


def _safetensors_header(st: Storage, path: str) -> dict:
    with _open_ranged(st, path) as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CorruptCheckpointError(f"{path}: too short for a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise CorruptCheckpointError(f"{path}: implausible safetensors header size {n}.")
        try:
            return json.loads(fh.read(n))
        except ValueError as exc:
            raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({exc}).") from exc


_SECRET_RE = re.compile(r"secret|key|token|passw|credential|session|auth", re.IGNORECASE)


def _redact(obj: Any, depth: int = 0) -> Any:
    """``config`` with the values of credential-like keys (anywhere in ``storage_options``) masked."""
    if isinstance(obj, dict) and depth < 8:
        out = {}
        for k, v in obj.items():
            if str(k) == "storage_options" and isinstance(v, dict):
                out[k] = {sk: ("***" if _SECRET_RE.search(str(sk)) and sv not in (None, "") else _redact(sv, depth + 1))
                          for sk, sv in v.items()}
            else:
                out[k] = _redact(v, depth + 1)
        return out
    return obj


def _trainer_summary(ts: Any) -> dict:
    if not isinstance(ts, dict):
        return {"type": type(ts).__name__}
    known = ("global_step", "world_size", "strategies", "roles", "config")
    out = {k: _jsonable(ts.get(k)) for k in known if k in ts}
    if "config" in out:
        out["config"] = _redact(out["config"])
    rngs = ts.get("rng_per_rank")
    if rngs is not None:
        out["rng_states"] = len(rngs) if isinstance(rngs, (list, tuple)) else 1
    out["other_keys"] = {str(k): type(v).__name__ for k, v in ts.items() if k not in known and k != "rng_per_rank"}
    return out


def _data_summary(data: Any) -> dict:
    if isinstance(data, dict) and data.get("format") == "skyrl-callbacks":
        per = data.get("per_rank") or []
        return {"format": "skyrl-callbacks", "world_size": data.get("world_size"), "per_rank": _jsonable(per)}
    return {"format": "dataloader state_dict (SkyRL)", "state": _jsonable(data)}


def cmd_inspect(args: argparse.Namespace) -> int:
    st = _open(args.ckpt_dir, args)
    path, kind = _resolve_step_dir(st, st.root, allow_role=True)
    files = st.walk_files(path)
    doc: dict[str, Any] = {"path": path, "kind": kind, "manifest": None, "trainer_state": None, "data": None, "roles": {}}
    tmp = tempfile.mkdtemp(prefix="skyrl-ckpt-inspect-")
    try:
        if kind == "step":
            manifest, err = _read_manifest(st, path)
            if manifest:
                doc["manifest"] = {
                    k: manifest.get(k) for k in ("step", "world_size", "strategies", "package_version", "format_version",
                                                 "checksum_algo", "parent_step", "created_unix", "converted_from")
                    if k in manifest
                }
                doc["manifest"]["files"] = len(manifest["files"])
                doc["manifest"]["bytes"] = sum(int(i.get("size") or 0) for i in manifest["files"].values()
                                               if isinstance(i, dict))
            elif err:
                doc["manifest"] = {"error": err}
            if TRAINER_STATE_FILE in files:
                try:
                    doc["trainer_state"] = _trainer_summary(_torch_load_small(st, st.join(path, TRAINER_STATE_FILE)))
                except CheckpointError as exc:
                    doc["trainer_state"] = {"error": str(exc)}
            if DATA_FILE in files:
                try:
                    doc["data"] = _data_summary(_torch_load_small(st, st.join(path, DATA_FILE)))
                except CheckpointError as exc:
                    doc["data"] = {"error": str(exc)}
            roles = _roles_of(files)
            if args.role:
                if args.role not in roles:
                    raise CLIError(f"{path}: has no {args.role}/ (roles: {', '.join(roles) or 'none'}).")
                roles = [args.role]
            for role in roles:
                rfiles = {k[len(role) + 1:]: v for k, v in files.items() if k.startswith(role + "/")}
                doc["roles"][role] = _inspect_role(st, st.join(path, role), role, rfiles, tmp)
        else:
            name = Storage.basename(path)
            doc["roles"][name] = _inspect_role(st, path, name, files, tmp)
            if kind == "hf":
                manifest, _ = _read_manifest(st, path)
                if manifest:
                    doc["manifest"] = {k: manifest.get(k) for k in ("step", "strategies", "package_version", "source")
                                       if k in manifest}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        _emit_json(doc)
    else:
        _print_inspect(doc, args.max_tensors)
    return EXIT_OK


def _print_inspect(doc: dict, max_tensors: int) -> None:
    print(f"checkpoint  {doc['path']}")
    m = doc.get("manifest")
    if m:
        if "error" in m:
            print(f"  manifest   ERROR {m['error']}")
        else:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created_unix"])) if m.get("created_unix") else "-"
            strategies = ", ".join(f"{k}={v}" for k, v in (m.get("strategies") or {}).items())
            print(f"  manifest   step {m.get('step')}, world size {m.get('world_size')}, strategies {strategies or '-'}, "
                  f"skyrl-callbacks {m.get('package_version')}, parent step {m.get('parent_step')}, "
                  f"{m.get('files')} files, {_human(m.get('bytes'))}, {m.get('checksum_algo')}, created {created}")
            if m.get("converted_from"):
                print(f"             converted from {m['converted_from']}")
    elif doc["kind"] == "step":
        print("  manifest   none (written by SkyRL itself, or not committed)")
    ts = doc.get("trainer_state")
    if ts:
        if "error" in ts:
            print(f"  trainer    ERROR {ts['error']}")
        else:
            strategies = ", ".join(f"{k}={v}" for k, v in (ts.get("strategies") or {}).items())
            print(f"  trainer    global_step {ts.get('global_step')}, world size {ts.get('world_size', '-')}, "
                  f"roles {', '.join(ts.get('roles') or []) or '-'}, strategies {strategies or '-'}"
                  + (f", {ts['rng_states']} RNG state(s)" if ts.get("rng_states") is not None else ""))
            cfg = ts.get("config")
            if isinstance(cfg, dict):
                print("             config: " + " ".join(f"{k}={_short_repr(v, 60)}" for k, v in cfg.items()))
            if ts.get("other_keys"):
                print("             other keys: " + ", ".join(f"{k} ({t})" for k, t in ts["other_keys"].items()))
    data = doc.get("data")
    if data:
        if "error" in data:
            print(f"  data       ERROR {data['error']}")
        elif data.get("format") == "skyrl-callbacks":
            per = data.get("per_rank") or []
            print(f"  data       data.pt: {len(per)} rank state(s) (world size {data.get('world_size')})")
            for r, s in enumerate(per[:8]):
                print(f"             rank {r}: {_short_repr(s)}")
            if len(per) > 8:
                print(f"             ... {len(per) - 8} more")
        else:
            print(f"  data       data.pt ({data['format']}): {_short_repr(data.get('state'))}")
    for name, r in doc["roles"].items():
        print(f"role {name}  layout {r['layout']}, {_human(r['size'])}" + (f"  ({r['note']})" if r.get("note") else ""))
        if r.get("fsdp_config"):
            print(f"  fsdp       {_short_repr(r['fsdp_config'], 200)}")
        if r.get("native"):
            print(f"  native     SkyRL per-rank files of world size {r['native']['world_size']} "
                  f"({len(r['native']['files'])} files); `{PROG} convert` makes them reshardable")
        model = r.get("model")
        if model:
            print(f"  model      {model['source']}: {model['num_tensors']} tensors, {_human(model['bytes'])}")
            rows = model["tensors"] if max_tensors <= 0 else model["tensors"][:max_tensors]
            if rows:
                width = max(len(t["name"]) for t in rows)
                for t in rows:
                    print(f"    {t['name']:<{width}}  {str(t['shape']):<16} {t['dtype']:<9} {_human(t['bytes'])}")
            if len(rows) < len(model["tensors"]):
                print(f"    ... {len(model['tensors']) - len(rows)} more (--max-tensors 0 lists all)")
        optim = r.get("optimizer")
        if optim:
            for i, o in enumerate(optim["optimizers"]):
                label = o.get("name") or f"#{i}"
                print(f"  optimizer  {optim['source']} {label}: {o.get('type')}, {o.get('params_with_state')} "
                      f"params with state, {_human(o.get('state_bytes'))}" + (f", step {o['step']}" if o.get("step") is not None else ""))
                for g, group in enumerate(o.get("param_groups") or []):
                    keys = [k for k in ("lr", "initial_lr", "betas", "eps", "weight_decay", "momentum") if k in group]
                    print(f"    group {g}: " + " ".join(f"{k}={group[k]}" for k in keys) + f" ({group.get('num_params')} params)")
        sched = r.get("lr_scheduler")
        if sched:
            if "error" in sched:
                print(f"  scheduler  ERROR {sched['error']}")
            for s in sched.get("schedulers", []):
                print(f"  scheduler  {sched['source']}: " + " ".join(f"{k.lstrip('_')}={v}" for k, v in s.items()))
        hf = r.get("huggingface")
        if hf:
            extra = ", ".join(f"{k}={v}" for k, v in hf.items() if k != "files")
            print(f"  huggingface {' '.join(hf['files'])}" + (f" ({extra})" if extra else ""))


# =========================================================================== safetensors writing
def _st_dtype(dtype: Any) -> str:
    import torch

    table = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    for name, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                       ("uint32", "U32"), ("uint64", "U64")):
        if hasattr(torch, name):
            table[getattr(torch, name)] = code
    if dtype not in table:
        raise IncompatibleCheckpointError(f"dtype {dtype} cannot be stored in safetensors.")
    return table[dtype]


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_safetensors(entries: list[_Entry], out_dir: str, *, max_shard_size: int, dtype: Any,
                       bar: Optional[_Progress]) -> list[str]:
    """Write ``entries`` as ``save_pretrained``-style safetensors shards, one tensor in memory at a time.

    The header of each shard is computed from the shapes and dtypes up front, so each tensor is
    read, converted and written straight to the file, then dropped.
    """
    import torch

    planned = []
    for e in entries:
        out_dtype = dtype if (dtype is not None and e.dtype.is_floating_point) else e.dtype
        nbytes = int(math.prod(e.shape)) * _itemsize(out_dtype)
        planned.append((e, out_dtype, nbytes))
    shards: list[list] = []
    size = 0
    for item in planned:
        if not shards or (shards[-1] and size + item[2] > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[2]
    if not shards:
        shards = [[]]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        fname = _shard_name(i, len(shards))
        header: dict[str, Any] = {}
        offset = 0
        for e, out_dtype, nbytes in shard:
            header[e.name] = {"dtype": _st_dtype(out_dtype), "shape": list(e.shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[e.name] = fname
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(out_dir, fname), "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for e, out_dtype, nbytes in shard:
                t = e.load()
                if tuple(t.shape) != tuple(e.shape):
                    raise CorruptCheckpointError(f"{e.name}: read shape {tuple(t.shape)}, expected {tuple(e.shape)}.")
                t = t.detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                if t.dtype != out_dtype:
                    t = t.to(out_dtype)
                if t.numel():
                    t = t.contiguous().reshape(-1).view(torch.uint8)
                    fh.write(memoryview(t.numpy()))
                del t
                total += nbytes
                if bar:
                    bar.update(nbytes)
            fh.flush()
            os.fsync(fh.fileno())
        names.append(fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
        names.append("model.safetensors.index.json")
    return names


_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
           "fp32": "float32", "float32": "float32", "float": "float32"}


def _parse_dtype(text: Optional[str]) -> Any:
    if not text or text == "auto":
        return None
    import torch

    key = text.lower().replace("torch.", "")
    if key not in _DTYPES:
        raise CLIError(f"--dtype {text}: expected one of bf16, fp16, fp32 (or auto: keep the saved dtype).")
    return getattr(torch, _DTYPES[key])


# =========================================================================== export-hf
def _model_entries(st: Storage, role_dir: str, files: dict[str, int], tmp: str,
                   bar_enabled: bool) -> tuple[list[_Entry], str]:
    """The model tensors of a role directory in any of our layouts, and a description of the source."""
    layout = _role_layout(files)
    if layout == "megatron":
        raise CLIError(
            f"{role_dir}: is a Megatron distributed checkpoint ({MEGATRON_METADATA} + *.distcp). Exporting Megatron "
            f"checkpoints is not supported yet; use Megatron's own converter (or SkyRL's HF export during training)."
        )
    if layout in ("plain", "fsdp-full"):
        path = st.join(role_dir, MODEL_FILE)
        with _Progress(bar_enabled and not st.is_local, files.get(MODEL_FILE), "downloading") as bar:
            sd = _load_pt_lazy(st, path, need_data=True, tmp_dir=tmp, bar=bar)
        if not isinstance(sd, dict):
            raise CorruptCheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}.")
        entries = [_Entry(n, tuple(t.shape), t.dtype, (lambda t=t: t)) for n, t in _walk_tensors(sd)]
        return entries, f"{layout} ({MODEL_FILE})"
    if layout == "fsdp-sharded":
        src = _DcpSource(st, st.join(role_dir, MODEL_DCP_DIR))
        skipped = src.others()
        if skipped:
            _warn(f"{MODEL_DCP_DIR}: non-tensor entries not exported: {skipped[:5]}")
        return src.entries(), f"fsdp sharded DCP ({MODEL_DCP_DIR}/, saved by {_dcp_ranks(files)} rank(s))"
    if layout == "skyrl-native":
        from skyrl_callbacks.writers.fsdp import convert_skyrl_native

        dst = os.path.join(tmp, "converted", "policy")
        logger.info("converting the SkyRL per-rank files into %s first", dst)
        with _quiet():
            convert_skyrl_native(role_dir, dst, storage=st, dst_storage=Storage(os.path.join(tmp, "converted")),
                                 include_optimizer=False)
        src = _DcpSource(Storage(dst), os.path.join(dst, MODEL_DCP_DIR))
        return src.entries(), f"SkyRL native per-rank FSDP (world size {_native_world(files)}), converted offline"
    if layout == "hf":
        raise CLIError(f"{role_dir}: is already a HuggingFace folder (*.safetensors).")
    raise CLIError(f"{role_dir}: no model state found (expected {MODEL_FILE}, {MODEL_DCP_DIR}/, or SkyRL's "
                   f"model_world_size_W_rank_R.pt).")


def _dcp_ranks(files: dict[str, int]) -> int:
    """Ranks that wrote ``model_state.dcp/`` (each writes ``__{rank}_{i}.distcp``, i < dcp_thread_count)."""
    names = (f[len(MODEL_DCP_DIR) + 1:] for f in files if f.startswith(MODEL_DCP_DIR + "/"))
    return len({m.group(1) for m in map(re.compile(r"^__(\d+)_\d+\.distcp$").match, names) if m})


def _check_out(out_st: Storage, final: str, overwrite: bool) -> None:
    if out_st.exists(final) and (not out_st.is_local or not os.path.isdir(final) or os.listdir(final)):
        if not overwrite:
            raise CLIError(f"{final}: already exists; pass --overwrite to replace it.")


def _prepare_out(out_st: Storage, final: str, overwrite: bool) -> str:
    """The staging location for ``final`` (local: a hidden sibling; URLs: ``final`` itself)."""
    _check_out(out_st, final, overwrite)
    token = new_token()
    staging = out_st.staging_dir(final, token)
    if out_st.is_local:
        os.makedirs(os.path.dirname(final.rstrip("/")) or ".", exist_ok=True)
    out_st.prepare_staging(staging)
    return staging


def _commit_local_tree(out_st: Storage, local_dir: str, staging: str, final: str, manifest: dict) -> None:
    """Publish files written into ``local_dir``: local = one rename; URLs = upload, then the manifest last."""
    if out_st.is_local:
        out_st.commit(staging, final, manifest)
        return
    from skyrl_callbacks.storage import upload_local_dir

    upload_local_dir(out_st, local_dir, final)
    out_st.commit(final, final, manifest)


def _hash_local_tree(top: str, extra_skip: Iterable[str] = ()) -> dict[str, dict]:
    from skyrl_callbacks.manifest import checksum_algo, hash_files

    rels = []
    skip = {MANIFEST_FILE, *extra_skip}
    for dirpath, _dirs, fnames in os.walk(top):
        for name in fnames:
            rel = os.path.relpath(os.path.join(dirpath, name), top).replace(os.sep, "/")
            if rel not in skip:
                rels.append(rel)
    return hash_files(Storage(top), top, sorted(rels), checksum_algo())


def cmd_export_hf(args: argparse.Namespace) -> int:
    from skyrl_callbacks.manifest import build_manifest, checksum_algo
    from skyrl_callbacks.writers.hf import parse_size

    dtype = _parse_dtype(args.dtype)
    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as exc:
        raise CLIError(f"--max-shard-size {args.max_shard_size}: not a size (e.g. 5GB, 500MB, 2GiB).") from exc
    if max_shard <= 0:
        raise CLIError(f"--max-shard-size {args.max_shard_size}: must be positive.")
    st = _open(args.ckpt_dir, args)
    path, kind = _resolve_step_dir(st, st.root, allow_role=True)
    if kind == "hf":
        raise CLIError(f"{path}: is already a HuggingFace folder.")
    if kind == "step":
        role_dir = st.join(path, args.role)
        step_files = st.walk_files(path)
        prefix = args.role + "/"
        files = {k[len(prefix):]: v for k, v in step_files.items() if k.startswith(prefix)}
        if not files:
            raise CLIError(f"{path}: has no {args.role}/ (roles: {', '.join(_roles_of(step_files)) or 'none'}).")
        if not args.no_verify:
            manifest, err = _read_manifest(st, path)
            if err:
                raise CorruptCheckpointError(f"{path}: {err}")
            if manifest:
                sub = dict(manifest, files={k: v for k, v in manifest["files"].items() if k.startswith(prefix)})
                failed = _failed(_check_files(st, path, sub, step_files, checksums=args.verify, bar=None))
                if failed:
                    raise CorruptCheckpointError(
                        f"{path}: failed verification: " + "; ".join(f"{e['file']}: {e['detail']}" for e in failed[:5])
                        + f". Run `{PROG} verify {args.ckpt_dir}` for the full report.")
        step = rules.parse_step_dirname(path)
    else:
        role_dir, files, step = path, st.walk_files(path), None
    out_st = _open(args.out, args)
    final = out_st.root
    if out_st.is_local and st.is_local and os.path.abspath(final).startswith(os.path.abspath(role_dir) + os.sep):
        raise CLIError(f"{final}: OUT must not be inside the checkpoint.")
    _check_out(out_st, final, args.overwrite)  # before any long work
    tmp = tempfile.mkdtemp(prefix="skyrl-ckpt-export-")
    progress = _progress_enabled(args)
    t0 = time.perf_counter()
    try:
        entries, source = _model_entries(st, role_dir, files, tmp, progress)
        if args.strip_prefix:
            entries = [_Entry(e.name[len(args.strip_prefix):] if e.name.startswith(args.strip_prefix) else e.name,
                              e.shape, e.dtype, e.load) for e in entries]
        # config / generation config / tokenizer
        meta_st, meta_dir = (st, st.join(role_dir, HF_DIR))
        if args.hf_config:
            meta_st = _open(args.hf_config, args)
            meta_dir = meta_st.root
        meta_files = meta_st.walk_files(meta_dir) if meta_st.exists(meta_dir) else {}
        config: dict = {}
        if "config.json" in meta_files:
            try:
                config = json.loads(meta_st.read_text(meta_st.join(meta_dir, "config.json")))
            except ValueError as exc:
                raise CorruptCheckpointError(f"{meta_dir}/config.json: not valid JSON ({exc}).") from exc
        else:
            _warn(f"no config.json in {meta_dir}: the output has weights only and will not load with "
                  f"from_pretrained; pass --hf-config DIR (a folder with config.json and the tokenizer).")
        tie = config.get("tie_word_embeddings")
        if tie is None and isinstance(config.get("text_config"), dict):
            tie = config["text_config"].get("tie_word_embeddings")
        names = {e.name for e in entries}
        skip = {"lm_head.weight"} if tie and "lm_head.weight" in names and len(names) > 1 else set()
        entries = [e for e in entries if e.name not in skip]
        if not entries:
            raise CorruptCheckpointError(f"{role_dir}: holds no tensors to export.")

        staging = _prepare_out(out_st, final, args.overwrite)
        local = staging if out_st.is_local else os.path.join(tmp, "out")
        os.makedirs(local, exist_ok=True)
        total = sum(int(math.prod(e.shape)) * _itemsize(dtype if (dtype is not None and e.dtype.is_floating_point) else e.dtype)
                    for e in entries)
        try:
            with _Progress(progress, total, "exporting") as bar:
                weights = _write_safetensors(entries, local, max_shard_size=max_shard, dtype=dtype, bar=bar)
            copied = []
            for rel in sorted(meta_files):
                dst = os.path.join(local, *rel.split("/"))
                if rel == "config.json" and dtype is not None:
                    cfg = dict(config)
                    name = _dtype_name(dtype)
                    for key in ("dtype", "torch_dtype"):
                        if key in cfg:
                            cfg[key] = name
                    if "dtype" not in cfg and "torch_dtype" not in cfg:
                        cfg["dtype"] = name
                    with open(dst, "w", encoding="utf-8") as fh:
                        json.dump(cfg, fh, indent=2, sort_keys=True)
                else:
                    _copy_file(meta_st, meta_st.join(meta_dir, rel), Storage(local), dst)
                copied.append(rel)
            hashes = _hash_local_tree(local)
            manifest = build_manifest(hashes, step=step or 0, world_size=1, strategies={args.role: "hf"},
                                      algo=checksum_algo(), extra={"source": path, "source_layout": source})
            _commit_local_tree(out_st, local, staging, final, manifest)
        except BaseException:
            if out_st.is_local:
                shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    doc = {"source": path, "role": args.role, "source_layout": source, "out": final, "tensors": len(entries),
           "bytes": total, "files": sorted(weights + copied), "weights": weights, "copied": copied,
           "skipped_tied": sorted(skip), "dtype": _dtype_name(dtype) if dtype is not None else None,
           "seconds": round(seconds, 3)}
    if args.json:
        _emit_json(doc)
    else:
        print(f"exported {len(entries)} tensors ({_human(total)}) from {source}")
        print(f"  -> {final}: {', '.join(weights)}" + (f" + {', '.join(copied)}" if copied else ""))
        if skip:
            print(f"  left out tied {', '.join(sorted(skip))} (tie_word_embeddings)")
        print(f"  in {seconds:.1f} s; load with AutoModelForCausalLM.from_pretrained({final!r})")
    return EXIT_OK


# =========================================================================== convert
def cmd_convert(args: argparse.Namespace) -> int:
    from skyrl_callbacks.manifest import build_manifest, checksum_algo
    from skyrl_callbacks.writers.fsdp import convert_skyrl_native

    st = _open(args.ckpt_dir, args)
    path = st.root
    kind = _classify(st, path)
    if kind != "step":
        raise _not_found(path, kind) if kind != "root" else CLIError(
            f"{path}: is a CKPT_PATH; `convert` takes one global_step_N directory.")
    step_files = st.walk_files(path)
    roles = _roles_of(step_files)
    native_roles = []
    for role in roles:
        rfiles = [k[len(role) + 1:] for k in step_files if k.startswith(role + "/")]
        if _role_layout(rfiles) == "skyrl-native":
            native_roles.append(role)
    if not native_roles:
        layouts = {r: _role_layout([k[len(r) + 1:] for k in step_files if k.startswith(r + "/")]) for r in roles}
        raise CLIError(f"{path}: nothing to convert: no SkyRL per-rank files (model_world_size_W_rank_R.pt); "
                       f"role layouts: {layouts or 'no roles'}.")
    out_st = _open(args.out, args)
    final = out_st.root
    staging = _prepare_out(out_st, final, args.overwrite)
    progress = _progress_enabled(args)
    summaries = {}
    world = None
    try:
        for role in native_roles:
            src_role = st.join(path, role)
            dst_role = out_st.join(staging, role)
            with _quiet():
                try:
                    summary = convert_skyrl_native(src_role, dst_role, storage=st, dst_storage=out_st,
                                                   include_optimizer=not args.no_optimizer)
                except IncompatibleCheckpointError as exc:
                    if "include_optimizer=False" in str(exc):
                        raise IncompatibleCheckpointError(f"{exc} With the CLI: add --no-optimizer.") from exc
                    raise
            world = summary.get("world_size", world)
            summaries[role] = {k: v for k, v in summary.items() if k != "files"}
        # everything else (trainer_state.pt, data.pt, huggingface/, non-native roles) is copied as is
        to_copy = []
        for rel in step_files:
            if rel == MANIFEST_FILE:
                continue
            role, _, rest = rel.partition("/")
            if role in native_roles and rest and (_NATIVE_RE.match(rest) or rest == FSDP_CONFIG_FILE):
                continue
            to_copy.append(rel)
        with _Progress(progress, sum(step_files[r] for r in to_copy), "copying") as bar:
            for rel in sorted(to_copy):
                _copy_file(st, st.join(path, rel), out_st, out_st.join(staging, *rel.split("/")), bar)
        present = out_st.walk_files(staging)
        from skyrl_callbacks.manifest import hash_files

        hashes = hash_files(out_st, staging, sorted(r for r in present if r != MANIFEST_FILE), checksum_algo())
        step = rules.parse_step_dirname(path)
        if step is None and TRAINER_STATE_FILE in step_files:
            ts = _torch_load_small(st, st.join(path, TRAINER_STATE_FILE))
            step = ts.get("global_step") if isinstance(ts, dict) else None
        strategies = {r: "fsdp" for r in native_roles}
        for r in roles:
            if r not in strategies:
                strategies[r] = _strategy_of_layout(_role_layout([k[len(r) + 1:] for k in step_files if k.startswith(r + "/")]))
        manifest = build_manifest(
            hashes, step=int(step or 0), world_size=int(world or 1), strategies=strategies, algo=checksum_algo(),
            extra={"parent_step": None, "converted_from": {"layout": "skyrl_native", "world_size": world, "source": path}},
        )
        out_st.commit(staging, final, manifest)
    except BaseException:
        if out_st.is_local:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    doc = {"source": path, "out": final, "roles": summaries, "copied": sorted(to_copy), "files": len(hashes),
           "bytes": sum(h["size"] for h in hashes.values()), "step": step}
    if args.json:
        _emit_json(doc)
    else:
        for role, s in summaries.items():
            print(f"converted {role}/: SkyRL native {s.get('fsdp_strategy')} (world size {s.get('world_size')}), "
                  f"{s.get('tensors')} tensors, optimizer {'included' if s.get('optimizer') else 'not included'}")
        print(f"copied {len(to_copy)} file(s): {', '.join(sorted(to_copy)) or '-'}")
        print(f"committed {final} ({len(hashes)} files, {_human(doc['bytes'])}); it loads at any world size")
    return EXIT_OK


# =========================================================================== parser
_EPILOG = f"""\
examples:
  {PROG} ls ~/ckpts/run1                          list checkpoints, pointer, retention
  {PROG} ls s3://bucket/run1 --storage-options '{{"endpoint_url": "http://minio:9000"}}'
  {PROG} inspect ~/ckpts/run1/global_step_100     tensors, optimizer, trainer/data state
  {PROG} verify ~/ckpts/run1                      check sizes + checksums of every checkpoint
  {PROG} prune ~/ckpts/run1 --keep 3 --dry-run    what retention would delete
  {PROG} export-hf ~/ckpts/run1/global_step_100 ./hf --dtype bf16
  {PROG} convert skyrl_ckpts/global_step_100 ckpts/global_step_100

CKPT_PATH is a run's ckpt_path (holding global_step_N/); CKPT_DIR is one global_step_N/.
Paths may be local or fsspec URLs (s3://, gs://, ...).
exit codes: 0 ok, 1 a check failed (corrupt checkpoint, a file refused as untrusted, I/O error), 2 usage error / bad input.
"""


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--storage-options", metavar="JSON", default=None,
                   help="fsspec options for URLs, as JSON or @file.json (default: $SKYRL_CKPT_STORAGE_OPTIONS)")
    g.add_argument("--json", action="store_true", help="print one JSON document on stdout (for scripts)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown on a terminal)")
    g.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("-v", "--verbose", action="store_true", help="log what is done; tracebacks on errors")
    g.add_argument("--trust-checkpoint-code", action="store_true",
                   help="also load files that only a code-executing unpickling can read (SkyRL's per-rank FSDP "
                        "files, checkpoints of older versions); only for checkpoints whose every writer you trust")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=fmt, epilog=_EPILOG,
        description="Inspect and manage SkyRL/skyrl-callbacks checkpoints: list, inspect, verify, prune, "
                    "export to HuggingFace, convert SkyRL's per-rank FSDP checkpoints.",
    )
    from skyrl_callbacks import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s (skyrl-callbacks {__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "ls", parents=[common], formatter_class=fmt, help="list the checkpoints of a CKPT_PATH",
        description="List every global_step_N of CKPT_PATH: committed / incomplete / corrupt, size, roles, layout, "
                    "world size, the pointer's checkpoint, what retention deletes, and leftovers of interrupted saves. "
                    "corrupt = the manifest's sizes do not match (--verify also checks checksums). "
                    "Exit 1 when a committed checkpoint is corrupt.",
        epilog=f"examples:\n  {PROG} ls ~/ckpts/run1\n  {PROG} ls ~/ckpts/run1 --keep 2 --json\n"
               f"  {PROG} ls s3://bucket/run1 --verify",
    )
    p.add_argument("ckpt_path", metavar="CKPT_PATH")
    p.add_argument("--keep", type=int, default=None, metavar="N",
                   help="retention to simulate (default: max_ckpts_to_keep in the newest trainer_state.pt)")
    p.add_argument("--verify", action="store_true", help="also check every file's checksum (reads everything)")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "inspect", parents=[common], formatter_class=fmt, help="show what one checkpoint holds",
        description="Show a checkpoint's manifest, trainer state, dataloader position and, per role, the tensors "
                    "(names, shapes, dtypes, bytes; read from metadata, not loaded), optimizer (type, param groups) "
                    "and scheduler. CKPT_DIR may also be a role directory, an HF export, or a CKPT_PATH (its "
                    "pointer's checkpoint is used).",
        epilog=f"examples:\n  {PROG} inspect ~/ckpts/run1/global_step_100\n"
               f"  {PROG} inspect ~/ckpts/run1/global_step_100 --role critic --json",
    )
    p.add_argument("ckpt_dir", metavar="CKPT_DIR")
    p.add_argument("--role", default=None, help="only this role (policy, critic)")
    p.add_argument("--max-tensors", type=int, default=40, metavar="N",
                   help="tensors listed per role in text output (0 = all; --json lists all)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "verify", parents=[common], formatter_class=fmt, help="check files against the manifest",
        description="Check every file of a checkpoint against its manifest (size and checksum) and report each "
                    "file. Given a CKPT_PATH, verifies every committed checkpoint. Exit 0 when everything "
                    "matches, 1 otherwise.",
        epilog=f"examples:\n  {PROG} verify ~/ckpts/run1/global_step_100\n  {PROG} verify ~/ckpts/run1 --quiet\n"
               f"  {PROG} verify s3://bucket/run1 --sizes-only --json",
    )
    p.add_argument("path", metavar="CKPT_DIR|CKPT_PATH")
    p.add_argument("--sizes-only", action="store_true", help="check sizes only (fast: reads no data)")
    p.add_argument("-q", "--quiet", action="store_true", help="list only the files that failed")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "prune", parents=[common], formatter_class=fmt, help="apply retention: keep the newest N",
        description="Delete committed checkpoints with the callback's retention rule (keep the newest N by step "
                    "number). Never deletes the newest checkpoint, the one the pointer names, or anything that "
                    "is not a global_step_N checkpoint of ours; also removes leftovers of interrupted saves "
                    "(.tmp-*/.trash-*) unless --keep-leftovers; while a live run holds CKPT_PATH's lock its leftovers "
                    "(maybe its save in progress) are kept.",
        epilog=f"examples:\n  {PROG} prune ~/ckpts/run1 --keep 3 --dry-run\n  {PROG} prune s3://bucket/run1 --keep 1",
    )
    p.add_argument("ckpt_path", metavar="CKPT_PATH")
    p.add_argument("--keep", type=int, required=True, metavar="N", help="committed checkpoints to keep (-1: all)")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted; change nothing")
    p.add_argument("--keep-leftovers", action="store_true", help="do not remove leftovers of interrupted saves")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "export-hf", parents=[common], formatter_class=fmt, help="write a HuggingFace folder (safetensors)",
        description="Export a role's weights as a HuggingFace folder (model*.safetensors + config, generation config "
                    "and tokenizer from the checkpoint's <role>/huggingface/). Reads every layout of this package: "
                    "plain model_state.pt, FSDP sharded DCP (any world size), FSDP full, and SkyRL's native "
                    "per-rank FSDP files. Streams one tensor at a time; OUT appears atomically (a rename locally, "
                    "the manifest last on object stores). Megatron checkpoints are not supported yet.",
        epilog=f"examples:\n  {PROG} export-hf ~/ckpts/run1/global_step_100 ./hf\n"
               f"  {PROG} export-hf s3://bucket/run1/global_step_100 s3://bucket/hf/100 --dtype bf16 --max-shard-size 2GB",
    )
    p.add_argument("ckpt_dir", metavar="CKPT_DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--role", default="policy", help="role to export (default: policy)")
    p.add_argument("--dtype", default=None, help="cast floating tensors: bf16, fp16, fp32 (default: as saved)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--hf-config", metavar="DIR", default=None,
                   help="take config/tokenizer files from DIR instead of <role>/huggingface/")
    p.add_argument("--strip-prefix", metavar="PREFIX", default=None, help="remove PREFIX from tensor names")
    p.add_argument("--verify", action="store_true", help="check the role's checksums first (sizes are always checked)")
    p.add_argument("--no-verify", action="store_true", help="skip the size check against the manifest")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser(
        "convert", parents=[common], formatter_class=fmt, help="SkyRL per-rank FSDP -> reshardable checkpoint",
        description="Convert a checkpoint written by SkyRL's FSDP strategy (model/optim/extra_state_world_size_W_rank_R.pt) "
                    "into this package's reshardable sharded layout, which loads at any world size. trainer_state.pt, "
                    "data.pt and huggingface/ are copied; a manifest is written, so OUT is a committed checkpoint "
                    "(atomic). Runs offline in one process.",
        epilog=f"examples:\n  {PROG} convert skyrl_ckpts/global_step_100 ckpts/global_step_100\n"
               f"  {PROG} convert old/global_step_50 new/global_step_50 --no-optimizer   (FSDP1 optimizer state)",
    )
    p.add_argument("ckpt_dir", metavar="CKPT_DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--no-optimizer", action="store_true",
                   help="convert weights and lr_scheduler only (needed for FSDP1's flattened optimizer state)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)
    return parser


# =========================================================================== entry points
def main(argv: Optional[list[str]] = None) -> int:
    """Run ``skyrl-ckpt`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USAGE)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format=f"{PROG}: %(message)s")
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")
    try:
        args.storage_options = _parse_storage_options(args.storage_options)
        from skyrl_callbacks.safe_load import trusting

        with trusting(bool(getattr(args, "trust_checkpoint_code", False))):
            return int(args.func(args))
    except CLIError as exc:
        _error(args, str(exc), exc, exc.code)
        return exc.code
    except (CorruptCheckpointError, StorageError, UntrustedCheckpointError) as exc:
        _error(args, str(exc), exc, EXIT_FAILED)
        return EXIT_FAILED
    except (CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        _error(args, str(exc), exc, EXIT_USAGE)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001
        _error(args, f"{type(exc).__name__}: {exc}", exc, EXIT_FAILED)
        return EXIT_FAILED


def _error(args: argparse.Namespace, message: str, exc: BaseException, code: int) -> None:
    print(f"{PROG} {getattr(args, 'command', '')}: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):  # scripts always get a JSON document on stdout
        _emit_json({"ok": False, "error": message, "error_type": type(exc).__name__, "exit_code": code})
    if getattr(args, "verbose", False):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)


def console_main() -> None:
    """Entry point of the ``skyrl-ckpt`` console script."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    console_main()
