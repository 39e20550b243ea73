"""Routers: megatron's TopKRouter made device-agnostic, and the two-path VQMoE router.

The VQMoE router turns one layer input into a :class:`RoutingPlan`: the rows to dispatch in
megatron's format (``probs`` float and ``routing_map`` bool, ``[rows, E]``), so that megatron's
dispatchers, experts and checkpoints apply unchanged. In ``pretrain`` mode the plan carries both
paths of METHOD.md section 1 in ONE permutation:

* expert input = token (x_d = x, no discrete norms): one stream ``[T, E]``; token t has the
  router's top-k experts with weight ``g_c * w`` and its VQ expert with weight ``g_d``; when the
  two coincide the rows merge into one row of weight ``g_c * w + g_d``;
* otherwise (x_d != x): two streams stacked on the sequence axis, ``[2S, B, H]`` hidden and a
  ``[2T, E]`` map: rows ``0..T-1`` are the router's top-k of x, rows ``T..2T-1`` the VQ expert of
  x_d; the layer sums the two halves of the combined output.

In ``discrete`` mode the router and the gate do not exist: one row per token, weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection
from megatron.core.transformer.moe.router import TopKRouter
from torch import nn

from vqmoe_megatron.moe.expert_input import expert_input, stacked_streams
from vqmoe_megatron.moe.metrics import RoutingMetrics, record_entropy
from vqmoe_megatron.moe.transformer_config import VQMoETransformerConfig
from vqmoe_megatron.moe.vq import VectorQuantizer

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def router_dtype(config: VQMoETransformerConfig, fallback: torch.dtype) -> torch.dtype:
    """The configured router arithmetic dtype (``moe.router_dtype``), else ``fallback``."""
    return _ROUTER_DTYPES.get(config.moe_router_dtype, fallback)


@torch.no_grad()
def draw_normal(param: torch.Tensor, init_method, generator: torch.Generator) -> None:
    """Fill ``param`` with ``init_method`` under a seed drawn from ``generator`` (fp32, then cast),
    leaving the global RNG stream untouched."""
    weight = torch.empty(param.shape, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
        init_method(weight)
    param.copy_(weight.to(param))


class StepRouting:
    """Routers whose routing may depend on the optimizer step (the default: it does not)."""

    def begin_step(self, step: int) -> None:
        """Before optimizer step ``step`` on every rank (``VQMoEGPTModel.begin_step``, called
        by the training loops with the step restored on resume)."""


class ContinuousRouter(StepRouting, TopKRouter):
    """megatron-core's TopKRouter with a device-agnostic gating GEMM.

    The stock ``gating`` moves its weight to ``torch.cuda.current_device()`` and, without
    Transformer Engine, hits a NameError (``te_general_gemm``, moe_utils.py in 0.16.1) on any
    device. Routing, top-k, aux/z losses and token dropping are megatron's own code. It also
    records the router entropy per layer for the routing metrics.

    ``vqmoe_reference_router`` reproduces the VQMoE reference code instead: softmax over the
    selected top-k logits only and no balance loss (megatron refuses that at top-1, where every
    weight is exactly 1 and the router receives no gradient: the defect METHOD.md describes).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.routing_metrics = RoutingMetrics()
        """Where the entropy is recorded; the owning model or VQMoE router replaces it."""

    def draw_parameters(self, generator: torch.Generator) -> None:
        """Layout-independent initialisation of the router weight from ``generator``."""
        draw_normal(self.weight, self.config.init_method, generator)

    @property
    def softmax_over_selected(self) -> bool:
        """Weights = softmax over the top-k logits only, no balance loss (else megatron's)."""
        return self.config.vqmoe_reference_router

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = router_dtype(self.config, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        record_entropy(self.routing_metrics, self.layer_number, logits, padding_mask)
        if self.softmax_over_selected:
            return self._reference_routing(logits.view(-1, logits.shape[-1]))
        return super().routing(logits, padding_mask=padding_mask)

    def _reference_routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, E] logits -> (probs, routing_map): softmax over the top-k logits only."""
        top_logits, top_idx = torch.topk(logits, self.topk, dim=1)
        weights = torch.softmax(top_logits, dim=-1)
        probs = torch.zeros_like(logits).scatter(1, top_idx, weights)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_idx, True)
        return probs, routing_map


class MixingGate(nn.Module):
    """The learned 2-way gate ``softmax(W_g x + b_g)`` -> ``[T, 2]`` = (g_c, g_d), in >= fp32."""

    def __init__(self, hidden_size: int, sequence_parallel: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 2)
        for param in self.linear.parameters():
            param.sequence_parallel = sequence_parallel

    @torch.no_grad()
    def reset_parameters(self, std: float, generator: torch.Generator) -> None:
        """Weights N(0, std^2), bias 0: both paths start with weight ~1/2."""
        self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=generator) * std)
        self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(dtype), self.linear.weight.to(dtype), self.linear.bias.to(dtype))
        return torch.softmax(logits, dim=-1)


@dataclass
class FusedScores:
    """Router logits, gate and code choice of one pretrain-mode input from ONE GEMM over x."""

    router_logits: torch.Tensor
    """``[S, B, E]`` in the router dtype, as megatron's ``TopKRouter.gating`` returns them."""
    gate: torch.Tensor
    """``[T, 2]`` = (g_c, g_d), as :class:`MixingGate` returns them."""
    codes: torch.Tensor
    """``[T]`` nearest code per token, as ``VectorQuantizer.assign`` returns them."""


