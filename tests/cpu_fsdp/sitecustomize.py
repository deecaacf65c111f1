"""Test-only: accelerate's FSDP on CPU processes (gloo), put on PYTHONPATH by tests/helpers_qlora.fsdp_launch_env.

accelerate turns an FSDP config into plain DDP on CPUs (AcceleratorState only enables FSDP for GPU-like
devices), yet torch's FSDP2 (fully_shard) runs on CPU with gloo. With ACCELERATE_USE_FSDP=true (set by
`accelerate launch --config_file configs/accelerate/fsdp.yaml`), the state is switched to FSDP after its own
init, with the plugin accelerate builds from the launcher's environment; the rest of accelerate (fsdp2 prepare,
no_sync, clip_grad_norm_) then runs unchanged, as on GPUs. Nothing of this is imported by trainkit.
"""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    import accelerate.state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    _init = accelerate.state.AcceleratorState.__init__

    def _init_with_cpu_fsdp(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()

    accelerate.state.AcceleratorState.__init__ = _init_with_cpu_fsdp
