"""The Axolotl plugin: translates the `fish_mask:` config into calls to the core.

Floor 6: the only room (with `cli` and `demo` above it) that imports Axolotl; may import every
core room.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.dict import DictDefault
from axolotl.utils.logging import get_logger
from torch import nn
from transformers import Trainer, TrainerCallback, set_seed

from axolotl_fish.adapters.tensors import trains_own_weights
from axolotl_fish.base.ranks import rank_and_world
from axolotl_fish.config import FishMaskConfig
from axolotl_fish.distributed.sharded_scoring import ScoredWhenTrainingStarts
from axolotl_fish.fisher.checkpointing import checkpointed_layers
from axolotl_fish.integration import bottleneck
from axolotl_fish.integration.args import LORA_KERNEL_KEYS
from axolotl_fish.integration.core_logs import show_core_logs
from axolotl_fish.integration.deepspeed import mask_callback, whole_for_scoring
from axolotl_fish.integration.multiprocess import (
    check_every_process_is_a_rank,
    cpu_device_map,
    skip_gpu_peer_check,
)
from axolotl_fish.integration.scoring_device import (
    on_training_device,
    scores_after_sharding,
    under_fsdp2,
)
from axolotl_fish.masks.file import MASK_FILENAME, FishMask
from axolotl_fish.masks.source import load_mask
from axolotl_fish.pipeline.compute import compute_fish_mask
from axolotl_fish.pipeline.provenance import check_mask_fits
from axolotl_fish.reports.model_card import add_card_section_on_create
from axolotl_fish.reports.quantized import quantized_base
from axolotl_fish.reports.summary import summarize
from axolotl_fish.training.delta import DELTA_FILENAME

LOG = get_logger(__name__)


class FishMaskPlugin(BasePlugin):
    """FISH-Tuning: compute a Fisher mask before training and train only its entries."""

    _mask: FishMask | None = None

    @property
    def mask(self) -> FishMask | None:
        """The mask of the current run, once `post_trainer_create` has made or loaded it."""
        return self._mask

    def get_input_args(self) -> str:
        return "axolotl_fish.integration.args.FishMaskPluginArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return bottleneck.capabilities()

    def load_adapter(
        self, model: nn.Module, cfg: DictDefault, inference: bool = False, config_only: bool = False
    ) -> tuple[nn.Module, None] | None:
        return bottleneck.load(model, cfg, config_only)

    def add_callbacks_post_trainer(
        self, cfg: DictDefault, trainer: Trainer
    ) -> list[TrainerCallback]:
        return bottleneck.callbacks(cfg, trainer)

    def register(self, cfg: dict) -> None:
        show_core_logs()
        if cfg.get("fish_mask") is None and cfg.get("adapter") != bottleneck.ADAPTER:
            LOG.warning(
                "FishMaskPlugin is listed but there is no `fish_mask:` block: it does nothing."
            )
        if cfg.get("fish_mask") is None:
            return
        skip_gpu_peer_check()  # register() runs before Axolotl's check, in every process
        if cfg.get("adapter") not in ("lora", "qlora"):  # Axolotl turns its kernels on for these
            return
        unset = [key for key in LORA_KERNEL_KEYS if cfg.get(key) is None]
        for key in unset:
            cfg[key] = False
        if unset:
            LOG.info(
                f"fish_mask: turned off Axolotl's fused LoRA kernels ({', '.join(unset)}); they "
                f"bypass the LoRA modules whose inputs the Fisher pass records."
            )

    def pre_model_load(self, cfg: DictDefault) -> None:
        if not cfg.fish_mask:
            return
        # Axolotl seeds only when the Trainer is built, after LoRA's A matrices were drawn, so
        # two runs of one config would start from (and score) different adapters.
        seed = 42 if cfg.seed is None else cfg.seed
        set_seed(seed)
        LOG.info(
            f"fish_mask: seeded torch with {seed} before the adapter is built (reproducible init)"
        )
        cpu_device_map(cfg)

    def post_trainer_create(self, cfg: DictDefault, trainer: Trainer) -> None:
        if not cfg.fish_mask:
            return
        check_every_process_is_a_rank(trainer)
        if quantized := quantized_base(trainer.model):
            LOG.info(f"fish_mask: {quantized}")
        config = FishMaskConfig(**cfg.fish_mask)
        source = _resume_mask_path(cfg) or _mask_path(config)
        if source is None and scores_after_sharding(cfg, trainer.model, config):
            trainer.add_callback(
                ScoredWhenTrainingStarts(
                    trainer.model,
                    partial(_computed_mask, trainer, config),
                    partial(self._adopt, trainer),
                )
            )
            return
        if source is None:
            with whole_for_scoring(cfg, trainer.model):
                mask = _computed_mask(trainer, config, trainer.model)
        else:
            mask = _load_mask(source, config)
            check_mask_fits(mask, trainer.model, str(source))
            _warn_if_settings_differ(mask, config)
        if under_fsdp2(cfg) and trains_own_weights(trainer.model):
            LOG.info(
                "fish_mask: full-parameter mode under FSDP2: the value vectors of the selected "
                "entries are sharded like the weights (AdamW state for k entries across all "
                "ranks); every save gathers the sparse delta"
            )
        callback = mask_callback(cfg, trainer.model, mask)
        self._adopt(trainer, mask, callback.digest)
        trainer.add_callback(callback)

    def _adopt(self, trainer: Trainer, mask: FishMask, digest: str) -> None:
        """Report the run's mask; world process zero keeps it for the model card it writes and
        for the report that ends the run."""
        LOG.info(summarize(mask))
        rank, world = rank_and_world()
        if world > 1:
            LOG.info(
                f"fish_mask: rank {rank} of {world} holds mask sha256:{digest}, the same as "
                f"every other rank",
                main_process_only=False,
            )
        self._mask = mask if trainer.is_world_process_zero() else None
        if self._mask is not None:
            add_card_section_on_create(trainer, mask)  # the README.md Axolotl has the Trainer write

    def post_train_unload(self, cfg: DictDefault) -> None:
        # The CLI's last hook, after the final adapter save: the report ends the run's log. The
        # process group is gone by now, so Axolotl's main-process filter would fail: only the
        # world process zero kept the mask.
        mask, self._mask = self._mask, None
        if mask is not None:
            path = Path(cfg.output_dir) / MASK_FILENAME
            delta = ""
            if cfg.adapter is None and not cfg.deepspeed:  # dense-masked under DeepSpeed
                delta = (
                    f", sparse delta in {Path(cfg.output_dir) / DELTA_FILENAME} (rebuild the "
                    f"model with `axolotl fish-mask apply {cfg.base_model} DELTA OUT_DIR`)"
                )
            LOG.info(
                f"fish_mask: weights in {cfg.output_dir}, mask in {path}{delta}\n{summarize(mask)}",
                main_process_only=False,
            )


def _resume_mask_path(cfg: DictDefault) -> Path | None:
    """The mask saved in the checkpoint this run resumes from: a resume must keep its mask."""
    checkpoint = cfg.resume_from_checkpoint
    if checkpoint is None and cfg.auto_resume_from_checkpoints:
        checkpoint = _last_complete_checkpoint(cfg)
    if checkpoint is None:
        return None
    path = Path(checkpoint) / MASK_FILENAME
    run_mask = Path(cfg.output_dir) / MASK_FILENAME
    if (
        not path.is_file()
        and Path(checkpoint).resolve().parent == Path(cfg.output_dir).resolve()
        and run_mask.is_file()
    ):
        # Killed between the checkpoint and its mask: the run wrote its mask when it started.
        LOG.warning(f"fish_mask: {checkpoint} has no {MASK_FILENAME}; using the run's {run_mask}")
        path = run_mask
    if not path.is_file():
        raise FileNotFoundError(
            f"Resuming from {checkpoint}, which has no {MASK_FILENAME}: recomputing the mask on "
            f"trained weights would select other entries. Point fish_mask.mask_path at the "
            f"run's mask file."
        )
    LOG.info(f"fish_mask: resuming with the mask saved in {path}")
    return path


def _last_complete_checkpoint(cfg: DictDefault) -> str | None:
    """The newest checkpoint the Trainer finished saving, which Axolotl's auto-resume is then told
    to use (by setting `resume_from_checkpoint`).

    Axolotl takes the newest `checkpoint-N` folder, even one a kill interrupted while it was being
    saved; the resume then crashes on its missing `trainer_state.json` (the Trainer writes it last).
    """
    checkpoints = sorted(
        (p for p in Path(cfg.output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for checkpoint in checkpoints:
        if (checkpoint / "trainer_state.json").is_file():
            cfg.resume_from_checkpoint = str(checkpoint)
            return cfg.resume_from_checkpoint
        LOG.warning(
            f"fish_mask: not resuming from {checkpoint}: it has no trainer_state.json (the run "
            f"was stopped while saving it)"
        )
    if checkpoints:
        raise FileNotFoundError(
            f"auto_resume_from_checkpoints: no checkpoint in {cfg.output_dir} was saved completely "
            f"(none has trainer_state.json); remove them to start afresh."
        )
    return None


def _mask_path(config: FishMaskConfig) -> str | None:
    if config.mask_path is not None:
        LOG.info(f"fish_mask: using the saved mask {config.mask_path} (no Fisher pass)")
    return config.mask_path


def _load_mask(source: Path | str, config: FishMaskConfig) -> FishMask:
    """Read a saved mask (a local file or folder, or `hf://` Hub reference); an unreadable
    `mask_path` names the config key that pointed at it."""
    try:
        return load_mask(source)
    except (FileNotFoundError, ValueError) as err:
        if str(source) != config.mask_path:
            raise
        raise type(err)(f"fish_mask.mask_path: {err}") from err


def _warn_if_settings_differ(mask: FishMask, config: FishMaskConfig) -> None:
    """A loaded mask wins over the config; say so when they disagree. (Whether it fits the
    model - keys, shapes, the adapter it was made for - is `check_mask_fits`'s job.)"""
    differ = [
        f"{name}: config {getattr(config, name)!r}, mask {mask.metadata.get(name)!r}"
        for name in ("strategy", "keep_ratio", "seed", "include", "exclude")
        if name in mask.metadata and mask.metadata[name] != getattr(config, name)
    ]
    if differ:
        LOG.warning(
            "fish_mask: the loaded mask was made with other settings; it is used as saved ("
            + "; ".join(differ)
            + ")"
        )


def _computed_mask(
    trainer: Trainer,
    config: FishMaskConfig,
    model: nn.Module,
    trainable: Mapping[str, nn.Parameter] | None = None,
) -> FishMask:
    """The mask of `model`: whole on one device, or (with `trainable`) sharded by FSDP2."""
    LOG.info(
        f"fish_mask: scoring entries with strategy={config.strategy} over "
        f"{config.num_samples} training examples"
    )
    with ExitStack() as stack:
        if trainable is None:
            stack.enter_context(on_training_device(model, trainer.args.device))
        if trainer.args.gradient_checkpointing:  # the Trainer turns it on only in `train()`
            layers = stack.enter_context(checkpointed_layers(model))
            LOG.info(f"fish_mask: gradient_checkpointing: the pass checkpoints {layers} layers")
        return compute_fish_mask(
            model,
            trainer.get_train_dataloader(),
            config,
            learning_rate=trainer.args.learning_rate,
            progress=trainer.is_world_process_zero(),
            trainable=trainable,
        )
