"""Shared helpers every room may use: rank agreement (`ranks`), FSDP2/DTensor local slices
(`sharded`), RNG preservation (`rng`), safetensors I/O with atomic writes (`safetensors_io`)
and atomic writes of any other file (`atomic`).

Floor 1: imports nothing from axolotl_fish; never imports Axolotl.
"""
