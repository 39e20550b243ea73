"""Device portability for megatron-core: one model code path for CUDA/NCCL and CPU/gloo.

megatron-core 0.16.1 assumes CUDA in a handful of places. Everything this project does about that
lives in this package, in two tiers:

* ``layers``: spec swaps and subclasses that are correct on every device (torch SDPA attention,
  torch norms that know about sequence parallelism, a RoPE module that stays on its device).
* ``shims``: process-wide patches that only a CPU process needs (``torch.cuda.current_device``,
  ``torch.cuda.synchronize`` and megatron's uneven all-gather, which gloo lacks). Each shim refuses
  to apply when CUDA is available, so a GPU job can never run with them by accident.

The CPU all-to-all dispatcher (no CUDA side stream) lives with the other dispatchers in
``vqmoe_megatron.moe.dispatcher``.
"""

from vqmoe_megatron.compat.layers import DeviceSafeRotaryEmbedding, SDPACoreAttention, SPTorchNorm
from vqmoe_megatron.compat.shims import apply_cpu_process_shims

__all__ = [
    "DeviceSafeRotaryEmbedding",
    "SDPACoreAttention",
    "SPTorchNorm",
    "apply_cpu_process_shims",
]
