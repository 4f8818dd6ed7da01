"""Held-out scoring of a trained adapter on tokenized rows (input_ids + labels, as `axolotl
preprocess` makes them: -100 on the prompt).

- answer loss: mean negative log-likelihood of a row's answer tokens (its labels), every row;
- accuracy, when the answers form a small closed set: each candidate answer's summed
  log-probability after the row's prompt is compared and the most likely one is the prediction
  (no generation, no parsing). Each prompt is read once, left-padded, and every candidate
  continues from a copy of its key/value cache;
- exact match (on request): greedy generation of as many tokens as the answer has, decoded and
  compared with the answer, whitespace stripped.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass(frozen=True)
class Row:
    input_ids: list[int]
    labels: list[int]

    @property
    def answer_start(self) -> int:
        return next(i for i, label in enumerate(self.labels) if label != IGNORE)

    @property
    def prompt(self) -> list[int]:
        return self.input_ids[: self.answer_start]

    @property
    def answer(self) -> tuple[int, ...]:
        """The answer tokens, when they are one run at the end of the row (else empty)."""
        start = self.answer_start
        tail = self.labels[start:]
        return tuple(tail) if IGNORE not in tail else ()


def closed_set(rows: list[Row], max_answers: int) -> list[tuple[int, ...]] | None:
    """The distinct answers, sorted, when every row has one run of answer tokens at its end and
    there are 2 to `max_answers` of them; else None (no accuracy)."""
    answers = {row.answer for row in rows}
    if () in answers or not 2 <= len(answers) <= max_answers:
        return None
    return sorted(answers)


def load_model(base_model: str | Path, adapter_dir: Path | None, device: str) -> nn.Module:
    """The base model in fp32 with the adapter saved in `adapter_dir` (PEFT, or the plugin's
    bottleneck adapter), in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from axolotl_fish.adapters.bottleneck import load_bottleneck

    logging.disable_progress_bar()  # the console carries the comparison's own lines only
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    if adapter_dir is not None and (adapter_dir / "bottleneck_config.json").is_file():
        model = load_bottleneck(model, adapter_dir)
    elif adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.to(device).eval()


def by_length(lengths: list[int], batch: int) -> list[list[int]]:
    """Row indices in batches of similar length (padding a random batch wastes half its work)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch] for start in range(0, len(order), batch)]


@torch.no_grad()
def answer_nll(model: nn.Module, rows: list[Row], pad: int, batch: int = 8) -> torch.Tensor:
    """[rows]: mean negative log-likelihood of each row's answer tokens."""
    device = next(model.parameters()).device
    out = torch.empty(len(rows))
    for chunk in by_length([len(row.input_ids) for row in rows], batch):
        width = max(len(rows[i].input_ids) for i in chunk)
        ids = torch.tensor(
            [rows[i].input_ids + [pad] * (width - len(rows[i].input_ids)) for i in chunk]
        )
        labels = torch.tensor(
            [rows[i].labels + [IGNORE] * (width - len(rows[i].labels)) for i in chunk]
        )
        attention = torch.tensor(
            [[1] * len(rows[i].input_ids) + [0] * (width - len(rows[i].input_ids)) for i in chunk]
        )
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        target = labels[:, 1:].to(device)
        nll = nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), target.clamp(min=0), reduction="none"
        )
        keep = target != IGNORE
        out[chunk] = ((nll * keep).sum(1) / keep.sum(1)).cpu()
    return out


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, position_ids) of left-padded prompts, positions counted from
    each prompt's first real token."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    return input_ids, attention, (attention.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def answer_logprobs(
    model: nn.Module, prompts: list[list[int]], answers: list[list[int]], pad: int
) -> torch.Tensor:
    """[prompts, answers]: summed log-probability of each answer's tokens after each prompt."""
    device = next(model.parameters()).device
    input_ids, attention, positions = (t.to(device) for t in left_padded(prompts, pad))
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    first = out.logits[:, -1].float().log_softmax(-1)
    columns = []
    for ids in answers:
        answer = torch.tensor(ids, device=device).expand(len(prompts), -1)
        total = first[:, ids[0]]
        if len(ids) > 1:
            rest = (
                model(
                    input_ids=answer[:, :-1],
                    attention_mask=torch.cat([attention, torch.ones_like(answer)], dim=1)[:, :-1],
                    position_ids=positions[:, -1:] + 1 + torch.arange(len(ids) - 1, device=device),
                    past_key_values=copy.deepcopy(out.past_key_values),
                )
                .logits.float()
                .log_softmax(-1)
            )
            total = total + rest.gather(-1, answer[:, 1:, None]).squeeze(-1).sum(-1)
        columns.append(total)
    return torch.stack(columns, dim=1).cpu()


