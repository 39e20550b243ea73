"""The paper's baseline routers (docs/BASELINES.md), each emitting megatron's (probs, routing_map).

Every router here returns ``probs`` float and ``routing_map`` bool, both ``[T, E]`` for an input
``[S, B, H]`` (T = S * B), so megatron's dispatchers, expert parallelism, capacity and
checkpoints apply unchanged; ``topk`` is the number of experts per token of the current routing
(the layer tells the all-to-all dispatcher ``T * topk`` rows).

* :class:`XMoERouter` (X-MoE, Chi et al. 2022; torchscale ``component/xmoe/routing.py``):
  logits ``proj(x) . normalise(e_j)`` with a bias-free projection to ``xmoe_dim`` and expert
  embeddings rescaled to L2 norm 1.5 without gradient at every training forward; with
  ``xmoe_temperature`` the paper's ``cos(proj(x), e_j) / tau`` with a learnable tau. Then
  megatron's top-k and balance loss.
* :class:`HashRouter` (Roller et al. 2021): a fixed table token id -> ``topk`` experts, weight
  ``1 / topk``; the table is a checkpointed buffer, balanced over the vocabulary.
* :class:`SMoEDropoutRouter` (Chen et al. 2023): a frozen random linear router, softmax over
  the selected logits, no balance loss; k grows linearly from ``k_min`` to ``k_max`` over
  ``ramp_steps`` optimizer steps; evaluation routes with ``eval_k`` experts.
* :class:`StableMoERouter` (Dai et al. 2022; Hunter-DDM/stablemoe ``moe_layer.py``): top-1.
  Stage 1 (steps ``1..stage1_steps`` of training) assigns by ``x . c_j`` and learns with
  StableMoE's balance loss while a token-id router (embedding + centroids) is distilled on
  those assignments; stage 2 and evaluation route with the distilled router, frozen. The prob is
  ``alpha = sigmoid(x . c_e)``, and ``layer.StableMoELayer`` adds ``(1 - alpha) * x``.

Routers that route by token id get the micro-batch's ids from the model before each forward
(:meth:`TokenIdRouting.set_token_ids`, called by ``VQMoEGPTModel``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, ProcessGroupCollection
from torch import nn

from vqmoe_megatron.moe.metrics import RoutingMetrics, record_entropy
from vqmoe_megatron.moe.router import (
    ContinuousRouter,
    StepRouting,
    draw_normal,
    router_dtype,
)
from vqmoe_megatron.moe.transformer_config import VQMoETransformerConfig


@torch.no_grad()
def _draw_orthogonal(param: torch.Tensor, gain: float, generator: torch.Generator) -> None:
    draw_normal(param, lambda w: nn.init.orthogonal_(w, gain=gain), generator)


def _one_hot_plan(experts: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """``experts`` [T, k] ids, ``weights`` [T, k] -> (probs [T, E], routing_map [T, E])."""
    tokens = experts.shape[0]
    probs = weights.new_zeros(tokens, num_experts).scatter(1, experts, weights)
    routing_map = torch.zeros(tokens, num_experts, dtype=torch.bool, device=experts.device)
    return probs, routing_map.scatter(1, experts, True)


class TokenIdRouting:
    """Routers that route by token id: the model hands them each micro-batch's ids."""

    _token_ids: Optional[torch.Tensor] = None

    def set_token_ids(self, input_ids: Optional[torch.Tensor]) -> None:
        """``input_ids`` [B, S] of the next forward (the whole sequence on every TP rank)."""
        self._token_ids = input_ids

    def token_ids_for(self, hidden: torch.Tensor, tp_group) -> torch.Tensor:
        """The ids [T] of ``hidden`` [S', B, H]'s tokens (S' = S / TP under sequence
        parallelism: this rank's slice of the sequence)."""
        if self._token_ids is None:
            raise RuntimeError(
                f"{type(self).__name__} routes by token id: run it inside VQMoEGPTModel (which "
                "hands it the input ids) or call set_token_ids first"
            )
        ids = self._token_ids.t()
        if ids.shape[0] != hidden.shape[0]:
            ids = ids.chunk(tp_group.size(), dim=0)[tp_group.rank()]
        if ids.shape != hidden.shape[:2]:
            raise ValueError(f"token ids {tuple(ids.shape)} do not match hidden {hidden.shape}")
        return ids.reshape(-1).to(hidden.device)


