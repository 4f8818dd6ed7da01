"""Offline building blocks for tests that train with axolotl on CPU.

Everything here is made locally and deterministically (no model hub, no network): a tiny byte-level
BPE tokenizer, tiny random causal LMs saved with it, an alpaca JSONL data set, a CPU-safe LoRA
config, and runners for ``axolotl train``. Fixtures in ``conftest.py`` wrap these; tests import
the plain functions (``from axolotl_run import write_config, run_axolotl_train``).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from unittest import mock

import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

# huggingface_hub reads these when first imported, so conftest sets them before anything imports
# transformers; that is why transformers is imported inside the functions below.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",  # telemetry otherwise retries network calls
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "CUDA_VISIBLE_DEVICES": "",
}

ARCHS: tuple[str, ...] = ("llama", "qwen2", "gpt2")

# LoRA keys per model_type. GPT-2 has fused Conv1D projections (weight stored as in x out), which
# lora_target_linear does not find; fan_in_fan_out says so to PEFT instead of a warning.
LORA_BY_MODEL_TYPE: dict[str, dict[str, Any]] = {
    "llama": {"lora_target_modules": ["q_proj", "v_proj"]},
    "qwen2": {"lora_target_modules": ["q_proj", "v_proj"]},
    "gpt2": {"lora_target_modules": ["c_attn", "c_proj"], "lora_fan_in_fan_out": True},
}

LABELS: tuple[str, str] = ("positive", "negative")
INSTRUCTION = "Classify the sentiment of the review."
_SUBJECTS = ("the movie", "the plot", "the acting", "the music", "the ending", "this film")
_WORDS: dict[str, tuple[str, ...]] = {
    "positive": ("great", "wonderful", "lovely", "superb", "fun", "moving", "charming"),
    "negative": ("terrible", "boring", "awful", "dull", "bad", "painful", "tedious"),
}
# axolotl's alpaca prompt (prompters.AlpacaPrompter); the tokenizer learns it so rows stay short.
_ALPACA_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
_SPECIAL_TOKENS = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}


def alpaca_rows(n_rows: int, seed: int = 0) -> list[dict[str, str]]:
    """Short sentiment rows with alternating labels, so any batch of two or more has both."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        label = LABELS[i % 2]
        review = f"{rng.choice(_SUBJECTS)} was {rng.choice(_WORDS[label])}."
        rows.append({"instruction": INSTRUCTION, "input": review, "output": label})
    return rows


def alpaca_text(row: dict[str, str]) -> str:
    """The text axolotl's ``type: alpaca`` strategy builds from one row (without BOS/EOS)."""
    return (
        f"{_ALPACA_SYSTEM}\n\n### Instruction:\n{row['instruction']}\n\n"
        f"### Input:\n{row['input']}\n\n### Response:\n{row['output']}"
    )


def build_tokenizer(vocab_size: int = 512, n_lines: int = 300) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on alpaca-formatted rows: any text encodes, the prompt stays short.

    A BOS is prepended like Llama's tokenizer does; axolotl appends EOS itself.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([alpaca_text(r) for r in alpaca_rows(n_lines, seed=1)], trainer)
    bos = _SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **_SPECIAL_TOKENS)


def tiny_model_config(arch: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """A 2-layer, 64-wide config; dropout off so runs are reproducible."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    decoder: dict[str, Any] = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    if arch == "llama":
        return LlamaConfig(**decoder, **ids)
    if arch == "qwen2":
        return Qwen2Config(**decoder, **ids)
    if arch == "gpt2":
        no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **no_dropout, **ids)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def save_tiny_model(
    arch: str, tokenizer: PreTrainedTokenizerFast, out_dir: Path, seed: int = 0
) -> Path:
    """Save a seeded random fp32 model plus tokenizer: a folder usable as ``base_model``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_model_config(arch, tokenizer), dtype=torch.float32
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# Multi-process runs under weight decay, clipping and accumulation (the settings under which
# masked entries could move), data in file order so that the ranks' examples are one process's.
SHARDED_HARSH: dict[str, Any] = {
    "curriculum_sampling": True,
    "plugins": ["axolotl_fish.FishMaskPlugin"],
    "weight_decay": 0.1,
    "max_grad_norm": 0.5,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "save_steps": 2,
}


def write_alpaca_jsonl(path: Path, n_rows: int = 64, seed: int = 0) -> Path:
    """Write ``alpaca_rows`` as JSONL; 64 rows = 16 micro-batches of 4."""
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(n_rows, seed)))
    return path


