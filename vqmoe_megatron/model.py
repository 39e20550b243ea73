"""Builds the megatron-core GPTModel with VQMoE layers from the typed run configuration.

One code path for every device: on CUDA with Transformer Engine installed the layers use TE's
specs (fused norms, grouped expert GEMMs); otherwise megatron's local spec with the portable
swaps of :mod:`vqmoe_megatron.compat` (SDPA attention, sequence-parallel torch norms). The MoE
slot of every ``moe.layer_freq``-th layer holds a :class:`~vqmoe_megatron.moe.VQMoELayer`
(``moe.router: vqmoe``), megatron's TopKRouter layer (``moe.router: topk``, the SMoE baseline)
or a baseline router of :mod:`vqmoe_megatron.moe.baselines` (``MOE_SPECS``).

Initialisation is layout-independent: dense weights use megatron's CPU initialisation (a full
master weight sliced per TP rank) and MoE weights are drawn per (layer, global expert), so the
same seed gives the same model at every TP/EP layout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from vqmoe_megatron.compat import SDPACoreAttention, SPTorchNorm, use_device_safe_rotary_embedding
from vqmoe_megatron.config import ConfigError, ModelConfig, MoEConfig, ParallelConfig
from vqmoe_megatron.moe import (
    CodeRestart,
    ContinuousRouter,
    GroupedGemmExperts,
    PortableMoELayer,
    StableMoELayer,
    VQMoELayer,
    VQMoERouter,
    VQMoETransformerConfig,
)
from vqmoe_megatron.moe.baselines import (
    HashRouter,
    SMoEDropoutRouter,
    StableMoERouter,
    TokenIdRouting,
    XMoERouter,
)
from vqmoe_megatron.moe.metrics import RoutingMetrics, attach

VOCAB_DIVISIBLE_BY = 128

MOE_SPECS = {
    "vqmoe": (VQMoELayer, VQMoERouter),
    "topk": (PortableMoELayer, ContinuousRouter),
    "xmoe": (PortableMoELayer, XMoERouter),
    "hash": (PortableMoELayer, HashRouter),
    "smoe_dropout": (PortableMoELayer, SMoEDropoutRouter),
    "stablemoe": (StableMoELayer, StableMoERouter),
}
"""``moe.router`` -> (MoE layer class, router class) of the MoE spec slots."""


def transformer_engine_available() -> bool:
    """Whether Transformer Engine can be used (importable and CUDA present)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def padded_vocab_size(vocab_size: int, tensor_parallel: int) -> int:
    """Vocabulary padded to a multiple of 128; pad ids are never targets.

    Unlike megatron's 128 * TP, the padding does not depend on TP (the padded rows take part
    in the softmax), so a model is the same function at every layout; 128 is divisible by
    every usual TP size.
    """
    padded = ((vocab_size + VOCAB_DIVISIBLE_BY - 1) // VOCAB_DIVISIBLE_BY) * VOCAB_DIVISIBLE_BY
    if padded % tensor_parallel:
        raise ValueError(
            f"padded vocabulary {padded} is not divisible by tensor_parallel={tensor_parallel}"
        )
    return padded


def is_moe_layer(layer_index: int, moe: MoEConfig) -> bool:
    """Whether 0-based layer ``layer_index`` is an MoE layer (every ``layer_freq``-th)."""
    return moe.num_experts > 0 and layer_index % moe.layer_freq == 0


def use_transformer_engine(model: ModelConfig) -> bool:
    """Whether this run builds Transformer Engine layers."""
    return model.use_transformer_engine == "auto" and transformer_engine_available()


def expert_backend(model: ModelConfig, moe: MoEConfig) -> str:
    """The resolved ``moe.expert_backend``: 'grouped', 'sequential' or 'te'."""
    use_te = use_transformer_engine(model)
    if moe.expert_backend == "auto":
        return "te" if use_te else "grouped"
    if moe.expert_backend == "te" and not use_te:
        raise ConfigError(
            "moe.expert_backend=te needs Transformer Engine on CUDA (and model."
            "use_transformer_engine=auto); use moe.expert_backend=grouped or sequential"
        )
    return moe.expert_backend


def build_transformer_config(
    model: ModelConfig,
    moe: MoEConfig,
    parallel: ParallelConfig,
    *,
    recompute: bool = False,
) -> VQMoETransformerConfig:
    """megatron TransformerConfig (+ vqmoe_* fields) for this run. Parameters are built in fp32;
    DeepSpeed casts them for bf16 training."""
    tp = parallel.tensor_parallel
    sequence_parallel = (
        parallel.sequence_parallel if parallel.sequence_parallel is not None else tp > 1
    )
    backend = expert_backend(model, moe)
    swiglu = model.activation == "swiglu"
    reference = moe.reference_router
    # Routers with their own balance terms (or none) take no megatron aux loss.
    own_balance = reference or moe.router in ("hash", "smoe_dropout", "stablemoe")
    k_max = moe.smoe_dropout_k_max or moe.num_experts
    return VQMoETransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization=model.normalization,
        activation_func=F.silu if swiglu else F.gelu,
        gated_linear_unit=swiglu,
        add_bias_linear=False,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        num_moe_experts=moe.num_experts if moe.num_experts > 0 else None,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size if moe.num_experts > 0 else None,
        moe_router_topk=moe.topk,
        moe_router_pre_softmax=moe.pre_softmax,
        moe_router_load_balancing_type="none"
        if own_balance or moe.aux_loss_coeff == 0
        else "aux_loss",
        moe_aux_loss_coeff=0.0 if own_balance else moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff,
        moe_router_dtype=moe.router_dtype,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_grouped_gemm=backend == "te",
        moe_permute_fusion=False,
        moe_router_fusion=False,
        vqmoe_router=moe.router,
        vqmoe_vocab_size=None
        if model.vocab_size is None
        else padded_vocab_size(model.vocab_size, tp),
        vqmoe_xmoe_dim=moe.xmoe_dim,
        vqmoe_xmoe_temperature=moe.xmoe_temperature,
        vqmoe_smoe_k_min=moe.smoe_dropout_k_min or moe.topk,
        vqmoe_smoe_k_max=k_max,
        vqmoe_smoe_ramp_steps=moe.smoe_dropout_ramp_steps,
        vqmoe_smoe_eval_k=moe.smoe_dropout_eval_k or moe.num_experts,
        vqmoe_stablemoe_stage1_steps=moe.stablemoe_stage1_steps,
        vqmoe_stablemoe_distill_dim=moe.stablemoe_distill_dim,
        vqmoe_stablemoe_balance_coeff=moe.stablemoe_balance_coeff,
        vqmoe_stablemoe_distill_coeff=moe.stablemoe_distill_coeff,
        vqmoe_expert_backend=backend,
        vqmoe_reference_router=reference,
        vqmoe_routing_mode=moe.routing_mode,
        vqmoe_num_codes=moe.num_codes,
        vqmoe_distance=moe.distance,
        vqmoe_expert_input=moe.expert_input,
        vqmoe_contrib_rate=moe.contrib_rate,
        vqmoe_discrete_layernorm=moe.discrete_layernorm,
        vqmoe_loss_coeff=moe.vq_loss_coeff,
        vqmoe_commitment_cost=moe.commitment_cost,
        vqmoe_codebook_init=moe.codebook_init,
        vqmoe_codebook_init_std=moe.codebook_init_std,
        vqmoe_kmeans_iters=moe.kmeans_iters,
        vqmoe_codebook_update=moe.codebook_update,
        vqmoe_ema_decay=moe.ema_decay,
        vqmoe_dead_code_interval=moe.dead_code_interval,
        vqmoe_dead_code_threshold=moe.dead_code_threshold,
        vqmoe_train_codebook_in_discrete=moe.train_codebook_in_discrete,
        vqmoe_loss_in_discrete=moe.vq_loss_in_discrete,
        vqmoe_router_alignment_coeff=moe.router_alignment_coeff,
        vqmoe_gate_discrete_coeff=moe.gate_discrete_coeff,
        vqmoe_gate_discrete_start=moe.gate_discrete_start,
        vqmoe_gate_discrete_ramp_steps=moe.gate_discrete_ramp_steps,
        vqmoe_discrete_phase_start=moe.discrete_phase_start,
    )


