"""Shared offline fixtures: a tiny tokenizer, tiny random models and an alpaca data set.

Everything is session-scoped and built locally in a few seconds; helpers that tests call directly
(``write_config``, ``run_axolotl_train``, ``load_adapter_tensors``) live in ``axolotl_run``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from axolotl_run import OFFLINE_ENV, build_tokenizer, save_tiny_model, write_alpaca_jsonl

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Before any test module imports huggingface_hub or axolotl, which read these at import time.
os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (~460 tokens) with <s>, </s>, <pad>, <unk>; trained in milliseconds."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast
) -> Callable[[str], Path]:
    """``tiny_model_dir(arch)`` -> a ``base_model`` folder; each arch is saved once a session."""
    saved: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in saved:
            out_dir = tmp_path_factory.mktemp(f"tiny_{arch}")
            saved[arch] = save_tiny_model(arch, tiny_tokenizer, out_dir)
        return saved[arch]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    """Tiny LlamaForCausalLM: 2 layers, hidden 64, 4 heads, 2 KV heads."""
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    """Tiny Qwen2ForCausalLM, same shape as the Llama (q/k/v carry a bias)."""
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    """Tiny GPT2LMHeadModel: Conv1D layers (c_attn, c_proj), weights stored transposed."""
    return tiny_model_dir("gpt2")


@pytest.fixture(scope="session")
def alpaca_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 short sentiment rows (alternating positive/negative), ~60 tokens each."""
    return write_alpaca_jsonl(tmp_path_factory.mktemp("data") / "alpaca.jsonl")
