"""Shared test helpers: tiny configs, a stand-alone VQMoE layer, and the naive float64 reference.

The reference is deliberately naive (ScatterMoE's ``dumb_forward`` style): a Python loop over
tokens that evaluates METHOD.md's equations with separate float64 leaf tensors, so that the
fused megatron path can be checked for its output and every gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from vqmoe_megatron.config import ModelConfig, MoEConfig, ParallelConfig
from vqmoe_megatron.distributed import init_distributed
from vqmoe_megatron.model import build_mlp_block
from vqmoe_megatron.parallel_tensors import global_tensors, is_expert_param

TINY_MODEL = ModelConfig(
    num_layers=2,
    hidden_size=16,
    num_attention_heads=2,
    ffn_hidden_size=32,
    vocab_size=64,
    seq_length=8,
)
TINY_MOE = MoEConfig(num_experts=4, expert_ffn_hidden_size=24, topk=1, router_dtype="fp64")


def init_single_process(seed: int = 1234) -> None:
    """Initialise a world of one process (idempotent) and unit aux-loss scale."""
    import torch.distributed as dist

    if not dist.is_initialized():
        init_distributed(1, 1, seed=seed)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))


def current_parallel_config() -> ParallelConfig:
    """The ParallelConfig matching megatron's initialised parallel state."""
    return ParallelConfig(
        tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(),
        expert_parallel=parallel_state.get_expert_model_parallel_world_size(),
    )


def build_moe_layer(moe: MoEConfig, model: ModelConfig = TINY_MODEL, seed: int = 7):
    """A stand-alone MoE layer (layer number 1) for the current parallel state."""
    return build_mlp_block(model, moe, current_parallel_config(), seed=seed)


@dataclass
class NaiveParams:
    """float64 leaf copies of a layer's parameters (None where the layer has none)."""

    fc1: list[torch.Tensor]
    fc2: list[torch.Tensor]
    codebook: torch.Tensor
    router: Optional[torch.Tensor]
    gate_w: Optional[torch.Tensor]
    gate_b: Optional[torch.Tensor]
    ln_in: Optional[tuple[torch.Tensor, torch.Tensor]]
    ln_out: Optional[tuple[torch.Tensor, torch.Tensor]]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """float64 copy that requires grad exactly when the layer's tensor does (frozen codebooks)."""
    return t.detach().double().clone().requires_grad_(t.requires_grad)


def expert_weights(layer, grads: bool = False) -> tuple[list, list]:
    """(fc1 list, fc2 list) of an MoE layer's local experts' weights (or their gradients, None
    where there is none) under either expert backend (SequentialMLP's modules or the
    grouped-GEMM stacks)."""
    tensors = {}
    ep_rank = layer.local_expert_indices[0] // layer.num_local_experts
    for name, param in layer.named_parameters():
        tensor = param.grad if grads else param
        if is_expert_param(name) and tensor is not None:
            tensors.update(global_tensors(name, tensor, layer.num_local_experts, ep_rank))
    return tuple(
        [
            tensors.get(f"experts.local_experts.{i}.linear_fc{fc}.weight")
            for i in layer.local_expert_indices
        ]
        for fc in (1, 2)
    )


def naive_params(layer) -> NaiveParams:
    """Copy a single-rank VQMoE layer's parameters into float64 leaves."""
    router = layer.router
    fc1, fc2 = expert_weights(layer)
    ln = lambda m: None if m is None else (_leaf(m.weight), _leaf(m.bias))  # noqa: E731
    return NaiveParams(
        fc1=[_leaf(w) for w in fc1],
        fc2=[_leaf(w) for w in fc2],
        codebook=_leaf(router.quantizer.codebook),
        router=None if router.continuous is None else _leaf(router.continuous.weight),
        gate_w=None if router.gate is None else _leaf(router.gate.linear.weight),
        gate_b=None if router.gate is None else _leaf(router.gate.linear.bias),
        ln_in=ln(router.discrete_norm_in),
        ln_out=ln(router.discrete_norm_out),
    )


def _ffn(p: NaiveParams, expert: int, x: torch.Tensor) -> torch.Tensor:
    return naive_ffn(p.fc1[expert], p.fc2[expert], x)


def naive_ffn(fc1: torch.Tensor, fc2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One expert's GELU MLP on one token ``x`` [H]."""
    return fc2 @ F.gelu(fc1 @ x)


def _layer_norm(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), wb[0], wb[1], eps=1e-5)


