"""The quality protocol's claim words and its pre-registered rule for the defaults.

What docs/quality.md and the README may claim, and which plugin default the evidence moves, is
decided by `axolotl_fish/compare/stats.py` and `DefaultQuestion.decide` in
`benchmarks/quality_methods.py`; a slip there would publish a claim the intervals do not allow.
"""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_modules import benchmarks_importable

from axolotl_fish.compare.stats import Difference, paired_bootstrap


@pytest.fixture(scope="module")
def rule() -> tuple:
    with benchmarks_importable():
        from quality_methods import default_questions
    return Difference, paired_bootstrap, default_questions


def test_paired_bootstrap_sees_a_real_gap_and_no_gap(rule: tuple) -> None:
    _, paired_bootstrap, _ = rule
    rng = np.random.default_rng(0)
    b = (rng.random((5, 1000)) < 0.80).astype(float)
    a = b.copy()
    a[:, :100] = 1.0  # A also gets right the first 100 rows of every seed
    gap = paired_bootstrap(a, b)
    assert gap.mean == pytest.approx((a - b).mean())
    assert gap.beats and not gap.worse
    same = paired_bootstrap(b, b)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    assert not same.beats and not same.worse
    with pytest.raises(ValueError, match="same \\[seeds, rows\\] shape"):
        paired_bootstrap(a[:3], b)


def test_claim_waits_for_every_planned_seed_and_needs_both_intervals(rule: tuple) -> None:
    difference = rule[0]
    up = difference(0.02, 0.01, 0.03, 3, 0.005, 0.035)
    assert up.claim("A", "B", 0.01, planned=5) == "no claim yet (3 of 5 seeds)"
    assert up.claim("A", "B", 0.01, planned=3) == "A beats B"
    bootstrap_only = difference(0.02, 0.01, 0.03, 3, -0.01, 0.05)  # t spans 0
    assert not bootstrap_only.beats
    assert bootstrap_only.claim("A", "B", 0.01) == "no difference shown (t interval(s) span 0)"
    down = difference(-0.02, -0.03, -0.01, 3, -0.035, -0.005)
    assert down.claim("A", "B", 0.01) == "A is worse than B"
    tight = difference(0.0, -0.004, 0.004, 3, -0.008, 0.009)
    assert tight.claim("A", "B", 0.01) == "A matches B within 1 point"


def test_defaults_follow_the_written_rule(rule: tuple) -> None:
    difference, _, default_questions = rule
    warmup, scope, restore = default_questions(8, 10)
    assert (warmup.key, scope.key, restore.key) == ("warmup_steps", "scope", "restore_after_warmup")
    up = difference(0.02, 0.01, 0.03, 5, 0.005, 0.035)
    flat = difference(0.0, -0.01, 0.01, 5, -0.02, 0.02)
    down = difference(-0.02, -0.03, -0.01, 5, -0.035, -0.005)
    partial = difference(0.02, 0.01, 0.03, 3, 0.005, 0.035)

    # Beats on one task, not worse on the other: the alternative replaces the paper's value.
    assert warmup.decide({"a": up, "b": flat}, 5).startswith("`10` replaces `0`")
    # Beats on one, worse on the other; or beats nowhere: the paper's value stays.
    assert warmup.decide({"a": up, "b": down}, 5).startswith("`0` stays")
    assert scope.decide({"a": flat, "b": flat}, 5).startswith("`global` stays")
    # Not an equal budget: restore_after_warmup: false has to beat on every task.
    assert restore.decide({"a": up, "b": flat}, 5).startswith("`true` stays")
    assert restore.decide({"a": up, "b": up}, 5).startswith("`false` replaces `true`")
    # Nothing is decided off part of the seeds or with a task missing.
    assert warmup.decide({"a": partial, "b": up}, 5) == (
        "undecided (a 3 of 5 seeds); `0` stays meanwhile"
    )
    assert "b not run yet" in warmup.decide({"a": up, "b": None}, 5)
    # ...except where the outcome is already settled: an alternative that must beat the
    # paper's value on every task and did not on one complete task cannot win any more.
    assert restore.decide({"a": flat, "b": None}, 5) == (
        "`true` stays: the alternative does not beat it on a (every planned seed in) and must "
        "beat it on every task (b not run yet: run as registered, cannot change this)"
    )
    assert restore.decide({"a": up, "b": partial}, 5).startswith("undecided (b 3 of 5 seeds)")
    assert warmup.decide({"a": flat, "b": None}, 5).startswith("undecided")
