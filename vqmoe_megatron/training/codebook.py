"""Codebooks during training: data-dependent initialisation and per-step upkeep.

Initialisation (``moe.codebook_init: kmeans``): one forward pass over a batch, layer by layer:
just before each VQMoE router routes, its codebook is set to the k-means centroids of that
layer's input tokens (gathered over the data-parallel ranks), so deeper layers see inputs routed
by already-initialised codebooks. Run it before the optimizer is built: ZeRO keeps its own fp32
copy of every parameter.
"""

from __future__ import annotations

from typing import Any

import torch

from vqmoe_megatron.model import VQMoEGPTModel
from vqmoe_megatron.moe.layer import derived_generator
from vqmoe_megatron.training.engine import write_codebook_rows
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
