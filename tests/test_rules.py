"""The pure rules, as tables."""

from __future__ import annotations

import pytest

from skyrl_callbacks import rules


@pytest.mark.parametrize(
    "step,interval,expected",
    [(0, 10, False), (10, 10, True), (20, 10, True), (15, 10, False), (1, 1, True), (7, -1, False), (100, -1, False), (9, 3, True)],
)
def test_should_save(step, interval, expected):
    assert rules.should_save(step, interval) is expected
    assert rules.should_export(step, interval) is expected


@pytest.mark.parametrize(
    "committed,keep,protected,expected",
    [
        ([10, 20, 30], -1, [], []),
        ([10, 20, 30], 3, [], []),
        ([10, 20, 30], 2, [], [10]),
        ([10, 20, 30], 1, [], [10, 20]),
        ([100, 20, 3], 1, [], [3, 20]),  # numeric, never string order ("100" < "20")
        ([9, 10, 11], 2, [], [9]),
        ([10, 20, 30], 1, [10], [20]),  # protected steps survive
        ([40, 30], 1, [30], []),  # a newer stale step never makes us delete what we just saved
        ([], 2, [], []),
    ],
)
def test_steps_to_delete(committed, keep, protected, expected):
    assert rules.steps_to_delete(committed, keep, protected) == expected


@pytest.mark.parametrize(
    "name,step",
    [("global_step_10", 10), ("global_step_0", 0), ("global_step_10/", 10), ("/a/b/global_step_7", 7),
     ("s3://b/k/global_step_3", 3), ("global_step_x", None), ("global_step_", None), (".tmp-global_step_10-ab", None),
     ("global_step_10.bak", None)],
)
def test_parse_step_dirname(name, step):
    assert rules.parse_step_dirname(name) == step


@pytest.mark.parametrize("text,step", [("10", 10), ("10\n", 10), (" 7 ", 7), ("", None), ("abc", None), ("-1", None)])
def test_parse_pointer(text, step):
    assert rules.parse_pointer(text) == step


@pytest.mark.parametrize(
    "pointer,committed,step,warns",
    [
        (20, [10, 20], 20, False),
        (20, [10, 20, 30], 20, False),  # the pointer wins
        (30, [10, 20], 20, True),  # pointer names something incomplete -> newest committed
        (None, [10, 20], 20, True),
        (None, [], None, False),
        (10, [], None, True),
    ],
)
def test_select_resume_step(pointer, committed, step, warns):
    got, warning = rules.select_resume_step(pointer, committed)
    assert got == step
    assert (warning is not None) is warns


@pytest.mark.parametrize("last,saved,expected", [(10, 10, False), (12, 10, True), (0, None, False), (5, None, True)])
def test_needs_final_save(last, saved, expected):
    assert rules.needs_final_save(last, saved) is expected


@pytest.mark.parametrize(
    "pointer,committed,parents,expected",
    [
        (20, [10, 20], {}, 20),
        (20, [10, 20, 30], {30: 20}, 30),  # crash between commit of 30 and the pointer move
        (20, [10, 20, 30, 40], {30: 20, 40: 30}, 40),
        (21, [10, 21, 30, 40], {30: 20, 40: 30}, 21),  # 30/40 belong to an abandoned run
        (20, [10, 20, 30], {30: None}, 20),
    ],
)
def test_follow_commits_after_pointer(pointer, committed, parents, expected):
    assert rules.follow_commits_after_pointer(pointer, committed, parents) == expected


def test_keep_zero_is_refused():
    with pytest.raises(ValueError, match="keep=0"):
        rules.steps_to_delete([1, 2], 0)
