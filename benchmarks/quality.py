"""Equal-budget quality benchmark: dense LoRA vs LoRA-FISH vs random vs reverse masks.

Every run is a real `axolotl train` of a generated config with the plugin, on the demo model and
data (`make demo` builds them). Held-out accuracy is scored by label log-likelihood: for each
test prompt the model's summed log-probability of every label (plus EOS) is compared, and the
most likely label is the prediction; no generation, no parsing.

Results go to `<out>/quality_runs.jsonl` one line per finished run, so an interrupted benchmark
resumes where it stopped; the table and plots are rebuilt from that file at the end.

    .venv/bin/python benchmarks/quality.py            # default: 3 seeds, about 90 min on 2 cores
    .venv/bin/python benchmarks/quality.py --quick    # smoke check: 1 seed, fewer runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from common import CACHE, TARGETS, machine

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class Method:
    """One training configuration: a LoRA rank and its `fish_mask:` block.

    Dense LoRA runs also carry the plugin, with `keep_ratio: 1.0, strategy: random` (every entry
    trains, no Fisher pass): the plugin seeds the adapter's initialisation, which plain Axolotl
    does not, so every method of one seed starts from the same adapter and sees the same batches.
    """

    name: str
    rank: int
    fish_mask: dict[str, Any]
    group: str  # "equal budget" | "sweep" | "reference"
    in_sweep: bool = False

    @property
    def strategy(self) -> str:
        return "dense" if self.fish_mask.get("keep_ratio") == 1.0 else self.fish_mask["strategy"]

    @property
    def remedy(self) -> str:
        if not self.fish_mask.get("warmup_steps"):
            return "none"
        return "warm-up+restore" if self.fish_mask["restore_after_warmup"] else "warm-up"


DENSE = {"keep_ratio": 1.0, "strategy": "random"}


def methods(rank: int, warmup: int, ratios: list[float], quick: bool) -> list[Method]:
    """Dense rank r; rank 2r masked to rank r's entry count by each strategy, with and without
    the zero-B remedies; a keep-ratio sweep of LoRA-FISH at rank 2r (warm-up + restore)."""
    remedies: list[tuple[str, dict[str, Any]]] = [
        ("", {}),
        (f", warm-up {warmup}+restore", {"warmup_steps": warmup, "restore_after_warmup": True}),
        (f", warm-up {warmup} kept", {"warmup_steps": warmup, "restore_after_warmup": False}),
    ]
    strategies = ("fisher", "random") if quick else ("fisher", "random", "reverse")
    out = [Method(f"dense LoRA r{rank}", rank, DENSE, "equal budget")]
    for index, (suffix, remedy) in enumerate(remedies[: 2 if quick else 3]):
        # Without restore every entry moved during the warm-up: only fisher vs random is asked.
        for strategy in strategies[:2] if index == 2 else strategies:
            out.append(
                Method(
                    f"{strategy} r{2 * rank}->r{rank}{suffix}",
                    2 * rank,
                    {"match_rank": rank, "strategy": strategy, **remedy},
                    "equal budget",
                    in_sweep=strategy == "fisher" and index == 1,
                )
            )
    for ratio in ratios:
        mask = {"keep_ratio": ratio, "strategy": "fisher", **remedies[1][1]}
        out.append(Method(f"fisher r{2 * rank} keep {ratio:g}", 2 * rank, mask, "sweep", True))
    out.append(Method(f"dense LoRA r{2 * rank}", 2 * rank, DENSE, "reference", True))
    return out


def config_for(method: Method, seed: int, args: argparse.Namespace, out_dir: Path) -> dict:
    """An ordinary Axolotl LoRA config; only `lora_r` and `fish_mask` vary between methods."""
    fish_mask = {"num_samples": args.num_samples, "seed": seed, **method.fish_mask}
    return {
        "base_model": str(args.model.resolve()),
        "datasets": [{"path": str(args.train_file.resolve()), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str((args.work / "prepared").resolve()),
        "val_set_size": 0,
        "sequence_len": 256,
        "pad_to_multiple_of": 8,
        "adapter": "lora",
        "lora_r": method.rank,
        "lora_alpha": 2 * method.rank,
        "lora_dropout": 0.05,
        "lora_target_modules": TARGETS,
        "plugins": ["axolotl_fish.FishMaskPlugin"],
        "fish_mask": fish_mask,
        "micro_batch_size": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "optimizer": "adamw_torch",
        "learning_rate": args.lr,
        "lr_scheduler": "cosine",
        "warmup_steps": max(1, args.steps // 10),
        "weight_decay": 0.0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "seed": seed,
        "output_dir": str(out_dir.resolve()),
        "logging_steps": 5,
        "save_strategy": "no",  # the final adapter and mask are written to output_dir anyway
    }


def train(config: dict, run_dir: Path) -> float:
    """`axolotl train` in a subprocess; the log goes to run_dir/train.log. Returns wall seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, **OFFLINE}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    start = time.perf_counter()
    with (run_dir / "train.log").open("w") as log:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "axolotl"), "train", str(config_path)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if result.returncode != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"axolotl train failed for {config_path}:\n{tail}")
    return time.perf_counter() - start


