"""Equal-budget quality protocol: dense LoRA vs LoRA-FISH vs its controls, tuned and seeded.

Every training is a real `axolotl train` of a generated config with the plugin, on the demo model
(`make demo` builds it). Held-out accuracy is scored by label log-likelihood: for each prompt the
model's summed log-probability of every label (plus EOS) is compared and the most likely label is
the prediction; no generation, no parsing.

The protocol runs in phases, per task, in the order that settles the main questions first:

  a. measure   one short dense run: seconds per step, start-up, scoring speed, token lengths
  b. curve     dense LoRA at one LR, a checkpoint every --checkpoint-every steps, each scored on the
               validation split; the run length S of every later run is the first checkpoint
               within --plateau-tol of the best (the plateau), unless --steps is given
  c. grid      per method (benchmarks/quality_methods.py), seed 0, S steps, LRs from the ladder
               1e-4, 3e-4, 1e-3, 3e-3, 1e-2, ...: --lrs first, one more step past an edge while
               the best validation accuracy is at that edge
  c'. plateau  for a further family's dense baseline (dense Adapter): the curve run again, at
               its chosen LR, so the report shows whether S (from dense LoRA's curve) reaches
               that baseline's plateau too; it does not change S
  d. seeds     the chosen LR (best validation accuracy; ties go to the lower LR) scored on the
               test split for seed 0 (the grid run) and trained + scored for the other seeds:
               --seeds for every method, and for tier 1 (the main questions) the further
               --main-seeds once every task's tier 1 has its --seeds
  e. report    docs/quality.md and plots, rebuilt after every run: per-seed values, means,
               paired bootstrap 95% intervals against dense LoRA and of Fisher vs random

Methods come in tiers; the order is task 1 tier 1, task 2 tier 1, tier 1's further seeds on
task 1 and task 2, task 1 tier 2, task 2 tier 2, ... Every
finished run is one line in the results file (rewritten atomically); a rerun of the same command
skips what is there and continues, and a training whose run folder is complete is not redone.

    .venv/bin/python benchmarks/quality.py                 # the protocol, resumable
    .venv/bin/python benchmarks/quality.py --report        # rebuild the report only
    .venv/bin/python benchmarks/quality.py --data my.jsonl --test my_test.jsonl   # your data

Your own data is a task named by its content (`data-<hash>`), its results and report go to
outputs/quality_own/<task>/ unless --results / --out say otherwise; `axolotl fish-mask compare`
(docs/compare.md) runs the same protocol for any config. The protocol's pieces (claim words and
intervals, LR ladder, training subprocess, results file, label scoring) live in
axolotl_fish/compare/; this script adds the published protocol's phases and method table.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import CACHE, TARGETS
from quality_methods import LR_WARMUP_STEPS, Method, lora_shapes, method_table

from axolotl_fish.compare.ladder import choose_lr, lrs_to_run
from axolotl_fish.compare.protocol import Store, read_jsonl
from axolotl_fish.compare.runs import RunFailed
from axolotl_fish.compare.runs import train as train_once
from axolotl_fish.compare.scoring import bits, closed_set_scores, load_model

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
MAX_FAILURES_IN_A_ROW = 3
ENVIRONMENT_RETRIES = 60  # one a minute
DEFAULT_TASKS = {
    "sentiment": CACHE / "sentiment",  # 2 labels, movie reviews (the demo's)
    "snippet-source": CACHE / "snippet-source",  # 4 labels: movie, tweet, product, news
}


@dataclass
class Task:
    name: str
    train_file: Path  # the training rows, validation rows removed
    val: list[dict]
    test: list[dict]


@dataclass(frozen=True)
class Job:
    kind: str  # measure | curve | grid | plateau | test
    task: str
    method: Method
    lr: float
    seed: int
    steps: int

    @property
    def key(self) -> tuple:
        return (self.kind, self.task, self.method.name, self.lr, self.seed, self.steps)

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.task} {self.method.name} lr {self.lr:g} seed {self.seed} "
            f"steps {self.steps}"
        )

    def run_dir(self, work: Path) -> Path:
        slug = re.sub(r"[^A-Za-z0-9.%+-]+", "_", self.method.name).strip("_")
        return work / self.task / self.kind / slug / f"lr{self.lr:g}_seed{self.seed}_n{self.steps}"


# ---------------------------------------------------------------- data and scoring


def load_task(name: str, data: Path, test: Path | None, args: argparse.Namespace) -> Task:
    """Validation rows come from the training file (a seeded draw, removed from training);
    test rows from `test` or, without it, a seeded draw from the data before that."""
    rows = read_jsonl(data)
    random.Random(0).shuffle(rows)
    if test is None:
        held, rows = rows[: args.test_size], rows[args.test_size :]
    else:
        held = read_jsonl(test)
        random.Random(0).shuffle(held)
        held = held[: args.test_size]
    if len(held) < 500:
        print(f"warning: {name}: {len(held)} test rows, fewer than the protocol's 500", flush=True)
    val, train = rows[: args.val_size], rows[args.val_size :]
    overlap = {r["input"] for r in held} & {r["input"] for r in train + val}
    if overlap:
        print(f"warning: {name}: {len(overlap)} test inputs also occur in training data")
    train_file = args.work / name / "train.jsonl"
    train_file.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in train)
    if not train_file.is_file() or train_file.read_text() != text:
        train_file.write_text(text)
    return Task(name, train_file, val, held)


# Every run trains and is scored on this prompt (Axolotl's user-defined dataset type over the
# alpaca fields). Alpaca's own template adds a 35-token preamble and headers to every row: with
# it a sentiment row is 85 tokens on average, with this one 44, and the protocol's compute
# follows the token count.
PROMPT = {
    "field_instruction": "instruction",
    "field_input": "input",
    "field_output": "output",
    "format": "{instruction}\n{input}\nAnswer:\n",
    "no_input_format": "{instruction}\nAnswer:\n",
}


class PromptTokens:
    """A row's tokens exactly as `axolotl train` makes them from PROMPT (Axolotl's own
    tokenizing strategy): the prompt, then the answer plus EOS."""

    def __init__(self, model_path: Path) -> None:
        from axolotl.prompt_strategies import load
        from axolotl.utils.dict import DictDefault
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        cfg = DictDefault({"train_on_inputs": False, "sequence_len": 1 << 20})
        self.strategy = load("user_defined", tokenizer, cfg, dict(PROMPT))

    def full(self, row: dict) -> list[int]:
        return self.strategy.tokenize_prompt(row)["input_ids"]

    def split(self, row: dict) -> tuple[list[int], list[int]]:
        """(prompt, answer + EOS): the answer starts at the first token with a label."""
        tokens = self.strategy.tokenize_prompt(row)
        start = next(i for i, label in enumerate(tokens["labels"]) if label != -100)
        return tokens["input_ids"][:start], tokens["input_ids"][start:]


class LabelScorer:
    """Held-out correctness by comparing the log-likelihood of each label after the prompt.

    Each prompt is read once and every label continues from a copy of its key/value cache
    (axolotl_fish.compare.scoring.closed_set_scores): the cost is one forward per row.
    """

    def __init__(self, model_path: Path, rows: list[dict]) -> None:
        self.model_path = model_path
        tokens = PromptTokens(model_path)
        self.labels = sorted({row["output"] for row in rows})
        self.gold = torch.tensor([self.labels.index(row["output"]) for row in rows])
        # Labels are tokenized on their own after the prompt (plus EOS), as in training.
        self.label_ids = [tokens.split({**rows[0], "output": label})[1] for label in self.labels]
        self.prompts = [tokens.split(row)[0] for row in rows]
        tokenizer = tokens.strategy.tokenizer
        self.pad = tokenizer.pad_token_id or tokenizer.eos_token_id

    def correct(self, adapter_dir: Path | None) -> torch.Tensor:
        """[rows] bool: whether the most likely label is the gold one."""
        model = load_model(self.model_path, adapter_dir, "cpu")
        scores = closed_set_scores(model, self.prompts, self.label_ids, self.pad)
        return scores.argmax(dim=1) == self.gold


# ---------------------------------------------------------------- training


def config_for(job: Job, task: Task, args: argparse.Namespace, keep_all: bool = False) -> dict:
    """An ordinary Axolotl config; the method's fragment is merged over it. Every run saves a
    checkpoint each --checkpoint-every steps and resumes from its last one after a kill (a
    stopped session loses at most that many steps); `keep_all` keeps every checkpoint (the
    curve scores each), otherwise only the last is kept."""
    every = args.checkpoint_every
    fragment = copy.deepcopy(job.method.config)
    fish_mask = fragment.pop("fish_mask", None)
    config: dict[str, Any] = {
        "base_model": str(args.model.resolve()),
        "datasets": [
            {"path": str(task.train_file.resolve()), "ds_type": "json", "type": dict(PROMPT)}
        ],
        "dataset_prepared_path": str((args.work / task.name / "prepared").resolve()),
        "val_set_size": 0,
        "sequence_len": args.sequence_len,
        "pad_to_multiple_of": 8,
        "lora_dropout": 0.05,
        "lora_target_modules": TARGETS,
        "micro_batch_size": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "max_steps": job.steps,
        "optimizer": "adamw_torch",
        "learning_rate": job.lr,
        "lr_scheduler": "constant_with_warmup",
        "warmup_steps": LR_WARMUP_STEPS,
        "weight_decay": 0.0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "seed": job.seed,
        "output_dir": str(job.run_dir(args.work).resolve()),
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": every,
        "save_total_limit": job.steps // every + 1 if keep_all else 1,
        "auto_resume_from_checkpoints": True,
        **fragment,
    }
    if config.get("adapter") == "lora":
        config["lora_alpha"] = 2 * config["lora_r"]
    if fish_mask is not None:
        config["plugins"] = ["axolotl_fish.FishMaskPlugin"]
        config["fish_mask"] = {"num_samples": args.num_samples, "seed": job.seed, **fish_mask}
    return config


def train(config: dict, run_dir: Path, threads: int) -> dict[str, Any]:
    """`axolotl train` in a subprocess (axolotl_fish.compare.runs.train: log run_dir/train.log,
    a finished run is not redone, a killed one resumes from its last checkpoint). A run that
    cannot even start because the environment is missing pieces (a shared venv being
    reinstalled) is retried every minute for up to an hour instead of failing."""
    env = {**OFFLINE, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for _ in range(ENVIRONMENT_RETRIES):
        try:
            return train_once(config, run_dir, ROOT, env) | {"threads": threads}
        except (RunFailed, OSError) as err:
            if isinstance(err, RunFailed) and not re.search(
                r"ModuleNotFoundError|ImportError", str(err)
            ):
                raise
            print("  environment incomplete (axolotl missing or an import failed); retry in 60 s")
            time.sleep(60)
    return train_once(config, run_dir, ROOT, env) | {"threads": threads}


def mask_facts(run_dir: Path, method: Method) -> dict[str, Any]:
    """k and total from the saved mask; for a method that must train one factor kind only
    (LoRA-FA), check that the mask selects exactly every entry of that kind."""
    from axolotl_fish.masks.file import MASK_FILENAME, FishMask

    if not (run_dir / MASK_FILENAME).is_file():  # a method without the plugin
        return {}
    mask = FishMask.load(run_dir)
    facts: dict[str, Any] = {"k": mask.k, "total": mask.total}
    if method.only_factor:
        wanted = sum(m.numel() for key, m in mask.masks.items() if method.only_factor in key)
        inside = sum(int(m.sum()) for key, m in mask.masks.items() if method.only_factor in key)
        if inside != wanted or mask.k != wanted:
            raise RuntimeError(
                f"{method.name}: the mask selects {inside:,} of {wanted:,} {method.only_factor} "
                f"entries and {mask.k - inside:,} others; it is not {method.only_factor} only"
            )
        facts["only_factor_checked"] = method.only_factor
    return facts


# ---------------------------------------------------------------- results file


Results = Store  # the results file (axolotl_fish.compare.protocol.Store), keyed by settings


# ---------------------------------------------------------------- the protocol's decisions


def plateau_step(points: list[tuple[int, float]], tol: float) -> int:
    """The first checkpoint whose validation accuracy is within tol of the best one."""
    best = max(acc for _, acc in points)
    return next(step for step, acc in sorted(points) if acc >= best - tol)


class Protocol:
    """Walks the phases and yields the next job whose inputs exist."""

    def __init__(self, args: argparse.Namespace, results: Results, table: list[Method]) -> None:
        self.args = args
        self.results = results
        self.table = table
        self.failed: set[tuple] = set()

    def steps(self, task: str) -> int | None:
        if self.args.steps:
            return self.args.steps
        curve = self.results.find(kind="curve", task=task, steps=self.args.curve_steps)
        return curve[0]["plateau_step"] if curve else None

    def grid(self, task: str, method: Method, steps: int) -> dict[float, float]:
        rows = self.results.find(kind="grid", task=task, method=method.name, seed=0, steps=steps)
        return {row["lr"]: row["val_acc"] for row in rows}

    def chosen_lr(self, task: str, method: Method, steps: int) -> float | None:
        """The method's LR once its grid is complete (None while LRs remain to try)."""
        grid = self.grid(task, method, steps)
        if self.grid_lrs(task, method, steps):
            return None
        return choose_lr(grid)[0]

    def grid_lrs(self, task: str, method: Method, steps: int) -> list[float]:
        """The grid's LRs still to run: every missing starting LR (they can run at once), then
        one ladder step past an edge, once the grid so far is complete."""
        start = list(method.lrs or self.args.lrs)
        bounds = (self.args.lr_min, self.args.lr_max)
        return lrs_to_run(self.grid(task, method, steps), start, bounds)

    @property
    def main_tier(self) -> int:
        return min(m.tier for m in self.table)

    def seeds(self, method: Method) -> list[int]:
        """The seeds a method is tested at: tier 1 gets --main-seeds on top of --seeds."""
        main = method.tier == self.main_tier
        return sorted(set(self.args.seeds) | set(self.args.main_seeds if main else ()))

    def stages(self) -> Iterator[tuple[str, int | str]]:
        tasks = list(self.args.task_names)
        yield tasks[0], "measure"
        for tier in sorted({m.tier for m in self.table}):
            for task in tasks:
                if tier == self.main_tier:
                    yield task, "curve"
                yield task, tier
            if tier == self.main_tier:
                for task in tasks:
                    yield task, "main seeds"

    def jobs(self) -> Iterator[Job]:
        """Every job of the protocol in order; jobs that depend on unfinished ones are held
        back (a single pass yields what can run now)."""
        args, dense = self.args, self.table[0]
        for task, stage in self.stages():
            if stage == "measure":
                yield Job("measure", task, dense, args.curve_lr, 0, args.measure_steps)
                continue
            if stage == "curve":
                if not args.steps:
                    yield Job("curve", task, dense, args.curve_lr, 0, args.curve_steps)
                continue
            steps = self.steps(task)
            if steps is None:
                continue
            if stage == "main seeds":
                methods = [m for m in self.table if m.tier == self.main_tier]
                seeds = sorted(set(args.main_seeds) - set(args.seeds))
            else:
                methods = [m for m in self.table if m.tier == stage]
                seeds = args.seeds
                for method in methods:
                    for lr in self.grid_lrs(task, method, steps):
                        yield Job("grid", task, method, lr, 0, steps)
                for method in (m for m in methods if m.check_plateau):
                    chosen = self.chosen_lr(task, method, steps)
                    if chosen is not None:
                        yield Job("plateau", task, method, chosen, 0, args.curve_steps)
            for seed in seeds:
                for method in methods:
                    chosen = self.chosen_lr(task, method, steps)
                    if chosen is not None:
                        yield Job("test", task, method, chosen, seed, steps)

    def done(self, job: Job) -> bool:
        """Recorded, or failed in this process (a rerun of the command retries failures)."""
        match = {"task": job.task, "method": job.method.name, "lr": job.lr, "seed": job.seed}
        return job.key in self.failed or bool(
            self.results.find(kind=job.kind, steps=job.steps, **match)
        )

    def next_job(self, busy: set[tuple] = frozenset()) -> Job | None:
        """The first job not done and not running (`busy`: keys of the jobs in flight)."""
        return next(
            (job for job in self.jobs() if job.key not in busy and not self.done(job)), None
        )


