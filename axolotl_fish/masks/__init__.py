"""Masks as data: the budget k (`budget`), which tensors are candidates (`candidates`), top-k
selection and tie-breaks (`selection`), the `fish_mask.safetensors` format (`file`) and where a mask
comes from - a file, a folder or the Hub (`source`).

Floor 3: may import `base`, `adapters`, `config`; never imports Axolotl.
"""
