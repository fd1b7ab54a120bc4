"""A write that the OS refuses mid-save, in every CI environment (no mount privilege needed).

A child process lowers its ``RLIMIT_FSIZE`` (the largest file it may write) below the size of a
checkpoint file and ignores ``SIGXFSZ``, so the kernel fails the write with a real ``EFBIG``, the
way a full disk fails it with ``ENOSPC``. The save must raise :class:`StorageError` naming the
file, the cause and the fix; the pointer must not move; every file of the checkpoints committed
before must be byte-for-byte unchanged (hashed before and after) and resumable; the next save with
room again commits and removes the leftover. Both local writers are covered: the threaded
``pwrite`` writer (files of ``SKYRL_PARALLEL_WRITE_MIN_BYTES`` and more) and the one-stream writer
used for small files. (A real full tmpfs, ENOSPC, is tests/test_bad_input.py's mount case, run
where mounting works.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from skyrl_callbacks import CheckpointConfig, CheckpointManager
from skyrl_callbacks.roles import discover_roles

pytest.importorskip("resource")

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 256  # policy model_state.pt ~260 KB, above the limit below
LIMIT = 64 * 1024

CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    sys.path.insert(0, sys.argv[4])
    from tests.test_disk_full import roles_at
    from skyrl_callbacks import CheckpointConfig, CheckpointManager

    root, limit, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=root, max_ckpts_to_keep=2))
    roles = roles_at(3)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of failing the write
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    result = {"saved": False}
    try:
        mgr.save(3, roles, data_state={"step": 3})
        result["saved"] = True
    except BaseException as exc:
        result.update(type=type(exc).__name__, mro=[c.__name__ for c in type(exc).__mro__], msg=str(exc),
                      errno=getattr(exc, "errno", None))
    with open(out, "w") as fh:
        json.dump(result, fh)
""")


def roles_at(step: int):
    m = nn.Module()
    m.policy = nn.Linear(WIDTH, WIDTH)
    m.critic = nn.Linear(WIDTH, 1)
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.fill_(step * 1000 + i)
    roles = discover_roles(m)
    roles[0].optimizers = [torch.optim.SGD(m.policy.parameters(), lr=0.1, momentum=0.9)]
    return roles


def committed_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.parts[len(root.parts)].startswith("global_step_")}


@pytest.mark.parametrize("writer,min_bytes", [("threaded", "0"), ("one-stream", str(1 << 40))])
def test_file_size_limit_mid_save(tmp_path, monkeypatch, writer, min_bytes):
    monkeypatch.setenv("SKYRL_PARALLEL_WRITE_MIN_BYTES", min_bytes)
    root = tmp_path / "ckpts"
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(root), max_ckpts_to_keep=2))
    for step in (1, 2):
        mgr.save(step, roles_at(step), data_state={"step": step})
    mgr.close()
    before = committed_hashes(root)
    assert any(n.endswith("policy/model_state.pt") for n in before)
    assert (root / "global_step_2" / "policy" / "model_state.pt").stat().st_size > LIMIT

    out = tmp_path / "result.json"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, SKYRL_PARALLEL_WRITE_MIN_BYTES=min_bytes, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(root), str(LIMIT), str(out), str(ROOT)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    print(writer, result)
    assert not result["saved"], "the save went through despite the file size limit"
    assert "StorageError" in result["mro"], result
    assert result["errno"] == 27, result  # EFBIG
    msg = result["msg"]
    for needle in ("global_step_3", "file too large", "RLIMIT_FSIZE", "ulimit -f", "untouched"):
        assert needle.lower() in msg.lower(), f"message lacks {needle!r}: {msg}"

    assert (root / "latest_ckpt_global_step.txt").read_text() == "2", "the pointer moved"
    assert committed_hashes(root) == before, "a committed file changed"
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=str(root), max_ckpts_to_keep=2))
    assert mgr.committed_steps() == [1, 2]
    state = mgr.resume(roles := roles_at(0))
    assert state.step == 2
    assert torch.equal(roles[0].model.weight, torch.full((WIDTH, WIDTH), 2000.0))
    # with room again the next save commits and removes the leftover of the failed one
    mgr.save(3, roles_at(3), data_state={"step": 3})
    mgr.close()
    assert mgr.committed_steps() == [2, 3]
    assert not [p.name for p in root.iterdir() if p.name.startswith((".tmp", ".trash"))]
