"""Full-parameter mode trains value vectors of the selected entries only: the same result as
dense masked training, O(k) optimizer state, standard checkpoints that resume, and sparse deltas
that rebuild the trained model bit for bit."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_peft import padded_batches, tiny_base_model
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from axolotl_fish import FishMask, FishMaskCallback
from axolotl_fish.adapters.tensors import saved_state, trainable_parameters
from axolotl_fish.cli import fish_mask
from axolotl_fish.masks.selection import select_top_k
from axolotl_fish.scorers.builtin import random_scores
from axolotl_fish.training import sparse as sparse_training
from axolotl_fish.training.delta import DELTA_FILENAME, SparseDelta, apply_delta
from axolotl_fish.training.masking import GradientMask
from axolotl_fish.training.sparse import VALUES_SUFFIX, SparseTraining

MODEL_FILE = "model.safetensors"


def tiny_mask(model) -> FishMask:
    """10% of the entries at random, plus one tensor fully selected and one not at all."""
    params = trainable_parameters(model)
    total = sum(p.numel() for p in params.values())
    masks = select_top_k(random_scores(params, seed=3), total // 10, seed=0).masks
    keys = list(masks)
    masks[keys[-1]] = torch.ones_like(masks[keys[-1]])
    masks[keys[-2]] = torch.zeros_like(masks[keys[-2]])
    return FishMask(masks=masks, metadata={})


class DenseMasked(TrainerCallback):
    """Today's full-parameter training: dense gradients zeroed outside the mask, restored."""

    def __init__(self, model, mask: FishMask) -> None:
        self.gradient_mask = GradientMask(trainable_parameters(model), mask.masks)

    def on_train_begin(self, *args, **kwargs) -> None:
        self.gradient_mask.snapshot()

    def on_optimizer_step(self, *args, **kwargs) -> None:
        self.gradient_mask.restore()


def trainer_for(model, out, max_steps=4, **overrides) -> Trainer:
    batch = padded_batches(16, 16)[0]
    rows = [{k: v[n] for k, v in batch.items()} for n in range(16)]
    settings = {
        "output_dir": str(out),
        "max_steps": max_steps,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 1,
        "weight_decay": 0.1,
        "max_grad_norm": 0.05,  # small enough that clipping acts on every step
        "save_steps": 2,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
    }
    args = TrainingArguments(**(settings | overrides))
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparse_training_equals_dense_masked_training(tmp_path, arch):
    """Weight decay, clipping, accumulation and the LR schedule act alike; masked entries stay
    bitwise equal to the base; AdamW keeps state for the selected entries only."""
    base = tiny_base_model(arch)  # GPT-2: tied lm_head, Conv1D, biases, LayerNorm
    initial = {k: p.detach().clone() for k, p in trainable_parameters(base).items()}
    mask = tiny_mask(base)

    dense_model = tiny_base_model(arch)
    dense = trainer_for(dense_model, tmp_path / "dense")
    dense.add_callback(DenseMasked(dense_model, mask))
    dense.train()

    sparse_model = tiny_base_model(arch)
    before = trainable_parameters(sparse_model)
    sparse = trainer_for(sparse_model, tmp_path / "sparse")
    sparse.add_callback(FishMaskCallback(sparse_model, mask))
    values = [p for n, p in sparse_model.named_parameters() if n.endswith(VALUES_SUFFIX)]
    sparse.train()

    partly = [key for key, m in mask.masks.items() if m.any() and not m.all()]
    optimized = [p for group in sparse.optimizer.param_groups for p in group["params"]]
    fully = [key for key, m in mask.masks.items() if m.all()]
    assert len(values) == len(partly) > 0
    state_entries = sum(s["exp_avg"].numel() for s in sparse.optimizer.state.values())
    selected = sum(int(mask.masks[key].sum()) for key in partly)
    assert state_entries == selected + sum(initial[key].numel() for key in fully)
    assert not {id(before[key]) for key in partly} & {id(p) for p in optimized}
    dense_weights, sparse_weights = dense_model.state_dict(), sparse_model.state_dict()
    # After training the value vectors are gone and the weights are plain parameters again.
    assert not any(n.endswith(VALUES_SUFFIX) for n, _ in sparse_model.named_parameters())
    assert all(before[key].requires_grad for key in partly)
    moved = 0
    for key, keep in mask.masks.items():
        got, want = sparse_weights[key].detach(), dense_weights[key].detach()
        assert torch.equal(got[~keep], initial[key][~keep]), key
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-6)
        moved += int((got != initial[key])[keep].sum())
    assert moved > 0.9 * mask.k


def test_base_weights_get_no_grad_and_checkpoints_are_standard(tmp_path):
    model = tiny_base_model("llama")
    mask = tiny_mask(model)
    trainer = trainer_for(model, tmp_path, max_steps=2)
    callback = FishMaskCallback(model, mask)
    trainer.add_callback(callback)
    partly = [key for key, m in mask.masks.items() if m.any() and not m.all()]
    grads_seen = []

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, *args, **kwargs) -> None:
            grads_seen.extend(dict(model.named_parameters())[key].grad for key in partly)

    trainer.add_callback(Probe())
    trainer.train()
    assert grads_seen and all(grad is None for grad in grads_seen)
    saved = load_file(tmp_path / "checkpoint-2" / MODEL_FILE)
    assert set(saved) == set(saved_state(tiny_base_model("llama")))


