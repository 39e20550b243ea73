"""megatron-core TransformerConfig extended with the VQMoE settings (``vqmoe_*`` fields).

megatron passes one ``TransformerConfig`` to every module it builds (routers, dispatchers,
experts); carrying the VQMoE settings on it keeps our router a plain spec slot
(``MoESubmodules.router``) that megatron can construct with ``(config=..., pg_collection=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from vqmoe_megatron.config import ROUTING_MODES

EXPERT_INPUTS = ("paper", "token", "quantized")
EXPERT_BACKENDS = ("grouped", "sequential", "te")
ROUTERS = ("vqmoe", "topk", "xmoe", "hash", "smoe_dropout", "stablemoe", "dense")
"""``dense`` builds no MoE layer (``config.apply_dense_preset``)."""


@dataclass
class VQMoETransformerConfig(TransformerConfig):
    """TransformerConfig plus the VQMoE layer settings (see METHOD.md and ``config.MoEConfig``)."""

    vqmoe_router: str = "vqmoe"
    """'vqmoe' (two-path VQMoE router), 'topk' (megatron's TopKRouter, the SMoE baseline) or a
    baseline router of ``moe.baselines`` ('xmoe', 'hash', 'smoe_dropout', 'stablemoe')."""
    vqmoe_vocab_size: Optional[int] = None
    """Padded vocabulary size (the token-id routers' tables)."""
    vqmoe_xmoe_dim: int = 16
    vqmoe_xmoe_temperature: Optional[float] = None
    vqmoe_smoe_k_min: int = 1
    vqmoe_smoe_k_max: int = 1
    vqmoe_smoe_ramp_steps: int = 1000
    vqmoe_smoe_eval_k: int = 1
    vqmoe_stablemoe_stage1_steps: int = 1000
    vqmoe_stablemoe_distill_dim: int = 50
    vqmoe_stablemoe_balance_coeff: float = 0.3
    vqmoe_stablemoe_distill_coeff: float = 0.3
    vqmoe_expert_backend: str = "grouped"
    """Routed experts: 'grouped' (experts.GroupedGemmExperts), 'sequential' (megatron's
    SequentialMLP) or 'te' (TEGroupedMLP, with ``moe_grouped_gemm``)."""
    vqmoe_reference_router: bool = False
    """Reference-code router: softmax over the selected logits, no balance loss."""
    vqmoe_routing_mode: str = "pretrain"
    """``moe.routing_mode`` (one of ``config.ROUTING_MODES``)."""
    vqmoe_num_codes: Optional[int] = None
    vqmoe_distance: str = "l2"
    vqmoe_expert_input: str = "paper"
    vqmoe_contrib_rate: float = 0.05
    vqmoe_discrete_layernorm: bool = False
    vqmoe_loss_coeff: float = 0.08
    vqmoe_commitment_cost: float = 0.25
    vqmoe_codebook_init: str = "normal"
    vqmoe_codebook_init_std: float = 0.02
    vqmoe_kmeans_iters: int = 10
    vqmoe_codebook_update: str = "gradient"
    vqmoe_ema_decay: float = 0.99
    vqmoe_dead_code_interval: int = 100
    vqmoe_dead_code_threshold: float = 1e-3
    vqmoe_train_codebook_in_discrete: bool = False
    vqmoe_loss_in_discrete: bool = True
    vqmoe_router_alignment_coeff: float = 0.0
    vqmoe_gate_discrete_coeff: float = 0.0
    vqmoe_gate_discrete_start: int = 0
    vqmoe_gate_discrete_ramp_steps: int = 1
    vqmoe_discrete_phase_start: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vqmoe_router not in ROUTERS:
            raise ValueError(f"vqmoe_router must be one of {ROUTERS}, got {self.vqmoe_router!r}")
        if self.vqmoe_router in ("hash", "stablemoe") and self.vqmoe_vocab_size is None:
            raise ValueError(f"vqmoe_router={self.vqmoe_router!r} needs vqmoe_vocab_size")
        if self.vqmoe_expert_backend not in EXPERT_BACKENDS:
            raise ValueError(f"vqmoe_expert_backend must be one of {EXPERT_BACKENDS}")
        if self.vqmoe_routing_mode not in ROUTING_MODES:
            raise ValueError(f"vqmoe_routing_mode must be one of {ROUTING_MODES}")
        if self.vqmoe_expert_input not in EXPERT_INPUTS:
            raise ValueError(f"vqmoe_expert_input must be one of {EXPERT_INPUTS}")
        if (
            self.num_moe_experts is not None
            and self.vqmoe_num_codes is not None
            and self.vqmoe_num_codes < self.num_moe_experts
        ):
            raise ValueError(
                f"vqmoe_num_codes ({self.vqmoe_num_codes}) must be >= num_moe_experts "
                f"({self.num_moe_experts}): every expert needs at least one code"
            )
        if self.moe_pad_expert_input_to_capacity:
            raise ValueError(
                "moe_pad_expert_input_to_capacity is not supported by the fused VQMoE dispatch "
                "(each token routes a variable number of rows)"
            )

    @property
    def vqmoe_codes(self) -> int:
        """Codebook size K (defaults to the number of experts)."""
        return self.vqmoe_num_codes or self.num_moe_experts
