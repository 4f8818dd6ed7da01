"""The offline fixtures are usable: tokenizer, tiny models, data, config and a real CLI run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from axolotl_run import (
    ARCHS,
    LABELS,
    alpaca_text,
    load_adapter_tensors,
    run_axolotl_train,
    save_tiny_model,
    train_in_process,
    write_config,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast


def test_tokenizer_round_trips_and_pads(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    """Byte-level BPE must encode any text losslessly and pad batches (axolotl's collator pads)."""
    text = "The movie was great! Ünïcode ✓ 123"
    ids = tiny_tokenizer(text).input_ids
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert 256 <= len(tiny_tokenizer) <= 512
    batch = tiny_tokenizer(["a", "a longer text"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, -1].item() == tiny_tokenizer.pad_token_id
    special = (
        tiny_tokenizer.eos_token_id,
        tiny_tokenizer.pad_token_id,
        tiny_tokenizer.unk_token_id,
    )
    assert len(set(special)) == 3


def test_alpaca_rows_fit_sequence_len(
    alpaca_jsonl: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    """axolotl drops rows longer than sequence_len and errors on an empty data set."""
    rows = [json.loads(line) for line in alpaca_jsonl.read_text().splitlines()]
    assert 64 <= len(rows) <= 96
    assert {r["output"] for r in rows} == set(LABELS)
    assert max(len(tiny_tokenizer(alpaca_text(r)).input_ids) for r in rows) < 64


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_loads_with_its_tokenizer(
    arch: str, tiny_model_dir: Callable[[str], Path]
) -> None:
    """Each saved folder works as a local ``base_model``: fp32 safetensors, tokenizer, logits."""
    model_dir = tiny_model_dir(arch)
    assert (model_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == arch
    assert model.dtype == torch.float32
    batch = tokenizer(["the movie was great.", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tokenizer))


def test_tiny_models_are_deterministic(
    tiny_llama_dir: Path, tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """Saving again with the same seed gives identical weights, so runs are comparable."""
    again = save_tiny_model("llama", tiny_tokenizer, tmp_path)
    first = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_write_config_merges_overrides(
    tmp_path: Path, tiny_gpt2_dir: Path, alpaca_jsonl: Path
) -> None:
    """Overrides replace top-level keys; GPT-2 gets Conv1D targets by default."""
    path = write_config(tmp_path, tiny_gpt2_dir, alpaca_jsonl, max_steps=1, plugins=["x.Y"])
    cfg = yaml.safe_load(path.read_text())
    assert cfg["max_steps"] == 1
    assert cfg["plugins"] == ["x.Y"]
    assert cfg["lora_target_modules"] == ["c_attn", "c_proj"]
    assert cfg["output_dir"] == str(tmp_path / "out")


@pytest.mark.e2e
def test_plain_lora_axolotl_train(tmp_path: Path, tiny_llama_dir: Path, alpaca_jsonl: Path) -> None:
    """The real CLI trains LoRA offline on CPU, saves checkpoint-2 and the final adapter."""
    config = write_config(tmp_path, tiny_llama_dir, alpaca_jsonl)
    run_axolotl_train(config, cwd=tmp_path)
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    final = load_adapter_tensors(out)
    lora_b = {k: v for k, v in final.items() if "lora_B" in k}
    assert lora_b, sorted(final)
    assert any(v.abs().sum() > 0 for v in lora_b.values())  # LoRA B starts at zero


@pytest.mark.e2e
def test_train_in_process_is_repeatable(
    tmp_path: Path, tiny_qwen2_dir: Path, alpaca_jsonl: Path
) -> None:
    """Two in-process runs of one config give identical adapters; two CLI runs do not (their
    lora_A init is unseeded, see ``train_in_process``)."""
    adapters = []
    for name in ("first", "second"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        train_in_process(write_config(run_dir, tiny_qwen2_dir, alpaca_jsonl, max_steps=2))
        adapters.append(load_adapter_tensors(run_dir / "out"))
    first, second = adapters
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
