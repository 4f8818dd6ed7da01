"""The protocol's trainings and tokenizations: the real `axolotl train` / `axolotl preprocess` of
a generated config, in a subprocess whose output goes to a log file beside the config.

A finished training leaves `done.json` (wall seconds, the trainer's own train_runtime): a rerun
returns it without training again. A killed training resumes from its last checkpoint
(`auto_resume_from_checkpoints`), or starts over when it had none.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from axolotl_fish.base.atomic import write_text_atomically

OFFLINE_DEFAULTS = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
DONE = "done.json"


class RunFailed(RuntimeError):
    """An `axolotl` subprocess exited with an error; the message ends with its log's tail."""


def axolotl_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """This environment with the venv's bin/ first on PATH (`axolotl train` execs `accelerate`
    found there) and `extra` on top."""
    env = {**OFFLINE_DEFAULTS, **os.environ, **extra}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_axolotl(
    command: str,
    config: dict[str, Any],
    folder: Path,
    cwd: Path,
    env: Mapping[str, str] = {},
    args: Sequence[str] = (),
) -> tuple[float, str]:
    """`axolotl COMMAND folder/config.yaml ARGS...` (log: folder/COMMAND.log), run from `cwd`.
    Returns (wall seconds, log text); raises RunFailed with the log's tail."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    write_text_atomically(config_path, yaml.safe_dump(config, sort_keys=False))
    log_path = folder / f"{command}.log"
    argv = [str(Path(sys.executable).parent / "axolotl"), command, str(config_path), *args]
    start = time.perf_counter()
    with log_path.open("w") as log:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=axolotl_env(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    wall = time.perf_counter() - start
    text = log_path.read_text()
    if result.returncode != 0:
        raise RunFailed(
            f"`axolotl {' '.join(argv[1:])}` exited with {result.returncode}; "
            f"last lines of {log_path}:\n{text[-3000:]}"
        )
    return wall, text


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The timing of a finished training in `run_dir`, or None."""
    done = run_dir / DONE
    return json.loads(done.read_text()) if done.is_file() else None


def train(
    config: dict[str, Any],
    run_dir: Path,
    cwd: Path,
    env: Mapping[str, str] = {},
    args: Sequence[str] = (),
) -> dict[str, Any]:
    """`axolotl train` of `config` into `run_dir` (`args`: the user's launcher arguments, e.g.
    `--launcher accelerate -- --multi_gpu --num_processes 2`), unless a finished one is there.
    Returns wall seconds and the trainer's own train_runtime (seconds)."""
    timing = finished(run_dir)
    if timing is not None:
        return timing
    resumed = max((int(c.name.split("-")[1]) for c in run_dir.glob("checkpoint-*")), default=0)
    wall, log = run_axolotl("train", config, run_dir, cwd, env, args)
    found = re.findall(r"'train_runtime': '?([0-9.]+)", log)
    timing = {
        "wall_seconds": round(wall, 1),
        "train_runtime": float(found[-1]) if found else round(wall, 1),
        # On a shared machine the 15-minute load average at the end says how much it was shared.
        "load_avg_15min": round(os.getloadavg()[2], 1),
        **({"resumed_from_step": resumed} if resumed else {}),
    }
    write_text_atomically(run_dir / DONE, json.dumps(timing))
    return timing
