"""`axolotl fish-mask compare` end to end on a tiny Llama: real `axolotl preprocess` and
`axolotl train` runs, killed after the first finished run and resumed.

One comparison (3 arms, 1 LR, 1 seed, 2 steps) guarantees: every arm trains exactly the dense
arm's number of entries (read from the saved masks, and the masked arms really are rank 2r); a
kill mid-run loses no finished run and the rerun does not train it again; nothing is written
outside the output folder (the project folder, data and model are unchanged).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from axolotl_run import OFFLINE_ENV, alpaca_rows, held_digests, two_process_launch, write_config

from axolotl_fish.masks.file import FishMask

pytestmark = pytest.mark.e2e

RANK = 4


def snapshot(folder: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """{path: (size, mtime_ns)} of every file under `folder` outside `skip`."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and skip not in p.parents
    }


def command(project: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "axolotl_fish", "compare", str(project / "config.yaml"),
        "--test", "test.jsonl", "--out", str(out), "--lrs", "1e-3", "--seeds", "0",
        "--val-size", "8", "--no-yours",
    ]  # fmt: skip


def make_project(project: Path, base: Path) -> Path:
    """A user's folder: a config training a LoRA r=RANK on data.jsonl, and a disjoint test.jsonl."""
    project.mkdir(exist_ok=True)
    train = alpaca_rows(64, seed=0)
    test = [row for row in alpaca_rows(80, seed=9) if row not in train][:24]
    (project / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (project / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    write_config(
        project,
        base,
        Path("data.jsonl"),
        lora_r=RANK,
        lora_alpha=2 * RANK,
        max_steps=2,
        plugins=["axolotl_fish.FishMaskPlugin"],
        fish_mask={"keep_ratio": 0.5, "num_samples": 8},
    )
    return project


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict:
    project = make_project(tmp_path_factory.mktemp("project"), tiny_llama_dir)
    out = project / "cmp"
    before = snapshot(project, out) | snapshot(tiny_llama_dir, out)
    env = {**os.environ, **OFFLINE_ENV}
    log = tmp_path_factory.mktemp("logs") / "first.log"
    with log.open("w") as handle:
        first = subprocess.Popen(
            command(project, out), cwd=project, env=env, stdout=handle,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    results = out / "results.jsonl"
    deadline = time.monotonic() + 1200
    while not (results.is_file() and results.read_text().strip()) and first.poll() is None:
        assert time.monotonic() < deadline, "no run finished in 1200 s"
        time.sleep(1)
    assert first.poll() is None, f"the comparison ended before the kill:\n{log.read_text()}"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    recorded = [json.loads(line) for line in results.read_text().splitlines()]
    run = out / "runs" / recorded[0]["protocol"]
    done = {p: p.stat().st_mtime_ns for p in run.rglob("done.json")}
    second = subprocess.run(
        command(project, out), cwd=project, env=env, capture_output=True, text=True, timeout=2400
    )
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    return {
        "project": project,
        "out": out,
        "before": before,
        "after": snapshot(project, out) | snapshot(tiny_llama_dir, out),
        "recorded_before_kill": recorded,
        "done_before_kill": done,
        "rows": [json.loads(line) for line in results.read_text().splitlines()],
        "output": second.stdout,
        "run": run,
    }


def test_arms_train_exactly_equal_entries(comparison: dict) -> None:
    rows = comparison["rows"]
    assert {r["arm"] for r in rows} == {
        f"dense LoRA r{RANK}",
        f"fisher LoRA r{2 * RANK}->r{RANK}",
        f"random LoRA r{2 * RANK}->r{RANK}",
    }
    dense = FishMask.load(comparison["run"] / f"dense_LoRA_r{RANK}" / "lr0.001_seed0")
    assert dense.k == dense.total  # every dense entry trains
    for arm in ("fisher", "random"):
        folder = comparison["run"] / f"{arm}_LoRA_r{2 * RANK}-_r{RANK}" / "lr0.001_seed0"
        mask = FishMask.load(folder)
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2 * RANK
        assert (mask.k, mask.total) == (dense.k, 2 * dense.total)
    assert {r["k"] for r in rows} == {dense.k}


def test_kill_resumes_without_retraining_finished_runs(comparison: dict) -> None:
    assert len(comparison["recorded_before_kill"]) == 1
    first = comparison["recorded_before_kill"][0]
    rows = comparison["rows"]
    # grid and test rows of 3 arms; the first is not recorded twice, nor its training redone.
    assert sorted((r["kind"], r["arm"]) for r in rows).count((first["kind"], first["arm"])) == 1
    assert len(rows) == 6 and rows[0] == first
    for path, mtime in comparison["done_before_kill"].items():
        assert path.stat().st_mtime_ns == mtime, f"{path.parent} was trained again"
    assert comparison["output"].count("[run ") == 2  # the two arms the kill left untrained
    assert "Verdict (test accuracy): " in comparison["output"]
    assert all(len(r["test_correct"]) == 24 for r in rows if r["kind"] == "test")


def test_nothing_is_written_outside_the_output_folder(comparison: dict) -> None:
    assert comparison["after"] == comparison["before"]
    out = comparison["out"]
    assert (out / "compare.md").is_file() and (out / "compare.png").is_file()


def test_launcher_arguments_reach_every_training(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Arguments after `--` are the user's launcher: every arm trains on 2 processes (DDP on CPU),
    each rank holding the same mask, and the arms still train exactly equal entries."""
    project = make_project(tmp_path / "project", tiny_llama_dir)
    out = project / "cmp"
    result = subprocess.run(
        [*command(project, out), "--", *two_process_launch()],
        cwd=project,
        env={**os.environ, **OFFLINE_ENV, "ACCELERATE_USE_CPU": "1"},
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "each run: axolotl train CONFIG --launcher accelerate -- --multi_gpu" in result.stdout
    logs = sorted(out.rglob("train.log"))
    assert len(logs) == 3  # one grid run per arm; seed 0's test score is the grid run's
    for log in logs:
        digests = held_digests(log.read_text())
        assert set(digests) == {"0", "1"} and len(set(digests.values())) == 1, log
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len({r["k"] for r in rows}) == 1 and len({r["arm"] for r in rows}) == 3
