"""The FISH-Tuning section of the model card, and what a run that pushes to the Hub uploads:
a real `axolotl train` (in process) with `hub_model_id`, the Hub upload call captured."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from axolotl_run import train_in_process, write_config
from huggingface_hub.utils import filter_repo_objects

from axolotl_fish.config import FishMaskConfig
from axolotl_fish.masks.file import MASK_FILENAME, FishMask
from axolotl_fish.reports.model_card import SECTION_START, add_card_section, card_section

KEY = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"


def sample_mask() -> FishMask:
    """q_proj: all of B (8) and 2 of A's 8; v_proj: 4 of B, none of A: k = 14 of 32."""
    masks = {
        KEY.format(0, module, m): torch.zeros(8, dtype=torch.bool)
        for module in ("q_proj", "v_proj")
        for m in "AB"
    }
    masks[KEY.format(0, "q_proj", "B")][:] = True
    masks[KEY.format(0, "q_proj", "A")][:2] = True
    masks[KEY.format(0, "v_proj", "B")][:4] = True
    metadata = {
        "strategy": "fisher",
        "fisher": "empirical",
        "keep_ratio": None,
        "keep_params": 14,
        "match_rank": None,
        "scope": "global",
        "k": 14,
        "total": 32,
        "num_samples": 256,
        "num_examples": 200,
        "fisher_seconds": 12.4,
        "warmup_steps": 5,
        "restore_after_warmup": True,
        "seed": 7,
        "include": ["self_attn"],
        "exclude": None,
        "dense_outside": 96,
        "peft_type": "LORA",
        "axolotl_fish_version": "0.1.0",
    }
    return FishMask(masks, metadata)


def yaml_blocks(text: str) -> list[dict]:
    return [yaml.safe_load(block.split("```")[0]) for block in text.split("```yaml\n")[1:]]


def test_card_section_says_how_the_adapter_was_made():
    section = card_section(sample_mask(), "hf://org/adapter")
    for line in (
        "| strategy | `fisher`, scope `global` |",
        "| trained entries | k = 14 of 32 (43.75%) |",
        "| Fisher samples | 200 training examples (of 256 requested), pass took 12 s |",
        "| warm-up | 5 dense steps before scoring; then every entry was put back to its initial "
        "value |",
        "| seed | 7 |",
        '| outside the mask | 96 entries trained densely (include `["self_attn"]`, exclude '
        "`null`) |",
        "| `q_proj` | 10 | 16 | 62.50% |",
        "| `v_proj` | 4 | 16 | 25.00% |",
        "| `lora_A` | 2 | 16 | 12.50% |",
        "| `lora_B` | 12 | 16 | 75.00% |",
        "`axolotl fish-mask inspect hf://org/adapter` shows it",
    ):
        assert line in section, line
    reproduce, reuse = yaml_blocks(section)
    assert reproduce == {
        "fish_mask": {
            "keep_params": 14,
            "strategy": "fisher",
            "fisher": "empirical",
            "scope": "global",
            "num_samples": 256,
            "warmup_steps": 5,
            "restore_after_warmup": True,
            "seed": 7,
            "include": ["self_attn"],
        }
    }
    FishMaskConfig(**reproduce["fish_mask"])  # a valid block
    assert reuse == {"fish_mask": {"keep_params": 14, "mask_path": "hf://org/adapter"}}


def test_the_section_is_added_once_after_the_existing_card(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: peft\n---\n# my adapter\n")
    add_card_section(card, sample_mask(), "out")
    add_card_section(card, sample_mask(), "out")  # a second card creation: replaced, not doubled
    text = card.read_text()
    assert text.startswith("---\nlibrary_name: peft\n---\n# my adapter\n\n" + SECTION_START)
    assert text.count("## FISH-Tuning") == 1 and text.endswith("<!-- axolotl-fish: end -->\n")
    add_card_section(tmp_path / "new.md", sample_mask(), "out")
    assert (tmp_path / "new.md").read_text() == card_section(sample_mask(), "out")


@dataclass
class Upload:
    path_in_repo: str | None
    files: dict[str, bytes]


class HubRecorder:
    """Stands in for `transformers.trainer.hf_api()`: records what each `upload_folder` call
    would send (its folder, filtered by its own ignore patterns, read at call time)."""

    def __init__(self) -> None:
        self.uploads: list[Upload] = []

    def create_repo(self, repo_id: str, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(
        self, *, folder_path, path_in_repo=None, ignore_patterns=None, run_as_future=False, **kwargs
    ):
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
        kept = filter_repo_objects(list(files), ignore_patterns=ignore_patterns)
        self.uploads.append(Upload(path_in_repo, {name: files[name].read_bytes() for name in kept}))
        done: Future = Future()
        done.set_result(None)
        return done if run_as_future else None


# Two saves and two checkpoint pushes, then Axolotl's push_to_hub at the end.
PUSHING_RUN = {
    "plugins": ["axolotl_fish.FishMaskPlugin"],
    "max_steps": 2,
    "save_steps": 1,
    "hub_model_id": "fish-org/tiny-fish",
    "hub_strategy": "checkpoint",
}


@pytest.mark.e2e
def test_a_pushed_adapter_carries_its_mask_and_card(tmp_path, tiny_llama_dir, alpaca_jsonl):
    fish_mask = {"keep_ratio": 0.5, "num_samples": 8, "seed": 3}
    settings = {**PUSHING_RUN, "fish_mask": fish_mask}
    config = write_config(tmp_path, tiny_llama_dir, alpaca_jsonl, **settings)
    hub = HubRecorder()
    with mock.patch("transformers.trainer.hf_api", lambda: hub):
        train_in_process(config)
    mask = FishMask.load(tmp_path / "out")

    def uploaded_mask(upload: Upload) -> FishMask:
        path = tmp_path / "uploaded.safetensors"
        path.write_bytes(upload.files[MASK_FILENAME])
        return FishMask.load(path)

    def same(other: FishMask) -> bool:
        masks = other.masks
        return masks.keys() == mask.masks.keys() and all(
            torch.equal(masks[k], m) for k, m in mask.masks.items()
        )

    checkpoints = [u for u in hub.uploads if u.path_in_repo == "last-checkpoint"]
    assert len(checkpoints) == 2  # one per save; uploaded before the Trainer's on_save
    for upload in checkpoints:
        assert same(uploaded_mask(upload)) and "adapter_model.safetensors" in upload.files

    final = hub.uploads[-1]  # push_to_hub at the end (Axolotl calls it when hub_model_id is set)
    assert final.path_in_repo is None
    assert same(uploaded_mask(final)) and uploaded_mask(final).metadata == mask.metadata
    assert "adapter_model.safetensors" in final.files
    assert not any(name.startswith("checkpoint-") for name in final.files)
    card = final.files["README.md"].decode()
    assert "library_name: peft" in card  # the Trainer's card, with the section added
    assert card.count("## FISH-Tuning") == 1
    assert f"| trained entries | k = {mask.k:,} of {mask.total:,} (50.00%) |" in card
    reproduce, reuse = yaml_blocks(card[card.index(SECTION_START) :])
    assert reproduce["fish_mask"] | fish_mask == reproduce["fish_mask"]
    assert reuse == {"fish_mask": {"keep_ratio": 0.5, "mask_path": "hf://fish-org/tiny-fish"}}
    assert (tmp_path / "out" / "README.md").read_text() == card
