"""The headline promise: SIGKILL + rerun is bitwise identical to an uninterrupted run.

Each case trains 16 steps straight and, separately, is SIGKILLed inside a step and rerun
(resuming by itself inside ``trainer.fit``). Final policy/critic weights, optimizer and
scheduler states, the global RNG, the sequence of batches and the RNG draws of every step
must be identical. 40 samples / batch 4 = 10 batches per epoch (5 per rank under DDP);
saves every 5 steps, so a kill at step 8 resumes mid-epoch (step 5) and a kill at step 12
resumes exactly on the epoch boundary (step 10).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.resume_harness import check_exact_resume

MID, BOUNDARY = (8, 5), (12, 10)
B = ["--steps", "16", "--interval", "5"]

CASES = [
    # (id, args, (kill_at, resumes_at), ranks)
    ("manual-torchdata-w0-global-mid", B + ["--manual", "--shuffle", "global", "--loader", "torchdata"], MID, 1),
    ("manual-torchdata-w0-global-boundary", B + ["--manual", "--shuffle", "global", "--loader", "torchdata"], BOUNDARY, 1),
    ("manual-w2-generator-mid", B + ["--manual", "--shuffle", "generator", "--num-workers", "2"], MID, 1),
    # (the epoch boundary with 2 workers: auto-mixin-w2-global-boundary below)
    # gradient accumulation: step 3 = 6 batches (mid-epoch); only accumulation boundaries save
    ("auto-accum2-mixin-generator-mid", ["--steps", "8", "--interval", "3", "--accumulate", "2", "--loader", "mixin",
                                         "--shuffle", "generator"], (4, 3), 1),
    ("auto-mixin-w2-global-boundary", B + ["--loader", "mixin", "--shuffle", "global", "--num-workers", "2"], BOUNDARY, 1),
    # DDP, 2 processes: 5 batches per epoch and rank
    ("ddp2-manual-w0-mid", ["--steps", "8", "--interval", "3", "--manual", "--devices", "2"], (4, 3), 2),
    ("ddp2-auto-mixin-w2-boundary", ["--steps", "8", "--interval", "5", "--devices", "2", "--loader", "mixin",
                                     "--num-workers", "2"], (7, 5), 2),
    # async_save: the kill comes right after step 10's save was started (not committed): the save
    # at 10 first committed step 5 (at most one in flight), so the rerun resumes from 5
    # (with async_overlap_copy: parameters/optimizer state copied while the next step runs)
    ("async-overlap-kill-in-flight", B + ["--async-overlap", "--shuffle", "generator"], (10, 5), 1),
    ("ddp2-async-kill-in-flight", ["--steps", "8", "--interval", "3", "--devices", "2", "--async-save"], (6, 3), 2),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("straight")


@pytest.mark.parametrize("args,kill,ranks", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sigkill_and_rerun_is_bitwise_identical(tmp_path, cache_dir, args, kill, ranks):
    check_exact_resume(tmp_path, cache_dir, args, kill_at=kill[0], expect_resume=kill[1], ranks=ranks)