# ---------------------------------------------------------------- running jobs


class Runner:
    def __init__(self, args: argparse.Namespace, results: Results, tasks: dict[str, Task]) -> None:
        self.args = args
        self.results = results
        self.tasks = tasks
        self.scorers: dict[tuple[str, str], LabelScorer] = {}
        self.lock = threading.Lock()  # runs score from worker threads

    def scorer(self, task: str, split: str) -> LabelScorer:
        with self.lock:
            if (task, split) not in self.scorers:
                rows = getattr(self.tasks[task], split)
                self.scorers[task, split] = LabelScorer(self.args.model, rows)
            return self.scorers[task, split]

    def base_row(self, job: Job) -> dict[str, Any]:
        return {
            "kind": job.kind,
            "task": job.task,
            "method": job.method.name,
            "tier": job.method.tier,
            "lr": job.lr,
            "seed": job.seed,
            "steps": job.steps,
        }

    def untrained(self, task: str) -> None:
        """The base model's validation and test correctness, once per task."""
        if self.results.find(kind="untrained", task=task):
            return
        val = self.scorer(task, "val").correct(None)
        test = self.scorer(task, "test").correct(None)
        self.results.append(
            {
                "kind": "untrained",
                "task": task,
                "val_acc": float(val.float().mean()),
                "test_acc": float(test.float().mean()),
                "test_correct": bits(test),
            }
        )

    def run(self, job: Job) -> dict[str, Any]:
        """Train (unless reused) and score one job: its results row. Safe to call from several
        threads at once for different jobs."""
        task = self.tasks[job.task]
        run_dir = job.run_dir(self.args.work)
        row = self.base_row(job)
        if job.kind == "measure":
            timing = train(config_for(job, task, self.args), run_dir, self.args.threads)
            start = time.perf_counter()
            val = self.scorer(job.task, "val").correct(run_dir)
            scoring = time.perf_counter() - start
            row |= timing | {
                "seconds_per_step": round(timing["train_runtime"] / job.steps, 2),
                "startup_seconds": round(timing["wall_seconds"] - timing["train_runtime"], 1),
                "val_rows_per_second": round(len(task.val) / scoring, 1),
                "val_acc": float(val.float().mean()),
                "tokens": token_lengths(self.args.model, task),
            }
        elif job.kind in ("curve", "plateau"):
            every = self.args.checkpoint_every
            timing = train(
                config_for(job, task, self.args, keep_all=True), run_dir, self.args.threads
            )
            points = []
            for step in range(every, job.steps + 1, every):
                val = self.scorer(job.task, "val").correct(run_dir / f"checkpoint-{step}")
                points.append((step, float(val.float().mean())))
                print(f"  curve step {step}: validation accuracy {points[-1][1]:.3f}", flush=True)
            row |= timing | {
                "points": points,
                "plateau_tol": self.args.plateau_tol,
                "plateau_step": plateau_step(points, self.args.plateau_tol),
            }
        else:
            # grid: validation; test: the test split, with per-row correctness for the pairing.
            grid = job.kind == "grid"
            reused = self.curve_checkpoint(job) if grid else self.grid_adapter(job)
            if reused is None:
                timing = train(config_for(job, task, self.args), run_dir, self.args.threads)
                source = run_dir
            else:
                source = reused
                timing = {"wall_seconds": 0.0, "train_runtime": 0.0, "reused": str(reused)}
            split = "val" if grid else "test"
            correct = self.scorer(job.task, split).correct(source)
            row |= timing | mask_facts(source, job.method)
            row[f"{split}_acc"] = float(correct.float().mean())
            if not grid:
                row["test_correct"] = bits(correct)
        return row

    def curve_checkpoint(self, job: Job) -> Path | None:
        """The dense grid point at the curve's LR is the curve run's checkpoint at S (same seed,
        same data order, constant LR after a fixed warm-up: the same run), while it is on disk
        (run folders are not committed: on another machine the run is trained again)."""
        for row in self.results.find(kind="curve", task=job.task, method=job.method.name):
            if row["lr"] == job.lr and job.seed == row["seed"] and job.steps == row["plateau_step"]:
                curve = Job("curve", job.task, job.method, row["lr"], row["seed"], row["steps"])
                return on_disk(curve.run_dir(self.args.work) / f"checkpoint-{job.steps}")
        return None

    def grid_adapter(self, job: Job) -> Path | None:
        """Seed 0's test score comes from its grid run at the chosen LR (no retraining), while
        that run's adapter is on disk."""
        for row in self.results.find(
            kind="grid", task=job.task, method=job.method.name, lr=job.lr, seed=job.seed
        ):
            if row["steps"] == job.steps:
                return on_disk(
                    Path(row["reused"])
                    if "reused" in row
                    else Job("grid", job.task, job.method, job.lr, job.seed, job.steps).run_dir(
                        self.args.work
                    )
                )
        return None


