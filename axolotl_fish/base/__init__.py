"""Shared helpers every room may use: rank agreement (`ranks`), FSDP2/DTensor local slices
(`sharded`), RNG preservation (`rng`), safetensors I/O with atomic writes (`safetensors_io`),
atomic writes of any other file (`atomic`) and third-party start-up lines kept off the console
(`console`).

Floor 1: imports nothing from axolotl_fish; never imports Axolotl.
"""
