"""Third-party start-up lines off the console (`axolotl_fish.base.console`): torchao's
kernel-loading lines, torch's pytree deprecation and bitsandbytes' kernel fetch. `make demo`
trains through `python -m axolotl_fish.demo.train` (Axolotl's `axolotl train`, in a process that
imports axolotl_fish first): a QLoRA run there prints none of them and keeps Axolotl's lines and
ours. The control imports the libraries first, as plain `axolotl train` does: it proves they do
print those lines, so their absence is the filters' doing."""

from __future__ import annotations

import logging
import sys

import pytest
from axolotl_run import run_axolotl, write_config
from test_qlora_e2e import QLORA, assert_base_was_4bit

from axolotl_fish.base.console import DROPPED, quiet_third_party

NOISE = (
    "Failed to load",
    "is an Enum subclass",
    "gemm_4bit_forward",
    "Skipping publisher trust check",
)


def noisy_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(noise in line for noise in NOISE)]


@pytest.mark.e2e
def test_the_demo_s_training_step_prints_no_start_up_noise(tmp_path, tiny_llama_dir, alpaca_jsonl):
    config = write_config(
        tmp_path,
        tiny_llama_dir,
        alpaca_jsonl,
        **QLORA,
        max_steps=2,
        fish_mask={"keep_ratio": 0.5, "num_samples": 8},
    )
    demo_train = (sys.executable, "-m", "axolotl_fish.demo.train")
    output = run_axolotl([str(config)], tmp_path, program=demo_train).stdout
    assert noisy_lines(output) == []
    assert_base_was_4bit(output)
    assert "FISH mask: " in output and "[axolotl.train] Starting trainer" in output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_the_libraries_print_those_lines_when_imported_first(tmp_path):
    script = ("-c", "import peft, torchao, axolotl_fish; from axolotl.cli import train")
    output = run_axolotl(script, tmp_path, program=(sys.executable,)).stdout
    assert all(noise in output for noise in NOISE[:3]), output[-4000:]


def test_other_lines_of_those_loggers_are_kept():
    quiet_third_party()
    quiet_third_party()  # idempotent: one filter per logger
    for name in DROPPED:
        [dropping] = logging.getLogger(name).filters
        kept = logging.LogRecord(name, logging.WARNING, __file__, 1, "Failed to save x", None, None)
        assert dropping.filter(kept)
    torchao = logging.getLogger("torchao").filters[0]
    dropped = logging.LogRecord(
        "torchao", logging.WARNING, __file__, 1, "Failed to load %s: no", ("a.so",), None
    )
    assert not torchao.filter(dropped)
