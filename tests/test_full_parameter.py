"""Full-parameter mode (the original FISH Mask): no adapter, the model's own parameters."""

from __future__ import annotations

import pytest
import torch
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault
from axolotl_run import run_axolotl_train, tiny_model_config, write_config
from safetensors.torch import load_file
from test_fisher import max_relative_error, reference_fisher
from tiny_peft import padded_batches, tiny_base_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

from axolotl_fish import FishMask, FishMaskCallback, FishMaskConfig, compute_fish_mask
from axolotl_fish.adapters.tensors import trainable_parameters
from axolotl_fish.fisher.scores import fisher_scores
from axolotl_fish.training.delta import SparseDelta

MODEL_FILE = "model.safetensors"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_keys_are_the_saved_model_files_keys_and_a_tied_tensor_counts_once(tmp_path, arch):
    model = tiny_base_model(arch)  # GPT-2 ties lm_head.weight to transformer.wte.weight
    params = trainable_parameters(model)
    model.save_pretrained(tmp_path)
    assert set(params) == set(load_file(tmp_path / MODEL_FILE))
    assert len(params) == len(list(model.parameters()))
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == (arch == "gpt2")
    assert ("lm_head.weight" in params) != tied
    embedding = model.get_input_embeddings().weight
    [embedding_key] = [key for key, param in params.items() if param is embedding]
    embedding.requires_grad_(False)  # frozen, e.g. by Axolotl's `unfrozen_parameters`
    assert set(trainable_parameters(model)) == set(params) - {embedding_key}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fisher_of_every_weight_matches_the_batch_size_one_reference(arch):
    """Plain Linear / Conv1D / Embedding / norm weights and biases take the per-example path;
    a tied tensor gets the gradient of both its uses. No .grad is left behind."""
    model = tiny_base_model(arch)
    params = trainable_parameters(model)
    batches = padded_batches(n_rows=5, batch_size=3)
    result = fisher_scores(model, batches, params, num_samples=5, progress=False)
    reference = reference_fisher(model, batches, params, num_samples=5)
    assert max_relative_error(result.scores, reference) < 1e-4
    assert all(p.grad is None for p in model.parameters())


def test_trainer_run_with_weight_decay_keeps_masked_weights_bitwise(tmp_path):
    model = tiny_base_model("gpt2")
    initial = {k: p.detach().clone() for k, p in trainable_parameters(model).items()}
    batch = padded_batches(16, 16)[0]
    rows = [{k: v[n] for k, v in batch.items()} for n in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        save_steps=2,
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, data_collator=default_data_collator
    )
    config = FishMaskConfig(keep_ratio=0.05, num_samples=4)
    mask = compute_fish_mask(model, trainer.get_train_dataloader(), config, progress=False)
    trainer.add_callback(FishMaskCallback(model, mask))
    trainer.train()
    trainer.save_model()

    assert mask.k == round(0.05 * mask.total) and mask.total == sum(
        p.numel() for p in model.parameters()
    )
    assert mask.metadata["peft_type"] is None
    for folder in (tmp_path / "checkpoint-2", tmp_path):
        saved = load_file(folder / MODEL_FILE)
        assert set(saved) == set(FishMask.load(folder).masks)
        for key, keep in mask.masks.items():
            assert torch.equal(saved[key][~keep], initial[key][~keep]), (folder, key)
    moved = sum(int((saved[k] != initial[k])[m].sum()) for k, m in mask.masks.items())
    assert moved > 0.5 * mask.k


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama with lm_head tied to embed_tokens, as in SmolLM2."""
    config = tiny_model_config("llama", tiny_tokenizer)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = tmp_path_factory.mktemp("tied_llama")
    model.save_pretrained(out_dir)
    tiny_tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.mark.e2e
def test_axolotl_full_fine_tune_keeps_masked_weights_of_the_base_model(
    tmp_path, tied_llama_dir, alpaca_jsonl
):
    """`axolotl train` without `adapter:`: exact k over every weight, masked entries bitwise equal
    to the base model's in every saved model.safetensors, under AdamW weight decay and gradient
    checkpointing (the Fisher pass checkpoints too); every folder's fish_delta.safetensors
    rebuilds its model.safetensors bit for bit."""
    config = write_config(
        tmp_path,
        tied_llama_dir,
        alpaca_jsonl,
        plugins=["axolotl_fish.FishMaskPlugin"],
        adapter=None,
        weight_decay=0.1,
        max_grad_norm=0.5,
        gradient_accumulation_steps=2,
        micro_batch_size=2,
        gradient_checkpointing=True,
        fish_mask={"keep_ratio": 0.05, "num_samples": 8},
    )
    log = run_axolotl_train(config, cwd=tmp_path).stdout
    assert "gradient_checkpointing: the pass checkpoints 2 layers" in log
    out = tmp_path / "out"
    base = load_file(tied_llama_dir / MODEL_FILE)
    assert "lm_head.weight" not in base and "model.embed_tokens.weight" in base
    mask = FishMask.load(out)
    assert mask.k == round(0.05 * mask.total) == mask.metadata["k"]
    assert mask.total == sum(t.numel() for t in base.values())
    for folder in (out / "checkpoint-2", out / "checkpoint-4", out):
        saved = load_file(folder / MODEL_FILE)
        assert set(saved) == set(FishMask.load(folder).masks) == set(base)
        for key, keep in mask.masks.items():
            assert torch.equal(saved[key][~keep], base[key][~keep]), (folder, key)
        rebuilt = SparseDelta.load(folder).apply(base)  # the sparse delta written beside it
        assert all(torch.equal(rebuilt[key], saved[key]) for key in saved), folder
    moved = sum(int((saved[k] != base[k])[m].sum()) for k, m in mask.masks.items())
    assert moved > 0.5 * mask.k


def full_fine_tune_config(tiny_llama_dir, alpaca_jsonl, **fish_mask) -> DictDefault:
    cfg = DictDefault(
        base_model=str(tiny_llama_dir),
        datasets=[{"path": str(alpaca_jsonl), "ds_type": "json", "type": "alpaca"}],
        sequence_len=64,
        micro_batch_size=2,
        num_epochs=1,
        learning_rate=1e-3,
        output_dir="./out",
        plugins=["axolotl_fish.FishMaskPlugin"],
        fish_mask=fish_mask,
    )
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_validation_accepts_no_adapter_but_not_match_rank(tiny_llama_dir, alpaca_jsonl):
    cfg = full_fine_tune_config(tiny_llama_dir, alpaca_jsonl, keep_ratio=0.01)
    assert cfg.adapter is None and cfg.fish_mask["keep_ratio"] == 0.01
    with pytest.raises(
        ValueError, match="without an adapter there is no rank: use keep_ratio or keep_params"
    ):
        full_fine_tune_config(tiny_llama_dir, alpaca_jsonl, match_rank=8)