def _layer_spec(config: VQMoETransformerConfig, moe: bool, use_te: bool) -> ModuleSpec:
    """One transformer layer spec: TE on CUDA when available, else the portable local spec."""
    num_experts = config.num_moe_experts if moe else None
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = copy.deepcopy(
            get_gpt_layer_with_transformer_engine_spec(
                num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm
            )
        )
    else:
        spec = copy.deepcopy(
            get_gpt_layer_local_spec(num_experts=num_experts, normalization=config.normalization)
        )
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
        spec.submodules.input_layernorm = SPTorchNorm
        spec.submodules.pre_mlp_layernorm = SPTorchNorm
    if moe:
        layer, router = MOE_SPECS[config.vqmoe_router]
        spec.submodules.mlp.module = layer
        spec.submodules.mlp.submodules.router = router
        if config.vqmoe_expert_backend == "grouped":
            spec.submodules.mlp.submodules.experts = ModuleSpec(module=GroupedGemmExperts)
    return spec


def build_block_spec(
    config: VQMoETransformerConfig, moe: MoEConfig, use_te: bool
) -> TransformerBlockSubmodules:
    """Layer specs for the whole decoder (MoE every ``moe.layer_freq``-th layer)."""
    specs = [_layer_spec(config, is_moe_layer(i, moe), use_te) for i in range(config.num_layers)]
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = SPTorchNorm
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)


