"""TEST ONLY: let accelerate run DeepSpeed on a machine without a GPU.

Put this folder on PYTHONPATH of `axolotl train` and set FISH_TEST_DEEPSPEED_ON_CPU=1; Python
imports `sitecustomize` at start-up in every launched process. Without the variable it does
nothing.

What it changes (nothing else; DeepSpeed itself picks its CPU accelerator and gloo):
- accelerate 1.13 turns DeepSpeed on only when not on CPU (`accelerate/state.py`: the
  `ACCELERATE_USE_DEEPSPEED ... and not cpu` branch); a multi-process CPU state (MULTI_CPU, from
  ACCELERATE_USE_CPU=1) given a DeepSpeed plugin becomes DEEPSPEED here, as that branch would
  make it, in AcceleratorState and in PartialState's shared state.
- DeepSpeed's shared-memory all-reduce (used for inference only) is not JIT-compiled at start-up.
- transformers refuses `bf16: true` without a bf16-capable GPU unless `use_cpu` is set (which
  Axolotl does not pass); the check is told the device has bf16, as a GPU run's would be. torch
  computes bf16 on CPU.
The product code never imports this.
"""

from __future__ import annotations

import os

if os.environ.get("FISH_TEST_DEEPSPEED_ON_CPU") == "1":
    import accelerate.state
    import deepspeed.ops
    import transformers.training_args
    from accelerate.utils import DistributedType

    transformers.training_args.is_torch_bf16_gpu_available = lambda: True

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _accelerator_state_init = accelerate.state.AcceleratorState.__init__

    def _deepspeed_on_cpu(self, *args, deepspeed_plugin=None, **kwargs) -> None:
        _accelerator_state_init(self, *args, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if deepspeed_plugin is None or self.distributed_type != DistributedType.MULTI_CPU:
            return
        plugins = deepspeed_plugin if isinstance(deepspeed_plugin, dict) else {"": deepspeed_plugin}
        for plugin in plugins.values():
            plugin.set_mixed_precision(self._mixed_precision)
        next(iter(plugins.values())).select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
        self.distributed_type = DistributedType.DEEPSPEED
        self._mixed_precision = "no"  # DeepSpeed casts itself (accelerate does the same)
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED

    accelerate.state.AcceleratorState.__init__ = _deepspeed_on_cpu
