"""docs/quality.md and its plots, rebuilt from the protocol's results file.

Every cell the protocol will fill but has not yet is written "not run yet"; a claim is worded
only as its paired intervals allow (axolotl_fish.compare.stats.Difference.claim).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from quality_methods import LR_WARMUP_STEPS, Method, comparisons, default_questions

from axolotl_fish.compare.stats import MIN_SEEDS_FOR_CLAIM, Difference, paired_bootstrap

NOT_RUN = "not run yet"


def correct_matrix(rows: list[dict], seeds: list[int]) -> np.ndarray:
    by_seed = {row["seed"]: row["test_correct"] for row in rows}
    return np.array([[c == "1" for c in by_seed[s]] for s in seeds], dtype=np.float64)


def difference(tests: dict[str, list[dict]], a: str, b: str) -> Difference | None:
    """Paired difference a - b over the seeds both have; None before both have one."""
    seeds = sorted({r["seed"] for r in tests.get(a, [])} & {r["seed"] for r in tests.get(b, [])})
    if not seeds:
        return None
    return paired_bootstrap(correct_matrix(tests[a], seeds), correct_matrix(tests[b], seeds))


def tests_by_method(rows: list[dict], task: str) -> dict[str, list[dict]]:
    tests: dict[str, list[dict]] = {}
    for row in rows:
        if row["kind"] == "test" and row["task"] == task:
            tests.setdefault(row["method"], []).append(row)
    return tests


def planned_pair(protocol: Any, table: list[Method], a: str, b: str) -> int:
    """How many seeds the protocol will test both methods at (the claim waits for all)."""
    by_name = {method.name: method for method in table}
    return len(set(protocol.seeds(by_name[a])) & set(protocol.seeds(by_name[b])))


def all_seeds(protocol: Any, table: list[Method]) -> list[int]:
    return sorted({seed for method in table for seed in protocol.seeds(method)})


def status(protocol: Any, table: list[Method], task: str, rows: list[dict]) -> list[str]:
    steps = protocol.steps(task)
    chosen = [m for m in table if steps and protocol.chosen_lr(task, m, steps) is not None]
    tests = [r for r in rows if r["kind"] == "test" and r["task"] == task]
    curve = [r for r in rows if r["kind"] == "curve" and r["task"] == task]
    planned = sum(len(protocol.seeds(method)) for method in table)
    return [
        f"- **{task}**: curve (b) {'done, S = ' + str(steps) + ' steps' if curve else NOT_RUN}; "
        f"LR grid (c) complete for {len(chosen)} of {len(table)} methods; test runs (d) "
        f"{len(tests)} of {planned} (each method at its seeds)."
    ]


def curve_section(rows: list[dict], task: str) -> list[str]:
    curve = [r for r in rows if r["kind"] == "curve" and r["task"] == task]
    if not curve:
        return [f"Dense-baseline validation curve: {NOT_RUN}.", ""]
    row = curve[0]
    best = max(acc for _, acc in row["points"])
    last_step = row["points"][-1][0]
    lines = [
        f"Dense-baseline validation curve ({row['method']}, lr {row['lr']:g}, seed "
        f"{row['seed']}, constant LR after {LR_WARMUP_STEPS} warm-up steps; `axolotl train` "
        f"{row['wall_seconds'] / 60:.1f} min):",
        "",
        *points_table(row["points"]),
        "",
        f"Plateau: first checkpoint within {row['plateau_tol']:g} of the best ({best:.3f}): "
        f"**S = {row['plateau_step']} steps**, the length of every later run."
        + (
            " The best is at the last checkpoint: the curve may still be rising; rerun with a "
            "larger --curve-steps to confirm the plateau."
            if row["plateau_step"] == last_step
            else ""
        ),
        "",
    ]
    plateaus = [r for r in rows if r["kind"] == "plateau" and r["task"] == task]
    return lines + [line for p in plateaus for line in plateau_lines(p, row["plateau_step"])]


def points_table(points: list[tuple[int, float]]) -> list[str]:
    return [
        "| step | " + " | ".join(str(step) for step, _ in points) + " |",
        "| --- |" + " --- |" * len(points),
        "| validation accuracy | " + " | ".join(f"{acc:.3f}" for _, acc in points) + " |",
    ]


def plateau_lines(row: dict, steps: int) -> list[str]:
    """Whether the run length S, chosen on dense LoRA's curve, reaches the plateau of another
    family's dense baseline (its curve at its chosen LR)."""
    points = dict(row["points"])
    best_step, best = max(row["points"], key=lambda point: (point[1], -point[0]))
    at_s = points.get(steps)
    if at_s is None:
        verdict = f"S = {steps} is not one of its checkpoints."
    elif at_s >= best - row["plateau_tol"]:
        verdict = (
            f"At S = {steps} it is at {at_s:.3f}, within {row['plateau_tol']:g} of its best "
            f"({best:.3f}, step {best_step}): S reaches this baseline's plateau too."
        )
    else:
        verdict = (
            f"At S = {steps} it is at {at_s:.3f}, {100 * (best - at_s):.1f} points below its best "
            f"({best:.3f}, step {best_step}): S does **not** reach this baseline's plateau; its "
            f"comparisons are at S all the same, as registered, and read with that in mind."
        )
    return [
        f"Plateau check for {row['method']} (its own validation curve at its chosen lr "
        f"{row['lr']:g}, seed {row['seed']}; `axolotl train` {row['wall_seconds'] / 60:.1f} min):",
        "",
        *points_table(row["points"]),
        "",
        verdict,
        "",
    ]


