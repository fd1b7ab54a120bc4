"""CheckpointConfig: SkyRL's checkpoint keys with SkyRL's defaults, validated at construction.

The seven keys of SkyRL's checkpointing doc keep their names and defaults. A few keys of
our own (``storage_options``, ``state_dict_type``, ``verify_on_resume``, ...) extend them;
they all have defaults that reproduce SkyRL's behaviour.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from skyrl_callbacks.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CheckpointConfig", "RESUME_MODES", "resolve_interpolations", "check_export_path"]

#: Accepted values of ``resume_mode`` (``None`` is accepted too and means ``"none"``).
RESUME_MODES = ("none", "latest", "from_path")
_STEP_DIR_RE = re.compile(r"^global_step_(\d+)$")
_ENV_RE = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)(?:,([^}]*))?\}")
# Keys of a SkyRL ``trainer:`` section, besides ours, that we read when present.
_SECTION_HINTS = ("trainer",)


def resolve_interpolations(value: str, key: str) -> str:
    """Resolve ``${oc.env:VAR}`` and ``${oc.env:VAR,default}`` in ``value``.

    OmegaConf nodes are resolved by OmegaConf itself; this covers plain dicts and YAML
    files read without OmegaConf, so that SkyRL's defaults work everywhere.

    Raises:
        ConfigError: the variable is unset and no default is given.
    """

    def _sub(match: re.Match) -> str:
        var, default = match.group(1), match.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default.strip().strip("'\"")
        raise ConfigError(
            f"{key}={value!r}: environment variable {var} is not set. "
            f"Set {var} or give {key} an explicit path."
        )

    if "${" in value and not _ENV_RE.search(value):
        raise ConfigError(
            f"{key}={value!r}: only ${{oc.env:VAR}} interpolation is supported here. "
            f"Pass an OmegaConf node to use other resolvers, or write the path out."
        )
    return _ENV_RE.sub(_sub, value)


@dataclass
class CheckpointConfig:
    """Checkpoint settings. Field names and defaults follow SkyRL's checkpointing doc.

    Build one from keyword arguments, a dict (:meth:`from_dict`), a YAML file
    (:meth:`from_yaml`) or an OmegaConf node such as SkyRL's ``trainer:`` section
    (:meth:`from_omegaconf`). Every value is validated here, at construction.
    """

    ckpt_interval: int = 10
    """Save a checkpoint every N training steps. -1 disables periodic saves (the final save at
    the end of training still happens)."""

    ckpt_path: str = "${oc.env:HOME}/ckpts/"
    """Base directory (local path or fsspec URL such as ``s3://bucket/run``) of all checkpoints."""

    max_ckpts_to_keep: int = -1
    """Keep only the newest N committed checkpoints; -1 keeps all."""

    resume_mode: Optional[str] = "latest"
    """``"none"``/``None`` (start fresh), ``"latest"`` (resume from the newest committed
    checkpoint) or ``"from_path"`` (resume from ``resume_path``)."""

    resume_path: Optional[str] = None
    """A ``global_step_N`` directory to resume from; used only with ``resume_mode="from_path"``."""

    hf_save_interval: int = -1
    """Export the policy in HuggingFace safetensors format every N steps; -1 disables."""

    export_path: str = "${oc.env:HOME}/exports/"
    """Base directory of HF exports: ``{export_path}/global_step_N/policy/``."""

    # ---- our extensions (all optional) -------------------------------------------------
    storage_options: Optional[dict] = None
    """Extra keyword arguments for the fsspec filesystem (endpoint, credentials, region...)."""

    state_dict_type: str = "sharded"
    """FSDP only: ``"sharded"`` (every rank writes its shards, reshardable) or ``"full"``."""

    dcp_thread_count: int = 4
    """FSDP ``state_dict_type="sharded"`` only: writer threads per rank of each DCP save. On a local disk
    they write the rank's one file (``__{rank}_0.distcp``; torch >= 2.6); on an object store (or an older
    torch) each writes a file of its own (``__{rank}_{i}.distcp``, ``i < dcp_thread_count``). Any value
    loads at any world size. See ``docs/fsdp.md``."""

    megatron_optimizer_sharding: str = "fully_reshardable"
    """Megatron ``DistributedOptimizer`` layout: ``"fully_reshardable"`` (loads at any TP/PP/DP; slower save)
    or ``"dp_reshardable"`` (faster; loads only at the same TP/PP). See ``docs/megatron.md``."""

    verify_on_resume: bool = True
    """Check every file's checksum against the manifest on resume (sizes are always checked). The large
    files are hashed while they are read for the load (no second read; Megatron's files, read by
    Megatron's own loader, are hashed before it); a mismatch falls back to the previous checkpoint
    (``latest``) or raises (``from_path``). ``false``: sizes only, the earlier default (a same-size bit flip
    is then loaded unless it breaks the file's structure). See ``docs/reliability.md``."""

    trust_checkpoint_code: bool = False
    """Allow loads that may execute code from the checkpoint store. Off (default): every file is
    loaded ``weights_only=True`` (DCP ``.metadata`` with a restricted unpickler), and a file that
    needs more (SkyRL's own per-rank FSDP files, checkpoints of older skyrl-callbacks versions, or a
    planted pickle) is refused with an error naming the file and the refused global. Set true only
    if you trust everyone who can write to ``ckpt_path``/``resume_path``. See docs/reliability.md."""

    async_save: bool = False
    """Write checkpoints in the background: the step's state is copied into reused host buffers
    (the only time the training loop waits), a background thread writes it, and the checkpoint is
    committed (pointer, retention) once every rank has finished. At most one save is in flight;
    the next save, a resume and the end of training wait for it. See ``docs/async.md``."""

    async_overlap_copy: bool = False
    """With ``async_save``: copy parameters and optimizer state into the host buffers in the
    background too, while the next step's forward and backward run; the next ``optimizer.step()``
    waits until the copy is done (a step pre-hook; Lightning: ``on_before_optimizer_step``).
    Buffers and everything else are still copied before ``save`` returns. Only safe when nothing
    but ``optimizer.step()`` changes parameters or optimizer state before the next step (no
    in-place weight edits in callbacks); hence off by default. See ``docs/async.md``."""

    save_on_train_end: bool = True
    """Save a final checkpoint (and export) at the end of ``fit`` if the last step was not saved."""

    cloud_upload: str = "staged"
    """Object-store ``ckpt_path`` only: ``"staged"`` (each rank writes its files to a local
    staging dir, then uploads them concurrently with multipart uploads; retried per file) or
    ``"stream"`` (files are streamed straight to the store, no local disk; a failed stream
    cannot be retried). See docs/cloud.md."""

    cloud_staging_dir: Optional[str] = None
    """Local directory for staged cloud saves and large downloads (default: the system temp dir)."""

    cloud_retry_deadline_s: float = 120.0
    """Object stores: retry budget of one operation (upload of a file, listing...) in seconds;
    transient errors (5xx, SlowDown, resets) are retried with backoff until it is spent."""

    run_lock: bool = True
    """Refuse to write into a ``ckpt_path`` that another live run owns (lock file with host, pid
    and heartbeat; a dead run's lock is taken over)."""

    preemption_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that mean "preempted": finish the current step, save, commit and stop cleanly
    (exit code 0) on every rank. An empty list turns this off."""

    extra: dict = field(default_factory=dict, repr=False, compare=False)
    """Keys of the source config that are not ours (e.g. the rest of SkyRL's ``trainer:``
    section). Kept so that ``trainer_state.pt`` records the complete configuration."""

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The keys a config accepts."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, ignore_unknown: bool = False) -> "CheckpointConfig":
        """Build a config from a mapping.

        Args:
            data: the keys of this config. With ``ignore_unknown`` (used for SkyRL's
                ``trainer:`` section), other keys are kept in :attr:`extra`.
            ignore_unknown: keep unknown keys instead of raising.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones) or a bad value.
        """
        if isinstance(data, CheckpointConfig):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"config: expected a dict, a YAML path, an OmegaConf node or a CheckpointConfig, "
                f"got {type(data).__name__}."
            )
        known = set(cls.field_names())
        ours = {k: v for k, v in data.items() if k in known}
        unknown = {k: v for k, v in data.items() if k not in known}
        if unknown and not ignore_unknown:
            key = sorted(map(str, unknown))[0]
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {key!r} (value {unknown[key]!r}).{hint} "
                f"Valid keys: {', '.join(cls.field_names())}."
            )
        for key in unknown:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.85)
            if close:
                logger.warning("config key %r is not a checkpoint key; did you mean %r?", key, close[0])
        return cls(**ours, extra=dict(unknown))

    @classmethod
    def from_yaml(cls, path: str, *, section: Optional[str] = None) -> "CheckpointConfig":
        """Read a YAML file. If it has a top-level ``trainer:`` section (a SkyRL config), or
        ``section`` names one, the keys are read from there and the others are ignored.

        Raises:
            ConfigError: the file cannot be read or holds bad values.
        """
        try:
            import yaml
        except ImportError:  # pragma: no cover
            yaml = None
        try:
            with open(path, "r", encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"config file {path!r} cannot be read: {exc}. Check the path.") from exc
        if yaml is not None:
            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else None
                raise ConfigError(
                    f"config file {path!r}: YAML syntax error{where}: {what}"
                    f"{f' (line: {line.strip()!r})' if line and line.strip() else ''}. Fix the YAML there (indentation, "
                    f"a missing ':' or an unclosed quote or bracket are the usual causes)."
                ) from None
        else:  # pragma: no cover - PyYAML ships with lightning/transformers
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
        return cls._from_nested(data, section=section, source=path)

    @classmethod
    def from_omegaconf(cls, node: Any, *, section: Optional[str] = None) -> "CheckpointConfig":
        """Build from an OmegaConf node (e.g. SkyRL's ``cfg.trainer``); interpolations resolve.

        Raises:
            ConfigError: bad values, or an interpolation that cannot be resolved.
        """
        from omegaconf import OmegaConf

        try:
            data = OmegaConf.to_container(node, resolve=True)
        except Exception as exc:  # omegaconf raises its own InterpolationResolutionError
            raise ConfigError(f"config: cannot resolve interpolations: {exc}") from exc
        return cls._from_nested(data, section=section, source="OmegaConf node")

    @classmethod
    def _from_nested(cls, data: Any, *, section: Optional[str], source: str) -> "CheckpointConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"config {source}: expected a mapping at the top level, got {type(data).__name__}.")
        if section is not None:
            if section not in data:
                raise ConfigError(f"config {source}: section {section!r} not found; it has {sorted(data)}.")
            return cls.from_dict(data[section], ignore_unknown=True)
        for name in _SECTION_HINTS:
            if isinstance(data.get(name), Mapping):
                return cls.from_dict(data[name], ignore_unknown=True)
        # A SkyRL trainer section passed directly has keys we do not know: keep them.
        return cls.from_dict(data, ignore_unknown=not set(data) <= set(cls.field_names()) and _looks_like_skyrl(data))

    @classmethod
    def coerce(cls, config: Any) -> "CheckpointConfig":
        """Accept a CheckpointConfig, dict, YAML path, OmegaConf node or None (defaults)."""
        if config is None:
            return cls()
        if isinstance(config, CheckpointConfig):
            return config
        if isinstance(config, (str, os.PathLike)):
            return cls.from_yaml(os.fspath(config))
        if type(config).__module__.startswith("omegaconf"):
            return cls.from_omegaconf(config)
        return cls.from_dict(config)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for key in ("ckpt_interval", "hf_save_interval"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{key}={value!r}: must be an integer (a positive N, or -1 to disable).")
            if value == 0 or value < -1:
                raise ConfigError(
                    f"{key}={value!r}: must be a positive number of steps, or -1 to disable. "
                    f"Use {key}=-1 to turn it off."
                )
        keep = self.max_ckpts_to_keep
        if isinstance(keep, bool) or not isinstance(keep, int) or keep == 0 or keep < -1:
            raise ConfigError(
                f"max_ckpts_to_keep={keep!r}: must be a positive integer or -1 (keep all). "
                f"0 would delete every checkpoint including the one just saved; use -1 to keep all."
            )
        mode = self.resume_mode
        if mode is None or (isinstance(mode, str) and mode.strip().lower() in ("null", "none", "")):
            self.resume_mode = "none"
        elif not isinstance(mode, str) or mode not in RESUME_MODES:
            raise ConfigError(
                f"resume_mode={mode!r}: must be one of 'none' (or null), 'latest', 'from_path'."
            )
        for key in ("ckpt_path", "export_path"):
            value = getattr(self, key)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{key}={value!r}: must be a non-empty path or URL string.")
            value = _absolute(resolve_interpolations(value, key))
            _check_path_length(key, value)
            setattr(self, key, value)
        check_export_path(self.ckpt_path, self.export_path)
        if self.resume_path is not None:
            if isinstance(self.resume_path, os.PathLike):
                self.resume_path = os.fspath(self.resume_path)
            if not isinstance(self.resume_path, str) or not self.resume_path.strip():
                raise ConfigError(f"resume_path={self.resume_path!r}: must be a path to a global_step_N directory.")
            self.resume_path = _absolute(resolve_interpolations(self.resume_path, "resume_path"))
            base = self.resume_path.rstrip("/").rsplit("/", 1)[-1]
            if not _STEP_DIR_RE.match(base):
                raise ConfigError(
                    f"resume_path={self.resume_path!r}: must point to a global_step_N directory "
                    f"(e.g. {self.resume_path.rstrip('/')}/global_step_10), not {base!r}."
                )
            if self.resume_mode != "from_path":
                logger.warning(
                    "resume_path=%r is ignored because resume_mode=%r; set resume_mode='from_path' to use it.",
                    self.resume_path,
                    self.resume_mode,
                )
        if self.resume_mode == "from_path" and self.resume_path is None:
            raise ConfigError(
                "resume_mode='from_path' needs resume_path: set resume_path to a "
                "{ckpt_path}/global_step_N directory, or use resume_mode='latest'."
            )
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise ConfigError(
                f"storage_options={self.storage_options!r}: must be a dict of fsspec options, "
                f"e.g. {{'endpoint_url': 'http://...'}}."
            )
        if self.storage_options is not None:
            self.storage_options = dict(self.storage_options)
        if self.state_dict_type not in ("sharded", "full"):
            raise ConfigError(f"state_dict_type={self.state_dict_type!r}: must be 'sharded' or 'full'.")
        threads = self.dcp_thread_count
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(
                f"dcp_thread_count={threads!r}: must be an integer >= 1 (writer threads per rank of an FSDP "
                f"sharded save). Use 1 for a single writer thread, or leave it out for the default 4."
            )
        if self.megatron_optimizer_sharding not in ("fully_reshardable", "dp_reshardable"):
            raise ConfigError(
                f"megatron_optimizer_sharding={self.megatron_optimizer_sharding!r}: must be 'fully_reshardable' "
                f"(reshards to any parallelism) or 'dp_reshardable' (same TP/PP only, faster)."
            )
        for key in ("verify_on_resume", "async_save", "async_overlap_copy", "save_on_train_end", "run_lock",
                    "trust_checkpoint_code"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}={getattr(self, key)!r}: must be true or false.")
        if self.async_overlap_copy and not self.async_save:
            raise ConfigError(
                "async_overlap_copy=true: it only applies to background saves; set async_save=true as well "
                "(or drop async_overlap_copy)."
            )
        if self.cloud_upload not in ("staged", "stream"):
            raise ConfigError(f"cloud_upload={self.cloud_upload!r}: must be 'staged' or 'stream'.")
        if self.cloud_staging_dir is not None:
            if isinstance(self.cloud_staging_dir, os.PathLike):
                self.cloud_staging_dir = os.fspath(self.cloud_staging_dir)
            if not isinstance(self.cloud_staging_dir, str) or not self.cloud_staging_dir.strip() or "://" in self.cloud_staging_dir:
                raise ConfigError(
                    f"cloud_staging_dir={self.cloud_staging_dir!r}: must be a local directory path (or null for the temp dir)."
                )
            self.cloud_staging_dir = _absolute(resolve_interpolations(self.cloud_staging_dir, "cloud_staging_dir"))
        deadline = self.cloud_retry_deadline_s
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not deadline > 0:
            raise ConfigError(f"cloud_retry_deadline_s={deadline!r}: must be a positive number of seconds.")
        self.cloud_retry_deadline_s = float(deadline)
        import signal as _signal

        if isinstance(self.preemption_signals, str) or not isinstance(self.preemption_signals, (list, tuple)):
            raise ConfigError(
                f"preemption_signals={self.preemption_signals!r}: must be a list of signal names, e.g. "
                f"['SIGTERM', 'SIGUSR1'], or [] to disable."
            )
        for name in self.preemption_signals:
            if not isinstance(name, str) or not isinstance(getattr(_signal, name, None), _signal.Signals):
                raise ConfigError(
                    f"preemption_signals: {name!r} is not a signal name of this platform; use names such as "
                    f"'SIGTERM' or 'SIGUSR1'."
                )
        self.preemption_signals = list(self.preemption_signals)

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict:
        """All keys, ours and the extra ones, as a plain dict (stored in trainer_state.pt)."""
        out = {name: getattr(self, name) for name in self.field_names()}
        if self.storage_options:
            # never persist credentials
            out["storage_options"] = {
                k: ("***" if any(s in k.lower() for s in ("secret", "token", "key", "password")) else v)
                for k, v in self.storage_options.items()
            }
        if self.extra:
            out["extra"] = dict(self.extra)
        return out


def _absolute(path: str) -> str:
    """A relative local path made absolute now, against the working directory at construction (as
    Lightning's ``ModelCheckpoint`` does): a later ``os.chdir`` (Hydra changes it per run) must not move
    where checkpoints go. Absolute paths and URLs are kept as written."""
    if "://" in path:
        return path
    expanded = os.path.expanduser(path)
    return expanded if os.path.isabs(expanded) else os.path.abspath(expanded)


#: Linux limits (``NAME_MAX``, ``PATH_MAX``) and the room our own names take below ``ckpt_path``
#: (``.tmp-global_step_N-<token>/critic/model_state.dcp/__12_3.distcp`` and the like).
_NAME_MAX, _PATH_MAX, _OUR_SUFFIX_MAX = 255, 4096, 160


def _check_path_length(key: str, path: str) -> None:
    """Refuse a local path the file system cannot hold (errno 36 otherwise, at the first save)."""
    if "://" in path:
        return
    raw = os.fsencode(path)
    long_name = max(raw.split(b"/"), key=len)
    if len(long_name) > _NAME_MAX:
        raise ConfigError(
            f"{key}={_short(path)}: the component {_short(os.fsdecode(long_name), 40)} is {len(long_name)} bytes "
            f"long; file systems allow {_NAME_MAX} bytes per name. Use a shorter {key}."
        )
    if len(raw) + _OUR_SUFFIX_MAX > _PATH_MAX:
        raise ConfigError(
            f"{key}={_short(path)}: the path is {len(raw)} bytes long; with the names checkpoints add below it "
            f"(up to {_OUR_SUFFIX_MAX} bytes) it exceeds the file system's limit of {_PATH_MAX} bytes per path. "
            f"Use a shorter {key} (under {_PATH_MAX - _OUR_SUFFIX_MAX} bytes)."
        )


def _short(text: str, keep: int = 60) -> str:
    return repr(text) if len(text) <= 2 * keep else repr(f"{text[:keep]}...{text[-keep:]}")


def _location(url: str) -> str:
    """Where ``url`` really is, for comparing two paths: local paths with symlinks resolved
    (``os.path.realpath``), object-store URLs normalised (scheme aliases, repeated and trailing ``/``)."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        proto = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}.get(proto.lower(), proto.lower())
        if proto not in ("file", "local"):
            return f"{proto}://{re.sub('/+', '/', rest).strip('/')}"
        url = rest
    return os.path.realpath(os.path.expanduser(url))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def check_export_path(ckpt_path: str, export_path: str) -> None:
    """Refuse an ``export_path`` that is ``ckpt_path``, inside it or above it, after resolving symlinks
    (local) or normalising the URL (object stores): an HF export to ``{export_path}/global_step_N/policy/``
    would otherwise replace a committed checkpoint's ``policy/``, and retention of one tree would walk the other.

    Raises:
        ConfigError: the two locations overlap.
    """
    ck, ex = _location(ckpt_path), _location(export_path)
    if _inside(ex, ck) or _inside(ck, ex):
        how = "is" if ex == ck else ("is inside" if _inside(ex, ck) else "contains")
        same = "" if (ck, ex) == (ckpt_path.rstrip("/"), export_path.rstrip("/")) else f" (resolved: {ex} and {ck})"
        raise ConfigError(
            f"export_path={export_path!r} {how} ckpt_path={ckpt_path!r}{same}: the HF export to "
            f"{{export_path}}/global_step_N/policy/ could replace a committed checkpoint's policy/ (model, optimizer "
            f"and scheduler state). Use another directory for export_path, outside ckpt_path, e.g. "
            f"{ckpt_path.rstrip('/')}_exports/."
        )


def _looks_like_skyrl(data: Mapping) -> bool:
    """A SkyRL ``trainer:`` section carries keys such as ``policy``/``epochs`` besides ours."""
    skyrl_markers = {"policy", "critic", "ref", "epochs", "strategy", "train_batch_size", "placement"}
    return bool(skyrl_markers & set(data))