class XMoERouter(ContinuousRouter):
    """X-MoE scores in a low-dimensional space, then megatron's top-k and balance loss."""

    def __init__(
        self, config: VQMoETransformerConfig, pg_collection: Optional[ProcessGroupCollection] = None
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        del self.weight
        dim = config.vqmoe_xmoe_dim
        self.projection = nn.Parameter(torch.empty(dim, config.hidden_size))
        self.expert_embeddings = nn.Parameter(torch.empty(config.num_moe_experts, dim))
        self.temperature = (
            None
            if config.vqmoe_xmoe_temperature is None
            else nn.Parameter(torch.tensor(float(config.vqmoe_xmoe_temperature)))
        )
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    @torch.no_grad()
    def draw_parameters(self, generator: torch.Generator) -> None:
        """Projection N(0, init_std^2); expert embeddings orthogonal with gain 0.32 (torchscale)."""
        draw_normal(self.projection, self.config.init_method, generator)
        _draw_orthogonal(self.expert_embeddings, 0.32, generator)
        if self.temperature is not None:
            self.temperature.fill_(self.config.vqmoe_xmoe_temperature)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """[S, B, H] -> logits [S, B, E]. Training rescales the expert embeddings to norm 1.5 in
        place first (no gradient; torchscale's step, which only changes their gradient scale)."""
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                norms = self.expert_embeddings.norm(dim=1, keepdim=True)
                self.expert_embeddings.mul_(1.5 / norms)
        dtype = router_dtype(self.config, input.dtype)
        reduced = F.linear(input.to(dtype), self.projection.to(dtype))
        experts = F.normalize(self.expert_embeddings.to(dtype), dim=1, eps=1e-4)
        if self.temperature is None:
            return reduced @ experts.t()
        reduced = F.normalize(reduced, dim=-1, eps=1e-4)
        return (reduced @ experts.t()) / self.temperature.to(dtype)


class SMoEDropoutRouter(ContinuousRouter):
    """A frozen random router whose k grows with the training step (SMoE-Dropout)."""

    def __init__(
        self, config: VQMoETransformerConfig, pg_collection: Optional[ProcessGroupCollection] = None
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.weight.requires_grad_(False)
        self.train_k = config.vqmoe_smoe_k_min

    @property
    def softmax_over_selected(self) -> bool:
        return True

    def begin_step(self, step: int) -> None:
        """k = round((k_max - k_min) * min(step, ramp) / ramp) + k_min (the reference's)."""
        cfg = self.config
        ramp = cfg.vqmoe_smoe_ramp_steps
        progress = 1.0 if ramp <= 0 else min(step, ramp) / ramp
        self.train_k = round((cfg.vqmoe_smoe_k_max - cfg.vqmoe_smoe_k_min) * progress)
        self.train_k += cfg.vqmoe_smoe_k_min

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        self.topk = self.train_k if self.training else self.config.vqmoe_smoe_eval_k
        return super().forward(input, padding_mask)


class _TokenIdRouter(TokenIdRouting, StepRouting, MegatronModule):
    """Common state of the routers built here from scratch (not on megatron's Router)."""

    def __init__(
        self,
        config: VQMoETransformerConfig,
        pg_collection: Optional[ProcessGroupCollection],
        topk: int,
    ) -> None:
        super().__init__(config)
        self.config = config
        self.num_experts = config.num_moe_experts
        self.topk = topk
        self.layer_number: Optional[int] = None
        self.tp_group = pg_collection.tp
        self.tp_cp_group = pg_collection.tp_cp
        self.routing_metrics = RoutingMetrics()
        """Where the routing metrics go (``moe.metrics``); the owning model replaces it."""

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number


class HashRouter(_TokenIdRouter):
    """Fixed token-id -> expert table (Roller et al. 2021): no parameters, weight 1 / topk."""

    def __init__(
        self, config: VQMoETransformerConfig, pg_collection: Optional[ProcessGroupCollection] = None
    ) -> None:
        super().__init__(config, pg_collection, config.moe_router_topk)
        self.register_buffer(
            "table", torch.zeros(config.vqmoe_vocab_size, self.topk, dtype=torch.long)
        )

    @torch.no_grad()
    def draw_parameters(self, generator: torch.Generator) -> None:
        """Token v -> experts (b_v + j) mod E, j < topk, with b = a random permutation of the
        vocabulary mod E: every expert serves the same number of token ids."""
        vocab = self.table.shape[0]
        base = torch.randperm(vocab, generator=generator) % self.num_experts
        table = (base[:, None] + torch.arange(self.topk)) % self.num_experts
        self.table.copy_(table)

    def forward(self, hidden: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        experts = self.table[self.token_ids_for(hidden, self.tp_group)]
        weights = torch.full(experts.shape, 1.0 / self.topk, device=hidden.device)
        return _one_hot_plan(experts, weights, self.num_experts)


class StableMoERouter(_TokenIdRouter):
    """StableMoE's two-stage top-1 router (see the module docstring)."""

    def __init__(
        self, config: VQMoETransformerConfig, pg_collection: Optional[ProcessGroupCollection] = None
    ) -> None:
        super().__init__(config, pg_collection, topk=1)
        dim = config.vqmoe_stablemoe_distill_dim
        self.expert_centroids = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.distill_embedding = nn.Parameter(torch.empty(config.vqmoe_vocab_size, dim))
        self.distill_centroids = nn.Parameter(torch.empty(self.num_experts, dim))
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel
        self.stage = 1

    @torch.no_grad()
    def draw_parameters(self, generator: torch.Generator) -> None:
        """Centroids orthogonal with gain 0.1, the id embedding N(0, 1) (the reference's)."""
        _draw_orthogonal(self.expert_centroids, 0.1, generator)
        draw_normal(self.distill_embedding, nn.init.normal_, generator)
        _draw_orthogonal(self.distill_centroids, 0.1, generator)

    def begin_step(self, step: int) -> None:
        """Stage 1 for steps ``1..stablemoe_stage1_steps``, stage 2 after (from the step the
        loops restore on resume, so the switch survives it)."""
        self.stage = 1 if step <= self.config.vqmoe_stablemoe_stage1_steps else 2

    def forward(self, hidden: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``hidden`` [S, B, H] -> (probs, routing_map) [T, E]; probs = alpha of the one expert."""
        dtype = router_dtype(self.config, hidden.dtype)
        x = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
        ids = self.token_ids_for(hidden, self.tp_group)
        centroids = self.expert_centroids.to(dtype)
        student = self.distill_embedding[ids].to(dtype) @ self.distill_centroids.to(dtype).t()
        learning = self.training and self.stage == 1
        with torch.no_grad():
            scores = x @ centroids.t() if learning else student
            record_entropy(self.routing_metrics, self.layer_number, scores, padding_mask)
            teacher = scores.argmax(dim=1) if learning else None
            experts = scores.argmax(dim=1)
        alpha = torch.sigmoid((x * centroids[experts]).sum(dim=-1))
        probs, routing_map = _one_hot_plan(experts[:, None], alpha[:, None], self.num_experts)
        if learning and torch.is_grad_enabled():
            valid = None if padding_mask is None else ~padding_mask.reshape(-1)
            loss = self._stage1_loss(alpha, student, teacher, valid)
            probs = MoEAuxLossAutoScaler.apply(probs, loss)
        return probs, routing_map

    def _stage1_loss(
        self,
        alpha: torch.Tensor,
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """balance_coeff * balance + distill_coeff * distill, each a sum over tokens divided by
        the token count (the reference sums both like its summed LM loss; ours is a mean).

        balance = sum_e (n_e - n_avg) / n_avg * sum_{t -> e} alpha_t (StableMoE's), with the
        counts over the micro-batch (all TP/CP slices); distill = CE(student, teacher).
        """
        cfg = self.config
        weight = alpha.new_ones(alpha.shape) if valid is None else valid.to(alpha.dtype)
        counts = torch.zeros(self.num_experts, dtype=alpha.dtype, device=alpha.device)
        counts.index_add_(0, teacher, weight)
        if self.tp_cp_group.size() > 1:
            dist.all_reduce(counts, group=self.tp_cp_group)
        total = counts.sum().clamp(min=1)
        mean = total / self.num_experts
        balance = ((counts[teacher] - mean) / mean * alpha * weight).sum()
        distill = (F.cross_entropy(student, teacher, reduction="none") * weight).sum()
        return (
            cfg.vqmoe_stablemoe_balance_coeff * balance
            + cfg.vqmoe_stablemoe_distill_coeff * distill
        ) / total
