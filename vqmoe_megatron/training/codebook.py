"""Codebooks during training: data-dependent initialisation and per-step upkeep.

Initialisation (``moe.codebook_init: kmeans``): one forward pass over a batch, layer by layer:
just before each VQMoE router routes, its codebook is set to the k-means centroids of that
layer's input tokens (gathered over the data-parallel ranks), so deeper layers see inputs routed
by already-initialised codebooks. Run it before the optimizer is built: ZeRO keeps its own fp32
copy of every parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
from torch import nn

from vqmoe_megatron.compat.deepspeed_zero import full_fp32_param, optimizer_state_reader
from vqmoe_megatron.model import VQMoEGPTModel
from vqmoe_megatron.moe.layer import derived_generator
from vqmoe_megatron.training.run_logger import RunLogger


@torch.no_grad()
def initialize_codebooks(gpt: VQMoEGPTModel, tokens: torch.Tensor, seed: int) -> int:
    """k-means-initialise every codebook still waiting for it; returns how many were set.

    ``tokens`` is a ``[B, S+1]`` batch of the training data (collective over DP ranks).
    """
    handles = []
    initialised = []

    def pre_hook(router, args):
        quantizer = router.quantizer
        if bool(quantizer.needs_data_init):
            hidden = args[0]
            quantizer.init_from_data(
                hidden.reshape(-1, hidden.shape[-1]),
                router.config.vqmoe_kmeans_iters,
                derived_generator(seed, router.layer_number, "kmeans"),
                router.tp_dp_cp_group,
            )
            initialised.append(router.layer_number)

    for layer in gpt.vq_layers():
        handles.append(layer.router.register_forward_pre_hook(pre_hook))
    was_training = gpt.training
    gpt.eval()
    try:
        gpt(tokens[:, :-1], None, None)
    finally:
        for handle in handles:
            handle.remove()
        gpt.train(was_training)
    return len(initialised)


def write_codebook_rows(engine: Any) -> Callable[[nn.Parameter, torch.Tensor, torch.Tensor], None]:
    """Row writer for dead-code restarts under DeepSpeed: updates the module parameter, ZeRO's
    fp32 master copy, and zeroes the Adam moments of the restarted rows (every DP rank calls it
    with identical arguments)."""

    def write(param: nn.Parameter, rows: torch.Tensor, values: torch.Tensor) -> None:
        master = full_fp32_param(param).clone()
        master[rows.to(master.device)] = values.to(master)
        safe_set_full_fp32_param(param, master)
        with torch.no_grad():
            param.copy_(master.to(param))
        read_state = optimizer_state_reader(engine)
        if read_state is None:
            return
        for key in ("exp_avg", "exp_avg_sq"):
            state = read_state(param, key).clone()
            state[rows.to(state.device)] = 0
            safe_set_full_optimizer_state(param, state, key)

    return write


def maintain_codebooks(
    gpt: VQMoEGPTModel, engine: Any, step: int, seed: int, log: RunLogger, applied: bool
) -> None:
    """After optimizer step ``step`` (every rank): fold its code usage into the codebooks (EMA,
    dead-code restarts written through ZeRO's master weights) when ``applied``; otherwise (a
    skipped step) forget the step's usage. Frozen codebooks are left alone either way."""
    if applied:
        restarts = gpt.maintain_codebooks(step, seed, write_rows=write_codebook_rows(engine))
        for layer, restart in restarts.items():
            log.info(f"layer {layer}: restarted {restart.codes.numel()} dead codes")
    else:
        for layer in gpt.vq_layers():
            layer.router.quantizer.discard_step_statistics()
