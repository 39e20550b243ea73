"""Every third-party patch and workaround of the project, one module per upstream behaviour.

Each module names the upstream version it was written against (megatron-core 0.16.1, DeepSpeed
0.19.8, torch 2.13), the behaviour or issue it works around, and has a test in
``tests/test_compat.py`` that fails when upstream changes or fixes that code.

Process-wide patches, applied once by :func:`apply_process_patches` (``init_distributed`` calls
it before DeepSpeed's communication backend starts):

* ``megatron_logging``: drop megatron's "Unknown MLP type" warning for MoELayer subclasses.
* ``shims`` (CPU only; each refuses to apply where CUDA is available): ``torch.cuda`` device and
  synchronize calls, gloo's uneven all-gather, the all-to-all dispatcher's CUDA stream slot,
  DeepSpeed's shared-memory op compilation.

Applied where the object they concern is built:

* ``layers``: spec swaps and subclasses correct on every device (torch SDPA attention, torch
  norms that know sequence parallelism, a RoPE module that stays on its device, swapped in by
  ``VQMoEGPTModel``).
* ``deepspeed_moe``: megatron's expert groups in DeepSpeed's tables and the MoE marker
  (``training.engine`` at EP > 1).
* ``deepspeed_zero``: per-parameter ZeRO-1/2 optimizer state, with the re-link of DeepSpeed's
  state fragments (checkpoints, codebook restarts).
* ``checkpoint_io``: no helper process per save, no code run by a load (checkpoint code).

The CPU all-to-all dispatcher subclass lives with the other dispatchers in
``vqmoe_megatron.moe.dispatcher``.
"""

import torch

from vqmoe_megatron.compat.layers import (
    DeviceSafeRotaryEmbedding,
    SDPACoreAttention,
    SPTorchNorm,
    use_device_safe_rotary_embedding,
)
from vqmoe_megatron.compat.megatron_logging import filter_unknown_mlp_type_warning
from vqmoe_megatron.compat.shims import apply_cpu_process_shims


def apply_process_patches() -> None:
    """Apply every process-wide patch this process needs (idempotent): the logging filter
    everywhere, the CPU shims only where CUDA is absent."""
    filter_unknown_mlp_type_warning()
    if not torch.cuda.is_available():
        apply_cpu_process_shims()


__all__ = [
    "DeviceSafeRotaryEmbedding",
    "SDPACoreAttention",
    "SPTorchNorm",
    "apply_cpu_process_shims",
    "apply_process_patches",
    "use_device_safe_rotary_embedding",
]