def write_config(tmp_path: Path, base_model_dir: Path, data_path: Path, **overrides: Any) -> Path:
    """Write a CPU-safe LoRA config to ``tmp_path/config.yaml``; ``overrides`` replace top keys.

    LoRA targets follow the model's ``model_type`` (``LORA_BY_MODEL_TYPE``). The fused Triton LoRA
    kernels and bf16/fp16/tf32 are off: axolotl turns them on without checking for CUDA.
    """
    model_type = json.loads((Path(base_model_dir) / "config.json").read_text())["model_type"]
    cfg: dict[str, Any] = {
        "base_model": str(base_model_dir),
        "datasets": [{"path": str(data_path), "ds_type": "json", "type": "alpaca"}],
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        **LORA_BY_MODEL_TYPE[model_type],
        "sequence_len": 128,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "lora_embedding_kernel": False,
        "val_set_size": 0,
        "save_steps": 2,
        "output_dir": str(tmp_path / "out"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "seed": 42,
        "logging_steps": 1,
        "save_safetensors": True,
    }
    cfg.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _offline_env() -> dict[str, str]:
    """This environment plus OFFLINE_ENV, with the venv's bin/ first: ``axolotl train`` execs
    ``accelerate launch`` found on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **OFFLINE_ENV}
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_shim_env(shim: str, flag: str) -> dict[str, str]:
    """What a 2-process ``axolotl train`` needs to take its GPU-only sharded path on CPU: gloo
    processes (ACCELERATE_USE_CPU), the test-only ``sitecustomize`` in ``tests/<shim>`` on their
    PYTHONPATH, and the variable ``flag`` that turns that shim on."""
    folder = str(Path(__file__).parent / shim)
    path = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
    return {"ACCELERATE_USE_CPU": "1", flag: "1", "PYTHONPATH": path}


def two_process_launch() -> tuple[str, ...]:
    """``axolotl train`` arguments that start 2 processes through ``accelerate launch``, meeting on
    a free port: tests run side by side (``pytest -n``) would otherwise all meet on 29500."""
    return (
        "--launcher",
        "accelerate",
        "--",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
    )


def start_axolotl(
    args: Sequence[str],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[str] = subprocess.PIPE,
    program: Sequence[str] = (),
) -> subprocess.Popen[str]:
    """Start the real ``axolotl ARGS...`` CLI (or ``PROGRAM ARGS...``) offline on CPU, with
    ``env`` added to the environment, in its own process group: ``os.killpg(proc.pid, ...)``
    also reaches the ``accelerate launch`` child and its workers."""
    cmd = [*(program or [str(Path(sys.executable).parent / "axolotl")]), *args]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**_offline_env(), **(env or {})},
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_axolotl(
    args: Sequence[str],
    cwd: Path,
    timeout: float = 300.0,
    env: Mapping[str, str] | None = None,
    program: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``start_axolotl`` to the end; raise with the log tail on failure or timeout."""
    with start_axolotl(args, cwd, env, program=program) as proc:
        cmd = proc.args
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise AssertionError(
                f"`{' '.join(cmd)}` timed out after {timeout}s; last output:\n{output[-4000:]}"
            ) from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout=output)
    if result.returncode != 0:
        raise AssertionError(
            f"`{' '.join(cmd)}` exited with {result.returncode}; last output:\n{output[-4000:]}"
        )
    return result


def start_axolotl_train(
    config_path: Path,
    cwd: Path,
    cli_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    stdout: int | IO[str] = subprocess.PIPE,
) -> subprocess.Popen[str]:
    """``axolotl train CONFIG [cli_args]``, started (see ``start_axolotl``)."""
    return start_axolotl(["train", str(config_path), *cli_args], cwd, env, stdout)


