"""The empirical Fisher pass: per-example squared gradients in one batched backward (`scores`),
the per-layer rules that compute them (`rules`, a registry), the forward/backward taps that feed the
rules (`taps`), the memory-bounded chunked driver (`chunks`) and gradient-checkpointing support
(`checkpointing`).

Floor 2: may import `base`; never imports Axolotl.
"""
