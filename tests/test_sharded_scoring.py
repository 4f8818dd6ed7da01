"""Scoring after FSDP2 has sharded the model (`sharded_scoring`), on two CPU processes (gloo).

Each rank holds a slice of every LoRA tensor; the mask is made when training starts, after the
optimizer was built over every trainable tensor (as the Trainer does under FSDP2). Rank 0 reads 3
micro-batches and rank 1 one, so the ranks must run their forwards in lockstep. One process
scoring the same examples on the whole model is the reference.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from axolotl.utils.dict import DictDefault
from axolotl_run import free_port
from peft import AdaptionPromptConfig, LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from tiny_peft import padded_batches, tiny_base_model, tiny_lora_model
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from axolotl_fish import FishMask, FishMaskConfig, compute_fish_mask
from axolotl_fish.adapters.bottleneck import BottleneckConfig, add_bottleneck
from axolotl_fish.adapters.tensors import trainable_parameters
from axolotl_fish.base.ranks import mask_digest
from axolotl_fish.base.sharded import names_of, parameters_by_name
from axolotl_fish.distributed.sharded_scoring import (
    ScoredWhenTrainingStarts,
    why_not_after_sharding,
)
from axolotl_fish.fisher.rules import claim_rules
from axolotl_fish.fisher.taps import check_gathered
from axolotl_fish.integration.scoring_device import scores_after_sharding

WORLD = 2
STEPS = 3
# k below the lora_B count, with lora_B at its initial 0: every lora_A score is exactly 0, so
# lora_A tensors get no entry and must stop training although the optimizer already holds them.
CONFIG = FishMaskConfig(keep_ratio=0.2, num_samples=64)
SAMPLED = FishMaskConfig(keep_ratio=0.2, num_samples=64, fisher="sampled", fisher_chunks=2)
BATCHES = padded_batches(16, 4)
SHARES = (BATCHES[:3], BATCHES[3:])
TRAINING = padded_batches(4 * WORLD * STEPS, 4, seed=1)


def lora_model() -> nn.Module:
    return tiny_lora_model(nonzero_b=False)


def shard(model: nn.Module) -> None:
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def dora_model(*targets: str) -> nn.Module:
    targets = ["q_proj", "v_proj", *targets]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    return get_peft_model(tiny_base_model(), config)


def dora_embedding_model() -> nn.Module:
    """DoRA on the input embedding too; its A perturbed (PEFT starts it at 0), so that every
    embedding factor gets real scores."""
    model = dora_model("embed_tokens")
    with torch.no_grad():
        for key, param in trainable_parameters(model).items():
            if "lora_embedding_A" in key:
                param.normal_(std=0.1)
    return model


def checkpointed_lora_model() -> nn.Module:
    """transformers' gradient checkpointing on (Axolotl's `gradient_checkpointing`, reentrant by
    default): the pass checkpoints the decoder layers itself, inside FSDP2's groups."""
    model = lora_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def llama_adapter_model() -> nn.Module:
    """PEFT's adaption prompts, used inside the attention's own forward: no batched rule knows
    them, so they are scored one example at a time."""
    config = AdaptionPromptConfig(adapter_layers=1, adapter_len=4, task_type="CAUSAL_LM")
    return get_peft_model(tiny_base_model(), config)


def zero_magnitude_dora() -> nn.Module:
    """DoRA with magnitude entries at exactly 0 (DoRA starts them there for all-zero rows of a
    base weight): their slope needs the values of the LoRA factors."""
    model = dora_model()
    with torch.no_grad():
        for key, param in trainable_parameters(model).items():
            if "lora_magnitude_vector" in key:
                param[1::5] = 0.0
    return model


def shard_like_axolotl(model: nn.Module) -> None:
    """Axolotl's FSDP2 layout: every LoRA factor, DoRA magnitude and LoRA embedding layer is a
    group of its own, gathered for its own forward and backward only; then as `shard`."""
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in [m for m in model.modules() if isinstance(m, LoraLayer)]:
        for part in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            for module in part.values():
                fully_shard(module, mesh=mesh)
        if layer.lora_embedding_A:
            fully_shard(layer, mesh=mesh)
    shard(model)