RowWriter = Callable[[torch.nn.Parameter, torch.Tensor, torch.Tensor], None]


def write_rows_in_place(
    param: torch.nn.Parameter, rows: torch.Tensor, values: torch.Tensor
) -> None:
    """Overwrite ``param[rows]`` with ``values`` (enough for plain torch optimisers)."""
    with torch.no_grad():
        param[rows.to(param.device)] = values.to(param)


class VQMoEGPTModel(GPTModel):
    """megatron-core GPTModel with VQMoE helpers (routing mode, codebook upkeep, MoE layers)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        use_device_safe_rotary_embedding(self)
        self.routing_metrics = attach(self, RoutingMetrics())
        """The routing statistics of this model's routers, kept apart from any other model's."""
        self._id_routers = [m for m in self.modules() if isinstance(m, TokenIdRouting)]

    def _hand_token_ids(self, input_ids: Optional[torch.Tensor]) -> None:
        """Give the routers that route by token id this forward's ``input_ids`` [B, S]."""
        for router in self._id_routers:
            router.set_token_ids(input_ids)

    def forward(self, input_ids: torch.Tensor, *args, **kwargs):
        """megatron's GPTModel.forward, with the input ids handed to the token-id routers."""
        self._hand_token_ids(input_ids)
        return super().forward(input_ids, *args, **kwargs)

    def final_hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The decoder's output after the final norm, without the LM output layer.

        ``input_ids``, ``position_ids`` [B, S]; ``padding_mask`` [B, S], True = padding (kept
        out of the MoE routing statistics and the VQ loss). Returns [S, B, H], or this rank's
        [S / TP, B, H] slice under sequence parallelism. Attention is causal, so right padding
        leaves the real tokens' states unchanged.
        """
        self._hand_token_ids(input_ids)
        decoder_input, rotary_pos_emb, _, _, _, padding_mask = self._preprocess(
            input_ids=input_ids, position_ids=position_ids, padding_mask=padding_mask
        )[:6]
        return self.decoder(
            hidden_states=decoder_input,
            attention_mask=None,
            rotary_pos_emb=rotary_pos_emb,
            padding_mask=padding_mask,
        )

    def moe_layers(self) -> list[PortableMoELayer]:
        """The MoE layers, in depth order."""
        return [m for m in self.modules() if isinstance(m, PortableMoELayer)]

    def vq_layers(self) -> list[VQMoELayer]:
        """The VQMoE layers, in depth order."""
        return [m for m in self.modules() if isinstance(m, VQMoELayer)]

    @property
    def routing_mode(self) -> Optional[str]:
        """'pretrain' / 'discrete' for VQMoE models, None for models without VQMoE layers."""
        layers = self.vq_layers()
        return layers[0].routing_mode if layers else None

    def set_routing_mode(self, mode: str) -> None:
        """Switch every VQMoE layer; 'discrete' drops routers and gates (before the optimizer)."""
        for layer in self.vq_layers():
            layer.set_routing_mode(mode)
        self.config.vqmoe_routing_mode = mode

    def reset_moe_parameters(self, seed: int) -> None:
        """Layout-independent initialisation of every MoE layer's parameters."""
        for layer in self.moe_layers():
            layer.reset_parameters(seed)

    def begin_step(self, step: int, seed: int) -> None:
        """Before optimizer step ``step`` (every rank; both training loops call it with the step
        restored on resume): step-dependent routing (SMoE-Dropout's k, StableMoE's stage) and
        the seeds of each codebook's restart sampling."""
        for layer in self.moe_layers():
            layer.begin_step(step, seed)

    def maintain_codebooks(
        self, step: int, seed: int, write_rows: RowWriter = write_rows_in_place
    ) -> dict[int, CodeRestart]:
        """Per-optimizer-step codebook upkeep of every VQMoE layer (collective over DP).

        Dead codes of gradient-learned codebooks are written with ``write_rows(param, rows,
        values)``; under DeepSpeed pass a writer that also updates the optimizer's fp32 master
        weights (``training.codebook.write_codebook_rows``), or ZeRO overwrites the restart at the next step.
        Returns the restarts by layer number (for logging).
        """
        restarts = {}
        for layer in self.vq_layers():
            restart = layer.maintain_codebook(step, seed)
            if restart is None:
                continue
            quantizer = layer.router.quantizer
            if isinstance(quantizer.codebook, torch.nn.Parameter):
                write_rows(quantizer.codebook, restart.codes, restart.vectors)
            restarts[layer.layer_number] = restart
        return restarts


