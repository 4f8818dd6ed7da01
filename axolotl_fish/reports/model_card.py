"""The FISH-Tuning section of an adapter's model card (the README.md the Trainer writes).

It says how the adapter was made, from the mask's own metadata: the strategy, k of the total and
where the budget went (per module type, per matrix such as lora_A vs lora_B), the Fisher
samples, the warm-up, the seed, the `fish_mask:` block that reproduces it, and where the mask
file is. `axolotl fish-mask inspect --card` prints the same section.

The HF Trainer rewrites README.md whenever it makes a card (`create_model_card`, also inside
`push_to_hub` just before the upload), so `add_card_section_on_create` wraps that method: the
section is added every time, before anything is uploaded.

Everything taken from the mask file (its metadata and tensor names: untrusted input) goes into
the card escaped: inline code spans and code blocks whose fences nothing inside can close, one
line each, `|` escaped inside tables.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from transformers import Trainer

from axolotl_fish.config import BUDGET_KEYS
from axolotl_fish.masks.file import MASK_FILENAME, FishMask
from axolotl_fish.reports.summary import matrix, module_type, percent, selected_fractions

CARD_FILENAME = "README.md"
SECTION_START = "<!-- axolotl-fish: FISH-Tuning section -->"
SECTION_END = "<!-- axolotl-fish: end -->"
PAPER = "Xue et al., *FISH-Tuning: Enhancing PEFT Methods with Fisher Information*, 2025"
PROJECT = "axolotl-fish"
# The `fish_mask:` keys a mask's metadata records, in the order a config lists them.
_SETTINGS = (
    "keep_ratio",
    "keep_params",
    "match_rank",
    "strategy",
    "fisher",
    "scope",
    "num_samples",
    "warmup_steps",
    "restore_after_warmup",
    "seed",
    "include",
    "exclude",
)


def fish_mask_settings(mask: FishMask) -> dict[str, Any]:
    """The `fish_mask:` block that computes this mask again (the settings it records)."""
    meta = mask.metadata
    return {key: meta[key] for key in _SETTINGS if meta.get(key) is not None}


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _code(value: Any, in_table: bool = False) -> str:
    """`value` as one inline code span: on one line, fenced by more backticks than any run inside
    it, `|` escaped in a table cell (GFM splits cells before it reads code spans)."""
    text = " ".join(str(value).split())
    if in_table:
        text = text.replace("|", "\\|")
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _code_block(text: str, language: str) -> list[str]:
    """A fenced code block that no line of `text` can close."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return [f"{fence}{language}", text.rstrip(), fence]


def _budget_table(title: str, fractions: dict[str, tuple[int, int]]) -> list[str]:
    lines = [f"| {title} | trained entries | of | share |", "| --- | ---: | ---: | ---: |"]
    lines += [
        f"| {_code(name, in_table=True)} | {kept:,} | {total:,} | {percent(kept, total)} |"
        for name, (kept, total) in fractions.items()
    ]
    return lines


def _warmup(meta: dict[str, Any]) -> str:
    steps = meta.get("warmup_steps")
    if not steps:
        return "none: scored at the adapter's initialisation"
    after = (
        "then every entry was put back to its initial value"
        if meta.get("restore_after_warmup", True)
        else "training started from the warmed adapter"
    )
    return f"{steps} dense steps before scoring; {after}"


