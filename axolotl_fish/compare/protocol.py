"""The comparison itself: arms x learning rates x seeds, trained and scored, resumable.

Phases, per arm, in order: the LR grid at seed 0 (a training per LR, scored on the validation
split; the best validation answer loss wins, extended one ladder step past an edge), then the
chosen LR at every seed scored on the test file (seed 0 is the grid's own run, not trained again).
Every arm trains the same number of steps.

Everything is written under the output folder: `results.jsonl` (one line per finished job,
rewritten atomically, each tagged with the protocol hash), `runs/<hash>/...` (the generated
configs, logs, adapters), the report. The protocol hash covers the config, the data's content and
the protocol's settings - never a file name - so a rerun of the same command skips what is
recorded, and a changed config or data set starts afresh in the same folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from axolotl_fish.base.atomic import write_text_atomically
from axolotl_fish.compare.arms import Arm, derive_arms
from axolotl_fish.compare.data import Splits, jsonl_text, local_dataset, read_rows, split
from axolotl_fish.compare.ladder import choose_lr, lrs_to_run
from axolotl_fish.compare.report import write_report
from axolotl_fish.compare.runs import finished, run_axolotl, train
from axolotl_fish.compare.scoring import Row, SplitScorer

RESULTS = "results.jsonl"
# Keys the protocol sets or removes: where runs write, which rows they see, how long, how fast.
PUBLISHING_KEYS = re.compile(r"^(hub_|push_|wandb_|mlflow_|comet_|use_wandb|use_mlflow|use_comet)")


@dataclass(frozen=True)
class Settings:
    steps: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    val_size: int
    factor: int = 2
    max_answers: int = 10  # answers form a closed set (accuracy) up to this many
    exact_match: bool = False
    lr_bounds: tuple[float, float] = (1e-6, 1.0)
    yours: bool = True
    # Arguments after `axolotl train CONFIG` (the launcher: processes change the batch, so they
    # are part of what a result depends on).
    train_args: tuple[str, ...] = ()

    def key(self) -> dict[str, Any]:
        """What a recorded result depends on (seeds are not: adding one reuses the others; no
        launcher arguments keep the key of a comparison made before they could be given)."""
        return {
            k: v
            for k, v in asdict(self).items()
            if k != "seeds" and not (k == "train_args" and not v)
        }


@dataclass(frozen=True)
class Job:
    kind: str  # grid (validation) | test
    arm: Arm
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.arm.name}|{self.lr:g}|{self.seed}"

    def __str__(self) -> str:
        return f"{self.kind} {self.arm.name} lr {self.lr:g} seed {self.seed}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Store:
    """The results file: one JSON object per line, rewritten atomically on every append; rows of
    another protocol (a hash here; the benchmark's settings dict) are kept and ignored."""

    def __init__(self, path: Path, protocol: Any) -> None:
        self.path = path
        self.protocol = protocol
        self.rows = read_jsonl(path) if path.is_file() else []

    def mine(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row.get("protocol") == self.protocol]

    def find(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.mine() if all(r.get(k) == v for k, v in match.items())]

    def get(self, key: str) -> dict[str, Any] | None:
        return next(iter(self.find(key=key)), None)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append({**row, "protocol": self.protocol})
        write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


class Comparison:
    """One comparison: the user's config and test file, the output folder, the settings."""

    def __init__(
        self,
        config_path: Path,
        test_path: Path,
        out: Path,
        settings: Settings,
        cwd: Path,
        say: Callable[[str], None] = print,
    ) -> None:
        self.config_path, self.out, self.settings = config_path, out, settings
        self.cwd, self.say = cwd, say
        self.config: dict[str, Any] = yaml.safe_load(config_path.read_text()) or {}
        train_path = local_dataset(self.config, config_path, cwd)
        names = (str(train_path), str(test_path))
        self.splits: Splits = split(
            read_rows(train_path), read_rows(test_path), settings.val_size, names=names
        )
        self.arms = derive_arms(self.config, config_path, settings.factor, settings.yours)
        protocol = {
            "config": self.protocol_config(),
            "data": self.splits.content_hash,
            "settings": self.settings.key(),
            "arms": [asdict(arm) for arm in self.arms],
        }
        digest = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()
        self.hash = digest[:16]
        self.work = out / "runs" / self.hash
        # The datasets library caches what it reads; the cache stays in the output folder too.
        self.env = {"HF_DATASETS_CACHE": str((self.work / "hf_datasets").resolve())}
        self.store = Store(out / RESULTS, self.hash)
        self.scorers: dict[str, SplitScorer] = {}

    # ------------------------------------------------------------------ configs

    def protocol_config(self) -> dict[str, Any]:
        """The user's config without what the protocol replaces or removes."""
        config = copy.deepcopy(self.config)
        for key in ("output_dir", "dataset_prepared_path", "learning_rate", "seed", "max_steps"):
            config.pop(key, None)
        config["datasets"][0].pop("path", None)
        return {k: v for k, v in config.items() if not PUBLISHING_KEYS.match(k)}

    def base_config(self) -> dict[str, Any]:
        """The user's config with the protocol's data, budget and folders; nothing published."""
        config = self.protocol_config()
        config["datasets"][0]["path"] = str((self.work / "train.jsonl").resolve())
        return {
            **config,
            "val_set_size": 0,
            "max_steps": self.settings.steps,
            "dataset_prepared_path": str((self.work / "prepared").resolve()),
            "auto_resume_from_checkpoints": True,
        }

    def run_dir(self, job: Job) -> Path:
        return self.work / slug(job.arm.name) / f"lr{job.lr:g}_seed{job.seed}"

    def run_config(self, job: Job) -> dict[str, Any]:
        config = job.arm.config(self.base_config(), job.seed)
        config.update(
            learning_rate=job.lr,
            seed=job.seed,
            output_dir=str(self.run_dir(job).resolve()),
        )
        return config

    # ------------------------------------------------------------------ the plan

    def grid(self, arm: Arm) -> dict[float, float]:
        """{lr: validation score, higher is better (minus the answer loss)} at seed 0."""
        rows = [r for r in self.store.mine() if r["kind"] == "grid" and r["arm"] == arm.name]
        return {row["lr"]: -row["val_nll"] for row in rows}

    def chosen_lr(self, arm: Arm) -> float | None:
        grid = self.grid(arm)
        if lrs_to_run(grid, list(self.settings.lrs), self.settings.lr_bounds):
            return None
        return choose_lr(grid)[0]

    def jobs(self) -> Iterator[Job]:
        """Every job whose inputs exist, in order (a job that waits on the grid is held back)."""
        for arm in self.arms:
            for lr in lrs_to_run(self.grid(arm), list(self.settings.lrs), self.settings.lr_bounds):
                yield Job("grid", arm, lr, self.settings.seeds[0])
        for seed in self.settings.seeds:
            for arm in self.arms:
                lr = self.chosen_lr(arm)
                if lr is not None:
                    yield Job("test", arm, lr, seed)

    def next_job(self) -> Job | None:
        return next((job for job in self.jobs() if self.store.get(job.key) is None), None)

    def trainings_left(self) -> int:
        """Trainings still to run as planned now (a grid extended past an edge adds more)."""
        grid = sum(
            len(lrs_to_run(self.grid(arm), list(self.settings.lrs), self.settings.lr_bounds))
            for arm in self.arms
        )
        seeds_left = [
            (arm, seed)
            for arm in self.arms
            for seed in self.settings.seeds[1:]
            if not any(
                r["kind"] == "test" and r["arm"] == arm.name and r["seed"] == seed
                for r in self.store.mine()
            )
        ]
        return grid + len(seeds_left)

    def measured_seconds(self) -> list[float]:
        """Wall seconds of every recorded training (seed 0's test row reuses its grid run)."""
        first = self.settings.seeds[0]
        rows = self.store.mine()
        return [r["wall_seconds"] for r in rows if r["kind"] == "grid" or r["seed"] != first]

    def estimate(self) -> str:
        seconds = self.measured_seconds()
        if not seconds:
            return "unknown until the first training finishes (then an ETA follows each run)"
        per_run = sum(seconds) / len(seconds)
        return f"about {self.trainings_left() * per_run / 60:.0f} min ({per_run:.0f} s per run)"

    def describe(self) -> list[str]:
        s = self.settings
        lines = [
            f"config {self.config_path}; protocol {self.hash}; output {self.out}",
            f"rows: {len(self.splits.train)} train, {len(self.splits.val)} validation (taken "
            f"from the training data), {len(self.splits.test)} test; disjoint by content",
            f"every run: {s.steps} steps; LR grid {', '.join(f'{lr:g}' for lr in s.lrs)} at seed "
            f"{s.seeds[0]}{' (extended past an edge)' if len(s.lrs) > 1 else ''}, then seeds "
            f"{', '.join(map(str, s.seeds))}",
            f"each run: axolotl train CONFIG {' '.join(s.train_args)}".rstrip(),
            "arms:",
        ]
        for arm in self.arms:
            settings = {**arm.overrides, "fish_mask": arm.fish_mask}
            equal = "" if arm.equal else " (its own budget, not the equal-entries comparison)"
            lines.append(f"  {arm.name}: {json.dumps(settings)}{equal}")
        return lines

    def dry_run(self) -> None:
        for line in self.describe():
            self.say(line)
        self.say("runs to train now (the rest follow from the grid's choice):")
        for job in self.jobs():
            if self.store.get(job.key) is None and finished(self.run_dir(job)) is None:
                self.say(f"  {job}")
        self.say(f"trainings left: {self.trainings_left()}; time: {self.estimate()}")

    # ------------------------------------------------------------------ running

    def prepare(self) -> None:
        """The results file first (it marks the folder as a comparison's), then the splits."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.store.path.is_file():
            write_text_atomically(self.store.path, "")
        self.work.mkdir(parents=True, exist_ok=True)
        for name in ("train", "val", "test"):
            text = jsonl_text(getattr(self.splits, name))
            path = self.work / f"{name}.jsonl"
            if not path.is_file() or path.read_text() != text:
                write_text_atomically(path, text)

    def tokenized(self, name: str) -> list[Row]:
        """The split's rows as `axolotl preprocess` tokenizes them with the config's dataset
        settings (cached in the run folder)."""
        cache = self.work / f"{name}_tokens.json"
        if not cache.is_file():
            config = {
                k: v for k, v in self.base_config().items() if k not in ("plugins", "fish_mask")
            }
            config["datasets"][0]["path"] = str((self.work / f"{name}.jsonl").resolve())
            config["dataset_prepared_path"] = str((self.work / f"prepared_{name}").resolve())
            config["sample_packing"] = False
            config["learning_rate"] = self.settings.lrs[0]  # required by the schema, unused
            config["output_dir"] = str((self.work / f"tokenize_{name}").resolve())
            run_axolotl("preprocess", config, self.work / f"tokenize_{name}", self.cwd, self.env)
            from datasets import load_from_disk

            folder = next((self.work / f"prepared_{name}").rglob("dataset_info.json")).parent
            data = load_from_disk(str(folder))
            rows = [[r["input_ids"], r["labels"]] for r in data]
            write_text_atomically(cache, json.dumps(rows))
        rows = [Row(ids, labels) for ids, labels in json.loads(cache.read_text())]
        total = len(getattr(self.splits, name))
        if len(rows) < total:
            self.say(
                f"note: axolotl kept {len(rows)} of {total} {name} rows (too long or no answer)"
            )
        return rows

    def scorer(self, name: str) -> SplitScorer:
        if name not in self.scorers:
            s = self.settings
            rows = self.tokenized(name)
            base = str(self.config["base_model"])
            self.scorers[name] = SplitScorer(rows, base, self.cwd, s.max_answers, s.exact_match)
        return self.scorers[name]

    def run(self) -> None:
        """Every job, in order, until none is left; progress and ETA on the console."""
        self.prepare()
        for line in self.describe():
            self.say(line)
        done = 0
        while (job := self.next_job()) is not None:
            trains = finished(self.run_dir(job)) is None
            label = f"[run {done + 1} of {done + self.trainings_left()}]" if trains else "[score]"
            self.say(f"{label} {job}")
            row = self.run_job(job)
            self.store.append(row)
            done += int(trains)
            split_name = "val" if job.kind == "grid" else "test"
            self.say(f"  {split_name} loss {row[f'{split_name}_nll']:.4f}; left: {self.estimate()}")
            if job.kind == "test":
                self.report()
        for line in self.report():
            self.say(line)

    def report(self) -> list[str]:
        """Rewrite out/compare.md and out/compare.png; returns the verdict and tables."""
        arms = [arm.name for arm in self.arms]
        rows = self.store.mine()
        return write_report(rows, arms, list(self.settings.seeds), self.describe(), self.out)

    def run_job(self, job: Job) -> dict[str, Any]:
        from axolotl_fish.masks.file import FishMask

        run_dir = self.run_dir(job)
        timing = train(self.run_config(job), run_dir, self.cwd, self.env, self.settings.train_args)
        row: dict[str, Any] = {
            "key": job.key,
            "kind": job.kind,
            "arm": job.arm.name,
            "lr": job.lr,
            "seed": job.seed,
            "steps": self.settings.steps,
            "k": FishMask.load(run_dir).k,
            **timing,
        }
        self.check_equal_entries(job.arm, row["k"])
        split_name = "val" if job.kind == "grid" else "test"
        row |= self.scorer(split_name).score(run_dir, split_name)
        return row

    def check_equal_entries(self, arm: Arm, k: int) -> None:
        """Every equal-budget arm trains exactly the dense arm's entries (checked on the masks)."""
        if not arm.equal:
            return
        equal = {a.name for a in self.arms if a.equal} - {arm.name}
        recorded = {r["arm"]: r["k"] for r in self.store.mine() if r["arm"] in equal}
        for name, other in recorded.items():
            if other != k:
                raise RuntimeError(
                    f"{arm.name} trains {k:,} entries but {name} trains {other:,}: the arms are "
                    "not at an equal budget"
                )
