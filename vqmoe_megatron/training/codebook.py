"""Data-dependent codebook initialisation (``moe.codebook_init: kmeans``).

One forward pass over a batch, layer by layer: just before each VQMoE router routes, its
codebook is set to the k-means centroids of that layer's input tokens (gathered over the
data-parallel ranks), so deeper layers see inputs routed by already-initialised codebooks.
Run it before the optimizer is built: ZeRO keeps its own fp32 copy of every parameter.
"""

from __future__ import annotations

import torch

from vqmoe_megatron.model import VQMoEGPTModel
from vqmoe_megatron.moe.layer import derived_generator


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
