"""Parameter counts, FLOPs per token and memory estimates for a model and parallel layout.

FLOPs follow megatron's accounting (a multiply-add is 2 FLOPs, training = 3 x forward) with
the MoE part counted for the experts a token actually visits in the chosen mode:
``topk + 1`` expert FFNs in VQMoE ``pretrain`` mode (router path + discrete path), 1 in
``discrete`` mode, ``topk`` for the TopKRouter baseline, plus the router, gate and codebook
distance GEMMs. Attention includes the ``S^2`` score and context products.
"""

from __future__ import annotations

from dataclasses import dataclass

from vqmoe_megatron.config import ModelConfig, MoEConfig, ParallelConfig
from vqmoe_megatron.model import is_moe_layer, padded_vocab_size

PEAK_TFLOPS = {
    # dense bf16 tensor-core peak per device (no sparsity)
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "V100": 125.0,
}


def experts_per_token(moe: MoEConfig) -> int:
    """Expert FFNs one token runs through (for FLOPs and 'active parameters'); SMoE-Dropout
    counts the k it ends its ramp with."""
    if moe.router == "vqmoe":
        return moe.topk + 1 if moe.routing_mode == "pretrain" else 1
    if moe.router == "stablemoe":
        return 1
    if moe.router == "smoe_dropout":
        return moe.smoe_dropout_k_max or moe.num_experts
    return moe.topk


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts (full model, no parallelism)."""

    total: int
    active: int
    embedding: int
    expert: int
    dense: int


def _ffn_params(hidden: int, ffn: int, swiglu: bool) -> int:
    return hidden * ffn * (3 if swiglu else 2)


def _attention_weights(model: ModelConfig) -> int:
    """QKV and output projection weights of one layer (GQA-aware)."""
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.hidden_size // heads
    return (
        model.hidden_size * (heads + 2 * groups) * head_dim + heads * head_dim * model.hidden_size
    )


def _routing_weights(hidden: int, moe: MoEConfig) -> int:
    """Weights of one MoE layer's per-token routing GEMMs: router, codebook, 2-way gate (the
    hash router has none; StableMoE's id embedding is a lookup, left out)."""
    if moe.router == "hash":
        return 0
    if moe.router == "xmoe":
        return moe.xmoe_dim * (hidden + moe.num_experts)
    if moe.router == "stablemoe":
        return moe.num_experts * (hidden + moe.stablemoe_distill_dim)
    weights = 0
    if moe.router != "vqmoe" or moe.routing_mode == "pretrain":
        weights += moe.num_experts * hidden
    if moe.router == "vqmoe":
        weights += moe.codebook_size * hidden
        if moe.routing_mode == "pretrain":
            weights += 2 * hidden
    return weights


def model_size(model: ModelConfig, moe: MoEConfig) -> ModelSize:
    """Closed-form parameter counts of the GPT the builder makes (bias-free linears)."""
    h, layers = model.hidden_size, model.num_layers
    vocab = padded_vocab_size(model.vocab_size, 1)
    swiglu = model.activation == "swiglu"
    attention = _attention_weights(model)
    norms = 2 * h
    embedding = vocab * h * (1 if not model.untie_embeddings_and_output_weights else 2)
    expert_ffn = _ffn_params(h, moe.expert_ffn_hidden_size, swiglu)
    gate_bias = 2 if moe.router == "vqmoe" and moe.routing_mode == "pretrain" else 0
    router = _routing_weights(h, moe) + gate_bias
    # StableMoE's distilled router: a token-id embedding table (+ the X-MoE temperature).
    lookup = vocab * moe.stablemoe_distill_dim if moe.router == "stablemoe" else 0
    lookup += 1 if moe.router == "xmoe" and moe.xmoe_temperature is not None else 0
    total = active = embedding + h  # final norm
    expert_total = 0
    for index in range(layers):
        total += attention + norms
        active += attention + norms
        if is_moe_layer(index, moe):
            total += moe.num_experts * expert_ffn + router + lookup
            active += experts_per_token(moe) * expert_ffn + router
            expert_total += moe.num_experts * expert_ffn
        else:
            dense = _ffn_params(h, model.ffn_hidden_size, swiglu)
            total += dense
            active += dense
    return ModelSize(
        total=total,
        active=active,
        embedding=embedding,
        expert=expert_total,
        dense=total - expert_total,
    )


