"""In-memory tiny PEFT models and padded batches for fast unit tests of the core."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 97


def tiny_base_model(arch: str = "llama", seed: int = 0, hidden_size: int = 32) -> nn.Module:
    """A 2-layer random causal LM: Llama (nn.Linear projections, pad id 0 so the embedding has a
    padding_idx; `hidden_size` wide) or GPT-2 (Conv1D)."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            pad_token_id=0,
            vocab_size=VOCAB,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return GPT2LMHeadModel(config)
    raise ValueError(arch)


class ScaledEmbedding(nn.Embedding):
    """Gemma's scaled word embedding: the lookup times a constant `embed_scale`, which PEFT also
    applies to the output of a LoRA adapter on it."""

    def __init__(self, embedding: nn.Embedding, embed_scale: float) -> None:
        super().__init__(*embedding.weight.shape, padding_idx=embedding.padding_idx)
        self.weight = embedding.weight
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def tiny_lora_model(
    arch: str = "llama",
    seed: int = 0,
    nonzero_b: bool = True,
    extra_targets: tuple[str, ...] = (),
    embed_scale: float | None = None,
    base: nn.Module | None = None,
    **lora_kwargs,
) -> nn.Module:
    """A tiny PEFT LoRA model (on `base`, else on `tiny_base_model(arch, seed)`); `nonzero_b`
    perturbs lora_B so every Fisher score is non-trivial; `embed_scale` makes the input
    embedding a `ScaledEmbedding`."""
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=[*TARGETS[arch], *extra_targets],
        lora_dropout=0.1,
        fan_in_fan_out=arch == "gpt2",
        **lora_kwargs,
    )
    base = tiny_base_model(arch, seed) if base is None else base
    if embed_scale is not None:
        base.set_input_embeddings(ScaledEmbedding(base.get_input_embeddings(), embed_scale))
    model = get_peft_model(base, config)
    if nonzero_b:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    param.normal_(std=0.1)
    return model


def quantized_llama(folder: Path, bits: int, storage: torch.dtype = torch.bfloat16) -> nn.Module:
    """`tiny_base_model("llama")`, 64 wide (bitsandbytes quantizes 64 weights per block), saved in
    `folder` and loaded back as Axolotl loads QLoRA with `bf16: false`: bitsandbytes `bits`-bit
    linears on the CPU (4 bits: NF4, double quantization, fp32 compute, codes packed in
    `storage`), through `prepare_model_for_kbit_training`."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not (folder / "config.json").is_file():
        tiny_base_model("llama", hidden_size=64).save_pretrained(folder)
    quantization = BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=storage,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def padded_batches(
    n_rows: int, batch_size: int, seed: int = 0, pad_id: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Right-padded rows of varied length with a masked prompt (-100) and padding (-100)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        length = int(torch.randint(6, 20, (1,), generator=generator))
        prompt = int(torch.randint(2, length - 2, (1,), generator=generator))
        ids = torch.randint(1, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = -100
        rows.append((ids, labels))
    batches = []
    for start in range(0, n_rows, batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(chunk):
            input_ids[i, : len(ids)] = ids
            labels[i, : len(ids)] = lab
            attention[i, : len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention, "labels": labels})
    return batches