def closed_set_scores(
    model: nn.Module, prompts: list[list[int]], answers: list[list[int]], pad: int, batch: int = 16
) -> torch.Tensor:
    """[rows, answers]: summed log-probability of each of `answers` after each prompt (the most
    likely one is the prediction)."""
    scores = torch.empty(len(prompts), len(answers))
    for chunk in by_length([len(p) for p in prompts], batch):
        scores[chunk] = answer_logprobs(model, [prompts[i] for i in chunk], answers, pad)
    return scores


@torch.no_grad()
def exact_match(
    model: nn.Module, rows: list[Row], tokenizer: PreTrainedTokenizerBase, batch: int = 8
) -> torch.Tensor:
    """[rows] bool: greedy generation of len(answer) tokens equals the answer (decoded, special
    tokens skipped, whitespace stripped)."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    out = torch.zeros(len(rows), dtype=torch.bool)
    for chunk in by_length([len(rows[i].prompt) for i in range(len(rows))], batch):
        prompts = [rows[i].prompt for i in chunk]
        answers = [[t for t in rows[i].labels if t != IGNORE] for i in chunk]
        input_ids, attention, _ = (t.to(device) for t in left_padded(prompts, pad))
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max(len(a) for a in answers),
            do_sample=False,
            pad_token_id=pad,
        )[:, input_ids.shape[1] :]
        for j, i in enumerate(chunk):
            text = tokenizer.decode(generated[j, : len(answers[j])], skip_special_tokens=True)
            gold = tokenizer.decode(answers[j], skip_special_tokens=True)
            out[i] = text.strip() == gold.strip()
    return out


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad token, or EOS when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def bits(values: torch.Tensor) -> str:
    """A bool tensor as a string of 0 and 1 (the results file's per-row form)."""
    return "".join("1" if v else "0" for v in values.tolist())


class SplitScorer:
    """Scores adapters on one split's tokenized rows: per-row answer loss always, correctness
    when the answers form a closed set of at most `max_answers`, exact match when asked."""

    def __init__(
        self, rows: list[Row], base_model: str, cwd: Path, max_answers: int, exact: bool
    ) -> None:
        from transformers import AutoTokenizer

        local = cwd / base_model
        self.base_model = str(local) if local.exists() else base_model
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        self.rows, self.exact = rows, exact
        self.answers = closed_set(rows, max_answers)
        if self.answers is not None:
            self.gold = torch.tensor([self.answers.index(row.answer) for row in rows])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def score(self, adapter_dir: Path, name: str) -> dict[str, object]:
        """`{name}_nll` (mean), `{name}_nll_rows`, and where they apply `{name}_acc` /
        `{name}_correct`, `{name}_exact_acc` / `{name}_exact`."""
        model = load_model(self.base_model, adapter_dir, self.device)
        pad = pad_id(self.tokenizer)
        out: dict[str, object] = {}
        if self.answers is None:
            nll = answer_nll(model, self.rows, pad)
        else:
            # One pass gives both: the gold answer's log-probability is its loss.
            prompts = [row.prompt for row in self.rows]
            scores = closed_set_scores(model, prompts, [list(a) for a in self.answers], pad)
            gold = scores.gather(1, self.gold[:, None]).squeeze(1)
            nll = -gold / torch.tensor([len(row.answer) for row in self.rows])
            correct = scores.argmax(dim=1) == self.gold
            out |= {f"{name}_acc": float(correct.float().mean()), f"{name}_correct": bits(correct)}
        out |= {
            f"{name}_nll": float(nll.mean()),
            f"{name}_nll_rows": [round(float(v), 5) for v in nll],
        }
        if self.exact:
            exact = exact_match(model, self.rows, self.tokenizer)
            out |= {f"{name}_exact_acc": float(exact.float().mean()), f"{name}_exact": bits(exact)}
        return out