class LabelScorer:
    """Held-out accuracy by comparing the log-likelihood of each label after the prompt.

    Each prompt is read once (left-padded, positions counted from its first real token) and every
    label continues from a copy of its key/value cache: the cost is one forward per test row.
    """

    def __init__(self, model_path: Path, rows: list[dict], batch: int = 16) -> None:
        from axolotl.prompters import AlpacaPrompter
        from transformers import AutoTokenizer

        self.model_path = model_path
        self.batch = batch
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.labels = sorted({row["output"] for row in rows})
        self.gold = torch.tensor([self.labels.index(row["output"]) for row in rows])
        self.label_ids = [
            tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for label in self.labels
        ]
        prompter = AlpacaPrompter()
        self.prompts = [
            tokenizer(next(prompter.build_prompt(row["instruction"], row["input"])))["input_ids"]
            for row in rows
        ]
        self.pad = tokenizer.pad_token_id or tokenizer.eos_token_id

    def load(self, adapter_dir: Path | None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
        return model.eval()

    @torch.no_grad()
    def accuracy(self, adapter_dir: Path | None) -> float:
        model = self.load(adapter_dir)
        scores = []
        for start in range(0, len(self.prompts), self.batch):
            scores.append(self._label_logprobs(model, self.prompts[start : start + self.batch]))
        predicted = torch.cat(scores).argmax(dim=1)
        return float((predicted == self.gold).float().mean())

    def _label_logprobs(self, model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
        """[rows, labels]: summed log-probability of each label's tokens after each prompt."""
        width = max(len(ids) for ids in prompts)
        input_ids = torch.tensor([[self.pad] * (width - len(ids)) + ids for ids in prompts])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        first = out.logits[:, -1].log_softmax(-1)
        columns = []
        for ids in self.label_ids:
            label = torch.tensor(ids).expand(len(prompts), -1)
            total = first[:, ids[0]]
            if len(ids) > 1:
                rest = model(
                    input_ids=label[:, :-1],
                    attention_mask=torch.cat([attention, torch.ones_like(label)], dim=1)[:, :-1],
                    position_ids=positions[:, -1:] + 1 + torch.arange(len(ids) - 1),
                    past_key_values=copy.deepcopy(out.past_key_values),
                ).logits.log_softmax(-1)
                total = total + rest.gather(-1, label[:, 1:, None]).squeeze(-1).sum(-1)
            columns.append(total)
        return torch.stack(columns, dim=1)


def split(args: argparse.Namespace) -> tuple[Path, list[dict]]:
    """The training file and the held-out rows: `--test`, or a seeded split of `--data`."""
    if args.test is not None:
        rows = [json.loads(line) for line in args.test.read_text().splitlines() if line.strip()]
        random.Random(0).shuffle(rows)
        return args.data, rows[: args.eval_size]
    lines = [line for line in args.data.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(lines)
    held_out, kept = lines[: args.eval_size], lines[args.eval_size :]
    train_file = args.work / "train.jsonl"
    train_file.parent.mkdir(parents=True, exist_ok=True)
    train_file.write_text("\n".join(kept) + "\n")
    return train_file, [json.loads(line) for line in held_out]


def mask_counts(run_dir: Path) -> tuple[int, int]:
    """(k, total) from the saved mask's metadata."""
    from safetensors import safe_open

    with safe_open(run_dir / "fish_mask.safetensors", "pt") as f:
        meta = f.metadata()
    return int(meta["k"]), int(meta["total"])


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def grouped(results: list[dict]) -> dict[str, list[dict]]:
    """Rows by method, in the order methods first appear, each sorted by seed."""
    by_method: dict[str, list[dict]] = {}
    for row in results:
        by_method.setdefault(row["method"], []).append(row)
    return {name: sorted(rows, key=lambda r: r["seed"]) for name, rows in by_method.items()}


def table(by_method: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| method | group | trainable entries | share of rank 2r | accuracy | std | per seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rows in by_method.items():
        accs = [row["accuracy"] for row in rows]
        mean, std = mean_std(accs)
        lines.append(
            f"| {name} | {rows[0]['group']} | {rows[0]['k']:,} | {rows[0]['fraction']:.3f} | "
            f"{mean:.3f} | {std:.3f} | {' '.join(f'{a:.3f}' for a in accs)} |"
        )
    return lines


def plot(by_method: dict[str, list[dict]], untrained: float, out: Path) -> None:
    """quality_methods.png (equal budget) and quality_keep_ratio.png (the FISH sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    equal = {name: rows for name, rows in by_method.items() if rows[0]["group"] == "equal budget"}
    colors = {"fisher": "C0", "random": "C1", "reverse": "C3", "dense": "C2"}
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(equal) + 1.6))
    for i, rows in enumerate(equal.values()):
        accs = [row["accuracy"] for row in rows]
        mean, std = mean_std(accs)
        ax.barh(i, mean, xerr=std, color=colors[rows[0]["strategy"]], alpha=0.75, capsize=3)
        ax.plot(accs, [i] * len(accs), "k.", markersize=5)
    ax.axvline(untrained, color="grey", linestyle="--", label=f"untrained ({untrained:.3f})")
    ax.set_yticks(range(len(equal)), list(equal))
    ax.invert_yaxis()
    low = min([untrained] + [r["accuracy"] for rows in equal.values() for r in rows])
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel("held-out accuracy (bar: mean +- std over seeds; dots: seeds)")
    ax.set_title("Equal number of trainable entries")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "quality_methods.png", dpi=110)
    plt.close(fig)

    sweep = sorted(
        (rows for rows in by_method.values() if rows[0]["in_sweep"]),
        key=lambda rows: rows[0]["fraction"],
    )
    stats = [mean_std([row["accuracy"] for row in rows]) for rows in sweep]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.errorbar(
        [rows[0]["fraction"] for rows in sweep],
        [mean for mean, _ in stats],
        yerr=[std for _, std in stats],
        marker="o",
        capsize=3,
        label="LoRA-FISH (rank 2r, warm-up + restore); 1.0 = dense",
    )
    ax.axhline(untrained, color="grey", linestyle="--", label="untrained")
    ax.set_xscale("log")
    ax.set_xlabel("trainable entries / entries of the rank-2r adapter")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("LoRA-FISH: accuracy vs proportion of trainable entries")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_keep_ratio.png", dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2-135m")
    parser.add_argument("--data", type=Path, default=CACHE / "sentiment" / "train.jsonl")
    parser.add_argument(
        "--test",
        type=Path,
        help="held-out alpaca JSONL (default: test.jsonl beside the default data; with another "
        "--data, a seeded split of it)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8, help="r: dense rank = masked budget")
    parser.add_argument("--warmup", type=int, default=5, help="fish_mask.warmup_steps")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.02, 0.1])
    parser.add_argument("--num-samples", type=int, default=64, help="fish_mask.num_samples")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("outputs/quality"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer steps and methods")
    parser.add_argument(
        "--report",
        action="store_true",
        help="no training: rebuild the table and plots from the runs recorded so far",
    )
    args = parser.parse_args()
    if args.test is None and args.data == CACHE / "sentiment" / "train.jsonl":
        args.test = CACHE / "sentiment" / "test.jsonl"
    if args.quick:
        args.seeds, args.steps, args.ratios = args.seeds[:1], min(args.steps, 10), [0.1]
        args.work, args.out = args.work / "quick", args.out / "quick"
    return args


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_file, held_out = split(args)
    args.train_file = train_file
    scorer = LabelScorer(args.model, held_out)
    results_path = args.out / "quality_runs.jsonl"
    settings = {
        k: v
        for k, v in vars(args).items()
        if k in ("steps", "micro_batch", "lr", "num_samples", "eval_size")
    }
    done = {
        (row.get("method"), row.get("seed"))
        for row in load_results(results_path)
        if row["settings"] == settings
    }
    # The equal-budget comparison first, for every seed; then the extras: a stopped run leaves
    # the main table complete (and a rerun of the same command finishes the rest).
    every = methods(args.rank, args.warmup, args.ratios, args.quick)
    plan = [
        (method, seed)
        for extras in (False, True)
        for seed in args.seeds
        for method in every
        if (method.group != "equal budget" or method.remedy == "warm-up") == extras
        and (method.name, seed) not in done
    ]
    start = time.perf_counter()
    untrained = untrained_accuracy(scorer, results_path, settings)
    for index, (method, seed) in enumerate([] if args.report else plan, 1):
        run_dir = args.work / f"seed{seed}" / method.name.replace(" ", "_").replace(">", "")
        seconds = train(config_for(method, seed, args, run_dir), run_dir)
        accuracy = scorer.accuracy(run_dir)
        k, total = mask_counts(run_dir)
        append(
            results_path,
            {
                "method": method.name,
                "group": method.group,
                "strategy": method.strategy,
                "remedy": method.remedy,
                "in_sweep": method.in_sweep,
                "rank": method.rank,
                "seed": seed,
                "k": k,
                "fraction": k * method.rank / (total * 2 * args.rank),
                "accuracy": accuracy,
                "train_seconds": round(seconds, 1),
                "settings": settings,
            },
        )
        elapsed = time.perf_counter() - start
        eta = elapsed / index * (len(plan) - index)
        print(
            f"[{index}/{len(plan)}] seed {seed} {method.name}: accuracy {accuracy:.3f}, "
            f"k {k:,}, train {seconds:.0f} s; elapsed {elapsed / 60:.1f} min, "
            f"eta {eta / 60:.1f} min",
            flush=True,
        )
    results = [
        row
        for row in load_results(results_path)
        if row["settings"] == settings and row["group"] != "untrained"
    ]
    by_method = grouped(results)
    plot(by_method, untrained, args.out)
    seeds = sorted({row["seed"] for row in results})
    lines = [
        f"Held-out accuracy on {len(held_out)} rows (label log-likelihood); {args.steps} steps x "
        f"micro-batch {args.micro_batch}, lr {args.lr:g}, Fisher samples {args.num_samples}, "
        f"seeds {seeds}; untrained model {untrained:.3f}.",
        "",
        *table(by_method),
        "",
        f"{machine()}; {len(results)} trainings, `axolotl train` wall time "
        f"{sum(row['train_seconds'] for row in results) / 60:.1f} min in all"
        + (f"; not yet run: {len(plan)}." if args.report and plan else "."),
    ]
    (args.out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def untrained_accuracy(scorer: LabelScorer, results_path: Path, settings: dict) -> float:
    """The base model's accuracy, measured once per settings and kept in the results file."""
    for row in load_results(results_path):
        if row["group"] == "untrained" and row["settings"] == settings:
            return row["accuracy"]
    accuracy = scorer.accuracy(None)
    append(results_path, {"group": "untrained", "accuracy": accuracy, "settings": settings})
    print(f"untrained accuracy {accuracy:.3f}", flush=True)
    return accuracy


def append(results_path: Path, row: dict) -> None:
    with results_path.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