def flops_per_token(model: ModelConfig, moe: MoEConfig, seq_length: int) -> float:
    """Training FLOPs per token (forward x 3)."""
    h = model.hidden_size
    swiglu = model.activation == "swiglu"
    vocab = padded_vocab_size(model.vocab_size, 1)
    forward = 2.0 * h * vocab  # output projection
    for index in range(model.num_layers):
        forward += 2.0 * _attention_weights(model)
        heads = model.num_attention_heads
        forward += 2.0 * 2 * seq_length * heads * (h // heads)  # QK^T and attention x V
        if is_moe_layer(index, moe):
            forward += (
                2.0 * experts_per_token(moe) * _ffn_params(h, moe.expert_ffn_hidden_size, swiglu)
            )
            forward += 2.0 * _routing_weights(h, moe)
        else:
            forward += 2.0 * _ffn_params(h, model.ffn_hidden_size, swiglu)
    return 3.0 * forward


def memory_estimate_gib(
    model: ModelConfig,
    moe: MoEConfig,
    parallel: ParallelConfig,
    *,
    world_size: int,
    micro_batch_size: int,
    zero_stage: int,
    precision: str,
    recompute: bool = False,
) -> dict[str, float]:
    """Rough per-device memory (GiB): weights, gradients, optimizer, activations.

    Optimizer state is fp32 master + 2 Adam moments (12 bytes/param in bf16, 8 extra in fp32),
    sharded over the data-parallel replicas by ZeRO (stage >= 1), gradients from stage 2 on.
    Activations use megatron's per-layer estimate ``S*B*H*(34 + 5*heads*S/H)`` bytes / TP
    plus the extra expert rows of the MoE layers; with full recomputation only each layer's
    input (``2*S*B*H`` bytes) is kept, plus one layer's activations during its backward.
    """
    size = model_size(model, moe)
    tp, ep = parallel.tensor_parallel, parallel.expert_parallel
    dp = world_size // tp
    expert_dp = max(world_size // (tp * ep), 1)
    dense_local = size.dense / tp  # dense parameters split over TP, experts over EP x TP
    expert_local = size.expert / (ep * tp)
    local = dense_local + expert_local
    weight_bytes = 2 if precision == "bf16" else 4
    optimizer_bytes = 12 if precision == "bf16" else 8
    shard_dense = dp if zero_stage >= 1 else 1
    shard_expert = expert_dp if zero_stage >= 1 else 1
    optimizer = optimizer_bytes * (dense_local / shard_dense + expert_local / shard_expert)
    grad_shard_dense = dp if zero_stage >= 2 else 1
    grad_shard_expert = expert_dp if zero_stage >= 2 else 1
    grads = weight_bytes * (dense_local / grad_shard_dense + expert_local / grad_shard_expert)
    s, b, h = model.seq_length, micro_batch_size, model.hidden_size
    per_layer = s * b * h * (34 + 5 * model.num_attention_heads * s / h) / tp
    extra_rows = (
        (experts_per_token(moe) - 1)
        * s
        * b
        * (4 * h + 2 * moe.expert_ffn_hidden_size)
        * weight_bytes
    )
    moe_layers = sum(1 for i in range(model.num_layers) if is_moe_layer(i, moe))
    if recompute:
        activations = model.num_layers * 2 * s * b * h / tp + per_layer + extra_rows
    else:
        activations = model.num_layers * per_layer + moe_layers * extra_rows
    gib = 1024.0**3
    return {
        "weights": weight_bytes * local / gib,
        "gradients": grads / gib,
        "optimizer": optimizer / gib,
        "activations": activations / gib,
        "total": (weight_bytes * local + grads + optimizer + activations) / gib,
    }


def device_peak_tflops(precision: str) -> float | None:
    """Known dense peak of the local GPU for bf16 (fp32 is not a tensor-core peak: None)."""
    import torch

    if not torch.cuda.is_available() or precision != "bf16":
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
