"""VQMoE layers for megatron-core, one concern per module.

``vq`` (codebook) -> ``router`` (continuous router, VQ routing, gate -> RoutingPlan) or
``baselines`` (X-MoE, hash, SMoE-Dropout, StableMoE routers) ->
``dispatcher`` (portable all-to-all) -> experts (``experts``: grouped GEMMs on
``grouped_gemm``, or megatron's) -> ``layer`` (fused dispatch/combine);
``expert_input`` builds what the discrete path's expert sees (and the stacked streams);
``metrics`` collects per-layer routing statistics (one collector per model); ``transformer_config`` carries the settings.
"""

from vqmoe_megatron.moe.experts import GroupedGemmExperts
from vqmoe_megatron.moe.layer import PortableMoELayer, StableMoELayer, VQMoELayer
from vqmoe_megatron.moe.router import ContinuousRouter, RoutingPlan, VQMoERouter
from vqmoe_megatron.moe.transformer_config import VQMoETransformerConfig
from vqmoe_megatron.moe.vq import CodeRestart, VectorQuantizer

__all__ = [
    "CodeRestart",
    "ContinuousRouter",
    "GroupedGemmExperts",
    "PortableMoELayer",
    "RoutingPlan",
    "StableMoELayer",
    "VQMoELayer",
    "VQMoERouter",
    "VQMoETransformerConfig",
    "VectorQuantizer",
]