@dataclass
class RoutingPlan:
    """What the VQMoE layer dispatches for one input ``[S, B, H]`` (T = S * B tokens).

    hidden: ``[P * S, B, H]`` token vectors to dispatch (P = ``num_streams``, 1 or 2).
    probs: ``[P * T, E]`` weight of every (row, expert) pair, 0 where not routed.
    routing_map: ``[P * T, E]`` bool.
    num_rows: exact number of routed rows if known without a device sync, else None.
    post_norm_scale: ``[S, B, 1]`` when the discrete expert output is normalised after combine
        (``discrete_layernorm``): the last stream is the discrete path and contributes
        ``post_norm_scale * LN(stream)``; None otherwise.
    aux_loss: scaled VQ loss to attach to the layer output (None when not training).
    """

    hidden: torch.Tensor
    probs: torch.Tensor
    routing_map: torch.Tensor
    num_streams: int
    num_rows: Optional[int]
    post_norm_scale: Optional[torch.Tensor]
    aux_loss: Optional[torch.Tensor]


class VQMoERouter(StepRouting, MegatronModule):
    """Continuous top-k router + nearest-code routing + mixing gate (METHOD.md section 1).

    Built by megatron from the spec slot ``MoESubmodules.router`` with
    ``(config=..., pg_collection=...)``; all settings come from the ``vqmoe_*`` fields of
    :class:`VQMoETransformerConfig`. Code j serves expert ``j mod E``.
    """

    def __init__(
        self,
        config: VQMoETransformerConfig,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config)
        self.config = config
        self.num_experts = config.num_moe_experts
        self.layer_number: Optional[int] = None
        self.tp_dp_cp_group = pg_collection.tp_dp_cp
        self.tp_cp_group = pg_collection.tp_cp
        self.tp_cp_size = pg_collection.tp_cp.size()
        self.routing_metrics = RoutingMetrics()
        """Where this router's statistics go (``moe.metrics``); the owning model replaces it."""
        sp = config.sequence_parallel
        self.quantizer = VectorQuantizer(
            config.hidden_size,
            config.vqmoe_codes,
            distance=config.vqmoe_distance,
            commitment_cost=config.vqmoe_commitment_cost,
            init_std=config.vqmoe_codebook_init_std,
            update=config.vqmoe_codebook_update,
            ema_decay=config.vqmoe_ema_decay,
            dead_code_threshold=config.vqmoe_dead_code_threshold,
            data_init=config.vqmoe_codebook_init == "kmeans",
            sequence_parallel=sp,
        )
        self.register_buffer(
            "code_to_expert",
            torch.arange(config.vqmoe_codes) % self.num_experts,
            persistent=False,
        )
        if config.vqmoe_discrete_layernorm:
            self.discrete_norm_in = nn.LayerNorm(config.hidden_size)
            self.discrete_norm_out = nn.LayerNorm(config.hidden_size)
            for param in (
                *self.discrete_norm_in.parameters(),
                *self.discrete_norm_out.parameters(),
            ):
                param.sequence_parallel = sp
        else:
            self.discrete_norm_in = self.discrete_norm_out = None
        self.mode = config.vqmoe_routing_mode
        self.discrete_phase = False
        """Pretraining routes by the nearest code only from ``vqmoe_discrete_phase_start`` on
        (:meth:`begin_step`); router and gate stay in the model, unused."""
        self.gate_loss_coeff = 0.0
        """This step's weight of the gate loss (``vqmoe_gate_discrete_*``, :meth:`begin_step`)."""
        if self.mode == "pretrain":
            self.continuous: Optional[ContinuousRouter] = ContinuousRouter(
                config=config, pg_collection=pg_collection
            )
            self.continuous.routing_metrics = self.routing_metrics
            self.gate: Optional[MixingGate] = MixingGate(config.hidden_size, sp)
        else:
            self.continuous = None
            self.gate = None
            self._freeze_codebook_if_configured()

    # ----------------------------------------------------------------------------- modes
    def set_layer_number(self, layer_number: int) -> None:
        """Layer index used for metrics and aux-loss logging (set by TransformerLayer)."""
        self.layer_number = layer_number
        if self.continuous is not None:
            self.continuous.set_layer_number(layer_number)

    def set_routing_mode(self, mode: str) -> None:
        """Switch to ``discrete`` (drops router and gate for good) or check ``pretrain``.

        Dropping is final: the parameters leave the module, its state dict and any optimizer
        built afterwards. Switch before building the optimizer.
        """
        if mode == "discrete":
            self.continuous = None
            self.gate = None
            self._freeze_codebook_if_configured()
        elif mode == "pretrain":
            if self.continuous is None or self.gate is None:
                raise ValueError(
                    "cannot switch to 'pretrain' routing: this layer has no router and gate "
                    "(it was built or loaded in 'discrete' mode)"
                )
        else:
            raise ValueError(f"routing mode must be 'pretrain' or 'discrete', got {mode!r}")
        self.mode = mode

    def _freeze_codebook_if_configured(self) -> None:
        if not self.config.vqmoe_train_codebook_in_discrete:
            self.quantizer.set_trainable(False)

    def begin_step(self, step: int) -> None:
        """The step-dependent pretraining options (METHOD.md section 8), from the step the
        training loop restores on resume, so they survive it: the discrete phase from step
        ``vqmoe_discrete_phase_start`` on, and the gate loss, 0 before step
        ``vqmoe_gate_discrete_start`` and ramping linearly to its full weight over
        ``vqmoe_gate_discrete_ramp_steps`` steps."""
        cfg = self.config
        start = cfg.vqmoe_discrete_phase_start
        self.discrete_phase = self.mode == "pretrain" and start is not None and step >= start
        ramp = (step - cfg.vqmoe_gate_discrete_start + 1) / max(
            1, cfg.vqmoe_gate_discrete_ramp_steps
        )
        self.gate_loss_coeff = cfg.vqmoe_gate_discrete_coeff * min(1.0, max(0.0, ramp))

    @property
    def active_routing(self) -> str:
        """How this forward routes: the mode, or 'discrete' in the discrete phase."""
        return "discrete" if self.discrete_phase else self.mode

    # ----------------------------------------------------------------------------- init
    @torch.no_grad()
    def draw_parameters(self, generator: torch.Generator) -> None:
        """Layout-independent initialisation of router, gate and codebook from ``generator``."""
        if self.continuous is not None:
            self.continuous.draw_parameters(generator)
            self.gate.reset_parameters(self.config.init_method_std, generator)
        self.quantizer.reset_parameters(generator)

    # ----------------------------------------------------------------------------- routing
    def _expert_input(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """x_d [T, H] for the configured expert input, dtype of x (``expert_input`` module).

        ``offset`` is ``sg(q - x)``: every variant passes gradient to x only.
        """
        cfg = self.config
        x_d = expert_input(x, offset, cfg.vqmoe_expert_input, cfg.vqmoe_contrib_rate)
        if self.discrete_norm_in is not None:
            x_d = self.discrete_norm_in(x_d)
        return x_d

    def _stacked_streams(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """``[x; x_d]`` [2T, H]: the continuous path's rows, then the discrete path's."""
        if self.discrete_norm_in is not None:
            return torch.cat([x, self._expert_input(x, offset)], dim=0)
        cfg = self.config
        return stacked_streams(x, offset, cfg.vqmoe_expert_input, cfg.vqmoe_contrib_rate)

    def _token_total(
        self, x: torch.Tensor, valid: Optional[torch.Tensor]
    ) -> Union[int, torch.Tensor]:
        """The valid tokens of the micro-batch over all TP/CP slices: the denominator of every
        per-token mean loss. Under sequence parallelism each TP rank holds a slice of the
        sequence and the gradients of replicated parameters are summed over TP, so each rank's
        loss is its share of the mean over the valid tokens of all slices (which may hold
        different amounts of padding)."""
        if valid is None:
            return x.shape[0] * self.tp_cp_size
        total = valid.sum().to(torch.float64)
        if self.tp_cp_size > 1:
            dist.all_reduce(total, group=self.tp_cp_group)
        return total.clamp(min=1)

    def _vq_aux_loss(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        valid: Optional[torch.Tensor],
        offset: torch.Tensor,
        total: Union[int, torch.Tensor],
    ) -> Optional[torch.Tensor]:
        if self.mode == "discrete" and not self.config.vqmoe_loss_in_discrete:
            return None
        loss = self.quantizer.loss(x, codes, valid, offset, total)
        if self.routing_metrics.enabled:
            self.routing_metrics.record(self.layer_number, "vq_loss_sum", loss)
            shares = torch.full((), 1.0 / self.tp_cp_size, device=x.device)
            self.routing_metrics.record(self.layer_number, "micro_batches", shares)
        return loss * self.config.vqmoe_loss_coeff

    @staticmethod
    def _token_mean(
        per_token: torch.Tensor, valid: Optional[torch.Tensor], total: Union[int, torch.Tensor]
    ) -> torch.Tensor:
        """This rank's share of the mean of ``per_token`` [T] over the valid tokens."""
        if valid is not None:
            per_token = per_token * valid.to(per_token.dtype)
        return per_token.sum() / total

    def _path_losses(
        self,
        logits: Optional[torch.Tensor],
        gate: torch.Tensor,
        expert_d: torch.Tensor,
        valid: Optional[torch.Tensor],
        total: Union[int, torch.Tensor],
    ) -> list[torch.Tensor]:
        """The pretrain-mode losses of METHOD.md section 8 that are switched on: router
        alignment ``coeff * mean CE(router logits [T, E], sg(VQ expert))`` and the gate loss
        ``coeff * mean(-log g_d)``."""
        losses = []
        if self.config.vqmoe_router_alignment_coeff > 0:
            ce = F.cross_entropy(logits.float(), expert_d, reduction="none")
            coeff = self.config.vqmoe_router_alignment_coeff
            losses.append(coeff * self._token_mean(ce, valid, total))
        if self.gate_loss_coeff > 0:
            minus_log_gd = -torch.log(gate[:, 1].clamp(min=torch.finfo(gate.dtype).tiny))
            losses.append(self.gate_loss_coeff * self._token_mean(minus_log_gd, valid, total))
        return losses

    def _fused_scores(self, hidden: torch.Tensor) -> Optional[FusedScores]:
        """The router GEMM, the gate GEMM and the L2 code scores as one ``[T, E + 2 + K]`` GEMM
        (one pass over x forward and one backward instead of three), where they share a dtype;
        None otherwise (cosine distance, fp64 router on fp32 activations, input jitter, expert
        bias, forced balancing), and the three run separately.

        Same values and gradients as the separate path: the code scores take the detached
        codebook and feed only an argmax, so no gradient flows through their columns.
        """
        router, cfg = self.continuous, self.config
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        if (
            self.quantizer.distance != "l2"
            or _ROUTER_DTYPES.get(cfg.moe_router_dtype, hidden.dtype) != dtype
            or cfg.moe_input_jitter_eps is not None
            or cfg.moe_router_enable_expert_bias
            or cfg.moe_router_force_load_balancing
        ):
            return None
        seq, batch, width = hidden.shape
        code_weight, code_bias = self.quantizer.l2_scores(dtype)
        router_bias = (
            hidden.new_zeros(self.num_experts, dtype=dtype)
            if router.bias is None
            else router.bias.to(dtype)
        )
        gate = self.gate.linear
        weight = torch.cat([router.weight.to(dtype), gate.weight.to(dtype), code_weight])
        bias = torch.cat([router_bias, gate.bias.to(dtype), code_bias])
        scores = F.linear(hidden.reshape(-1, width).to(dtype), weight, bias)
        logits, gate_logits, code_scores = scores.split(
            [self.num_experts, 2, self.quantizer.num_codes], dim=-1
        )
        return FusedScores(
            router_logits=logits.view(seq, batch, self.num_experts),
            gate=torch.softmax(gate_logits, dim=-1),
            codes=code_scores.detach().argmax(dim=1),
        )

    def forward(
        self, hidden: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
    ) -> RoutingPlan:
        """Route ``hidden`` [S, B, H]; ``padding_mask`` [S, B] bool marks padding (True)."""
        seq, batch, width = hidden.shape
        x = hidden.reshape(-1, width)
        valid = None if padding_mask is None else ~padding_mask.reshape(-1)
        if self.quantizer.needs_data_init and self.training:
            raise RuntimeError(
                "codebook_init=kmeans: run the data-dependent initialisation "
                "(vqmoe_megatron.training.codebook.initialize_codebooks) before training"
            )
        routing = self.active_routing
        fused = self._fused_scores(hidden) if routing == "pretrain" else None
        codes = self.quantizer.assign(x) if fused is None else fused.codes
        if self.training and torch.is_grad_enabled():
            self.quantizer.record(
                x if valid is None else x[valid], codes if valid is None else codes[valid]
            )
        expert_d = (
            codes if self.quantizer.num_codes == self.num_experts else self.code_to_expert[codes]
        )
        onehot_d = F.one_hot(expert_d, self.num_experts).bool()
        offset = self.quantizer.offset(x, codes)
        learning = self.training and torch.is_grad_enabled()
        total = self._token_total(x, valid) if learning else None
        aux_loss = self._vq_aux_loss(x, codes, valid, offset, total) if learning else None
        post_norm = self.discrete_norm_out is not None

        if routing == "discrete":
            plan = RoutingPlan(
                hidden=self._expert_input(x, offset).view(seq, batch, width),
                probs=onehot_d.to(torch.float32),
                routing_map=onehot_d,
                num_streams=1,
                num_rows=x.shape[0],
                post_norm_scale=hidden.new_ones(seq, batch, 1) if post_norm else None,
                aux_loss=aux_loss,
            )
            self._record_metrics(codes, plan, valid, gate=None, probs_c=None, expert_d=expert_d)
            return plan

        aligning = learning and self.config.vqmoe_router_alignment_coeff > 0
        if fused is None:
            probs_c, map_c = self.continuous(hidden, padding_mask)
            gate = self.gate(x)
            logits = self.continuous.gating(hidden).view(-1, self.num_experts) if aligning else None
        else:  # TopKRouter.forward after its gating GEMM
            probs_c, map_c = self.continuous.routing(fused.router_logits, padding_mask)
            gate = fused.gate
            logits = fused.router_logits.view(-1, self.num_experts)
        if learning:
            for loss in self._path_losses(logits, gate, expert_d, valid, total):
                aux_loss = loss if aux_loss is None else aux_loss + loss
        g_c, g_d = gate[:, :1], gate[:, 1:]
        merged = self.config.vqmoe_expert_input == "token" and not post_norm
        if merged:
            plan = RoutingPlan(
                hidden=hidden,
                probs=g_c * probs_c + g_d * onehot_d,
                routing_map=map_c | onehot_d,
                num_streams=1,
                num_rows=None,
                post_norm_scale=None,
                aux_loss=aux_loss,
            )
        else:
            weight_d = torch.ones_like(g_d) if post_norm else g_d
            static_rows = self.config.moe_expert_capacity_factor is None
            plan = RoutingPlan(
                hidden=self._stacked_streams(x, offset).view(2 * seq, batch, width),
                probs=torch.cat([g_c * probs_c, weight_d * onehot_d], dim=0),
                routing_map=torch.cat([map_c, onehot_d], dim=0),
                num_streams=2,
                num_rows=x.shape[0] * (self.config.moe_router_topk + 1) if static_rows else None,
                post_norm_scale=g_d.view(seq, batch, 1) if post_norm else None,
                aux_loss=aux_loss,
            )
        self._record_metrics(codes, plan, valid, gate=gate, probs_c=probs_c, expert_d=expert_d)
        return plan

    def combine_streams(self, output: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Sum the ``[P * S, B, H]`` combined expert output of a plan's streams -> ``[S, B, H]``."""
        streams = output.chunk(plan.num_streams, dim=0)
        if plan.post_norm_scale is None:
            combined = streams[0]
            for stream in streams[1:]:
                combined = combined + stream
            return combined
        *continuous, discrete = streams
        combined = plan.post_norm_scale.to(output.dtype) * self.discrete_norm_out(discrete)
        for stream in continuous:
            combined = combined + stream
        return combined

    @torch.no_grad()
    def _record_metrics(
        self,
        codes: torch.Tensor,
        plan: RoutingPlan,
        valid: Optional[torch.Tensor],
        gate: Optional[torch.Tensor],
        probs_c: Optional[torch.Tensor],
        expert_d: torch.Tensor,
    ) -> None:
        layer = self.layer_number
        metrics = self.routing_metrics
        if layer is None or not metrics.enabled:
            return
        tokens = codes.shape[0]
        keep = (
            valid
            if valid is not None
            else torch.ones(tokens, dtype=torch.bool, device=codes.device)
        )
        streams_keep = keep.repeat(plan.num_streams)
        metrics.record(layer, "tokens", keep.sum())
        metrics.record(layer, "expert_rows", plan.routing_map[streams_keep].sum(dim=0))
        metrics.record(
            layer, "code_counts", torch.bincount(codes[keep], minlength=self.quantizer.num_codes)
        )
        if gate is not None:
            metrics.record(layer, "gate_discrete_sum", gate[keep, 1].sum())
            top1 = probs_c.argmax(dim=-1)
            metrics.record(layer, "agreement_sum", (top1 == expert_d)[keep].sum())
