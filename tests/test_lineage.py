"""Lineage: retention and resume fallbacks follow the manifests' ``parent_step``, never an abandoned branch;
a pointer moved back by hand wins over newer commits, a crash between a commit and the pointer move does
not; a committed ``global_step_N`` of another lineage is never replaced by a save of the same step.

Manager-level and cheap: a 16x16 linear layer per checkpoint, real files under ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from skyrl_callbacks import CheckpointConfig, CheckpointManager
from skyrl_callbacks import rules
from skyrl_callbacks.roles import Role

WIDTH = 16


def roles_at(step: float) -> list[Role]:
    """A policy whose weights are all ``step`` (so a resume shows which checkpoint it loaded)."""
    model = nn.Linear(WIDTH, WIDTH)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return [Role(name="policy", model=model, optimizers=[opt])]


def mgr(tmp_path: Path, **kw) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(ckpt_path=str(tmp_path / "c"), export_path=str(tmp_path / "e"), **kw))


def run(tmp_path: Path, steps, **kw) -> None:
    m = mgr(tmp_path, **kw)
    state = m.resume(roles_at(-1))  # as the integrations do at the start of every run
    assert (state is not None) == (kw.get("resume_mode") in ("latest", "from_path"))
    for step in steps:
        m.save(step, roles_at(step))
    m.close()


def on_disk(tmp_path: Path) -> list[int]:
    return sorted(s for s in (rules.parse_step_dirname(p.name) for p in (tmp_path / "c").iterdir()) if s is not None)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def resumed(tmp_path: Path, **kw) -> float:
    roles = roles_at(-1)
    state = mgr(tmp_path, **kw).resume(roles)
    value = roles[0].model.weight.flatten()[0].item()
    assert state is not None and float(state.step) == value, (state, value)
    return value


def corrupt(tmp_path: Path, step: int) -> None:
    f = tmp_path / "c" / f"global_step_{step}" / "policy" / "model_state.pt"
    f.write_bytes(f.read_bytes()[:100])


# --------------------------------------------------------------------------- the pure rule
@pytest.mark.parametrize("head,committed,parents,expected", [
    (14, [10, 12, 14, 20], {12: 10, 14: 12, 20: 10, 10: None}, [14, 12, 10]),  # rollback: 20 abandoned
    (20, [10, 12, 14, 20], {12: 10, 14: 12, 20: 10, 10: None}, [20, 10]),
    (3, [1, 2, 3, 5, 6], {1: None, 2: 1, 3: 2, 5: None, 6: 5}, [3, 2, 1]),  # another run's 5, 6
    (30, [10, 20, 30], {}, [30, 20, 10]),  # SkyRL-native (no manifests): linear
    (30, [10, 30], {30: 20}, [30, 10]),  # parent 20 deleted: the next committed step below it
    (95, [5, 10, 95, 100], {10: 5, 100: 10, 95: 100}, [95, 100, 10, 5]),  # saved out of step order
    (10, [5, 10], {10: 10}, [10, 5]),  # a re-save naming itself: linear
    (7, [7], {7: None}, [7]),
])
def test_lineage_rule(head, committed, parents, expected):
    assert rules.lineage(head, committed, parents) == expected


# --------------------------------------------------------------------------- rollback (issue 17, item 5)
def test_rollback_retention_and_fallback_stay_on_the_branch(tmp_path, caplog):
    """Run A saves 10 and 20; run B resumes from_path global_step_10 with max_ckpts_to_keep 2 and saves 12, 14.
    A's abandoned 20 is neither counted (B's 12 survives) nor deleted, and with 14 corrupt `latest` resumes
    B's 12, not A's 20."""
    run(tmp_path, [10, 20])
    run(tmp_path, [12, 14], resume_mode="from_path", resume_path=str(tmp_path / "c" / "global_step_10"),
        max_ckpts_to_keep=2)
    assert on_disk(tmp_path) == [12, 14, 20]  # B's 10 retired with B's lineage; A's 20 kept, not counted
    assert resumed(tmp_path) == 14
    corrupt(tmp_path, 14)
    caplog.set_level(logging.WARNING)
    assert resumed(tmp_path) == 12
    assert "global_step_14" in caplog.text


def test_pointer_moved_back_by_hand_wins(tmp_path, caplog):
    """SkyRL's rollback: `echo 10 > latest_ckpt_global_step.txt` after 20 and 30 were committed."""
    run(tmp_path, [10, 20, 30])
    pointer = tmp_path / "c" / "latest_ckpt_global_step.txt"
    for back in (20, 10):
        pointer.write_text(f"{back}\n")
        caplog.clear()
        caplog.set_level(logging.WARNING)
        assert resumed(tmp_path) == back
        assert "moved back by hand" in caplog.text
    # the rolled-back run goes on: its saves neither delete nor count the abandoned 20 and 30
    run(tmp_path, [15, 25], resume_mode="latest", max_ckpts_to_keep=2)
    assert resumed(tmp_path) == 25
    assert 20 in on_disk(tmp_path) and 30 in on_disk(tmp_path) and 10 not in on_disk(tmp_path)


def test_crash_between_commit_and_pointer_resumes_the_commit(tmp_path, caplog):
    """The on-disk state a crash leaves after global_step_20's commit and before the pointer move: the
    pointer (content and modification time) as global_step_10's save left it."""
    m = mgr(tmp_path)
    m.save(10, roles_at(10))
    pointer = tmp_path / "c" / "latest_ckpt_global_step.txt"
    shutil.copy2(pointer, tmp_path / "pointer_after_10")
    m.save(20, roles_at(20))
    m.close()
    shutil.copy2(tmp_path / "pointer_after_10", pointer)  # keeps the old modification time
    caplog.set_level(logging.WARNING)
    assert resumed(tmp_path) == 20
    assert "committed after the pointer" in caplog.text


