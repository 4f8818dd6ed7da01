"""The pluggy scorer registry: built-ins, checks on what a scorer returns, and a third-party
scorer installed as a distribution with an `axolotl_fish.scorers` entry point."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from axolotl_run import load_adapter_tensors, run_axolotl_train, write_config
from tiny_peft import padded_batches, tiny_lora_model

from axolotl_fish.adapters.tensors import adapter_parameters
from axolotl_fish.config import FishMaskConfig
from axolotl_fish.masks.file import FishMask
from axolotl_fish.pipeline.compute import compute_fish_mask
from axolotl_fish.scorers import Scores, ScoringContext, available_scorers, hookimpl, score
from axolotl_fish.scorers.registry import plugin_manager

# What a third-party package ships: a module with a hookimpl, found through its entry point.
POSITION_SCORER = '''
"""Scores an entry by its position when all entries are laid out in sorted key order."""

import math

import torch

from axolotl_fish.scorers import Scores, hookimpl


def position_scores(shapes):
    scores, offset = {}, 0
    for key in sorted(shapes):
        n = math.prod(shapes[key])
        scores[key] = torch.arange(offset, offset + n, dtype=torch.float32).reshape(shapes[key])
        offset += n
    return scores


def position(context):
    shapes = {key: tuple(p.shape) for key, p in context.params.items()}
    return Scores(position_scores(shapes), metadata={"position_scorer_version": 1})


@hookimpl
def fish_mask_scorers():
    return {"position": position}
'''


@pytest.fixture(scope="module")
def scorer_package(tmp_path_factory):
    """A folder that importlib.metadata sees as an installed distribution `position-scorer`."""
    root = tmp_path_factory.mktemp("site")
    (root / "position_scorer.py").write_text(POSITION_SCORER)
    dist_info = root / "position_scorer-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: position-scorer\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[axolotl_fish.scorers]\nposition = position_scorer\n"
    )
    return root


@pytest.fixture
def installed(scorer_package, monkeypatch):
    """The package on sys.path and the registry reloaded; both undone afterwards."""
    monkeypatch.syspath_prepend(str(scorer_package))
    plugin_manager.cache_clear()
    yield importlib.import_module("position_scorer")
    plugin_manager.cache_clear()


@pytest.fixture
def registered():
    """Register plugin objects on the live registry for one test."""
    plugins = []

    def register(plugin, name):
        plugin_manager().register(plugin, name=name)
        plugins.append(plugin)

    yield register
    for plugin in plugins:
        plugin_manager().unregister(plugin)


def expected_top(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The k highest of distinct scores, without the core's selection code."""
    threshold = torch.cat([s.flatten() for s in scores.values()]).topk(k).values[-1]
    return {key: s >= threshold for key, s in scores.items()}


def context(strategy: str = "fisher") -> ScoringContext:
    model = tiny_lora_model()
    config = FishMaskConfig(keep_ratio=0.5, num_samples=8, strategy=strategy)
    return ScoringContext(model, padded_batches(8, 4), adapter_parameters(model), config, False)


def test_builtins_come_through_the_hook():
    assert list(available_scorers()) == ["fisher", "random", "reverse"]
    impls = plugin_manager().hook.fish_mask_scorers.get_hookimpls()
    assert [impl.plugin_name for impl in impls] == ["axolotl_fish.builtin"]


def unread_batches():
    raise AssertionError("the data was read before the strategy was checked")
    yield  # a generator: the assertion fires on the first read


def test_unknown_strategy_names_the_available_ones_before_any_work():
    config = FishMaskConfig(keep_ratio=0.5, strategy="magic", warmup_steps=2)
    with pytest.raises(ValueError, match="unknown scorer 'magic': expected 'fisher', 'random' or"):
        compute_fish_mask(tiny_lora_model(), unread_batches(), config, progress=False)


def test_reverse_is_negated_fisher():
    ctx = context()
    fisher, reverse = score("fisher", ctx), score("reverse", ctx)
    assert fisher.metadata["num_examples"] == 8 == reverse.metadata["num_examples"]
    assert any(s.abs().sum() > 0 for s in fisher.scores.values())
    for key, value in fisher.scores.items():
        assert torch.equal(reverse.scores[key], -value), key


class BadScorers:
    """Scorers that break the contract in one way each."""

    @hookimpl
    def fish_mask_scorers(self):
        def drop_last(ctx):
            return Scores({k: torch.zeros(p.shape) for k, p in list(ctx.params.items())[:-1]})

        def flatten(ctx):
            return Scores({k: torch.zeros(p.numel()) for k, p in ctx.params.items()})

        def nan(ctx):
            return Scores({k: torch.full(p.shape, math.nan) for k, p in ctx.params.items()})

        return {"drop_last": drop_last, "flatten": flatten, "nan": nan}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("drop_last", "Scorer 'drop_last' returned no score for tensor '.*down_proj"),
        ("flatten", r"Scorer 'flatten' returned \(\d+,\) for tensor '.*', expected a tensor of"),
        ("nan", "Scorer 'nan' returned non-finite or non-float scores for tensor"),
    ],
)
def test_a_scorer_that_breaks_the_contract_is_named(registered, name, message):
    registered(BadScorers(), "bad-scorers")
    with pytest.raises(ValueError, match=message):
        score(name, context())


def test_a_name_provided_twice_names_both_plugins(registered):
    class Shadow:
        @hookimpl
        def fish_mask_scorers(self):
            return {"fisher": lambda ctx: None}

    registered(Shadow(), "shadow")
    with pytest.raises(ValueError, match="'fisher' is provided by both '.*' and '.*'"):
        available_scorers()


def test_an_installed_scorer_is_selected_by_name(installed):
    assert "position" in available_scorers()
    model = tiny_lora_model()
    config = FishMaskConfig(keep_ratio=0.25, strategy="position")
    mask = compute_fish_mask(model, padded_batches(4, 4), config, progress=False)
    shapes = {key: tuple(m.shape) for key, m in mask.masks.items()}
    expected = expected_top(installed.position_scores(shapes), mask.k)
    assert mask.k == round(0.25 * mask.total)
    assert all(torch.equal(mask.masks[k], m) for k, m in expected.items())
    assert mask.metadata["strategy"] == "position" and mask.metadata["position_scorer_version"] == 1


@pytest.mark.e2e
def test_axolotl_train_with_an_installed_scorer(
    installed, scorer_package, monkeypatch, tmp_path, tiny_llama_dir, alpaca_jsonl
):
    monkeypatch.setenv("PYTHONPATH", str(scorer_package))  # the `axolotl train` process finds it
    fish_mask = {"keep_ratio": 0.25, "strategy": "position"}
    config = write_config(
        tmp_path,
        tiny_llama_dir,
        alpaca_jsonl,
        plugins=["axolotl_fish.FishMaskPlugin"],
        fish_mask=fish_mask,
        max_steps=2,
    )
    run_axolotl_train(config, cwd=tmp_path)
    mask = FishMask.load(tmp_path / "out")
    shapes = {key: tuple(m.shape) for key, m in mask.masks.items()}
    expected = expected_top(installed.position_scores(shapes), round(0.25 * mask.total))
    assert all(torch.equal(mask.masks[k], m) for k, m in expected.items())
    adapter = load_adapter_tensors(tmp_path / "out")
    for key, keep in mask.masks.items():
        if "lora_B" in key:  # starts at 0: entries outside the mask never move
            assert not adapter[key][~keep].any(), key
