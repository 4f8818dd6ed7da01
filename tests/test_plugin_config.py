"""The `fish_mask:` block in Axolotl's own config validation."""

from __future__ import annotations

import pytest
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault

from axolotl_fish.config import FishMaskConfig

PLUGIN = "axolotl_fish.FishMaskPlugin"
LLAMA_ADAPTER = {"adapter": "llama-adapter", "peft_adapter": {"layers": 1, "len": 4}}
QLORA = {"adapter": "qlora", "load_in_4bit": True}


@pytest.fixture
def make_cfg(tiny_llama_dir, alpaca_jsonl):
    def make(**overrides) -> DictDefault:
        cfg = {
            "base_model": str(tiny_llama_dir),
            "datasets": [{"path": str(alpaca_jsonl), "ds_type": "json", "type": "alpaca"}],
            "adapter": "lora",
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_target_modules": ["q_proj", "v_proj"],
            "sequence_len": 64,
            "micro_batch_size": 2,
            "num_epochs": 1,
            "learning_rate": 1e-3,
            "output_dir": "./out",
            "bf16": False,
            "fp16": False,
            "plugins": [PLUGIN],
            "fish_mask": {"keep_ratio": 0.5},
        }
        cfg.update(overrides)
        return DictDefault(cfg)

    return make


def validated(cfg: DictDefault) -> DictDefault:
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_defaults_filled_and_cpu_kernels_turned_off(make_cfg):
    cfg = validated(make_cfg())
    assert cfg.fish_mask == FishMaskConfig(keep_ratio=0.5).model_dump(exclude_none=True)
    assert cfg.fish_mask["num_samples"] == 1024 and cfg.fish_mask["strategy"] == "fisher"
    assert cfg.lora_qkv_kernel is False and cfg.lora_mlp_kernel is False
    assert cfg.lora_o_kernel is False and cfg.lora_embedding_kernel is False


def test_qlora_is_accepted_on_cpu_with_the_kernels_off(make_cfg):
    cfg = validated(make_cfg(**QLORA))
    assert cfg.adapter == "qlora" and cfg.load_in_4bit and cfg.fish_mask["keep_ratio"] == 0.5
    assert cfg.lora_qkv_kernel is False and cfg.lora_mlp_kernel is False


def test_explicit_kernel_setting_is_kept_false(make_cfg):
    assert validated(make_cfg(lora_o_kernel=False)).lora_o_kernel is False


