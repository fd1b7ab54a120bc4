"""The corruption table, cell by cell: the reason reported, and no committed byte touched.

tests/test_corruption.py checks that each corrupted file of the newest checkpoint is caught and
``latest`` falls back. Here every cell (file x truncate / bit-flip / delete) must also report its
own reason, in the fallback warning and in the ``from_path`` error: a truncation the exact sizes
(``size H != F in the manifest``), a bit-flip a checksum mismatch, a deletion ``missing``, a
truncated manifest ``manifest unreadable``. And every file of every committed checkpoint, the
corrupted one included, holds the same bytes after the resume and the failed ``from_path`` load as
before them (hashed): verification only reads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import pytest
import torch

from skyrl_callbacks import CheckpointConfig, CheckpointManager, CorruptCheckpointError
from tests.test_corruption import FILES, corrupt, roles_at

DATA_FILES = [f for f in FILES if f != "skyrl_manifest.json"]


def expected_reason(rel: str, how: str, full_size: int) -> str:
    """A regex for the reason the cell must report."""
    if rel == "skyrl_manifest.json":
        if how == "truncate":
            return r"manifest unreadable \("
        # a flipped bit inside the manifest lands in a name, a size or a hash: whichever it hits is named
        return r"(manifest unreadable \(|[\w/.\x7f-\uffff]+: (missing|size \d+ != \d+ in the manifest|checksum mismatch))"
    if how == "truncate":
        return re.escape(f"{rel}: size {full_size // 2} != {full_size} in the manifest")
    if how == "bitflip":
        return re.escape(f"{rel}: checksum mismatch (")
    return re.escape(f"{rel}: missing")


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.parts[len(root.parts)].startswith("global_step_")}


CELLS = [(rel, how) for rel in DATA_FILES for how in ("truncate", "bitflip", "delete")] + [
    ("skyrl_manifest.json", "truncate"), ("skyrl_manifest.json", "bitflip")]
# (the deleted manifest: tests/test_corruption.py)


@pytest.mark.parametrize("rel,how", CELLS, ids=[f"{r}-{h}" for r, h in CELLS])
def test_each_cell_reports_its_reason_and_touches_nothing(tmp_path, caplog, rel, how):
    root = tmp_path / "c"
    cfg = dict(ckpt_path=str(root), verify_on_resume=True)
    mgr = CheckpointManager(CheckpointConfig(**cfg))
    for step in (1, 2):
        mgr.save(step, roles_at(step)[1], data_state={"pos": step})
    mgr.close()
    target = root / "global_step_2" / rel
    full_size = target.stat().st_size
    corrupt(str(target), how)
    before = tree_hashes(root)
    pointer = (root / "latest_ckpt_global_step.txt").read_bytes()
    reason = expected_reason(rel, how, full_size)

    caplog.set_level(logging.WARNING)
    m, roles = roles_at(0)
    state = CheckpointManager(CheckpointConfig(**cfg)).resume(roles)
    assert state.step == 1, f"{rel} {how}: resumed from {state.step}"
    assert torch.equal(m.policy.weight, roles_at(1)[0].policy.weight)
    skipped = [r.getMessage() for r in caplog.records if "global_step_2" in r.getMessage()]
    assert skipped, f"no warning names global_step_2: {caplog.text[-2000:]}"
    assert any(re.search(reason, msg) for msg in skipped), f"{rel} {how}: reason {reason!r} not in {skipped}"

    with pytest.raises(CorruptCheckpointError) as info:
        CheckpointManager(CheckpointConfig(**cfg, resume_mode="from_path",
                                           resume_path=str(root / "global_step_2"))).resume(roles_at(0)[1])
    msg = str(info.value)
    assert str(root / "global_step_2") in msg and re.search(reason, msg), f"{rel} {how}: {msg}"

    assert tree_hashes(root) == before, "a committed file (or the corrupted one) changed"
    assert (root / "latest_ckpt_global_step.txt").read_bytes() == pointer
    if how == "delete":
        assert not os.path.exists(target)