# Other adapters: a `modules_to_save` copy of the head beside LoRA, bottleneck adapters
# (zero-initialised up-projections: ties, drawn by seed), transformers' gradient checkpointing,
# and tensors whose rules read their values during the layer's backward: DoRA magnitudes (also
# at 0, where the rule gathers the LoRA factors), LoRA and DoRA embeddings (the rule gathers a
# DoRA embedding's magnitude), norm weights (`modules_to_save` copies of every `...norm`).
# Each tensor ranked on its own (`per_tensor`), so every value-reading rule's ranking is compared.
PER_TENSOR = FishMaskConfig(keep_ratio=0.2, num_samples=64, scope="per_tensor")
OTHER_ADAPTERS = {
    "modules_to_save": lambda: tiny_lora_model(nonzero_b=False, modules_to_save=["lm_head"]),
    "bottleneck": lambda: add_bottleneck(tiny_base_model(), BottleneckConfig(size=4)),
    "activation checkpointing": lora_model,  # layers wrapped below, as Axolotl's FSDP2 does
    "gradient checkpointing": checkpointed_lora_model,
    "dora": dora_model,
    "lora embedding": lambda: tiny_lora_model(extra_targets=("embed_tokens",)),
    "norms": lambda: tiny_lora_model(modules_to_save=["norm"]),
    "dora, Axolotl's layout": dora_model,
    "dora, Axolotl's layout, activation checkpointing": dora_model,
    "lora embedding, Axolotl's layout": lambda: tiny_lora_model(extra_targets=("embed_tokens",)),
    "dora, magnitudes at 0, Axolotl's layout": zero_magnitude_dora,
    "dora embedding": dora_embedding_model,
    "dora embedding, Axolotl's layout": dora_embedding_model,
}


NO_REENTRANT = CheckpointImpl.NO_REENTRANT


def checkpoint_layers(model: nn.Module) -> None:
    """Axolotl's `fsdp_config.activation_checkpointing`: every decoder layer in a non-reentrant
    `checkpoint_wrapper`, which recomputes its forward during backward, in eval mode too."""
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=NO_REENTRANT),
        check_fn=lambda module: isinstance(module, LlamaDecoderLayer),
    )
    assert any(isinstance(module, CheckpointWrapper) for module in model.modules())