def grid_section(rows: list[dict], protocol: Any, table: list[Method], task: str) -> list[str]:
    steps = protocol.steps(task)
    if steps is None:
        return [f"LR grid: {NOT_RUN} (waits for the curve).", ""]
    grids = {m.name: protocol.grid(task, m, steps) for m in table}
    lrs = sorted(set(protocol.args.lrs) | {lr for g in grids.values() for lr in g})
    failed = {
        (r["method"], r["lr"])
        for r in rows
        if r["kind"] == "failed"
        and r["job_kind"] == "grid"
        and r["task"] == task
        and r["seed"] == 0
        and r["steps"] == steps
    }
    lines = [
        f"LR grid (seed 0, {steps} steps, validation accuracy; **bold** = chosen, ties to the "
        "lower LR; an LR past an edge is tried while the best sits at that edge and beats its "
        "neighbour):",
        "",
        "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " | chosen LR |",
        "| --- |" + " --- |" * (len(lrs) + 1),
    ]
    for method in table:
        grid = grids[method.name]
        chosen = protocol.chosen_lr(task, method, steps)
        cells = []
        for lr in lrs:
            if lr in grid:
                cells.append(f"**{grid[lr]:.3f}**" if lr == chosen else f"{grid[lr]:.3f}")
            elif (method.name, lr) in failed:
                cells.append("failed")
            else:
                cells.append(NOT_RUN if lr in (method.lrs or protocol.args.lrs) else "")
        chosen_text = f"{chosen:g}" if chosen is not None else NOT_RUN
        lines.append(f"| {method.name} | " + " | ".join(cells) + f" | {chosen_text} |")
    return [*lines, ""]


def test_section(
    rows: list[dict], protocol: Any, table: list[Method], task: str, margin: float
) -> tuple[list[str], dict[str, Difference]]:
    seeds = all_seeds(protocol, table)
    tests = tests_by_method(rows, task)
    untrained = next((r for r in rows if r["kind"] == "untrained" and r["task"] == task), None)
    size = len(untrained["test_correct"]) if untrained else protocol.args.test_size
    dense = table[0].name
    lines = [
        f"Test accuracy ({size} rows, label log-likelihood) at each method's chosen LR"
        + (f"; untrained model {untrained['test_acc']:.3f}" if untrained else "")
        + f". Difference to {dense}: mean over seeds, in points, with its paired bootstrap 95% "
        "interval (seeds and rows resampled) and the Student-t 95% interval over the per-seed "
        "differences (t). Tier 1 is tested at "
        f"{len(protocol.seeds(table[0]))} seeds, the other tiers at {len(protocol.args.seeds)}; "
        "a blank seed cell is one the protocol does not run:",
        "",
        "| method | trainable entries | LR | "
        + " | ".join(f"seed {s}" for s in seeds)
        + f" | mean | vs {dense} | claim |",
        "| --- | --- | --- |" + " --- |" * len(seeds) + " --- | --- | --- |",
    ]
    diffs: dict[str, Difference] = {}
    for method in table:
        by_seed = {r["seed"]: r for r in tests.get(method.name, [])}
        planned = protocol.seeds(method)
        cells = [
            f"{by_seed[s]['test_acc']:.3f}" if s in by_seed else NOT_RUN if s in planned else ""
            for s in seeds
        ]
        if not by_seed:
            lines.append(f"| {method.name} | | | " + " | ".join(cells) + " | | | |")
            continue
        first = next(iter(by_seed.values()))
        accs = [row["test_acc"] for row in by_seed.values()]
        versus, claim = "", ""
        if method.name != dense:
            diff = difference(tests, method.name, dense)
            if diff is not None:
                diffs[method.name] = diff
                pair = planned_pair(protocol, table, method.name, dense)
                versus, claim = str(diff), diff.claim(method.name, dense, margin, pair)
        k = f"{first['k']:,}" if first.get("k") is not None else "?"
        lines.append(
            f"| {method.name} | {k} | {first['lr']:g} | "
            + " | ".join(cells)
            + f" | {np.mean(accs):.3f} | {versus} | {claim} |"
        )
    lines += ["", "Paired comparisons at the same k (or as named):", ""]
    lines += [
        "| question | A | B | A - B, points [95% CI] | claim |",
        "| --- | --- | --- | --- | --- |",
    ]
    names = {method.name for method in table}
    for a, b, question in comparisons(table, protocol.args.rank, protocol.args.warmup):
        if a not in names or b not in names:  # left out with --methods
            continue
        diff = difference(tests, a, b)
        if diff is None:
            lines.append(f"| {question} | {a} | {b} | {NOT_RUN} | |")
        else:
            claim = diff.claim(a, b, margin, planned_pair(protocol, table, a, b))
            lines.append(f"| {question} | {a} | {b} | {diff} | {claim} |")
    return [*lines, ""], diffs


