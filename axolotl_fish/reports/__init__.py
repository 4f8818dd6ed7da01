"""Text and pictures about a mask: per-layer summary (`summary`), `inspect` / `diff` text
(`text`), the PNG heatmap (`heatmap`) and the model-card section (`model_card`),
and the line naming a quantized (QLoRA) base model's layers (`quantized`).

Floor 4: may import floors 1-3; never `training` or Axolotl.
"""