def test_without_the_block_the_plugin_changes_nothing(make_cfg):
    cfg = make_cfg()
    del cfg["fish_mask"]
    assert validated(cfg).fish_mask is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fish_mask": {"keep_ratio": 1.5}}, "fish_mask.keep_ratio"),
        ({"fish_mask": {"keep_ratio": 0.0}}, "fish_mask.keep_ratio"),
        ({"fish_mask": {}}, "set exactly one of fish_mask.keep_ratio"),
        ({"fish_mask": {"keep_ratio": 0.5, "match_rank": 4}}, "got keep_ratio, match_rank"),
        ({"fish_mask": {"keep_ratio": 0.5, "scope": "per_layer"}}, "fish_mask.scope"),
        ({"fish_mask": {"keep_ratio": 0.5, "num_samples": 0}}, "fish_mask.num_samples"),
        (
            {"fish_mask": {"keep_ratio": 0.5, "strategy": "magic"}},
            "fish_mask.strategy: unknown scorer 'magic': expected 'fisher', 'random' or 'reverse'",
        ),
        ({"fish_mask": {"keep_ratio": 0.5, "kep_ratio": 1}}, "fish_mask.kep_ratio"),
        ({"adapter": "llama-adapter"}, "needs `peft_adapter: {layers: L, len: K}`"),
        (
            {**LLAMA_ADAPTER, "fish_mask": {"match_rank": 2}},
            "with `adapter: llama-adapter` there is no rank: use keep_ratio",
        ),
        ({"bottleneck": {"size": 8}}, "`bottleneck:` settings need `adapter: bottleneck`"),
        ({"adapter": "bottleneck", "bottleneck": {"size": 0}}, "bottleneck.size"),
        ({"adapter": "bottleneck", "bottleneck": {"placement": "x"}}, "bottleneck.placement"),
        ({"adapter": "bottleneck", "rl": "dpo"}, "supervised fine-tuning only"),
        ({"adapter": "bottleneck", "load_in_8bit": True}, "full-precision base model"),
        (
            {**QLORA, "fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}},
            "qlora. under FSDP2 needs an accelerator: Axolotl 0.19 loads",
        ),
        ({"lora_qkv_kernel": True}, "set lora_qkv_kernel: false"),
        (
            {"deepspeed": "missing.json"},
            "deepspeed: cannot read the DeepSpeed config 'missing.json'",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}},
            "zero_optimization.offload_param.device: nvme .NVMe offload. is not supported",
        ),
        (
            {"adapter": None, "deepspeed": {"zero_optimization": {"stage": 3}}},
            "ZeRO-3 supports adapters .LoRA. only",
        ),
        (
            {"peft_use_dora": True, "deepspeed": {"zero_optimization": {"stage": 3}}},
            "ZeRO-3: peft_use_dora: true fails in PEFT itself, plugin or not",
        ),
        (
            {"adapter": "bottleneck", "deepspeed": {"zero_optimization": {"stage": 3}}},
            "ZeRO-3: adapter: bottleneck has not been run there yet",
        ),
        (
            {**QLORA, "deepspeed": {"zero_optimization": {"stage": 2}}},
            "ZeRO-2: adapter: qlora has not been run there yet",
        ),
        ({"fsdp": ["full_shard"]}, "FSDP only as FSDP2: set `fsdp_version: 2` .got None"),
        ({"fsdp_config": {"reshard_after_forward": True}}, "FSDP1 flattens each wrapped module"),
        (
            {
                "adapter": None,
                "fsdp_version": 2,
                "fsdp_config": {"cpu_ram_efficient_loading": True},
            },
            "needs the mask made after FSDP2 shards the model, since only rank 0 holds",
        ),
        (
            {
                **LLAMA_ADAPTER,
                "fsdp_version": 2,
                "fsdp_config": {"cpu_ram_efficient_loading": True},
            },
            "without fish_mask.score_after_sharding: false .adapter is 'llama-adapter'.",
        ),
        (
            {
                "fsdp_version": 2,
                "fsdp_config": {"cpu_ram_efficient_loading": True},
                "fish_mask": {"keep_ratio": 0.5, "score_after_sharding": False},
            },
            "Otherwise set `fsdp_config.cpu_ram_efficient_loading: false`",
        ),
    ],
)
def test_bad_settings_are_named(make_cfg, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validated(make_cfg(**overrides))


def test_other_adapters_are_accepted_with_their_settings(make_cfg):
    """Any adapter Axolotl loads is masked (its trainable tensors are the candidates)."""
    cfg = validated(make_cfg(**LLAMA_ADAPTER))
    assert cfg.adapter == "llama-adapter" and cfg.peft_adapter == {"layers": 1, "len": 4}
    cfg = validated(make_cfg(adapter="bottleneck", fish_mask={"match_rank": 16}))
    assert cfg.bottleneck is None and cfg.fish_mask["match_rank"] == 16
    cfg = validated(
        make_cfg(adapter="bottleneck", bottleneck={"size": 32, "placement": "pfeiffer"})
    )
    assert cfg.bottleneck["size"] == 32 and cfg.bottleneck["nonlinearity"] == "relu"


@pytest.mark.parametrize(
    "fsdp",
    [
        {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}},
        {"fsdp_config": {"fsdp_version": 2, "cpu_ram_efficient_loading": False}},
        {"fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": True}},  # LoRA
        {
            "adapter": "bottleneck",
            "fsdp_version": 2,
            "fsdp_config": {"cpu_ram_efficient_loading": True},
        },
        {
            "fsdp_version": 2,
            "fsdp_config": {"cpu_ram_efficient_loading": True},
            "fish_mask": {"keep_ratio": 0.5, "warmup_steps": 2},
        },
    ],
)
def test_fsdp2_is_accepted(make_cfg, fsdp):
    cfg = validated(make_cfg(**fsdp))
    assert str(cfg.fsdp_version or cfg.fsdp_config.fsdp_version) == "2"
    assert cfg.fish_mask["keep_ratio"] == 0.5


@pytest.mark.parametrize(
    "settings",
    [
        {"deepspeed": {"zero_optimization": {"stage": 3}}},  # LoRA
        {"peft_use_dora": True, "deepspeed": {"zero_optimization": {"stage": 1}}},
        {"adapter": "bottleneck", "deepspeed": {"zero_optimization": {"stage": 2}}},
        {"adapter": None, "deepspeed": {"zero_optimization": {"stage": 2}}},
    ],
    ids=["lora-zero3", "dora-zero1", "bottleneck-zero2", "full-parameter-zero2"],
)
def test_tested_deepspeed_set_ups_are_accepted(make_cfg, settings):
    pytest.importorskip("deepspeed", reason="the `deepspeed` extra")
    cfg = validated(make_cfg(**settings))
    assert cfg.deepspeed["zero_optimization"]["stage"] in (1, 2, 3)
