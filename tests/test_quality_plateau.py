"""The quality protocol's plateau check: the run length S comes from dense LoRA's curve, so the
Adapter family's dense baseline gets its own curve at its chosen LR, and the report says
whether S reaches its plateau (`benchmarks/quality.py`, `benchmarks/quality_report.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmark_modules import benchmarks_importable

STEPS = 150


@pytest.fixture(scope="module")
def harness() -> tuple:
    with benchmarks_importable():
        import quality
        import quality_report
        from quality_methods import LoraShapes, method_table
    table = method_table(8, LoraShapes(a_per_rank=100, b_per_rank=100), 10)
    return quality, quality_report, table


def protocol_with(harness: tuple, tmp_path: Path, rows: list[dict]):
    quality, _, table = harness
    tmp_path.mkdir()
    args = quality.parse_args(["--results", str(tmp_path / "results.jsonl")])
    results = quality.Results(args.results, {"protocol": "test"})
    for row in rows:
        results.append(row)
    return quality.Protocol(args, results, table), table


def grid_rows(method: str, accuracies: dict[float, float]) -> list[dict]:
    return [
        {"kind": "grid", "task": "sentiment", "method": method, "lr": lr, "seed": 0}
        | {"steps": STEPS, "val_acc": acc}
        for lr, acc in accuracies.items()
    ]


def tier_four_jobs(protocol) -> list:
    return [
        job
        for job in protocol.jobs()
        if job.task == "sentiment" and job.method.tier == 4 and not protocol.done(job)
    ]


def test_the_adapter_baseline_gets_its_curve_at_its_chosen_lr_once_its_grid_is_done(
    harness, tmp_path
):
    curve = {"kind": "curve", "task": "sentiment", "method": "dense LoRA r8", "lr": 1e-3}
    curve |= {"seed": 0, "steps": 240, "plateau_step": STEPS, "points": [], "plateau_tol": 0.01}
    dense = "dense Adapter s16"
    unfinished = grid_rows(dense, {3e-4: 0.82, 1e-3: 0.90})
    protocol, table = protocol_with(harness, tmp_path / "a", [curve, *unfinished])
    assert not [job for job in tier_four_jobs(protocol) if job.kind == "plateau"]

    done = grid_rows(dense, {3e-4: 0.82, 1e-3: 0.90, 3e-3: 0.88})
    protocol, table = protocol_with(harness, tmp_path / "b", [curve, *done])
    jobs = tier_four_jobs(protocol)
    [plateau] = [job for job in jobs if job.kind == "plateau"]
    assert (plateau.method.name, plateau.lr, plateau.seed, plateau.steps) == (dense, 1e-3, 0, 240)
    assert jobs.index(plateau) < min(i for i, job in enumerate(jobs) if job.kind == "test")
    # Only the Adapter family's baseline: dense LoRA r1 is tuned on LoRA's own curve.
    assert [m.name for m in table if m.check_plateau] == [dense]
    assert protocol.steps("sentiment") == STEPS  # the check never moves S

    row = {"kind": "plateau", "task": "sentiment", "method": dense, "lr": 1e-3, "seed": 0}
    protocol, _ = protocol_with(harness, tmp_path / "c", [curve, *done, row | {"steps": 240}])
    assert not [job for job in tier_four_jobs(protocol) if job.kind == "plateau"]


@pytest.mark.parametrize(
    ("at_s", "verdict"),
    [(0.895, "S reaches this baseline's plateau too"), (0.85, "S does **not** reach")],
)
def test_the_report_says_whether_s_reaches_the_baseline_s_plateau(harness, at_s, verdict):
    _, quality_report, _ = harness
    points = [(30, 0.70), (120, 0.84), (STEPS, at_s), (210, 0.90), (240, 0.89)]
    row = {"method": "dense Adapter s16", "lr": 1e-3, "seed": 0, "wall_seconds": 600}
    lines = quality_report.plateau_lines(row | {"points": points, "plateau_tol": 0.01}, STEPS)
    text = "\n".join(lines)
    assert verdict in text and "step 210" in text
    assert f"| validation accuracy | 0.700 | 0.840 | {at_s:.3f} | 0.900 | 0.890 |" in lines
