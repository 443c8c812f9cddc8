"""Test-only: let accelerate shard a model across CPU processes (FSDP2 or DeepSpeed ZeRO-3 on gloo).

accelerate 1.16 builds a CPU multi-process state (`DistributedType.MULTI_CPU`, gloo) only with
`Accelerator(cpu=True)`, and then never turns on FSDP or DeepSpeed: accelerate/state.py enables
them for GPU-like device types only (and DeepSpeed only when cpu is False). torch's
`fully_shard` and DeepSpeed's CPU accelerator both run on gloo, so after accelerate has made its
gloo process group this switches the distributed type to the one `accelerate launch` asked for
(ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED), with the plugin built from the same
environment, exactly as on GPUs. Nothing else in accelerate, TRL or lpreg is changed.
"""

import os

_TRUE = ("1", "true", "yes")


def enable_sharding_on_cpu() -> None:
    from accelerate import state as st
    from accelerate.utils import DistributedType

    if getattr(st.AcceleratorState, "_lpreg_cpu_sharding", False):
        return
    original = st.AcceleratorState.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in _TRUE and kwargs.get("fsdp_plugin") is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs["fsdp_plugin"]
        elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in _TRUE \
                and kwargs.get("deepspeed_plugin") is not None:
            plugin = kwargs["deepspeed_plugin"]
            plugin.set_mixed_precision(self._mixed_precision)
            plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = plugin
            self.distributed_type = DistributedType.DEEPSPEED
        # every later AcceleratorState() re-reads the process state: keep the type there too
        st.PartialState._shared_state["distributed_type"] = self.distributed_type

    st.AcceleratorState.__init__ = __init__
    st.AcceleratorState._lpreg_cpu_sharding = True