def run_axolotl_train(
    config_path: Path,
    cwd: Path,
    timeout: float = 300.0,
    cli_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``axolotl train CONFIG [cli_args]``, run to the end (see ``run_axolotl``)."""
    return run_axolotl(["train", str(config_path), *cli_args], cwd, timeout, env)


def train_in_process(config_path: Path) -> None:
    """Run what the ``axolotl train`` child runs, in this process, so imports are paid once.

    ``load_cfg`` registers plugins before validation (their keys survive), normalizes and hands
    the config to the PluginManager; ``do_train`` loads data, trains and unloads. Differences
    from the CLI, each to keep runs in one process independent and repeatable:
    - torch is seeded with ``cfg.seed`` before the model is built. torch seeds its generator
      randomly at start-up and axolotl seeds only when the Trainer is made, after LoRA's A
      matrices are drawn, so two CLI runs of one config start from different adapters.
    - axolotl's stdout tee is off: ``close_debug_log`` deadlocks on a second run (the replaced
      tee is flushed on garbage collection while its non-reentrant lock is held).
    - afterwards the debug.log is closed and the plugin registry emptied.
    Monkeypatches axolotl applies to transformers stay for the session.
    """
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.cli.train import do_train
    from axolotl.integrations.base import PluginManager
    from axolotl.utils.tee import close_debug_log
    from transformers import set_seed

    try:
        with mock.patch.dict(os.environ, {"AXOLOTL_TEE_STDOUT": "0"}):
            cfg = load_cfg(str(config_path))
            set_seed(42 if cfg.seed is None else cfg.seed)  # 42: the Trainer's default
            do_train(cfg, TrainerCliArgs())
    finally:
        close_debug_log()
        manager = PluginManager.get_instance()
        manager.plugins.clear()
        manager.cfg = None


def resume_from_copy(out: Path, tmp_path: Path) -> Path:
    """``tmp_path/out`` holding a copy of ``out/checkpoint-2`` only: a run there with
    ``auto_resume_from_checkpoints`` resumes from it as if it had been stopped after step 2."""
    import shutil

    resumed_out = tmp_path / "out"
    resumed_out.mkdir()
    shutil.copytree(Path(out) / "checkpoint-2", resumed_out / "checkpoint-2")
    return resumed_out


def held_digests(log: str) -> dict[str, str]:
    """{rank: the digest of the mask it holds}, as a multi-process run logs them."""
    return dict(re.findall(r"rank (\d) of 2 holds mask sha256:([0-9a-f]{64})", log))


def load_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Tensors of ``adapter_model.safetensors`` in an output or ``checkpoint-N`` folder."""
    return load_file(Path(adapter_dir) / "adapter_model.safetensors")


def bottleneck_model(base_dir: Path, **settings: Any) -> torch.nn.Module:
    """The base model with fresh bottleneck adapters (``settings``: the ``bottleneck:`` block):
    a run's initial adapter, since the init is seeded."""
    from transformers import AutoModelForCausalLM

    from axolotl_fish.adapters.bottleneck import BottleneckConfig, add_bottleneck

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return add_bottleneck(model, BottleneckConfig(**settings))


def initial_bottleneck(base_dir: Path, **settings: Any) -> dict[str, torch.Tensor]:
    """The tensors of ``bottleneck_model``'s fresh adapter, keyed like the saved adapter."""
    from axolotl_fish.adapters.bottleneck import bottleneck_parameters

    adapter = bottleneck_parameters(bottleneck_model(base_dir, **settings))
    return {key: param.detach() for key, param in adapter.items()}


def bottleneck_file(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of ``bottleneck_adapter.safetensors`` in an output or ``checkpoint-N`` folder."""
    from axolotl_fish.adapters.bottleneck import ADAPTER_FILENAME

    return load_file(Path(folder) / ADAPTER_FILENAME)


def moved_entries(
    mask: Any, adapter: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> int:
    """How many selected entries of ``adapter`` differ from ``reference`` (``mask``: a FishMask)."""
    return sum(int((adapter[k] != reference[k])[keep].sum()) for k, keep in mask.masks.items())


def assert_masked_entries_equal(
    mask: Any, reference: Mapping[str, torch.Tensor], folders: Sequence[Path]
) -> None:
    """Every unselected entry of the bottleneck adapter saved in each folder equals ``reference``;
    ``mask`` is a ``FishMask``."""
    for folder in folders:
        adapter = bottleneck_file(folder)
        for key, keep in mask.masks.items():
            assert torch.equal(adapter[key][~keep], reference[key][~keep]), (folder, key)