def defaults_section(
    rows: list[dict], protocol: Any, table: list[Method], tasks: list[str]
) -> list[str]:
    names = {method.name for method in table}
    lines = [
        "## Defaults",
        "",
        "Each default the protocol settles, decided by the rule written before its runs "
        "([benchmarks.md](benchmarks.md#quality-at-equal-budget)): the alternative replaces the "
        "paper's value only if it beats it on at least one task and is worse on none "
        "(`restore_after_warmup: false`, not an equal budget, must beat it on every task); "
        "nothing is decided before every planned seed is in on every task, unless the outcome "
        "is already settled (an alternative that must beat it on every task and did not on "
        "one complete task).",
        "",
        "| default | paper | alternative | "
        + " | ".join(f"{task}: alternative - paper" for task in tasks)
        + " | decision |",
        "| --- | --- | --- |" + " --- |" * len(tasks) + " --- |",
    ]
    tests = {task: tests_by_method(rows, task) for task in tasks}
    for q in default_questions(protocol.args.rank, protocol.args.warmup):
        if q.paper_method not in names or q.alternative_method not in names:  # --methods
            continue
        diffs = {
            task: difference(tests[task], q.alternative_method, q.paper_method) for task in tasks
        }
        planned = planned_pair(protocol, table, q.alternative_method, q.paper_method)
        cells = [NOT_RUN if d is None else str(d) for d in diffs.values()]
        lines.append(
            f"| `{q.key}` | `{q.paper}` | `{q.alternative}` | "
            + " | ".join(cells)
            + f" | {q.decide(diffs, planned)} |"
        )
    return [*lines, ""]