def check_parallel_state(parallel: ParallelConfig) -> None:
    """Refuse a ParallelConfig that disagrees with megatron's initialised parallel state."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "initialise megatron's parallel state first (vqmoe_megatron.distributed)"
        )
    actual = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
    )
    wanted = (parallel.tensor_parallel, parallel.expert_parallel)
    if actual != wanted:
        raise ValueError(
            f"parallel.tensor_parallel/expert_parallel = {wanted} but the process groups were "
            f"initialised with {actual}; pass the same sizes to init_distributed"
        )


def build_mlp_block(
    model: ModelConfig,
    moe: MoEConfig,
    parallel: ParallelConfig,
    *,
    seed: int,
    moe_layer: bool = True,
):
    """One stand-alone MLP block (MoE layer or dense MLP) exactly as the model builds it.

    Used by benchmarks and tests that exercise a single layer.
    """
    check_parallel_state(parallel)
    config = build_transformer_config(model, moe, parallel)
    torch.manual_seed(seed)
    spec = _layer_spec(config, moe=moe_layer, use_te=use_transformer_engine(model)).submodules.mlp
    block = build_module(spec, config=config)
    if moe_layer:
        block.set_layer_number(1)
        block.reset_parameters(seed)
    return block


def build_model(
    model: ModelConfig,
    moe: MoEConfig,
    parallel: ParallelConfig,
    *,
    seed: int,
    recompute: bool = False,
) -> VQMoEGPTModel:
    """Build the model for the current megatron parallel state (call after initialisation).

    The global torch RNG is seeded with ``seed`` so that megatron's CPU initialisation draws the
    same dense weights on every rank and at every layout.
    """
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "initialise megatron's parallel state first (vqmoe_megatron.distributed)"
        )
    config = build_transformer_config(model, moe, parallel, recompute=recompute)
    torch.manual_seed(seed)
    gpt = VQMoEGPTModel(
        config=config,
        transformer_layer_spec=build_block_spec(config, moe, use_transformer_engine(model)),
        vocab_size=padded_vocab_size(model.vocab_size, parallel.tensor_parallel),
        max_sequence_length=model.seq_length,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_base=model.rotary_base,
    )
    gpt.reset_moe_parameters(seed)
    return gpt