def test_resume_from_a_checkpoint_continues_as_if_never_stopped(tmp_path):
    straight = tiny_base_model("llama")
    mask = tiny_mask(straight)
    trainer = trainer_for(straight, tmp_path / "straight")
    trainer.add_callback(FishMaskCallback(straight, mask))
    trainer.train()

    resumed = tiny_base_model("llama")
    trainer = trainer_for(resumed, tmp_path / "resumed")
    trainer.add_callback(FishMaskCallback(resumed, mask))
    trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    for key, weight in trainable_parameters(straight).items():
        torch.testing.assert_close(trainable_parameters(resumed)[key], weight, rtol=0, atol=1e-7)


def test_delta_rebuilds_the_trained_model_bitwise_and_refuses_another_base(tmp_path):
    model = tiny_base_model("gpt2")
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    mask = tiny_mask(model)
    out = tmp_path / "out"
    trainer = trainer_for(model, out)
    trainer.add_callback(FishMaskCallback(model, mask))
    trainer.train()
    trainer.save_model()

    for folder in (out / "checkpoint-2", out):
        delta = SparseDelta.load(folder)
        assert delta.metadata["k"] < mask.k  # the fully selected tensor is stored whole
        rebuilt = tmp_path / f"rebuilt-{folder.name}"
        result = CliRunner().invoke(fish_mask, ["apply", str(base_dir), str(folder), str(rebuilt)])
        assert result.exit_code == 0, result.output
        trained, applied = load_file(folder / MODEL_FILE), load_file(rebuilt / MODEL_FILE)
        assert set(trained) == set(applied)
        assert all(torch.equal(trained[key], applied[key]) for key in trained), folder
        assert (rebuilt / "config.json").is_file()
    assert (out / DELTA_FILENAME).stat().st_size < 0.3 * (out / MODEL_FILE).stat().st_size

    other_dir = tmp_path / "other"
    tiny_base_model("gpt2", seed=1).save_pretrained(other_dir)
    result = CliRunner().invoke(fish_mask, ["apply", str(other_dir), str(out), str(tmp_path / "x")])
    assert result.exit_code != 0 and "not those the delta was made on" in result.output
    damaged = bytearray((out / DELTA_FILENAME).read_bytes())
    damaged[-3] ^= 0xFF
    (tmp_path / DELTA_FILENAME).write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="checksum"):
        apply_delta(base_dir, tmp_path / DELTA_FILENAME, tmp_path / "y")


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_value_gradients(reentrant):
    """Recomputed forwards swap the weight view in again: the values get the same gradients."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_base_model("llama")
        model.train()
        params = trainable_parameters(model)
        masks = select_top_k(random_scores(params, seed=0), 500, seed=0).masks
        if checkpointing:
            kwargs = {"use_reentrant": reentrant}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        sparse = SparseTraining(model, params, masks)
        model(**padded_batches(4, 4)[0]).loss.backward()
        grads.append(torch.cat([tensor.values.grad for tensor in sparse.tensors]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_write_back_in_chunks_writes_every_selected_entry_and_nothing_else(monkeypatch):
    """Chunks smaller than k (and not dividing it) still write all k values, and only them."""
    monkeypatch.setattr(sparse_training, "WRITE_CHUNK", 7)
    model = tiny_base_model("llama")
    params = trainable_parameters(model)
    initial = {key: param.detach().clone() for key, param in params.items()}
    masks = select_top_k(random_scores(params, seed=0), 500, seed=0).masks
    sparse = SparseTraining(model, params, masks)
    assert any(tensor.values.numel() > 7 for tensor in sparse.tensors)
    with torch.no_grad():
        for tensor in sparse.tensors:
            tensor.values.copy_(torch.randn_like(tensor.values))
    sparse.after_step()
    for tensor in sparse.tensors:
        keep = masks[tensor.key]
        assert torch.equal(tensor.weight.detach()[keep], tensor.values.detach()), tensor.key
        assert torch.equal(tensor.weight.detach()[~keep], initial[tensor.key][~keep]), tensor.key


def test_indices_follow_the_weights_to_another_device():
    """Axolotl loads an FSDP model on CPU and FSDP2 moves it to the GPU after the value vectors
    exist; their indices follow (the meta device stands in for the GPU)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    params = dict(model.named_parameters())
    masks = select_top_k(random_scores(params, seed=0), 10, seed=0).masks
    sparse = SparseTraining(model, params, masks)
    model.to("meta")
    model(torch.randn(2, 4, device="meta")).sum().backward()
    sparse.after_step()
    sparse.read_back()
    assert sparse.tensors and all(t.indices.device.type == "meta" for t in sparse.tensors)
