"""HuggingFace export: safetensors weights, config, generation config and tokenizer.

Weights are streamed: tensors arrive one at a time from the role's writer (gathered one
parameter at a time under FSDP), are packed into shards of at most ``max_shard_size`` bytes,
and each shard is written as soon as it is full. Rank 0 never holds more than one shard.
The layout is the one ``save_pretrained`` writes (``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import torch

if TYPE_CHECKING:
    from skyrl_callbacks.dist import DistContext
    from skyrl_callbacks.roles import Role
    from skyrl_callbacks.storage import Storage
    from skyrl_callbacks.writers.base import RoleWriter

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "parse_size",
    "hf_model_of",
    "write_hf_metadata",
    "write_safetensors_stream",
    "export_role",
    "tied_duplicate_keys",
]

DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3
_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(size: Any) -> int:
    """``"5GB"`` / ``"500MiB"`` / int -> bytes."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * _UNITS[unit])
    return int(text)


def hf_model_of(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The ``transformers.PreTrainedModel`` inside wrappers, or None."""
    import sys

    transformers = sys.modules.get("transformers")
    if transformers is None:  # no HF model can exist unless transformers was imported (saves ~7 s)
        return None
    PreTrainedModel = transformers.PreTrainedModel
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, PreTrainedModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        seen += 1
    return None


def tied_duplicate_keys(model: Optional[torch.nn.Module], names: Iterable[str]) -> set[str]:
    """State-dict keys that ``save_pretrained`` drops because they are tied to another key."""
    if model is None:
        return set()
    names = set(names)
    config = getattr(model, "config", None)
    tie = bool(getattr(config, "tie_word_embeddings", False)) if config is not None else False
    if not tie:
        return set()
    out = set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    for key in keys:
        if key in names:
            out.add(key)
    if not out and "lm_head.weight" in names:
        out.add("lm_head.weight")
    return out


def write_hf_metadata(out_dir: str, model: Optional[torch.nn.Module], tokenizer: Any = None) -> None:
    """Write ``config.json``, ``generation_config.json`` and the tokenizer into a LOCAL dir."""
    os.makedirs(out_dir, exist_ok=True)
    hf = hf_model_of(model) if model is not None else None
    if hf is not None:
        hf.config.save_pretrained(out_dir)
        gen = getattr(hf, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(out_dir)
            except Exception as exc:  # an invalid generation config must not fail the save
                logger.warning("generation_config not saved: %s", exc)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_safetensors_stream(
    tensors: Iterator[tuple[str, torch.Tensor]],
    out_dir: str,
    *,
    write: bool,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    dtype: Optional[torch.dtype] = None,
    skip: Iterable[str] = (),
    metadata: Optional[dict] = None,
) -> list[str]:
    """Consume ``(name, tensor)`` pairs and write safetensors shards into a LOCAL dir.

    Every rank must iterate ``tensors`` (the gather behind it may be collective); only the
    rank with ``write=True`` keeps tensors and writes. Shards are written under temporary
    names as they fill up and renamed to ``save_pretrained``'s names at the end.

    Returns:
        The file names written (relative to ``out_dir``).
    """
    from safetensors.torch import save_file

    skip = set(skip)
    shards: list[tuple[str, list[str], int]] = []  # (tmp name, keys, bytes)
    weight_map: dict[str, str] = {}
    buf: dict[str, torch.Tensor] = {}
    buf_bytes = 0
    total = 0

    def flush() -> None:
        nonlocal buf, buf_bytes
        if not buf:
            return
        tmp = f".shard-{len(shards):05d}.safetensors"
        save_file(buf, os.path.join(out_dir, tmp), metadata={"format": "pt", **(metadata or {})})
        shards.append((tmp, list(buf), buf_bytes))
        buf, buf_bytes = {}, 0

    if write:
        os.makedirs(out_dir, exist_ok=True)
    for name, tensor in tensors:
        if not write or name in skip:
            continue
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if buf and buf_bytes + nbytes > max_shard_size:
            flush()
        buf[name] = t.clone() if t.untyped_storage().nbytes() != nbytes else t
        buf_bytes += nbytes
        total += nbytes
    if not write:
        return []
    flush()
    if not shards:
        save_file({}, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = []
    for i, (tmp, keys, _nbytes) in enumerate(shards):
        final = _shard_name(i, len(shards))
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        names.append(final)
        for key in keys:
            weight_map[key] = final
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
        names.append("model.safetensors.index.json")
    return names


def export_role(
    storage: "Storage",
    out_dir: str,
    role: "Role",
    writer: "RoleWriter",
    dist: "DistContext",
    *,
    max_shard_size: Any = DEFAULT_MAX_SHARD_SIZE,
    dtype: Optional[torch.dtype] = None,
) -> list[str]:
    """Write the HF folder of ``role`` into ``out_dir`` (a staging dir; the caller commits).

    Weights stream through ``writer.full_state_dict`` (collective on every rank); rank 0
    writes into a local temp dir and, for a remote ``storage``, uploads the files.

    Returns:
        Files written by this rank, relative to ``out_dir``.
    """
    hf = hf_model_of(role.module)
    limit = parse_size(max_shard_size)
    local = out_dir if storage.is_local else tempfile.mkdtemp(prefix="skyrl-hf-")
    try:
        names: list[str] = []
        # a model without an HF config (megatron-core GPT) gets one from its writer; collective, so a
        # model the writer cannot map fails on every rank instead of leaving ranks waiting
        hf_cfg = dist.run(
            "hf config", lambda: writer.hf_config(role) if hf is None and hasattr(writer, "hf_config") else None
        )
        stream = writer.full_state_dict(role, dist)
        if dist.is_main:
            write_hf_metadata(local, hf, role.tokenizer)
            if hf_cfg is not None:
                hf_cfg.save_pretrained(local)
            keys: list[str] = []

            def tracked() -> Iterator[tuple[str, torch.Tensor]]:
                for name, t in stream:
                    keys.append(name)
                    yield name, t

            skip = tied_duplicate_keys(hf, _state_keys(role))
            if hf is None and hf_cfg is not None and getattr(hf_cfg, "tie_word_embeddings", False):
                skip = set(skip) | {"lm_head.weight"}  # save_pretrained drops the tied head too
            names = write_safetensors_stream(tracked(), local, write=True, max_shard_size=limit, dtype=dtype, skip=skip)
        else:
            for _ in stream:  # take part in the collective gathers
                pass
        if dist.is_main:
            files = sorted(_walk_local(local))
            if not storage.is_local:
                from skyrl_callbacks.storage import upload_local_dir

                upload_local_dir(storage, local, out_dir)
            return files
        return names
    finally:
        if not storage.is_local:
            import shutil

            shutil.rmtree(local, ignore_errors=True)


def _state_keys(role: "Role") -> list[str]:
    try:
        return list(role.model_state_dict().keys())
    except Exception:  # noqa: BLE001 - only used to spot tied keys
        return []


def _walk_local(top: str) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            out.append(os.path.relpath(os.path.join(dirpath, name), top).replace(os.sep, "/"))
    return out