def on_disk(run: Path) -> Path | None:
    """`run` if it holds a finished adapter or checkpoint, else None (train it again)."""
    return run if (run / "adapter_config.json").is_file() or (run / "done.json").is_file() else None


def token_lengths(model_path: Path, task: Task) -> dict[str, int]:
    """Prompt + answer + EOS token counts of the training rows: max and 95th percentile."""
    tokens = PromptTokens(model_path)
    lengths = sorted(len(tokens.full(row)) for row in read_jsonl(task.train_file))
    return {
        "max": lengths[-1],
        "p95": lengths[int(0.95 * (len(lengths) - 1))],
        "rows": len(lengths),
    }


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2-135m")
    parser.add_argument(
        "--tasks", nargs="+", default=list(DEFAULT_TASKS), help="built-in tasks, in order"
    )
    parser.add_argument("--data", type=Path, help="your alpaca JSONL (replaces --tasks)")
    parser.add_argument(
        "--test", type=Path, help="held-out alpaca JSONL for --data (default: a seeded draw of it)"
    )
    parser.add_argument("--val-size", type=int, default=400)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--main-seeds",
        type=int,
        nargs="*",
        default=[0, 1, 2, 3, 4],
        help="tier 1's seeds (the main questions); the ones beyond --seeds run after every "
        "task's tier 1 has its --seeds",
    )
    parser.add_argument("--rank", type=int, default=8, help="r: dense rank = masked budget")
    parser.add_argument(
        "--warmup", type=int, default=10, help="fish_mask.warmup_steps of the remedy"
    )
    parser.add_argument("--num-samples", type=int, default=64, help="fish_mask.num_samples")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--sequence-len", type=int, default=320)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--lr-min", type=float, default=1e-5)
    parser.add_argument("--lr-max", type=float, default=0.1)
    parser.add_argument("--curve-lr", type=float, default=1e-3)
    parser.add_argument("--curve-steps", type=int, default=240)
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=30,
        help="steps between checkpoints: the curve's points, and where a killed run resumes",
    )
    parser.add_argument("--plateau-tol", type=float, default=0.01)
    parser.add_argument("--steps", type=int, help="fixed run length (skips the curve phase)")
    parser.add_argument("--measure-steps", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, here and in training"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="trainings at once (2 x 1 thread: 1.2x of 1 x 2)"
    )
    parser.add_argument("--margin", type=float, default=0.01, help="'matches' = CI within +-margin")
    parser.add_argument("--max-jobs", type=int, help="stop after this many runs")
    parser.add_argument(
        "--methods", nargs="+", help="only these methods (names as in the report); dense r first"
    )
    parser.add_argument("--work", type=Path, default=Path("outputs/quality_protocol"))
    parser.add_argument(
        "--results",
        type=Path,
        help="results file (default: docs/quality_protocol.jsonl for the built-in tasks, "
        "outputs/quality_own/<task>/quality_protocol.jsonl for --data)",
    )
    parser.add_argument(
        "--out", type=Path, help="report folder (default: docs, or the --results folder for --data)"
    )
    parser.add_argument("--report", action="store_true", help="no training: rebuild the report")
    parser.add_argument(
        "--plan", action="store_true", help="no training: list the runs that can start now"
    )
    args = parser.parse_args(argv)
    if args.data is not None:
        # Keyed by the data's content: a file named like a built-in task (sentiment.jsonl) is
        # never taken for it, and the project's docs/ are written only when asked.
        args.task_names = [data_task_name(args.data, args.test)]
        own = Path("outputs/quality_own") / args.task_names[0]
        args.results = args.results or own / "quality_protocol.jsonl"
        args.out = args.out or args.results.parent
    else:
        unknown = [t for t in args.tasks if t not in DEFAULT_TASKS]
        if unknown:
            parser.error(f"unknown task {unknown[0]!r}; built in: {', '.join(DEFAULT_TASKS)}")
        args.task_names = args.tasks
        args.results = args.results or Path("docs/quality_protocol.jsonl")
        args.out = args.out or Path("docs")
    return args


