"""The scoring that ends `make demo`: the shared-prefix shortcut gives what a plain forward of
every whole prompt gives."""

from __future__ import annotations

import pytest
import torch
from tiny_peft import tiny_base_model, tiny_lora_model

from axolotl_fish.demo.report import common_prefix, next_token_logprobs

PREFIX = [5, 9, 13, 2, 40, 41, 42]
PROMPTS = [PREFIX + rest for rest in ([7], [8, 3, 3, 90], [60, 61], [7, 7, 7, 7, 7, 7], [11, 12])]
TOKENS = [3, 50, 96]


def plain(model, prompts: list[list[int]]) -> torch.Tensor:
    """One whole-prompt forward per prompt, no cache, no padding."""
    with torch.no_grad():
        rows = [model(input_ids=torch.tensor([p])).logits[0, -1].log_softmax(-1) for p in prompts]
    return torch.stack(rows)[:, TOKENS]


def test_common_prefix():
    assert common_prefix(PROMPTS) == PREFIX
    assert common_prefix([[1, 2], [1, 2, 3]]) == [1, 2] and common_prefix([[1], [2]]) == []


@pytest.mark.parametrize("build", [tiny_base_model, tiny_lora_model], ids=["base", "lora"])
@pytest.mark.parametrize("prompts", [PROMPTS, [[4, 5], [6, 7, 8]], [PREFIX, PREFIX]])
def test_cached_prefix_and_padding_change_nothing(build, prompts):
    """With a shared beginning, none, or identical prompts (the cache then stops a token short);
    batches of 2 leave padding in most of them."""
    model = build().eval()
    got = next_token_logprobs(model, prompts, TOKENS, pad_id=0, batch_size=2, desc="test")
    torch.testing.assert_close(got, plain(model, prompts), rtol=1e-4, atol=1e-5)
