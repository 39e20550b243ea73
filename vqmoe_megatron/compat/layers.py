"""Spec swaps and subclasses for megatron-core that work on every device."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(DotProductAttention):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Replaces megatron's DotProductAttention (which takes its score buffer from a CUDA global
    memory buffer). SDPA picks flash / memory-efficient kernels on GPU and a fused CPU kernel
    otherwise. Inputs are megatron's ``[s, b, heads, head_dim]``; the output is ``[s, b, hp]``.
    ``attention_mask`` follows megatron's convention (True = masked out); None means causal.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "SDPACoreAttention supports neither packed sequences nor bias"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, n, h] -> [b, n, s, h]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        sdpa_mask = None
        is_causal = False
        if attention_mask is not None:
            sdpa_mask = ~attention_mask.bool()
        elif mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal):
            is_causal = True
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=sdpa_mask,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
        )
        # [b, n, s, h] -> [s, b, n*h]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(*context.shape[:2], self.hidden_size_per_partition)


class SPTorchNorm:
    """Factory for a torch LayerNorm / RMSNorm usable with sequence parallelism.

    megatron's WrappedTorchNorm refuses ``sequence_parallel``; the only thing SP needs from a norm
    is that its parameters carry ``sequence_parallel=True`` so that their gradients (computed on a
    slice of the sequence) are summed over the tensor-parallel group. Like WrappedTorchNorm this
    returns the plain torch module, so state-dict keys stay ``<name>.weight``.
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        del persist_layer_norm, normalization  # megatron passes these; the config decides
        if zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("SPTorchNorm does not support zero-centered gamma")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class DeviceSafeRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose tables stay on the device of ``inv_freq``.

    megatron-core 0.16.1's ``RotaryEmbedding.get_emb`` (``models/common/embeddings/
    rotary_pos_embedding.py``) moves a CPU ``inv_freq`` to ``torch.cuda.current_device()`` on
    first use, which fails without CUDA; here the buffer is moved with the module
    (``model.to(device)``) like any other buffer. Upstream: NVIDIA/Megatron-LM#6270 (open at the
    time of writing) makes rotary tables follow module migration.
    """

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(
                freqs.shape[0], -1
            )
        return emb[:, None, None, :]


def use_device_safe_rotary_embedding(model: torch.nn.Module) -> None:
    """Re-class ``model.rotary_pos_emb`` (if it is megatron's plain RotaryEmbedding) to
    :class:`DeviceSafeRotaryEmbedding`, in place: ``GPTModel.__init__`` builds the embedding
    itself (no spec slot), so the class swap after construction is the only hook. The state
    (``inv_freq`` and the settings) is unchanged."""
    rope = getattr(model, "rotary_pos_emb", None)
    if type(rope) is RotaryEmbedding:
        rope.__class__ = DeviceSafeRotaryEmbedding
