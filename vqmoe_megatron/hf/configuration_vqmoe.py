"""Hugging Face configuration of an exported VQMoE GPT (self-contained: copied into exports).

``router`` is the MoE layers' router: 'vqmoe' (the VQMoE block) or one of the baselines
'topk', 'xmoe', 'hash', 'smoe_dropout', 'stablemoe' (their inference routing; see
``modeling_vqmoe``).

Every field mirrors a setting of the project's ``ModelConfig`` / ``MoEConfig``; the exporter
(``vqmoe_megatron.convert.hf``) fills them from a checkpoint's run config. ``vocab_size`` is the
model's padded vocabulary (a multiple of 128); ``tokenizer_vocab_size`` the real one: ids at or
above it are padding rows that no text ever produces.
"""

from __future__ import annotations

from typing import Optional

from transformers import PretrainedConfig

ROUTING_MODES = ("pretrain", "discrete")
"""``vqmoe_megatron.config.ROUTING_MODES``, copied: an export cannot import the project
(``tests/test_config.py`` checks that the two agree)."""


class VQMoEConfig(PretrainedConfig):
    """Architecture and routing settings of a VQMoE causal language model."""

    model_type = "vqmoe"

    def __init__(
        self,
        vocab_size: int = 512,
        tokenizer_vocab_size: Optional[int] = None,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 8,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        intermediate_size: int = 1024,
        normalization: str = "RMSNorm",
        norm_eps: float = 1e-5,
        activation: str = "gelu",
        position_embedding_type: str = "rope",
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 512,
        num_experts: int = 16,
        expert_intermediate_size: int = 512,
        moe_layer_freq: int = 1,
        num_codes: Optional[int] = None,
        router: str = "vqmoe",
        routing_mode: str = "pretrain",
        router_topk: int = 1,
        router_pre_softmax: bool = True,
        reference_router: bool = False,
        router_dtype: str = "fp32",
        distance: str = "l2",
        expert_input: str = "paper",
        contrib_rate: float = 0.05,
        discrete_layernorm: bool = False,
        xmoe_dim: int = 16,
        xmoe_temperature: Optional[float] = None,
        smoe_dropout_eval_k: Optional[int] = None,
        stablemoe_distill_dim: int = 50,
        codebook_update: str = "gradient",
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        **kwargs,
    ) -> None:
        if routing_mode not in ROUTING_MODES:
            raise ValueError(f"routing_mode must be one of {ROUTING_MODES}, got {routing_mode!r}")
        self.vocab_size = vocab_size
        self.tokenizer_vocab_size = tokenizer_vocab_size or vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.activation = activation
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.num_experts = num_experts
        self.expert_intermediate_size = expert_intermediate_size
        self.moe_layer_freq = moe_layer_freq
        self.num_codes = num_codes or num_experts
        self.router = router
        self.xmoe_dim = xmoe_dim
        self.xmoe_temperature = xmoe_temperature
        self.smoe_dropout_eval_k = smoe_dropout_eval_k or num_experts
        self.stablemoe_distill_dim = stablemoe_distill_dim
        self.codebook_update = codebook_update  # how training moved the codes (read-back only)
        self.routing_mode = routing_mode
        self.router_topk = router_topk
        self.router_pre_softmax = router_pre_softmax
        self.reference_router = reference_router
        self.router_dtype = router_dtype
        self.distance = distance
        self.expert_input = expert_input
        self.contrib_rate = contrib_rate
        self.discrete_layernorm = discrete_layernorm
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def is_moe_layer(self, index: int) -> bool:
        """Whether 0-based layer ``index`` is a VQMoE layer (every ``moe_layer_freq``-th)."""
        return self.num_experts > 0 and index % self.moe_layer_freq == 0
