"""The core with a plain HF Trainer: masks saved with checkpoints, frozen entries, data order."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from tiny_peft import padded_batches, tiny_lora_model
from transformers import Trainer, TrainingArguments, default_data_collator

from axolotl_fish import FishMask, FishMaskCallback, FishMaskConfig, compute_fish_mask
from axolotl_fish.adapters.tensors import adapter_parameters


class RecordingTrainer(Trainer):
    """Remembers the input_ids and loss of every micro-batch it trains on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []
        self.losses: list[float] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen.append(inputs["input_ids"].clone())
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        self.losses.append(float(loss))
        return loss


def make_trainer(tmp_path, max_steps: int = 4) -> RecordingTrainer:
    batch = padded_batches(24, 24)[0]
    rows = [{k: v[n] for k, v in batch.items()} for n in range(24)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=0.5,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        lr_scheduler_type="constant",
    )
    model = tiny_lora_model("llama", nonzero_b=False)
    return RecordingTrainer(
        model=model, args=args, train_dataset=rows, data_collator=default_data_collator
    )


def test_trainer_run_keeps_mask_and_frozen_entries(tmp_path):
    trainer = make_trainer(tmp_path)
    config = FishMaskConfig(keep_ratio=0.5, num_samples=8)
    mask = compute_fish_mask(trainer.model, trainer.get_train_dataloader(), config, progress=False)
    initial = {k: p.detach().clone() for k, p in adapter_parameters(trainer.model).items()}
    trainer.add_callback(FishMaskCallback(trainer.model, mask))
    trainer.train()
    trainer.save_model()

    assert mask.k == round(0.5 * mask.total)
    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path):
        saved = FishMask.load(folder)
        assert saved.metadata["k"] == mask.k
        assert all(torch.equal(saved.masks[k], m) for k, m in mask.masks.items())
        adapter = load_file(folder / "adapter_model.safetensors")
        assert set(adapter) == set(mask.masks)  # keyed exactly like the saved adapter
        for key, value in adapter.items():
            frozen = ~mask.masks[key]
            assert torch.equal(value[frozen], initial[key][frozen]), (folder, key)
    final = load_file(tmp_path / "adapter_model.safetensors")
    moved = sum(int((final[k] != initial[k])[m].sum()) for k, m in mask.masks.items())
    assert moved > 0.5 * mask.k


def test_fisher_pass_does_not_change_data_order_or_random_stream(tmp_path):
    """A run with the pass trains on the same batches with the same losses as a run that gets
    the same mask without a pass: lora_dropout draws from the RNG stream the pass must keep."""
    fished = make_trainer(tmp_path / "fished")
    config = FishMaskConfig(keep_ratio=0.5, num_samples=8)
    mask = compute_fish_mask(fished.model, fished.get_train_dataloader(), config, progress=False)
    fished.add_callback(FishMaskCallback(fished.model, mask))
    fished.train()
    given = make_trainer(tmp_path / "given")
    given.add_callback(FishMaskCallback(given.model, mask))
    given.train()
    assert len(given.seen) == len(fished.seen) == 8
    for a, b in zip(given.seen, fished.seen, strict=True):
        assert torch.equal(a, b)
    assert given.losses == fished.losses
