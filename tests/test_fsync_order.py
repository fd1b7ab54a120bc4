"""fsync and rename order of a real local save, observed with ``strace``.

A SIGKILL keeps the page cache, so no kill test can tell a save that fsyncs from one that does
not; only a power loss could. Here a child process saves three checkpoints (``max_ckpts_to_keep=2``,
so the third retires the first) under ``strace -f -y`` (``-y``: every fd printed with its path),
and the test checks, for every commit, in the order the system calls completed:

* every file of the committed directory (the model/optimizer files of the threaded writer, the
  small files of the one-stream writer, the manifest) was fsynced, in the staging directory,
  before the rename that publishes it; so were the staging directory and its subdirectories;
* the parent directory was fsynced after that rename and before the pointer moved;
* the pointer's temporary file was fsynced before the rename that replaces the pointer, and the
  parent directory after it;
* retention (the rename of the retired checkpoint to ``.trash-``) came only after the new
  checkpoint and the pointer naming it were durable, followed by a parent-directory fsync.

Skipped where strace is missing or ptrace is not allowed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POINTER = "latest_ckpt_global_step.txt"

CHILD = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from skyrl_callbacks import CheckpointConfig, CheckpointManager
    from skyrl_callbacks.roles import discover_roles

    root, mode = sys.argv[1], sys.argv[2]
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=root, max_ckpts_to_keep=2, async_save=mode == "async"))
    for step in (1, 2, 3):
        torch.manual_seed(step)
        m = nn.Module()
        m.policy = nn.Linear(32, 32)
        m.critic = nn.Linear(32, 1)
        roles = discover_roles(m)
        roles[0].optimizers = [torch.optim.Adam(m.policy.parameters())]
        mgr.save(step, roles, data_state={"step": step})
    mgr.close()
    print("done", flush=True)
""")


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    try:
        return subprocess.run(["strace", "-qq", "-e", "trace=fsync", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _strace_works(), reason="needs strace (and ptrace permission)")

_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
_FD_PATH = re.compile(r"^\d+<(.*)>$")


def parse_trace(text: str) -> list[tuple[str, tuple[str, ...], int]]:
    """``[(syscall, paths, result)]`` in the order the calls completed (an ``<unfinished ...>``
    call counts where it resumed). fsync: the fd's path; rename*: (old, new)."""
    pending: dict[str, tuple[str, str]] = {}
    events = []
    for line in text.splitlines():
        m = _RESUMED.match(line)
        if m:
            pid, name, rest = m.groups()
            started = pending.pop(pid, None)
            if started is None:
                continue
            line_args = started[1] + rest
        else:
            m = _CALL.match(line)
            if not m:
                continue
            pid, name, line_args = m.groups()
            if line_args.endswith("<unfinished ...>"):
                pending[pid] = (name, line_args[: -len("<unfinished ...>")].rstrip())
                continue
        result = re.search(r"\)\s*=\s*(-?\d+)", line_args)
        code = int(result.group(1)) if result else -1
        if name in ("fsync", "fdatasync"):
            fd = _FD_PATH.match(line_args.split(")")[0].split(",")[0].strip())
            if fd:
                events.append(("fsync", (fd.group(1),), code))
        elif name.startswith("rename"):
            quoted = re.findall(r'"((?:[^"\\]|\\.)*)"', line_args)
            if len(quoted) >= 2:
                events.append(("rename", (quoted[0], quoted[1]), code))
    return events


def _index(events, kind, pred) -> list[int]:
    return [i for i, (k, paths, code) in enumerate(events) if k == kind and code == 0 and pred(paths)]


def traced_saves(tmp_path: Path, mode: str) -> tuple[Path, list]:
    ckpt = tmp_path / "ckpts"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    trace = tmp_path / "trace"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(["strace", "-f", "-qq", "-y", "-s", "4096", "-o", str(trace),
                           "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                           sys.executable, str(script), str(ckpt), mode],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-3000:]
    return ckpt, parse_trace(trace.read_text())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_commit_fsyncs_files_dirs_and_pointer_in_order(tmp_path, mode):
    ckpt, events = traced_saves(tmp_path, mode)
    root = str(ckpt)
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("global_step_")) == [
        "global_step_2", "global_step_3"]
    root_fsyncs = _index(events, "fsync", lambda p: p[0] == root)
    pointer_renames = _index(events, "rename", lambda p: p[1] == os.path.join(root, POINTER))
    assert len(pointer_renames) == 3, "one pointer replace per save"
    counts = {}
    for step in (1, 2, 3):
        final = os.path.join(root, f"global_step_{step}")
        commit = _index(events, "rename", lambda p: p[1] == final)
        assert len(commit) == 1, f"global_step_{step}: {len(commit)} commit renames"
        c = commit[0]
        staging = events[c][1][0]
        assert os.path.basename(staging).startswith(f".tmp-global_step_{step}-"), staging
        if step > 1:  # global_step_1 was retired; its files are gone: checked through steps 2 and 3
            files = [str(p.relative_to(final)) for p in Path(final).rglob("*") if p.is_file()]
            dirs = [""] + [str(p.relative_to(final)) for p in Path(final).rglob("*") if p.is_dir()]
            assert {"policy/model_state.pt", "policy/optimizer_state.pt", "critic/model_state.pt", "data.pt",
                    "trainer_state.pt", "skyrl_manifest.json"} <= set(files), files
            for rel in files + dirs:
                path = os.path.join(staging, rel) if rel else staging
                synced = _index(events, "fsync", lambda p, path=path: p[0] == path)
                assert synced and min(synced) < c, f"global_step_{step}/{rel or '.'}: not fsynced before the commit rename"
            counts[step] = len(_index(events, "fsync", lambda p: p[0].startswith(staging)))
        # the parent directory is fsynced after the commit rename, before the pointer moves
        ptr = min(i for i in pointer_renames if i > c)
        assert any(c < i < ptr for i in root_fsyncs), f"global_step_{step}: ckpt_path not fsynced between commit and pointer"
        tmp_ptr = events[ptr][1][0]
        assert os.path.basename(tmp_ptr).startswith(f".tmp-{POINTER}-"), tmp_ptr
        ptr_synced = _index(events, "fsync", lambda p: p[0] == tmp_ptr)
        assert ptr_synced and c < max(ptr_synced) < ptr, f"global_step_{step}: pointer not fsynced before its replace"
        assert any(i > ptr for i in root_fsyncs), f"global_step_{step}: ckpt_path not fsynced after the pointer"
    # retention: global_step_1 retired by the third save only after global_step_3 and its pointer are durable
    trash = _index(events, "rename", lambda p: p[0] == os.path.join(root, "global_step_1")
                   and os.path.basename(p[1]).startswith(".trash-global_step_1-"))
    assert len(trash) == 1, "global_step_1 was not retired by a rename"
    commit3 = _index(events, "rename", lambda p: p[1] == os.path.join(root, "global_step_3"))[0]
    last_ptr = max(pointer_renames)
    assert trash[0] > commit3 and trash[0] > last_ptr, "retention ran before the new checkpoint and its pointer were durable"
    assert any(last_ptr < i < trash[0] for i in root_fsyncs), "retention before the pointer's directory fsync"
    assert any(i > trash[0] for i in root_fsyncs), "the retirement rename was not fsynced"
    # figures for docs/reliability.md: fsyncs under each staging directory (files + dirs)
    print(f"fsyncs per commit ({mode}): {counts}")
