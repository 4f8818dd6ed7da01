"""The end of `make demo`: what the adapter changed, and where its mask went.

After `axolotl train CONFIG` it scores held-out rows with the base model and with the trained
adapter (`output_dir`), prints both accuracies, and writes the mask's heatmap as a PNG beside the
adapter. A row is classified by the next token after its prompt: the prompt is built by Axolotl's
own alpaca prompter (as in training), and the label whose (first) token the model finds more
likely right after it is the prediction; nothing is generated or parsed. The prompts' common
beginning (the alpaca template and the instruction) is run once and its key/value cache reused,
so each row costs a forward over its own review only.

    python -m axolotl_fish.demo.report CONFIG --test TEST.jsonl [--rows 300]
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

from axolotl_fish.masks.file import MASK_FILENAME, FishMask
from axolotl_fish.reports.heatmap import HEATMAP_FILENAME, heatmap_title, save_heatmap


def common_prefix(sequences: list[list[int]]) -> list[int]:
    """The longest list every sequence starts with."""
    length = 0
    for column in zip(*sequences, strict=False):
        if len(set(column)) > 1:
            break
        length += 1
    return sequences[0][:length]


@torch.no_grad()
def next_token_logprobs(
    model: nn.Module,
    prompts: list[list[int]],
    tokens: list[int],
    pad_id: int,
    batch_size: int = 16,
    desc: str = "scoring",
) -> torch.Tensor:
    """[prompts, tokens]: log-probability of each of `tokens` right after each prompt."""
    shared = common_prefix(prompts)[: min(len(p) for p in prompts) - 1]  # each keeps a token
    prefix = (
        model(input_ids=torch.tensor([shared]), use_cache=True).past_key_values if shared else None
    )
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        rests = [p[len(shared) :] for p in prompts[start : start + batch_size]]
        width = max(len(rest) for rest in rests)
        input_ids = torch.tensor([rest + [pad_id] * (width - len(rest)) for rest in rests])
        attention = torch.tensor([[1] * len(rest) + [0] * (width - len(rest)) for rest in rests])
        cache = copy.deepcopy(prefix)
        if cache is not None:
            cache.batch_repeat_interleave(len(rests))
        logits = model(
            input_ids=input_ids,
            attention_mask=torch.cat(
                [torch.ones(len(rests), len(shared), dtype=torch.long), attention], 1
            ),
            position_ids=len(shared) + torch.arange(width).expand(len(rests), -1),
            past_key_values=cache,
        ).logits
        last = logits[torch.arange(len(rests)), attention.sum(1) - 1].float()
        out.append(last.log_softmax(-1)[:, tokens])
    return torch.cat(out)


def read_rows(path: Path, n_rows: int) -> list[dict[str, str]]:
    """The first `n_rows` alpaca rows (`instruction`, `input`, `output`) of a JSON-lines file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no rows.")
    return rows[:n_rows]


class HeldOutAccuracy:
    """Accuracy of a model on alpaca rows whose `output` is one of a few labels, each starting
    with its own token."""

    def __init__(self, tokenizer_dir: Path, rows: list[dict[str, str]]) -> None:
        from axolotl.prompters import AlpacaPrompter
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        prompter = AlpacaPrompter()
        self.labels = sorted({row["output"] for row in rows})
        self.gold = torch.tensor([self.labels.index(row["output"]) for row in rows])
        self.prompts = [
            tokenizer(next(prompter.build_prompt(row["instruction"], row["input"])))["input_ids"]
            for row in rows
        ]
        self.tokens = [
            tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in self.labels
        ]
        if len(set(self.tokens)) < len(self.tokens):
            raise ValueError(f"The labels {self.labels} do not all start with different tokens.")
        eos = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def __call__(self, model: nn.Module, desc: str) -> float:
        scores = next_token_logprobs(
            model.eval(), self.prompts, self.tokens, self.pad_id, desc=desc
        )
        return float((scores.argmax(dim=1) == self.gold).float().mean())


def report(config_path: Path, test_path: Path, n_rows: int) -> str:
    """Accuracy of the base model and of the adapter in the config's `output_dir`, and the
    heatmap PNG written there; returns the lines to print."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = yaml.safe_load(config_path.read_text())
    base_model, output_dir = Path(cfg["base_model"]), Path(cfg["output_dir"])
    rows = read_rows(test_path, n_rows)
    accuracy = HeldOutAccuracy(base_model, rows)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    base = accuracy(model, "base model")
    trained = accuracy(PeftModel.from_pretrained(model, output_dir), "trained adapter")
    mask = FishMask.load(output_dir / MASK_FILENAME)
    png = save_heatmap(mask, output_dir / HEATMAP_FILENAME, heatmap_title(mask, str(output_dir)))
    labels = sorted(Counter(row["output"] for row in rows).items())
    counts = ", ".join(f"{n} {label}" for label, n in labels)
    return "\n".join(
        [
            f"Held-out accuracy on {len(rows)} reviews of {test_path} ({counts}); the "
            f"prediction is the more likely label token after the prompt:",
            f"  base model       {base:.1%}   ({base_model})",
            f"  trained adapter  {trained:.1%}   ({output_dir}: {mask.k:,} of {mask.total:,} "
            f"adapter entries trained)",
            f"Mask heatmap (layers down, module types across, colour = fraction selected): {png}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the Axolotl config that was trained")
    parser.add_argument("--test", type=Path, required=True, help="held-out alpaca JSON lines")
    parser.add_argument("--rows", type=int, default=300, help="how many held-out rows to score")
    args = parser.parse_args(argv)
    print(report(args.config, args.test, args.rows))


if __name__ == "__main__":
    main()
