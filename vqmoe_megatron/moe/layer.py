"""MoE layers: megatron's MoELayer made portable, and the fused two-path VQMoE layer.

``PortableMoELayer`` is megatron-core's ``MoELayer`` with two changes: the all-to-all dispatcher
runs without CUDA (``dispatcher.PortableAlltoAllTokenDispatcher``), and every MoE parameter is
drawn from a seed derived from (layer, global expert id), so a model has the same weights at any
expert- or tensor-parallel layout (megatron's CPU init gives every EP rank the same experts).

``VQMoELayer`` routes with :class:`router.VQMoERouter` and dispatches both routing paths in one
permutation / one all-to-all / one combine: route -> dispatch -> experts -> combine -> sum of the
plan's streams.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_default_pg_collection

from vqmoe_megatron.moe.dispatcher import COUNT_ROWS, PortableAlltoAllTokenDispatcher
from vqmoe_megatron.moe.experts import GroupedGemmExperts
from vqmoe_megatron.moe.metrics import record_assignment
from vqmoe_megatron.moe.router import VQMoERouter
from vqmoe_megatron.moe.transformer_config import VQMoETransformerConfig
from vqmoe_megatron.moe.vq import CodeRestart


def derived_seed(*keys: object) -> int:
    """A seed from a stable hash of ``keys`` (independent of layout and order)."""
    return int(hashlib.sha256(repr(keys).encode()).hexdigest()[:15], 16)


def derived_generator(*keys: object) -> torch.Generator:
    """A CPU generator seeded by :func:`derived_seed` of ``keys``."""
    generator = torch.Generator()
    generator.manual_seed(derived_seed(*keys))
    return generator


def _expert_weights(experts: torch.nn.Module, local_idx: int) -> list[tuple]:
    """(tensor, partition_dim, partition_stride) of local expert ``local_idx``'s fc1 and fc2
    weights for SequentialMLP, TEGroupedMLP and GroupedGemmExperts (views of its stacks)."""
    if isinstance(experts, GroupedGemmExperts):
        fc1, fc2 = experts.expert_weights(local_idx)
        return [(fc1, 0, experts.fc1_weight.partition_stride), (fc2, 1, 1)]
    if hasattr(experts, "local_experts"):
        expert = experts.local_experts[local_idx]
        params = [expert.linear_fc1.weight, expert.linear_fc2.weight]
    else:
        params = [
            getattr(experts.linear_fc1, f"weight{local_idx}"),
            getattr(experts.linear_fc2, f"weight{local_idx}"),
        ]
    return [(p, p.partition_dim, getattr(p, "partition_stride", 1)) for p in params]


class PortableMoELayer(MoELayer):
    """megatron MoELayer with a device-portable all-to-all dispatcher and layout-independent init."""

    def __init__(
        self,
        config: VQMoETransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
    ) -> None:
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        # MoE parameters are re-drawn by reset_parameters(); forking keeps the global RNG stream
        # (and so the dense layers built after this one) independent of the expert layout.
        with torch.random.fork_rng(devices=[]):
            super().__init__(config, submodules, layer_number, pg_collection)
        self.expert_tp_group = pg_collection.expt_tp
        if config.moe_token_dispatcher_type == "alltoall":
            self.token_dispatcher = PortableAlltoAllTokenDispatcher(
                self.num_local_experts,
                self.local_expert_indices,
                config=config,
                pg_collection=pg_collection,
            )

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Draw router and experts from seeds derived from (seed, layer, global expert id)."""
        if self.layer_number is None:
            raise RuntimeError("reset_parameters needs the layer number (set by TransformerLayer)")
        self._reset_router(derived_generator(seed, self.layer_number, "router"))
        etp_rank = self.expert_tp_group.rank()
        etp_size = self.expert_tp_group.size()
        inits = (self.config.init_method, self.config.output_layer_init_method)
        for local_idx, global_idx in enumerate(self.local_expert_indices):
            weights = _expert_weights(self.experts, local_idx)
            for which, ((weight, dim, stride), init_method) in enumerate(zip(weights, inits)):
                full_shape = list(weight.shape)
                full_shape[dim] *= etp_size
                generator = derived_generator(seed, self.layer_number, "expert", global_idx, which)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
                    _initialize_affine_weight_cpu(
                        weight,
                        full_shape[0],
                        full_shape[1],
                        weight.shape[dim],
                        dim,
                        init_method,
                        stride=stride,
                        params_dtype=weight.dtype,
                        rank=etp_rank,
                        world_size=etp_size,
                        skip_set_tensor_parallel_attributes=True,
                    )

    def _reset_router(self, generator: torch.Generator) -> None:
        self.router.draw_parameters(generator)

    def begin_step(self, step: int, seed: int) -> None:
        """Before optimizer step ``step`` (every rank): step-dependent routing."""
        self.router.begin_step(step)

    def _token_major_padding(
        self, intermediate_tensors, padding_mask: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """``padding_mask`` [B, S] -> [S, B] bool (True = pad), the layout of the hidden states;
        refuses partial CUDA-graph capture, which the subclasses' forward does not implement."""
        if intermediate_tensors is not None:
            raise NotImplementedError(
                f"{type(self).__name__} does not support partial CUDA-graph capture"
            )
        return None if padding_mask is None else padding_mask.transpose(0, 1).bool()

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """megatron's route; records the tokens and expert rows for the routing metrics and
        tells the all-to-all dispatcher the rows of a dropless map (``tokens * router.topk``:
        the router's k may change with the step or the mode). ``padding_mask`` [S, B]."""
        probs, routing_map = super().route(hidden_states, padding_mask)
        record_assignment(
            self.router.routing_metrics, self.router.layer_number, routing_map, padding_mask
        )
        if (
            isinstance(self.token_dispatcher, PortableAlltoAllTokenDispatcher)
            and self.config.moe_expert_capacity_factor is None
        ):
            self.token_dispatcher.num_routed_rows = routing_map.shape[0] * self.router.topk
        return probs, routing_map


class StableMoELayer(PortableMoELayer):
    """StableMoE's layer: ``y = alpha * FFN_e(x) + (1 - alpha) * x`` for the token's one expert
    e (``alpha`` is the router's prob, ``baselines.StableMoERouter``); a token dropped by the
    capacity keeps ``y = x``, as in the reference."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        intermediate_tensors=None,
        padding_mask: Optional[torch.Tensor] = None,
    ):
        """``hidden_states`` [S, B, H] -> ([S, B, H], None); ``padding_mask`` [B, S], True = pad."""
        padding_mask = self._token_major_padding(intermediate_tensors, padding_mask)
        probs, routing_map = self.route(hidden_states, padding_mask)
        hidden, dispatched_probs = self.preprocess(hidden_states, probs, routing_map)
        hidden, dispatched_probs = self.dispatch(hidden, dispatched_probs)
        output, _ = self.routed_experts_compute(hidden, dispatched_probs)
        output = self.postprocess(self.combine(output), None)
        keep = (1 - probs.sum(dim=-1)).view(*hidden_states.shape[:-1], 1)
        return output + keep.to(output.dtype) * hidden_states, None


class VQMoELayer(PortableMoELayer):
    """VQMoE layer: both routing paths in one dispatch (see ``router.RoutingPlan``)."""

    def __init__(
        self,
        config: VQMoETransformerConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
    ) -> None:
        if config.moe_shared_expert_intermediate_size is not None:
            raise ValueError("VQMoELayer does not support shared experts")
        super().__init__(config, submodules, layer_number, pg_collection)
        if not isinstance(self.router, VQMoERouter):
            raise TypeError(f"VQMoELayer needs a VQMoERouter, got {type(self.router).__name__}")

    @property
    def routing_mode(self) -> str:
        """'pretrain' (router + VQ + gate) or 'discrete' (nearest code only)."""
        return self.router.mode

    def set_routing_mode(self, mode: str) -> None:
        """Switch routing mode; 'discrete' drops the router and gate (see VQMoERouter)."""
        self.router.set_routing_mode(mode)

    def begin_step(self, step: int, seed: int) -> None:
        """Before optimizer step ``step``: seed the sampling of its restart candidates."""
        super().begin_step(step, seed)
        self.router.quantizer.begin_step(derived_seed(seed, self.layer_number, "candidates", step))

    def maintain_codebook(self, step: int, seed: int) -> Optional[CodeRestart]:
        """Per-optimizer-step codebook upkeep (EMA, dead-code restarts); collective over DP."""
        return self.router.quantizer.maintain(
            step,
            self.config.vqmoe_dead_code_interval,
            derived_generator(seed, self.layer_number, "restart", step),
            self.router.tp_dp_cp_group,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        intermediate_tensors=None,
        padding_mask: Optional[torch.Tensor] = None,
    ):
        """``hidden_states`` [S, B, H] -> ([S, B, H], None); ``padding_mask`` [B, S], True = pad."""
        padding_mask = self._token_major_padding(intermediate_tensors, padding_mask)
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("MoE with tensor parallelism needs sequence parallelism in training")
        plan = self.router(hidden_states, padding_mask)
        folded = False
        if isinstance(self.token_dispatcher, PortableAlltoAllTokenDispatcher):
            self.token_dispatcher.num_routed_rows = (
                plan.num_rows if plan.num_rows is not None else COUNT_ROWS
            )
            self.token_dispatcher.fold_streams = (
                plan.num_streams if plan.post_norm_scale is None else 1
            )
            folded = self.token_dispatcher.folds()
        hidden, probs = self.token_dispatcher.dispatch_preprocess(
            plan.hidden, plan.routing_map, plan.probs
        )
        hidden, probs = self.dispatch(hidden, probs)
        output, _ = self.routed_experts_compute(hidden, probs)
        output = self.combine(output)
        output = self.token_dispatcher.combine_postprocess(output)
        if not folded:
            output = self.router.combine_streams(output, plan)
        if plan.aux_loss is not None:
            output = MoEAuxLossAutoScaler.apply(output, plan.aux_loss)
        return output, None
