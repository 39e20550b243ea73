"""Pure-PyTorch Hugging Face implementation of an exported VQMoE GPT (self-contained).

The project trains megatron-core models; ``vqmoe_megatron.convert.hf`` exports them here so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads and generates without
megatron or DeepSpeed. Numerics follow the project's modules exactly (fp32 logits agree to about
1e-6): pre-norm decoder layers (RMSNorm or LayerNorm), RoPE on full head dims (megatron's
non-interleaved layout) or learned positions, grouped-query attention through SDPA, no biases,
and in every ``moe_layer_freq``-th layer the VQMoE block of METHOD.md:

* nearest code ``k*(x)`` of the codebook (squared L2 or cosine), expert ``k* mod E``, on the
  expert input ``x_d`` ('paper': ``(1 - rho) x + rho (q - x)``, 'token': ``x``, 'quantized':
  ``q``), optionally wrapped as ``LN(FFN(LN(x_d)))``;
* ``routing_mode='pretrain'``: plus the continuous top-k router over ``x`` and the mixing gate
  ``[g_c, g_d] = softmax(W_g x + b_g)``: ``y = g_c * sum_k w_k FFN_k(x) + g_d * y_d``;
* ``routing_mode='discrete'``: the router and gate do not exist, ``y = y_d``.

Baseline routers (``config.router``), at their inference routing:

* 'topk' (megatron's TopKRouter): ``y = sum_k w_k FFN_k(x)``;
* 'xmoe': the same top-k over ``proj(x) . normalise(e_j)`` (or ``cos(proj(x), e_j) / tau``);
* 'smoe_dropout': the frozen router's top ``smoe_dropout_eval_k`` logits, softmax over them;
* 'hash': the experts of the token id in a fixed table, weight ``1 / k``;
* 'stablemoe': expert ``e = argmax(emb(id) . d_j)`` of the distilled router,
  ``y = alpha FFN_e(x) + (1 - alpha) x`` with ``alpha = sigmoid(x . c_e)``.

The vocabulary keeps the training model's padding rows (``vocab_size`` is a multiple of 128);
their logits are real outputs of the model, so log-probabilities equal the project's; generation
suppresses them through ``generation_config.suppress_tokens`` (written by the exporter).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_vqmoe import VQMoEConfig

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def _norm(config: VQMoEConfig) -> nn.Module:
    if config.normalization == "LayerNorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


def rope_angles(position_ids: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Rotary angles ``[B, S, head_dim]`` (megatron's fp32 inverse frequencies, halves repeated)."""
    inv_freq = 1.0 / (
        base
        ** (
            torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
        )
    )
    freqs = position_ids[..., None].float() * inv_freq
    return torch.cat([freqs, freqs], dim=-1)