def cost_section(rows: list[dict], protocol: Any, table: list[Method]) -> list[str]:
    trained = [r for r in rows if r["kind"] in ("measure", "curve", "grid", "plateau", "test")]
    wall = sum(r.get("wall_seconds", 0.0) for r in trained)
    measure = next((r for r in rows if r["kind"] == "measure"), None)
    setups = Counter(
        f"{r.get('workers', 1)} at once x {r['threads']} thread(s)"
        for r in trained
        if "threads" in r
    )
    lines = [
        f"Compute so far: {len(trained)} recorded run(s), `axolotl train` wall time "
        f"{wall / 3600:.2f} h in all (scoring not included; runs side by side each count), on "
        f"{os.cpu_count()} CPU cores (torch {torch.__version__}); trainings "
        + (", ".join(f"{n} run(s) {setup}" for setup, n in setups.items()) or "none")
        + "."
    ]
    resumed = [r for r in trained if "resumed_from_step" in r]
    if resumed:
        lines[0] += (
            f" {len(resumed)} run(s) resumed from a checkpoint after a stop; the part before it is"
            " not in that wall time."
        )
    if measure is None:
        return [*lines, f"Measurement (a): {NOT_RUN}.", ""]
    args = protocol.args
    per_step = measure["seconds_per_step"]
    fisher_pass = args.num_samples / args.micro_batch * per_step  # about a training step each
    remaining = 0.0
    runs_left = rows_left = 0
    for task in args.task_names:
        steps = protocol.steps(task) or args.curve_steps // 2
        if protocol.steps(task) is None and not args.steps:
            remaining += args.curve_steps * per_step + measure["startup_seconds"]
            runs_left += 1
            rows_left += args.curve_steps // args.checkpoint_every * args.val_size
        for method in table:
            grid = protocol.grid(task, method, steps)
            todo = [lr for lr in (method.lrs or args.lrs) if lr not in grid]
            tested = {
                r["seed"]
                for r in rows
                if r["kind"] == "test" and r["task"] == task and r["method"] == method.name
            }
            untested = [s for s in protocol.seeds(method) if s not in tested]
            todo_runs = len(todo) + len([s for s in untested if s != 0])
            rows_left += len(todo) * args.val_size
            rows_left += len(untested) * args.test_size
            extra = 0.0 if method.dense else fisher_pass * (2 if "warm-up" in method.name else 1)
            remaining += todo_runs * (steps * per_step + measure["startup_seconds"] + extra)
            runs_left += todo_runs
            if method.check_plateau and not any(
                r["kind"] == "plateau" and r["task"] == task and r["method"] == method.name
                for r in rows
            ):
                remaining += args.curve_steps * per_step + measure["startup_seconds"]
                runs_left += 1
                rows_left += args.curve_steps // args.checkpoint_every * args.val_size
    lines += [
        "",
        f"Measurement (a), {measure['task']}: {measure['seconds_per_step']:.2f} s per step at "
        f"micro-batch {args.micro_batch} ({measure.get('threads', args.threads)} torch "
        f"thread(s), one training at a time; 15-minute load average "
        f"{measure.get('load_avg_15min', '?')} on the {os.cpu_count()} cores), start-up "
        f"{measure['startup_seconds']:.0f} s per `axolotl train`, scoring "
        f"{measure['val_rows_per_second']:.1f} rows/s (model load included); training rows "
        f"{measure['tokens']['rows']:,}, "
        f"tokens per row max {measure['tokens']['max']}, 95th percentile "
        f"{measure['tokens']['p95']} (sequence_len {args.sequence_len}: nothing truncated"
        + ("" if measure["tokens"]["max"] <= args.sequence_len else " - NO, rows are dropped")
        + ").",
        projection(runs_left, remaining, rows_left, measure, args.curve_steps),
        "",
    ]
    return lines


def projection(
    runs_left: int, remaining: float, rows_left: int, measure: dict, curve_steps: int
) -> str:
    """What is left to run, at the measured speeds; a finished protocol says so."""
    if runs_left == 0 and rows_left == 0:
        return "Nothing left to run: every training and scoring the protocol plans is recorded."
    return (
        f"Projection at these speeds: about {runs_left} trainings left, about "
        f"{remaining / 3600:.1f} h of `axolotl train`, plus about "
        f"{rows_left / measure['val_rows_per_second'] / 3600:.1f} h of scoring "
        f"({rows_left:,} rows); grids counted at their starting LRs (edge extensions come on "
        "top); where the curve has not chosen S yet, S is taken as half of --curve-steps "
        f"= {curve_steps // 2}. That is one training at a time; two at once with one "
        "thread each (`--workers 2 --threads 1`) measured 1.22x the throughput of one with two "
        "threads (docs/benchmarks.md)."
    )


