"""What the trainable tensors are: naming, ranks and roles of LoRA-family / full-parameter
tensors (`tensors`) and the bottleneck adapter module (`bottleneck`).

Floor 2: may import `base`; never imports Axolotl.
"""