def apply_rope(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``t`` [B, heads, S, D] by ``angles`` [B, S, D] (rotate-half layout)."""
    angles = angles[:, None]
    first, second = t.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return t * torch.cos(angles).to(t.dtype) + rotated * torch.sin(angles).to(t.dtype)


class VQMoEAttention(nn.Module):
    """Causal self-attention with grouped query heads; K/V cached per layer when asked."""

    def __init__(self, config: VQMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,
        angles: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        cache: Optional[Cache],
    ) -> torch.Tensor:
        """``hidden`` [B, S, H]; ``mask`` [B, 1, S, S_total] bool (True = attend) or None for
        plain causal attention; returns [B, S, H]."""
        batch, seq, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if angles is not None:
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0 / math.sqrt(self.head_dim)
        )
        return self.o_proj(context.transpose(1, 2).reshape(batch, seq, -1))


class VQMoEMLP(nn.Module):
    """FFN ``down(act(up(x)))``, or ``down(silu(gate(x)) * up(x))`` for SwiGLU; no biases."""

    def __init__(self, hidden: int, intermediate: int, activation: str) -> None:
        super().__init__()
        self.swiglu = activation == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class VQMoEBlock(nn.Module):
    """The MoE layer: the VQMoE block, or a baseline router's (``config.router``)."""

    def __init__(self, config: VQMoEConfig) -> None:
        super().__init__()
        self.config = config
        hidden, experts = config.hidden_size, config.num_experts
        self.experts = nn.ModuleList(
            VQMoEMLP(hidden, config.expert_intermediate_size, config.activation)
            for _ in range(experts)
        )
        kind = config.router
        if kind == "vqmoe":
            self.codebook = nn.Parameter(torch.empty(config.num_codes, hidden))
            if config.discrete_layernorm:
                self.discrete_norm_in = nn.LayerNorm(hidden)
                self.discrete_norm_out = nn.LayerNorm(hidden)
            if config.routing_mode == "pretrain":
                self.router = nn.Linear(hidden, experts, bias=False)
                self.gate = nn.Linear(hidden, 2)
        elif kind in ("topk", "smoe_dropout"):
            self.router = nn.Linear(hidden, experts, bias=False)
        elif kind == "xmoe":
            self.projection = nn.Parameter(torch.empty(config.xmoe_dim, hidden))
            self.expert_embeddings = nn.Parameter(torch.empty(experts, config.xmoe_dim))
            if config.xmoe_temperature is not None:
                self.temperature = nn.Parameter(torch.tensor(float(config.xmoe_temperature)))
        elif kind == "hash":
            table = torch.zeros(config.vocab_size, config.router_topk, dtype=torch.long)
            self.register_buffer("table", table)
        elif kind == "stablemoe":
            dim = config.stablemoe_distill_dim
            self.expert_centroids = nn.Parameter(torch.empty(experts, hidden))
            self.distill_embedding = nn.Parameter(torch.empty(config.vocab_size, dim))
            self.distill_centroids = nn.Parameter(torch.empty(experts, dim))
        else:
            raise ValueError(f"unknown router {kind!r}")

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code of each token: ``x`` [T, H] -> [T] (the project's fp32 formula)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf, cb = x.to(dtype), self.codebook.to(dtype)
        if self.config.distance == "cosine":
            scores = F.normalize(xf, dim=-1) @ F.normalize(cb, dim=-1).t()
        else:
            scores = torch.addmm(-(cb * cb).sum(dim=1), xf, cb.t(), alpha=2.0)
        return scores.argmax(dim=1)

    def expert_input(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """x_d of every token [T, H] (see the module docstring)."""
        kind = self.config.expert_input
        if kind == "token":
            x_d = x
        else:
            dtype = torch.promote_types(x.dtype, torch.float32)
            q = self.codebook[codes].to(dtype)
            if self.config.distance == "cosine":
                q = F.normalize(q, dim=-1) * x.to(dtype).norm(dim=-1, keepdim=True)
            delta = (q - x.to(dtype)).to(x.dtype)
            if kind == "quantized":
                x_d = x + delta
            else:
                rho = self.config.contrib_rate
                x_d = torch.add(x * (1.0 - rho), delta, alpha=rho)
        if self.config.discrete_layernorm:
            x_d = self.discrete_norm_in(x_d)
        return x_d

    def run_experts(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """``sum_j weights[t, j] * FFN_{experts[t, j]}(x[t])``: x [T, H], experts/weights [T, k]."""
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            token, slot = (experts == index).nonzero(as_tuple=True)
            if token.numel():
                y = expert(x[token]) * weights[token, slot].unsqueeze(-1).to(x.dtype)
                out.index_add_(0, token, y)
        return out

    def _router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] logits of the linear routers ('vqmoe', 'topk', 'smoe_dropout') or X-MoE's, in
        the router dtype."""
        dtype = _ROUTER_DTYPES.get(self.config.router_dtype, x.dtype)
        if self.config.router != "xmoe":
            return F.linear(x.to(dtype), self.router.weight.to(dtype))
        reduced = F.linear(x.to(dtype), self.projection.to(dtype))
        experts = F.normalize(self.expert_embeddings.to(dtype), dim=1, eps=1e-4)
        if self.config.xmoe_temperature is None:
            return reduced @ experts.t()
        reduced = F.normalize(reduced, dim=-1, eps=1e-4)
        return (reduced @ experts.t()) / self.temperature.to(dtype)

    def route(
        self, x: torch.Tensor, input_ids: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's (expert ids [T, k], weights [T, k]) as the project computes them;
        ``input_ids`` [T] for the routers that route by token id."""
        cfg = self.config
        if cfg.router == "hash":
            experts = self.table[input_ids]
            return experts, torch.full(experts.shape, 1.0 / experts.shape[1], device=x.device)
        if cfg.router == "stablemoe":
            dtype = _ROUTER_DTYPES.get(cfg.router_dtype, x.dtype)
            student = (
                self.distill_embedding[input_ids].to(dtype) @ self.distill_centroids.to(dtype).t()
            )
            experts = student.argmax(dim=1, keepdim=True)
            centroids = self.expert_centroids.to(dtype)[experts[:, 0]]
            return experts, torch.sigmoid((x.to(dtype) * centroids).sum(dim=-1, keepdim=True))
        logits = self._router_logits(x)
        if cfg.router == "smoe_dropout":
            top, experts = torch.topk(logits, cfg.smoe_dropout_eval_k, dim=1)
            return experts, torch.softmax(top, dim=-1)
        if cfg.router_pre_softmax and not cfg.reference_router:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
            weights, experts = torch.topk(scores, cfg.router_topk, dim=1)
        else:
            top, experts = torch.topk(logits, cfg.router_topk, dim=1)
            weights = torch.softmax(top, dim=-1, dtype=torch.float32).type_as(logits)
        return experts, weights

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S, H] (and the ids [B, S]) -> [B, S, H]."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        ids = input_ids.reshape(-1)
        if self.config.router != "vqmoe":
            experts, weights = self.route(x, ids)
            y = self.run_experts(x, experts, weights)
            if self.config.router == "stablemoe":
                y = y + ((1 - weights) * x).to(y.dtype)
            return y.view(shape)
        codes = self.assign(x)
        expert_d = (codes % self.config.num_experts).unsqueeze(1)
        ones = torch.ones(expert_d.shape, dtype=torch.float32, device=x.device)
        y_d = self.run_experts(self.expert_input(x, codes), expert_d, ones)
        if self.config.discrete_layernorm:
            y_d = self.discrete_norm_out(y_d)
        if self.config.routing_mode == "discrete":
            return y_d.view(shape)
        dtype = torch.promote_types(x.dtype, torch.float32)
        gate = torch.softmax(
            F.linear(x.to(dtype), self.gate.weight.to(dtype), self.gate.bias.to(dtype)), dim=-1
        )
        experts, weights = self.route(x, ids)
        y_c = self.run_experts(x, experts, gate[:, :1] * weights)
        return (y_c + gate[:, 1:].to(y_d.dtype) * y_d).view(shape)


class VQMoEDecoderLayer(nn.Module):
    """Pre-norm transformer layer: attention, then a dense FFN or a VQMoE block."""

    def __init__(self, config: VQMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = VQMoEAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = VQMoEBlock(config)
        else:
            self.mlp = VQMoEMLP(config.hidden_size, config.intermediate_size, config.activation)

    def forward(
        self,
        hidden: torch.Tensor,
        angles: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        cache: Optional[Cache],
        input_ids: torch.Tensor,
    ) -> torch.Tensor:
        """``input_ids`` [B, S] reach the MoE block (routers that route by token id)."""
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), angles, mask, cache)
        normed = self.post_attention_layernorm(hidden)
        if isinstance(self.mlp, VQMoEBlock):
            return hidden + self.mlp(normed, input_ids)
        return hidden + self.mlp(normed)


class VQMoEPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading glue shared by the VQMoE models."""

    config_class = VQMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["VQMoEDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VQMoEBlock):
            for param in module.parameters(recurse=False):
                if param.dim() > 1:  # codebook, router embeddings and centroids
                    init.normal_(param, mean=0.0, std=0.02)


class VQMoEModel(VQMoEPreTrainedModel):
    """Embeddings and decoder layers; returns the final-norm hidden states [B, S, H]."""

    def __init__(self, config: VQMoEConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(
            VQMoEDecoderLayer(config, index) for index in range(config.num_hidden_layers)
        )
        self.norm = _norm(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
    ) -> torch.Tensor:
        """``input_ids`` [B, S]; ``attention_mask`` [B, past + S] (1 = real token)."""
        batch, seq = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(past, past + seq, device=input_ids.device)
                position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        hidden = self.embed_tokens(input_ids)
        angles = None
        if self.config.position_embedding_type == "learned_absolute":
            hidden = hidden + self.embed_positions(position_ids)
        else:
            angles = rope_angles(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = self._mask(attention_mask, batch, seq, past, input_ids.device)
        for layer in self.layers:
            hidden = layer(hidden, angles, mask, cache, input_ids)
        return self.norm(hidden)

    @staticmethod
    def _mask(
        attention_mask: Optional[torch.Tensor], batch: int, seq: int, past: int, device
    ) -> Optional[torch.Tensor]:
        """Boolean [B, 1, S, past + S] mask, or None when plain causal attention is exact."""
        if past == 0 and (attention_mask is None or bool(attention_mask.all())):
            return None
        total = past + seq
        query = torch.arange(past, total, device=device)[:, None]
        keys = torch.arange(total, device=device)[None, :]
        mask = (keys <= query)[None, None].expand(batch, 1, seq, total)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -total:].bool()
        # A query at a padding position may see nothing; let it see itself (its output is unused).
        return mask | (keys == query)[None, None]


class VQMoEForCausalLM(VQMoEPreTrainedModel, GenerationMixin):
    """VQMoE causal LM: logits [B, S, vocab_size] (padded vocabulary, see module docstring)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: VQMoEConfig) -> None:
        super().__init__(config)
        self.model = VQMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of every position; ``labels`` [B, S] (-100 = ignore) give the mean next-token
        loss (labels are shifted inside, as in every HF causal LM)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
