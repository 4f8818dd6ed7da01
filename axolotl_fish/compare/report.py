"""The comparison's table, verdict and plot, from the recorded test rows.

Per arm and metric: the value at every seed, the mean, and against the dense arm the paired
difference with its bootstrap interval (seeds and rows) and t interval (seeds). The verdict
compares FISH with dense and with random selection on the main metric (accuracy when the answers
form a closed set, else the answer loss) and claims only what both intervals allow
(`stats.Difference.claim`): "beats", "is worse than", "matches ... within", "no difference shown",
or "no claim yet" before every planned seed (at least 3) is in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from axolotl_fish.base.atomic import write_atomically, write_text_atomically
from axolotl_fish.compare.stats import Difference, paired_bootstrap


@dataclass(frozen=True)
class Metric:
    name: str
    title: str
    rows_key: str  # per-row values in a test row
    higher_is_better: bool
    margin: float  # "matches within" this, in the metric's units
    unit: str
    scale: float  # shown values are value * scale

    def per_row(self, row: dict[str, Any]) -> np.ndarray | None:
        """The row's per-row values, oriented so that higher is better (None: not measured)."""
        values = row.get(self.rows_key)
        if values is None:
            return None
        if isinstance(values, str):
            return np.array([c == "1" for c in values], dtype=np.float64)
        array = np.asarray(values, dtype=np.float64)
        return array if self.higher_is_better else -array

    def show(self, value: float) -> str:
        return f"{self.scale * value:.{1 if self.scale == 100 else 4}f}"


METRICS = (
    Metric("acc", "test accuracy (%)", "test_correct", True, 0.01, "point", 100.0),
    Metric("nll", "test answer loss (nats)", "test_nll_rows", False, 0.01, "nat", 1.0),
    Metric("exact", "test exact match (%)", "test_exact", True, 0.01, "point", 100.0),
)


def test_rows(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """{arm: {seed: test row}}."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        if row["kind"] == "test":
            out.setdefault(row["arm"], {})[row["seed"]] = row
    return out


def measured(tests: dict[str, dict[int, dict[str, Any]]]) -> list[Metric]:
    return [
        m
        for m in METRICS
        if any(m.per_row(row) is not None for seeds in tests.values() for row in seeds.values())
    ]


def difference(
    tests: dict[str, dict[int, dict[str, Any]]], a: str, b: str, metric: Metric
) -> Difference | None:
    """Paired difference a - b (higher is better) over the seeds both have."""
    seeds = sorted(set(tests.get(a, {})) & set(tests.get(b, {})))
    if not seeds:
        return None
    first = np.stack([metric.per_row(tests[a][s]) for s in seeds])
    second = np.stack([metric.per_row(tests[b][s]) for s in seeds])
    return paired_bootstrap(first, second)


def mean_value(row: dict[str, Any], metric: Metric) -> float:
    values = metric.per_row(row)
    value = float(values.mean())
    return value if metric.higher_is_better else -value


def table(
    tests: dict[str, dict[int, dict[str, Any]]], arms: list[str], seeds: list[int], metric: Metric
) -> list[str]:
    """A markdown table: arm, entries, LR, value per seed, mean, difference to the first arm."""
    dense = arms[0]
    sign = "" if metric.higher_is_better else " (positive: lower loss)"
    lines = [
        f"{metric.title}",
        "",
        f"| arm | entries | LR | {' | '.join(f'seed {s}' for s in seeds)} | mean "
        f"| vs {dense}{sign}: mean [bootstrap 95%], t [95%] |",
        "|" + "---|" * (len(seeds) + 5),
    ]
    for arm in arms:
        rows = tests.get(arm, {})
        cells = [metric.show(mean_value(rows[s], metric)) if s in rows else "-" for s in seeds]
        values = [mean_value(row, metric) for row in rows.values()]
        mean = metric.show(sum(values) / len(values)) if values else "-"
        first = next(iter(rows.values()), {})
        diff = difference(tests, arm, dense, metric) if arm != dense else None
        shown = diff.format(metric.scale, ".1f" if metric.scale == 100 else ".4f") if diff else "-"
        entries = f"{first['k']:,}" if first else "-"
        lr = f"{first['lr']:g}" if first else "-"
        lines.append(f"| {arm} | {entries} | {lr} | {' | '.join(cells)} | {mean} | {shown} |")
    return lines


def pairs(arms: list[str]) -> list[tuple[str, str]]:
    """The verdict's questions: FISH vs dense, FISH vs random (arms: dense, fisher, random,...)."""
    dense, fisher, random = arms[:3]
    return [(fisher, dense), (fisher, random)]


def verdict(
    tests: dict[str, dict[int, dict[str, Any]]], arms: list[str], planned_seeds: int
) -> str:
    """One line: what both intervals allow on the main metric, for each question."""
    metric = measured(tests)[0]
    claims = []
    for a, b in pairs(arms):
        diff = difference(tests, a, b, metric)
        claims.append(
            f"{a} vs {b}: "
            + (
                "not run yet"
                if diff is None
                else diff.claim(a, b, metric.margin, planned_seeds, metric.unit, metric.scale)
            )
        )
    return f"Verdict ({metric.title.split(' (')[0]}): " + "; ".join(claims)


def plot(
    tests: dict[str, dict[int, dict[str, Any]]], arms: list[str], metric: Metric, path: Path
) -> Path:
    """Per arm: every seed's value (dots) and their mean (bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 * len(arms) + 2, 4))
    for i, arm in enumerate(arms):
        values = [metric.scale * mean_value(row, metric) for row in tests.get(arm, {}).values()]
        if values:
            ax.bar(i, sum(values) / len(values), color="#9ecae1", width=0.6)
            ax.scatter([i] * len(values), values, color="black", zorder=3, s=14)
    finite = [
        metric.scale * mean_value(row, metric) for seeds in tests.values() for row in seeds.values()
    ]
    if finite and all(math.isfinite(v) for v in finite):
        low, high = min(finite), max(finite)
        pad = max(0.05 * (high - low), 1e-3 * max(abs(high), 1.0))
        ax.set_ylim(low - 5 * pad, high + 5 * pad)
    ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right")
    ax.set_ylabel(metric.title)
    ax.set_title("per-seed values (dots) and mean (bar)", fontsize=10)
    fig.tight_layout()
    try:
        return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)


def write_report(
    rows: list[dict[str, Any]], arms: list[str], seeds: list[int], header: list[str], out: Path
) -> list[str]:
    """out/compare.md and out/compare.png; returns the report's lines (table and verdict)."""
    tests = test_rows(rows)
    metrics = measured(tests)
    if not metrics:
        return ["no test results yet"]
    lines = [verdict(tests, arms, len(seeds)), ""]
    for metric in metrics:
        lines += [*table(tests, arms, seeds, metric), ""]
    plot(tests, arms, metrics[0], out / "compare.png")
    text = "\n".join(["# FISH compare", "", *header, "", *lines, "Plot: compare.png", ""])
    write_text_atomically(out / "compare.md", text)
    return lines
