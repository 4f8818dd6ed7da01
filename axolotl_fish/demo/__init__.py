"""The `make demo` pieces: building the offline SmolLM2-135M model and data (`assets`), the training
step (`train`: `axolotl train` without third-party start-up noise) and the before/after report
(`report`). Not part of the library.

Floor 7: may import anything in axolotl_fish.
"""
