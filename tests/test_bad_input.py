"""Bad input that gets past config validation: NaN/Inf in the Fisher pass and unusable mask
files, each with a message naming what is wrong. (Masks made for another model or adapter:
test_provenance.py.)

(Out-of-range budgets, num_samples 0, unknown strategies, a missing adapter, DeepSpeed/FSDP:
test_plugin_config.py; unreadable and mismatched mask files: test_mask_file.py; more samples
than data: test_fisher.py; hostile files and references - forged deltas, bad mask metadata, Hub
references, `apply` into the base: test_hostile_inputs.py.)
"""

from __future__ import annotations

import pytest
import torch
from tiny_peft import padded_batches, tiny_lora_model

from axolotl_fish.adapters.tensors import adapter_parameters
from axolotl_fish.config import FishMaskConfig
from axolotl_fish.fisher.scores import fisher_scores
from axolotl_fish.integration import _load_mask


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-example"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_gradient_names_the_tensor_and_the_examples(batched, poison):
    model = tiny_lora_model("llama")
    batches = padded_batches(12, 4)
    target = batches[1]["input_ids"][2]  # example 6: the second micro-batch's third row

    def poison_row(module, args, output):
        if args[0].shape[1] != target.shape[0]:
            return output
        rows = (args[0] == target).all(dim=1)
        return torch.where(rows[:, None, None], poison, output)

    model.get_input_embeddings().register_forward_hook(poison_row)
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite gradient for adapter tensor '.+lora_[AB]\.weight' from "
        r"examples 4-7 of the pass on rank 0",
    ):
        fisher_scores(
            model, batches, adapter_parameters(model), 12, batched=batched, progress=False
        )


def test_mask_path_errors_name_the_key(tmp_path):
    missing = FishMaskConfig(keep_ratio=0.5, mask_path=str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"fish_mask\.mask_path: No FISH mask file at"):
        _load_mask(missing.mask_path, missing)
    (tmp_path / "bad.safetensors").write_bytes(b"not a mask")
    bad = FishMaskConfig(keep_ratio=0.5, mask_path=str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"fish_mask\.mask_path: .*bad\.safetensors is not a"):
        _load_mask(bad.mask_path, bad)
