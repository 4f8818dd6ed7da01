"""Training with a mask: gradient masking and bitwise restore (`masking`), sparse value vectors
for full-parameter mode (`sparse`), the sparse delta file (`delta`), dense warm-up (`warmup`),
modules fixed at zero (`zero_updates`) and the HF `TrainerCallback` that wires them (`callback`).

Floor 4: may import floors 1-3 (`base`, `config`, `adapters`, `fisher`, `masks`, `scorers`); never
`reports`, `pipeline`, `distributed`, `integration` or Axolotl.
"""
