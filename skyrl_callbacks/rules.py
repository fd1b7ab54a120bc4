"""Pure decisions: when to save, when to export, what to delete, where to resume.

No IO and no framework here, so every rule is tested with plain tables.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence

__all__ = [
    "STEP_DIR_PREFIX",
    "POINTER_FILE",
    "step_dirname",
    "parse_step_dirname",
    "should_save",
    "should_export",
    "needs_final_save",
    "steps_to_delete",
    "select_resume_step",
    "parse_pointer",
    "follow_commits_after_pointer",
    "lineage",
]

STEP_DIR_PREFIX = "global_step_"
POINTER_FILE = "latest_ckpt_global_step.txt"
_STEP_RE = re.compile(r"^global_step_(\d+)$")


def step_dirname(step: int) -> str:
    """``global_step_N``, SkyRL's name of the checkpoint of step N."""
    return f"{STEP_DIR_PREFIX}{int(step)}"


def parse_step_dirname(name: str) -> Optional[int]:
    """The step of a ``global_step_N`` name (a trailing ``/`` is allowed), else None."""
    match = _STEP_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def should_save(step: int, interval: int) -> bool:
    """SkyRL's rule: save when ``step % ckpt_interval == 0``; -1 disables; step 0 never saves."""
    return interval > 0 and step > 0 and step % interval == 0


def should_export(step: int, interval: int) -> bool:
    """SkyRL's rule for HF exports (``hf_save_interval``); -1 disables."""
    return should_save(step, interval)


def needs_final_save(last_step: int, last_saved_step: Optional[int]) -> bool:
    """At the end of training: save when the last completed step has no checkpoint yet."""
    return last_step > 0 and last_saved_step != last_step


def steps_to_delete(committed: Iterable[int], keep: int, protected: Iterable[int] = ()) -> list[int]:
    """Steps retention deletes, oldest first, given the committed steps (numeric order).

    Args:
        committed: steps of the committed checkpoints, including the one just saved.
        keep: ``max_ckpts_to_keep``; -1 keeps everything.
        protected: steps never deleted (e.g. the last verified checkpoint); they still count
            toward ``keep``.

    Returns:
        The steps to delete, ascending.
    """
    if keep == 0:
        raise ValueError("keep=0 would delete every checkpoint; use a positive number or -1 (keep all)")
    steps = sorted(set(int(s) for s in committed))
    if keep < 0 or len(steps) <= keep:
        return []
    keep_set = set(steps[-keep:])
    protect = set(int(p) for p in protected)
    return [s for s in steps if s not in keep_set and s not in protect]


def parse_pointer(text: str) -> Optional[int]:
    """The step in ``latest_ckpt_global_step.txt`` (plain decimal, as SkyRL writes it), else None."""
    text = text.strip()
    return int(text) if text.isdigit() else None


def select_resume_step(pointer: Optional[int], committed: Sequence[int]) -> tuple[Optional[int], Optional[str]]:
    """Which step ``resume_mode="latest"`` resumes from.

    The pointer wins when it names a committed checkpoint. Otherwise the newest committed
    checkpoint is used and a reason is returned, to be logged as a warning.

    Returns:
        ``(step or None, warning or None)``.
    """
    steps = sorted(set(committed))
    if pointer is not None and pointer in steps:
        return pointer, None
    if not steps:
        if pointer is not None:
            return None, f"pointer names global_step_{pointer}, which is missing or incomplete; nothing to resume"
        return None, None
    newest = steps[-1]
    if pointer is None:
        return newest, f"pointer file missing or unreadable; resuming from the newest committed global_step_{newest}"
    return newest, (
        f"pointer names global_step_{pointer}, which is missing or incomplete; "
        f"resuming from the newest committed global_step_{newest}"
    )


def follow_commits_after_pointer(pointer: int, committed: Sequence[int], parent_of: Mapping[int, Optional[int]]) -> int:
    """The newest checkpoint committed by the same run after the one the pointer names.

    The pointer moves right after each commit, so a crash in between leaves one committed
    checkpoint newer than the pointer whose manifest names the pointer's step as its parent.
    Newer checkpoints of an abandoned run (after a ``from_path`` resume to an older step)
    name other parents and are ignored.
    """
    current = pointer
    for step in sorted(s for s in committed if s > pointer):
        if parent_of.get(step) == current:
            current = step
    return current


def lineage(head: int, committed: Sequence[int], parent_of: Mapping[int, Optional[int]]) -> list[int]:
    """The committed checkpoints ``head`` descends from, ``head`` first (descending).

    Each manifest names its ``parent_step`` (the step the run had saved or resumed from before
    it; None for a fresh start). A step absent from ``parent_of`` has no known parent (a
    SkyRL-native checkpoint, an unreadable manifest): the next older committed step is taken, as
    in a linear history. A parent that is no longer committed (deleted) continues with the next
    committed step below it. Checkpoints of abandoned branches (newer steps of a run that was
    rolled back, older steps of another run after ``resume_mode: none``) are never in it.

    Args:
        head: the newest step of the lineage (the one just saved, or the one resume picked).
        committed: the committed steps under ``ckpt_path``.
        parent_of: ``{step: parent_step}`` of the steps whose manifest records one.

    Returns:
        The steps of the lineage, ``head`` first, then each ancestor (all committed). A parent newer
        than its child (steps saved out of order) is followed too.
    """
    steps = sorted(set(int(s) for s in committed))
    present = set(steps)
    out = [int(head)]
    current = int(head)

    def below(step: int) -> Optional[int]:
        older = [s for s in steps if s < step]
        return older[-1] if older else None

    while True:
        parent: Optional[int]
        if current in parent_of and parent_of[current] != current:
            parent = parent_of[current]
            if parent is None:
                return out
            parent = int(parent)
            if parent not in present:
                parent = below(parent)
        else:  # unknown (or a re-save of the same step naming itself): a linear history
            parent = below(current)
        if parent is None or parent in out:
            return out
        out.append(parent)
        current = parent