def naive_vqmoe(
    x: torch.Tensor, p: NaiveParams, moe: MoEConfig, mode: str, gate_coeff: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loop: returns (y [T, H], the coefficient-weighted VQ + balance loss, plus the
    router-alignment loss and the gate loss of weight ``gate_coeff`` in pretrain mode)."""
    num_experts = len(p.fc1)
    codes, vq_terms, outputs, router_scores, router_top = [], [], [], [], []
    align_terms, gate_terms = [], []
    for t in range(x.shape[0]):
        xt = x[t]
        if moe.distance == "cosine":
            dist = -(F.normalize(xt, dim=0) @ F.normalize(p.codebook, dim=1).t())
        else:
            dist = ((xt.detach() - p.codebook.detach()) ** 2).sum(dim=1)
        k = int(dist.argmin())
        codes.append(k)
        c = p.codebook[k]
        if moe.distance == "cosine":
            xn, cn = F.normalize(xt, dim=0), F.normalize(c, dim=0)
            vq_terms.append(
                ((xn.detach() - cn) ** 2).mean()
                + moe.commitment_cost * ((xn - cn.detach()) ** 2).mean()
            )
            q = cn * xt.detach().norm()
        else:
            vq_terms.append(
                ((xt.detach() - c) ** 2).mean()
                + moe.commitment_cost * ((xt - c.detach()) ** 2).mean()
            )
            q = c
        if moe.expert_input == "token":
            x_d = xt
        elif moe.expert_input == "quantized":
            x_d = xt + (q - xt).detach()
        else:
            x_d = (1 - moe.contrib_rate) * xt + moe.contrib_rate * (q - xt).detach()
        if p.ln_in is not None:
            x_d = _layer_norm(x_d, p.ln_in)
        y_d = _ffn(p, k % num_experts, x_d)
        if p.ln_out is not None:
            y_d = _layer_norm(y_d, p.ln_out)
        if mode == "discrete":
            outputs.append(y_d)
            continue
        logits = p.router @ xt
        if moe.reference_router:
            top = torch.topk(logits, moe.topk).indices
            weights = torch.softmax(logits[top], dim=0)
        else:
            scores = torch.softmax(logits, dim=0)
            weights, top = torch.topk(scores, moe.topk)
            router_scores.append(scores)
            router_top.append(top)
        y_c = sum(w * _ffn(p, int(e), xt) for w, e in zip(weights, top))
        g = torch.softmax(p.gate_w @ xt + p.gate_b, dim=0)
        outputs.append(g[0] * y_c + g[1] * y_d)
        align_terms.append(-torch.log_softmax(logits, dim=0)[k % num_experts])
        gate_terms.append(-torch.log(g[1]))
    y = torch.stack(outputs)
    losses = moe.vq_loss_coeff * torch.stack(vq_terms).mean()
    if align_terms:
        losses = losses + moe.router_alignment_coeff * torch.stack(align_terms).mean()
        losses = losses + gate_coeff * torch.stack(gate_terms).mean()
    if mode == "discrete" and not moe.vq_loss_in_discrete:
        losses = losses * 0
    if router_scores and moe.aux_loss_coeff > 0:
        losses = losses + switch_balance_loss(router_scores, router_top, num_experts, moe)
    return y, losses


def switch_balance_loss(
    scores: list[torch.Tensor], tops: list[torch.Tensor], num_experts: int, moe: MoEConfig
) -> torch.Tensor:
    """megatron's Switch balance loss from per-token softmax scores [E] and top-k ids [k]."""
    tokens = len(scores)
    counts = torch.zeros(num_experts, dtype=torch.float64)
    for top in tops:
        counts[top] += 1
    prob_sums = torch.stack(scores).sum(dim=0)
    return (prob_sums * counts).sum() * (
        num_experts * moe.aux_loss_coeff / (moe.topk * tokens * tokens)
    )


def baseline_settings(router: str) -> dict:
    """MoEConfig overrides that make a router's tiny test layer exercise its features: X-MoE's
    projection to 3 dims, SMoE-Dropout's k ramp 1 -> 4 over 4 steps, StableMoE's stages
    switching after step 2 with a 5-dim distilled router."""
    extra = {
        "xmoe": dict(xmoe_dim=3),
        "smoe_dropout": dict(smoe_dropout_k_min=1, smoe_dropout_k_max=4, smoe_dropout_ramp_steps=4),
        "stablemoe": dict(stablemoe_stage1_steps=2, stablemoe_distill_dim=5),
    }
    return {"router": router, **extra.get(router, {})}


def moe_variant(**overrides) -> MoEConfig:
    """TINY_MOE with overrides."""
    return replace(TINY_MOE, **overrides)


ROUTER_EP_CASES = [
    (moe_variant(topk=2, **baseline_settings("xmoe")), 1),
    (moe_variant(topk=2, token_dispatcher="allgather", **baseline_settings("hash")), 1),
    (moe_variant(**baseline_settings("smoe_dropout")), 2),
    (moe_variant(**baseline_settings("stablemoe")), 2),
    (moe_variant(token_dispatcher="allgather", **baseline_settings("stablemoe")), 3),
    (moe_variant(topk=2, router_alignment_coeff=0.3, gate_discrete_coeff=0.5), 1),
    (moe_variant(discrete_phase_start=2), 2),
]
"""(MoEConfig, training step) of the EP = 2 vs EP = 1 checks of the baseline routers and of
VQMoE's step-dependent options: X-MoE top-2, hash top-2 (all-gather), SMoE-Dropout at k = 3 of
its 1 -> 4 ramp, StableMoE in stage 1 (step 2, all-to-all) and stage 2 (step 3, all-gather),
VQMoE top-2 with the router-alignment and gate losses, and VQMoE in its discrete phase."""
