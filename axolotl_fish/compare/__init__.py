"""`axolotl fish-mask compare`: the equal-budget quality protocol for any config and any data.

Owns the protocol's pieces, shared with `benchmarks/quality.py` (the project's own two tasks):
the paired intervals and claim words (`stats`), the learning-rate ladder (`ladder`), the data
splits and their content check (`data`), the arms at equal trainable entries (`arms`), the
`axolotl train` / `axolotl preprocess` subprocesses (`runs`), held-out scoring (`scoring`), the
resumable sweep (`protocol`), the table, verdict and plot (`report`) and the click command
(`command`).

Floor 7: may import every room below it; Axolotl itself only runs as a subprocess (the CLI), so
this room never imports it.
"""