def plot_curves(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in rows if r["kind"] in ("curve", "plateau")]
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in curves:
        steps, accs = zip(*row["points"], strict=True)
        label = f"{row['task']} ({row['method']}, lr {row['lr']:g})"
        style = "-" if row["kind"] == "curve" else "--"
        ax.plot(steps, accs, marker="o", linestyle=style, label=label)
        if row["kind"] == "curve":
            ax.axvline(row["plateau_step"], linestyle=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("training step (micro-batch 8)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Dense baselines' validation curves (dotted: chosen run length S)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_curve.png", dpi=110)
    plt.close(fig)


def plot_differences(
    diffs: dict[str, dict[str, Difference]], dense: str, planned: dict[str, int], out: Path
) -> None:
    """Each method's difference to dense LoRA per task; `planned`: the seeds each pair gets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [task for task, d in diffs.items() if d]
    if not tasks:
        return
    # One row per method in every panel, in the order the tasks list them, so a method sits at
    # the same height for every task; a task that has not run it leaves its row empty.
    names = list(dict.fromkeys(name for task in tasks for name in diffs[task]))
    fig, axes = plt.subplots(
        1,
        len(tasks),
        figsize=(6.5 * len(tasks), 0.45 * len(names) + 1.8),
        squeeze=False,
    )
    for ax, task in zip(axes[0], tasks, strict=True):
        ran = [i for i, name in enumerate(names) if name in diffs[task]]
        d = {i: diffs[task][names[i]] for i in ran}
        for done in (True, False):
            rows = [i for i in ran if (d[i].seeds >= planned[names[i]]) is done]
            ax.errorbar(
                [100 * d[i].mean for i in rows],
                rows,
                xerr=[
                    [100 * (d[i].mean - d[i].low) for i in rows],
                    [100 * (d[i].high - d[i].mean) for i in rows],
                ],
                fmt="o",
                capsize=3,
                color="C0",
                **({} if done else {"markerfacecolor": "white"}),
            )
        # The Student-t interval over seeds, drawn thin and grey just below each point, once
        # every planned seed is in (at 2 seeds its t quantile of 12.7 would set the axis).
        for i in ran:
            if d[i].seeds >= planned[names[i]] and d[i].seeds > 1:
                t_range = [100 * d[i].t_low, 100 * d[i].t_high]
                ax.plot(t_range, [i + 0.18] * 2, color="grey", linewidth=1)
        ax.axvline(0, color="grey", linestyle="--")
        labels = []
        for i, name in enumerate(names):
            k, n = (d[i].seeds if i in d else 0), planned[name]
            labels.append(
                f"{name} (not run yet)"
                if not k
                else f"{name} ({k} seed{'' if k == 1 else 's'})"
                if k >= n
                else f"{name} ({k} of {n} seeds)"
            )
        ax.set_yticks(range(len(names)), labels)
        ax.set_ylim(len(names) - 0.5, -0.5)  # top to bottom, the same rows in every panel
        ax.set_xlabel(
            f"test accuracy - {dense}, points\nbars: paired bootstrap 95% interval\n"
            "grey: Student-t 95% interval over seeds\nhollow: not all planned seeds in yet"
        )
        ax.set_title(task)
    fig.tight_layout()
    fig.savefig(out / "quality_methods.png", dpi=110)
    plt.close(fig)


def write_report(
    args: argparse.Namespace, results: Any, protocol: Any, table: list[Method]
) -> None:
    rows = results.mine()
    lines = [
        "# Quality protocol: results so far",
        "",
        f"Generated by `benchmarks/quality.py` from `{args.results}` at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. The protocol and how to read this "
        "page: [benchmarks.md](benchmarks.md#quality-at-equal-budget). A claim appears only where "
        f"every seed the protocol plans for both methods is in (at least {MIN_SEEDS_FOR_CLAIM})"
        " and both intervals allow it (the paired bootstrap and the Student-t interval over the "
        "per-seed differences, marked t); 'matches' means both "
        f"lie within +-{100 * args.margin:g} point(s).",
        "",
        "## Status",
        "",
    ]
    for task in args.task_names:
        lines += status(protocol, table, task, rows)
    keys = ("task", "method", "lr", "seed", "steps")
    succeeded = {(r["kind"], *(r.get(k) for k in keys)) for r in rows}
    failed = [
        r
        for r in rows
        if r["kind"] == "failed" and (r["job_kind"], *(r[k] for k in keys)) not in succeeded
    ]
    if failed:
        lines += ["", "Failed runs (a rerun of the command retries them):", ""]
        lines += [
            f"- {r['task']} {r['method']} lr {r['lr']:g} seed {r['seed']}: {r['error'][-200:]}"
            for r in failed
        ]
    lines += ["", "## Cost", "", *cost_section(rows, protocol, table)]
    all_diffs: dict[str, dict[str, Difference]] = {}
    for task in args.task_names:
        lines += [f"## Task: {task}", ""]
        lines += curve_section(rows, task)
        lines += grid_section(rows, protocol, table, task)
        section, all_diffs[task] = test_section(rows, protocol, table, task, args.margin)
        lines += section
    lines += defaults_section(rows, protocol, table, args.task_names)
    lines += [
        "## Methods",
        "",
        "| method | tier | config fragment | notes |",
        "| --- | --- | --- | --- |",
    ]
    for method in table:
        lines.append(f"| {method.name} | {method.tier} | `{method.config}` | {method.notes} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.md").write_text("\n".join(lines) + "\n")
    plot_curves(rows, args.out)
    dense = table[0].name
    planned = {m.name: planned_pair(protocol, table, m.name, dense) for m in table[1:]}
    plot_differences(all_diffs, dense, planned, args.out)
