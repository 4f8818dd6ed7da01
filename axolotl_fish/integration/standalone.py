"""The mask `axolotl train CONFIG` would compute, without training: the same config loading,
datasets, model, trainer and plugin hook, stopped before the first step."""

from __future__ import annotations

from pathlib import Path

import yaml
from axolotl.utils.dict import DictDefault
from axolotl.utils.logging import get_logger

from axolotl_fish.masks.file import MASK_FILENAME, FishMask

LOG = get_logger(__name__)
_FSDP_KEYS = ("fsdp", "fsdp_config", "fsdp_version")


def _in_one_process(config: Path) -> DictDefault:
    """The config without its FSDP keys: `compute` runs one process, where the Trainer refuses
    FSDP ("only works in distributed training"), and scoring happens before any sharding."""
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    dropped = [key for key in _FSDP_KEYS if raw.pop(key, None) is not None]
    if dropped:
        LOG.info(f"fish_mask: scoring in one process, without {', '.join(dropped)} of {config}")
    return DictDefault(raw)


def compute_mask_for_config(config: Path) -> tuple[FishMask, Path]:
    """Run `axolotl train`'s setup for `config` up to `post_trainer_create`, where the plugin
    scores the adapter; return its mask and where a run of `config` would save it."""
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets, load_preference_datasets
    from axolotl.integrations.base import PluginManager
    from axolotl.train import setup_model_and_trainer

    from axolotl_fish.integration import FishMaskPlugin

    cfg = load_cfg(_in_one_process(config))
    manager = PluginManager.get_instance()
    plugin = next((p for p in manager.plugins.values() if isinstance(p, FishMaskPlugin)), None)
    if plugin is None or not cfg.fish_mask:
        raise ValueError(
            f"{config} needs `plugins: [axolotl_fish.FishMaskPlugin]` and a `fish_mask:` block "
            f"(without the plugin, Axolotl drops the block)."
        )
    # Compute afresh: with these, the plugin would only read a saved mask back.
    cfg.fish_mask["mask_path"] = None
    cfg.resume_from_checkpoint = None
    cfg.auto_resume_from_checkpoints = False
    # As axolotl.cli.train.do_train loads data.
    dataset_meta = manager.load_datasets(cfg, preprocess=False)
    if dataset_meta is None:
        load = load_preference_datasets if cfg.rl else load_datasets
        dataset_meta = load(cfg=cfg, cli_args=TrainerCliArgs())
    setup_model_and_trainer(cfg, dataset_meta)
    if plugin.mask is None:  # post_trainer_create keeps it on world process zero
        raise RuntimeError(f"Axolotl built the trainer for {config} but the plugin made no mask.")
    return plugin.mask, Path(cfg.output_dir) / MASK_FILENAME