# --------------------------------------------------------------------------- resume_mode none (issue 17, item 4)
def test_resume_none_never_replaces_an_older_runs_checkpoints(tmp_path, caplog):
    run(tmp_path, [1, 2])
    old = {s: tree_hash(tmp_path / "c" / f"global_step_{s}") for s in (1, 2)}
    caplog.set_level(logging.WARNING)
    run(tmp_path, [1, 2, 3], resume_mode="none", max_ckpts_to_keep=1)
    assert "starting fresh" in caplog.text and "superseded" in caplog.text
    kept = {int(p.name.split(".")[0].rsplit("_", 1)[1]): tree_hash(p)
            for p in (tmp_path / "c").glob("global_step_*.superseded-*")}
    assert kept == old  # the old run's 1 and 2, byte for byte, under a name nothing deletes
    assert on_disk(tmp_path) == [3]  # this run's retention (keep 1) removed only its own 1 and 2
    assert resumed(tmp_path) == 3


def test_resume_none_older_run_is_no_fallback(tmp_path):
    """Steps of the earlier run (5, 6) neither count for retention nor stand in for this run's corrupt 2."""
    run(tmp_path, [5, 6])
    run(tmp_path, [1, 2], resume_mode="none", max_ckpts_to_keep=2)
    assert on_disk(tmp_path) == [1, 2, 5, 6]
    corrupt(tmp_path, 2)
    assert resumed(tmp_path) == 1


def test_save_over_an_abandoned_branch_keeps_it(tmp_path, caplog):
    """After a rollback to 10, this run's save of 20 moves A's 20 aside instead of replacing it."""
    run(tmp_path, [10, 20])
    a20 = tree_hash(tmp_path / "c" / "global_step_20")
    caplog.set_level(logging.WARNING)
    run(tmp_path, [20], resume_mode="from_path", resume_path=str(tmp_path / "c" / "global_step_10"))
    aside = list((tmp_path / "c").glob("global_step_20.superseded-*"))
    assert len(aside) == 1 and tree_hash(aside[0]) == a20
    assert "not of this run's lineage" in caplog.text
    assert resumed(tmp_path) == 20
    # a run's own re-save of a step (here: the one it resumed from) replaces it, as before
    run(tmp_path, [20], resume_mode="latest")
    assert len(list((tmp_path / "c").glob("global_step_20.superseded-*"))) == 1


def test_s3_save_over_an_abandoned_branch_keeps_it(s3_server, s3_bucket, tmp_path):
    """Object stores have no rename: the abandoned global_step_20 is copied aside (manifest included), then
    removed manifest first; this run's 20 is committed under the name."""
    import fsspec

    url = f"s3://{s3_bucket}/run"
    fs = fsspec.filesystem("s3", **s3_server.storage_options)

    def s3mgr(**kw) -> CheckpointManager:
        return CheckpointManager(CheckpointConfig(ckpt_path=url, export_path=str(tmp_path / "e"),
                                                  storage_options=s3_server.storage_options, **kw))

    a = s3mgr()
    for step in (10, 20):
        a.save(step, roles_at(step))
    a.close()
    def files(prefix: str) -> dict:
        fs.invalidate_cache()
        return {p[len(prefix.split("://")[-1]):]: fs.cat_file(p) for p in fs.find(prefix)}

    before = files(f"{url}/global_step_20")
    assert "/skyrl_manifest.json" in before
    b = s3mgr(resume_mode="from_path", resume_path=f"{url}/global_step_10")
    assert b.resume(roles_at(-1)).step == 10
    b.save(20, roles_at(20.5))
    b.close()
    aside = [p for p in fs.ls(url, detail=False, refresh=True) if ".superseded-" in p]
    assert len(aside) == 1
    assert files(aside[0]) == before
    roles = roles_at(-1)
    assert s3mgr().resume(roles).step == 20 and roles[0].model.weight.flatten()[0].item() == 20.5


def test_resume_from_another_ckpt_path_keeps_this_ones_step(tmp_path):
    """Resumed from_path another ckpt_path's global_step_10: this ckpt_path's own global_step_10 (another
    run's) is not that checkpoint, so a save of 10 keeps it aside."""
    other = tmp_path / "other"
    m = CheckpointManager(CheckpointConfig(ckpt_path=str(other), export_path=str(tmp_path / "e2")))
    m.save(10, roles_at(10))
    m.close()
    run(tmp_path, [10])
    mine = tree_hash(tmp_path / "c" / "global_step_10")
    run(tmp_path, [10], resume_mode="from_path", resume_path=str(other / "global_step_10"))
    aside = list((tmp_path / "c").glob("global_step_10.superseded-*"))
    assert len(aside) == 1 and tree_hash(aside[0]) == mine


def test_resume_from_another_ckpt_path_starts_a_lineage_here(tmp_path):
    """Resumed from another ckpt_path's global_step_10, this run's saves 12 and 14 (max_ckpts_to_keep 2) must not
    count or delete this ckpt_path's own global_step_10 (another run's): here they start a new lineage."""
    other = tmp_path / "other"
    m = CheckpointManager(CheckpointConfig(ckpt_path=str(other), export_path=str(tmp_path / "e2")))
    m.save(10, roles_at(10))
    m.close()
    run(tmp_path, [10])
    mine = tree_hash(tmp_path / "c" / "global_step_10")
    run(tmp_path, [12, 14, 16], resume_mode="from_path", resume_path=str(other / "global_step_10"),
        max_ckpts_to_keep=2)
    assert on_disk(tmp_path) == [10, 14, 16] and tree_hash(tmp_path / "c" / "global_step_10") == mine