def join(rank: int, port: int) -> None:
    """Join the gloo group; a rank left waiting in a collective (ranks out of lockstep) fails
    instead of hanging."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),
    )


def worker(rank: int, port: int, out_dir: str) -> None:
    join(rank, port)
    try:
        model = lora_model()
        initial = {key: p.detach().clone() for key, p in trainable_parameters(model).items()}

        def score(prepared: nn.Module, trainable) -> FishMask:
            return compute_fish_mask(
                prepared, SHARES[rank], CONFIG, progress=False, trainable=trainable
            )

        adopted: list[tuple[FishMask, str]] = []
        callback = ScoredWhenTrainingStarts(model, score, lambda *mask: adopted.append(mask))
        names = names_of(model, trainable_parameters(model))
        shard(model)
        chunked = compute_fish_mask(  # two passes in lockstep, labels drawn from the model
            model,
            SHARES[rank],
            SAMPLED,
            progress=False,
            trainable=parameters_by_name(model, names),
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        state = SimpleNamespace(is_world_process_zero=rank == 0)
        callback.on_train_begin(SimpleNamespace(output_dir=out_dir), state, None, model=model)
        params = parameters_by_name(model, names)
        requires_grad = {key: p.requires_grad for key, p in params.items()}
        model.train()
        for step in range(STEPS):
            model(**TRAINING[WORLD * step + rank]).loss.backward()
            optimizer.step()
            callback.on_optimizer_step(None, None, None)
            optimizer.zero_grad()
        with_state = {key for key, p in params.items() if p in optimizer.state}
        final = {key: p.full_tensor() for key, p in params.items()}
        run = {"initial": initial, "final": final, "requires_grad": requires_grad}
        run |= {"with_state": with_state, "mask": callback.digest}
        run["adopted"] = [(mask is callback.mask, digest) for mask, digest in adopted]
        run |= {"chunked": chunked.masks, "chunked_examples": chunked.metadata["num_examples"]}
        try:  # adaption prompts take the one-example path: not on slices
            prompted = llama_adapter_model()
            names = names_of(prompted, trainable_parameters(prompted))
            shard(prompted)
            trainable = parameters_by_name(prompted, names)
            compute_fish_mask(prompted, SHARES[rank], CONFIG, progress=False, trainable=trainable)
        except ValueError as err:
            run["refused"] = str(err)
        try:
            trainable_parameters(prompted)
        except ValueError as err:
            run["unnamed"] = str(err)
        torch.save(run, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def other_adapters_worker(rank: int, port: int, out_dir: str) -> None:
    join(rank, port)
    try:
        masks = {}
        for name, build in OTHER_ADAPTERS.items():
            model = build()
            assert why_not_after_sharding(model, CONFIG) is None
            names = names_of(model, trainable_parameters(model))
            if "activation checkpointing" in name:
                checkpoint_layers(model)
            (shard_like_axolotl if "Axolotl's layout" in name else shard)(model)
            trainable = parameters_by_name(model, names)
            mask = compute_fish_mask(
                model, SHARES[rank], PER_TENSOR, progress=False, trainable=trainable
            )
            masks[name] = mask.masks
            if name == "norms":  # outside a backward: sharded, a rule reading them refuses
                norm_rule = next(r for r in claim_rules(model, trainable) if r.reads_values)
                try:
                    check_gathered(norm_rule)
                except RuntimeError as err:
                    masks["resharded"] = str(err)
        torch.save(masks, f"{out_dir}/others{rank}.pt")
    finally:
        dist.destroy_process_group()


# Two warm-up steps, but rank 1 holds one micro-batch: every rank must stop after one.
WARMUP = FishMaskConfig(keep_ratio=0.2, num_samples=64, warmup_steps=2)


def warmup_worker(rank: int, port: int, out_dir: str) -> None:
    """The dense warm-up and the pass on the sharded model, and on a whole model in each
    process (gradients averaged over the ranks, as under DDP), from the same initial adapter.
    A rank that stepped alone would leave the other waiting in a collective (a timeout)."""
    join(rank, port)
    try:
        model = lora_model()
        initial = {key: p.detach().clone() for key, p in trainable_parameters(model).items()}
        names = names_of(model, trainable_parameters(model))
        shard(model)
        trainable = parameters_by_name(model, names)
        sharded = compute_fish_mask(
            model, SHARES[rank], WARMUP, progress=False, learning_rate=0.05, trainable=trainable
        )
        again = compute_fish_mask(  # the DDP path
            lora_model(), SHARES[rank], WARMUP, progress=False, learning_rate=0.05
        )
        after = {key: p.full_tensor() for key, p in trainable.items()}
        run = {"sharded": sharded.masks, "again": again.masks}
        torch.save(run | {"initial": initial, "after": after}, f"{out_dir}/warmup{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_warm_up_trains_the_sharded_adapter_in_lockstep_and_restores_it(tmp_path):
    mp.spawn(warmup_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        run = torch.load(tmp_path / f"warmup{rank}.pt")
        assert set(run["sharded"]) == set(run["again"])
        for key, keep in run["again"].items():
            assert torch.equal(run["sharded"][key], keep), (rank, key)
        # The warm-up moved lora_B, so lora_A entries got real scores and some were selected.
        assert any("lora_A" in key and keep.any() for key, keep in run["sharded"].items())
        for key, value in run["initial"].items():  # restored after the pass
            assert torch.equal(run["after"][key], value), (rank, key)


def test_other_adapters_score_on_the_sharded_model_as_in_one_process(tmp_path):
    mp.spawn(other_adapters_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for name, build in OTHER_ADAPTERS.items():
        single = compute_fish_mask(build(), BATCHES, PER_TENSOR, progress=False).masks
        for rank in range(WORLD):
            sharded = torch.load(tmp_path / f"others{rank}.pt")
            assert set(sharded[name]) == set(single), name
            for key, keep in single.items():
                assert torch.equal(sharded[name][key], keep), (name, key)
            assert "input_layernorm.weight" in sharded["resharded"], sharded["resharded"]
            assert "FSDP2 has resharded" in sharded["resharded"]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_scoring")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def test_the_sharded_mask_is_one_process_s_over_the_same_examples(sharded_runs):
    out, ranks = sharded_runs
    single = compute_fish_mask(lora_model(), BATCHES, CONFIG, progress=False)
    saved = FishMask.load(out)  # written by rank 0 when training started
    assert saved.metadata["num_examples"] == 16 == single.metadata["num_examples"]
    assert saved.metadata["world_size"] == 2 and "tie_breaks" not in saved.metadata
    assert saved.k == single.k
    for key, keep in single.masks.items():
        assert torch.equal(saved.masks[key], keep), key
    assert ranks[0]["mask"] == ranks[1]["mask"] == mask_digest(saved.masks)
    assert ranks[0]["adopted"] == [(True, ranks[0]["mask"])]  # reported once, after the check
    assert all("lora_A" not in key for key, keep in saved.masks.items() if keep.any())


def test_sampled_fisher_in_chunks_on_the_sharded_model_is_one_process_s(sharded_runs):
    _, ranks = sharded_runs
    single = compute_fish_mask(lora_model(), BATCHES, SAMPLED, progress=False)
    assert single.metadata["fisher_chunks"] == 2
    for run in ranks:
        assert run["chunked_examples"] == 16
        for key, keep in single.masks.items():
            assert torch.equal(run["chunked"][key], keep), key


def test_only_selected_entries_train_though_the_optimizer_was_built_first(sharded_runs):
    out, ranks = sharded_runs
    mask = FishMask.load(out)
    for run in ranks:
        for key, keep in mask.masks.items():
            before, after = run["initial"][key], run["final"][key]
            assert torch.equal(after[~keep], before[~keep]), key
            assert run["requires_grad"][key] == bool(keep.any()), key
    moved = sum(
        int((ranks[0]["final"][key] != ranks[0]["initial"][key]).sum()) for key in mask.masks
    )
    assert moved == mask.k
    # AdamW skips tensors without a gradient: no state for the ones with no selected entry.
    trained = {key for key, keep in mask.masks.items() if keep.any()}
    assert ranks[0]["with_state"] == trained == ranks[1]["with_state"]


def test_tensors_scored_one_example_at_a_time_are_refused_by_name(sharded_runs):
    _, ranks = sharded_runs
    for run in ranks:
        assert "adaption_prompt" in run["refused"] and "FSDP2 has sharded it" in run["refused"]
        assert "already sharded" in run["unnamed"] and "names_of" in run["unnamed"]


@pytest.mark.parametrize(
    ("model", "config", "reason"),
    [
        (lora_model, CONFIG, None),
        (lora_model, FishMaskConfig(keep_ratio=0.2, strategy="random"), None),
        (lora_model, FishMaskConfig(keep_ratio=0.2, warmup_steps=2), None),
        (tiny_base_model, CONFIG, "full-parameter mode"),
        (dora_model, CONFIG, None),
        (lambda: tiny_lora_model(extra_targets=("embed_tokens",)), CONFIG, None),
        (partial(dora_model, "embed_tokens"), CONFIG, None),
        (llama_adapter_model, CONFIG, "self_attn.adaption_prompt' (2 in all)"),
    ],
    ids=[
        "lora",
        "random",
        "warm-up",
        "full-parameter",
        "dora",
        "lora-embedding",
        "dora-embedding",
        "llama-adapter",
    ],
)
def test_why_not_after_sharding(model, config, reason):
    got = why_not_after_sharding(model(), config)
    assert got is None if reason is None else reason in got


FSDP2_CFG = DictDefault({"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}})


def test_the_plugin_scores_after_sharding_when_it_can_and_says_why_not(caplog):
    with caplog.at_level("INFO"):
        assert scores_after_sharding(FSDP2_CFG, lora_model(), CONFIG)
        assert scores_after_sharding(FSDP2_CFG, dora_model(), CONFIG)
        assert not scores_after_sharding(FSDP2_CFG, llama_adapter_model(), CONFIG)
        assert not scores_after_sharding(DictDefault({}), lora_model(), CONFIG)
    assert "computed when training starts" in caplog.text
    assert "scoring before FSDP2 shards the model, on one device: tensor" in caplog.text
    off = FishMaskConfig(keep_ratio=0.2, score_after_sharding=False)
    assert not scores_after_sharding(FSDP2_CFG, lora_model(), off)
    offload = DictDefault({"fsdp_version": 2, "fsdp_config": {"offload_params": True}})
    with caplog.at_level("INFO"):
        assert not scores_after_sharding(offload, lora_model(), CONFIG)
    assert "on one device: fsdp_config.offload_params keeps the sharded" in caplog.text
    forced = FishMaskConfig(keep_ratio=0.2, score_after_sharding=True)
    with pytest.raises(ValueError, match="true, but tensor .*adaption_prompt"):
        scores_after_sharding(FSDP2_CFG, llama_adapter_model(), forced)
    # Only rank 0 loads weights: the mask can only be made after sharding.
    efficient = DictDefault({"fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": True}})
    assert scores_after_sharding(efficient, lora_model(), CONFIG)
    with pytest.raises(ValueError, match="cpu_ram_efficient_loading: true needs the mask made af"):
        scores_after_sharding(efficient, llama_adapter_model(), CONFIG)


def test_a_full_parameter_model_cannot_defer_its_mask():
    with pytest.raises(ValueError, match="full-parameter mask must exist before"):
        ScoredWhenTrainingStarts(tiny_base_model(), lambda model, trainable: None)