def card_section(mask: FishMask, mask_location: str) -> str:
    """The markdown section, between markers; `mask_location` is where the mask file is, as a
    user would write it in `fish_mask.mask_path` (a path or `hf://org/name`)."""
    meta = mask.metadata
    strategy = _code(meta.get("strategy"), in_table=True)
    what = "adapter" if meta.get("peft_type") else "model (full-parameter FISH Mask)"
    examples = meta.get("num_examples")
    samples = (
        f"{examples:,} training examples (of {meta['num_samples']:,} requested)"
        + (f", pass took {meta['fisher_seconds']:.0f} s" if "fisher_seconds" in meta else "")
        if examples is not None
        else f"not used by strategy {strategy}"
    )
    rows = [
        ("strategy", f"{strategy}, scope {_code(meta.get('scope', 'global'), in_table=True)}"),
        ("trained entries", f"k = {mask.k:,} of {mask.total:,} ({percent(mask.k, mask.total)})"),
        ("Fisher samples", samples),
        ("warm-up", _warmup(meta)),
        ("seed", f"{meta.get('seed')}"),
    ]
    if meta.get("dense_outside"):
        rows.append(
            (
                "outside the mask",
                f"{meta['dense_outside']:,} entries trained densely (include "
                f"{_code(json.dumps(meta.get('include')), in_table=True)}, exclude "
                f"{_code(json.dumps(meta.get('exclude')), in_table=True)})",
            )
        )
    for tie in meta.get("tie_breaks", []):
        rows.append(
            (
                "ties",
                f"{tie['chosen']:,} entries drawn at random among {tie['tied']:,} with equal "
                f"score {tie['score']:.3g}",
            )
        )
    if meta.get("axolotl_fish_version"):
        version = _code(meta["axolotl_fish_version"], in_table=True)
        rows.append(("made with", f"{PROJECT} {version}"))
    block = yaml.safe_dump({"fish_mask": fish_mask_settings(mask)}, sort_keys=False)
    budget = {key: meta[key] for key in BUDGET_KEYS if meta.get(key) is not None}
    reuse = yaml.safe_dump({"fish_mask": {**budget, "mask_path": mask_location}}, sort_keys=False)
    lines = [
        SECTION_START,
        "## FISH-Tuning",
        "",
        f"This {what} was trained with FISH-Tuning ({PAPER}; {PROJECT}): only the k entries "
        f"that strategy {_code(meta.get('strategy'))} ranked highest were trained; every other "
        f"entry kept its initial value, bit for bit.",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "Where the budget went:",
        "",
        *_budget_table("module type", selected_fractions(mask.masks, module_type)),
        "",
        *_budget_table("matrix", selected_fractions(mask.masks, matrix)),
        "",
        "To compute such a mask again, add this to the same Axolotl config "
        "(with `plugins: [axolotl_fish.FishMaskPlugin]`):",
        "",
        *_code_block(block, "yaml"),
        "",
        f"The mask itself is `{MASK_FILENAME}` ({_code(mask_location)}); to train with exactly "
        f"these entries:",
        "",
        *_code_block(reuse, "yaml"),
        "",
        f"{_code(f'axolotl fish-mask inspect {mask_location}')} shows it per layer, module type "
        f"and matrix.",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def add_card_section(card: str | os.PathLike[str], mask: FishMask, mask_location: str) -> Path:
    """Put the section into `card` (README.md; created if missing), replacing an earlier one;
    written atomically."""
    path = Path(card)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start != -1 and end > start:
        text = text[:start] + text[end + len(SECTION_END) :].lstrip("\n")
    text = text.rstrip("\n") + "\n\n" if text.strip() else ""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text + card_section(mask, mask_location), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def mask_location(trainer: Trainer) -> str:
    """Where the card says the mask is: the Hub repository the run pushes to, else output_dir."""
    repo = getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id
    if trainer.args.push_to_hub and repo:
        return f"hf://{repo}"
    return str(trainer.args.output_dir)


def add_card_section_on_create(trainer: Trainer, mask: FishMask) -> None:
    """Wrap `trainer.create_model_card` so that every card it writes (also the one `push_to_hub`
    uploads) ends with the FISH-Tuning section."""
    create: Callable[..., None] = trainer.create_model_card

    @functools.wraps(create)
    def create_model_card(*args: Any, **kwargs: Any) -> None:
        create(*args, **kwargs)
        if trainer.is_world_process_zero():
            card = Path(trainer.args.output_dir) / CARD_FILENAME
            add_card_section(card, mask, mask_location(trainer))

    trainer.create_model_card = create_model_card  # type: ignore[method-assign]