def data_task_name(data: Path, test: Path | None) -> str:
    """`data-<hash>`: the task of your own data, named by the content of its files."""
    digest = hashlib.sha256(data.read_bytes())
    if test is not None:
        digest.update(test.read_bytes())
    return f"data-{digest.hexdigest()[:12]}"


def protocol_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for a recorded run to count (the model by folder name)."""
    keys = ("val_size", "test_size", "rank", "warmup", "num_samples", "micro_batch")
    return {
        "model": args.model.name,
        "sequence_len": args.sequence_len,
        "curve_lr": args.curve_lr,
        "prompt": PROMPT["format"],
        **{key: getattr(args, key) for key in keys},
    }


def sweep(
    args: argparse.Namespace,
    protocol: Protocol,
    runner: Runner,
    results: Results,
    report: Callable[[], None],
) -> None:
    """Run jobs, up to --workers at once (each training with --threads torch threads), until
    none can start. This thread alone records results and rebuilds the report."""
    started, failures, clock = 0, 0, time.perf_counter()
    running: dict[Future, Job] = {}
    with ThreadPoolExecutor(args.workers) as pool:
        while True:
            while len(running) < args.workers and (
                args.max_jobs is None or started < args.max_jobs
            ):
                job = protocol.next_job({j.key for j in running.values()})
                if job is None:
                    break
                runner.untrained(job.task)
                print(f"[{time.strftime('%H:%M:%S')}] {job}", flush=True)
                running[pool.submit(runner.run, job)] = job
                started += 1
            if not running:
                return
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    row = future.result()
                    results.append(row | {"workers": args.workers})
                    value = row.get("val_acc", row.get("test_acc", row.get("plateau_step")))
                    outcome, failures = f"{job}: {value}", 0
                except (RuntimeError, OSError, ValueError) as err:
                    # One broken method must not stop an unattended sweep: record it, go on;
                    # several in a row mean the environment is broken (e.g. the venv is being
                    # reinstalled).
                    protocol.failed.add(job.key)
                    failures += 1
                    results.append(
                        {
                            **runner.base_row(job),
                            "kind": "failed",
                            "job_kind": job.kind,
                            "error": str(err)[-2000:],
                        }
                    )
                    outcome = f"{job} FAILED: {str(err)[-300:]}"
                    if failures >= MAX_FAILURES_IN_A_ROW:
                        message = f"{failures} runs failed in a row; stopping (last: {outcome})"
                        raise SystemExit(message) from err
                minutes = (time.perf_counter() - clock) / 60
                print(f"  -> {outcome}; {started} started in {minutes:.1f} min", flush=True)
                report()


def main(argv: list[str] | None = None) -> None:
    # Everything the sweep needs later is imported now: a long sweep must survive its venv
    # being reinstalled underneath it (the training subprocesses wait for it, see train()).
    import matplotlib.pyplot  # noqa: F401  (the report's plots)
    import peft  # noqa: F401  (loading adapters to score them)
    from axolotl.prompt_strategies import user_defined  # noqa: F401
    from quality_report import write_report

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = protocol_settings(args)
    # Run folders belong to one protocol: a run of another prompt or rank is never reused.
    args.work = (
        args.work / hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    )
    if args.data is not None:
        tasks = {args.task_names[0]: load_task(args.task_names[0], args.data, args.test, args)}
    else:
        missing = [t for t in args.task_names if not (DEFAULT_TASKS[t] / "train.jsonl").is_file()]
        if missing:
            raise SystemExit(
                f"no data for task {missing[0]!r} at {DEFAULT_TASKS[missing[0]]}: build it with "
                f"`python -m axolotl_fish.demo.assets --cache {CACHE}`"
            )
        tasks = {
            name: load_task(
                name, DEFAULT_TASKS[name] / "train.jsonl", DEFAULT_TASKS[name] / "test.jsonl", args
            )
            for name in args.task_names
        }
    table = method_table(args.rank, lora_shapes(args.model, TARGETS), args.warmup)
    if args.methods:
        unknown = sorted(set(args.methods) - {m.name for m in table})
        if unknown:
            raise SystemExit(f"unknown method {unknown[0]!r}; known: {[m.name for m in table]}")
        table = [m for i, m in enumerate(table) if i == 0 or m.name in args.methods]
    results = Results(args.results, settings)
    protocol = Protocol(args, results, table)
    runner = Runner(args, results, tasks)
    if args.plan:
        for job in (job for job in protocol.jobs() if not protocol.done(job)):
            print(job)
        return
    if not args.report:
        sweep(args, protocol, runner, results, lambda: write_report(args, results, protocol, table))
    write_report(args, results, protocol, table)


if __name__ == "__main__":
    main()
