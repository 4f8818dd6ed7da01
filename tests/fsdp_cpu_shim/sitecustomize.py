"""TEST ONLY: let accelerate and Axolotl take their real FSDP2 path on a machine without a GPU.

Put this folder on PYTHONPATH of `axolotl train` and set FISH_TEST_FSDP_ON_CPU=1; Python imports
`sitecustomize` at start-up in every launched process. Without the variable it does nothing.

What it changes (nothing else; FSDP2 itself runs on CPU with gloo as it is):
- accelerate enables FSDP only for GPU-like distributed types: a multi-process CPU state
  (MULTI_CPU, from ACCELERATE_USE_CPU=1) given an FSDP plugin becomes FSDP, in AcceleratorState
  and in PartialState's shared state (saving reads the latter).
- Axolotl builds its device mesh for "cuda": it is built for "cpu".
The product code never imports this.
"""

from __future__ import annotations

import os

if os.environ.get("FISH_TEST_FSDP_ON_CPU") == "1":
    import accelerate.parallelism_config
    import accelerate.state
    from accelerate.utils import DistributedType

    _accelerator_state_init = accelerate.state.AcceleratorState.__init__
    _build_device_mesh = accelerate.parallelism_config.ParallelismConfig.build_device_mesh

    def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
        _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    def _cpu_mesh(self, device_type: str):
        return _build_device_mesh(self, "cpu" if device_type == "cuda" else device_type)

    accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu
    accelerate.parallelism_config.ParallelismConfig.build_device_mesh = _cpu_mesh
