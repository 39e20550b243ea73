"""Export to a Hugging Face directory (``AutoModelForCausalLM`` with ``trust_remote_code``).

The directory holds ``config.json`` (:class:`~vqmoe_megatron.hf.configuration_vqmoe.VQMoEConfig`
with ``auto_map``), ``model.safetensors`` (fp32), the modelling and tokenizer code of
``vqmoe_megatron/hf/`` (pure PyTorch + sentencepiece), ``tokenizer.model`` with its
``tokenizer_config.json``, and ``generation_config.json`` (EOS stops generation; the padding
rows of the vocabulary and ``<pad>`` are suppressed).

Weight names: :mod:`vqmoe_megatron.checkpoint.hf_export` (which also reads an export back).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.checkpoint.hf_export import hf_state_dict
from vqmoe_megatron.config import PretrainConfig
from vqmoe_megatron.data import Tokenizer
from vqmoe_megatron.model import padded_vocab_size


def check_exportable(cfg: PretrainConfig) -> None:
    """Refuse models the HF code does not implement, naming the setting."""
    if cfg.moe.num_experts > 0 and cfg.moe.capacity_factor is not None:
        raise CheckpointError(
            f"moe.capacity_factor={cfg.moe.capacity_factor}: token dropping depends on the batch, "
            "the HF export implements dropless models only"
        )


def hf_config(cfg: PretrainConfig, tokenizer: Tokenizer):
    """The VQMoEConfig of a run (in its ``moe.routing_mode``)."""
    from vqmoe_megatron.hf.configuration_vqmoe import VQMoEConfig

    model, moe = cfg.model, cfg.moe
    return VQMoEConfig(
        vocab_size=padded_vocab_size(model.vocab_size, 1),
        tokenizer_vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups or model.num_attention_heads,
        head_dim=model.hidden_size // model.num_attention_heads,
        intermediate_size=model.ffn_hidden_size,
        normalization=model.normalization,
        norm_eps=1e-5,
        activation=model.activation,
        position_embedding_type=model.position_embedding_type,
        rope_theta=float(model.rotary_base),
        max_position_embeddings=model.seq_length,
        num_experts=moe.num_experts,
        expert_intermediate_size=moe.expert_ffn_hidden_size,
        moe_layer_freq=moe.layer_freq,
        num_codes=moe.codebook_size,
        router=moe.router,
        routing_mode=moe.routing_mode,
        router_topk=moe.topk,
        router_pre_softmax=moe.pre_softmax,
        reference_router=moe.reference_router,
        router_dtype=moe.router_dtype,
        distance=moe.distance,
        expert_input=moe.expert_input,
        contrib_rate=moe.contrib_rate,
        discrete_layernorm=moe.discrete_layernorm,
        xmoe_dim=moe.xmoe_dim,
        xmoe_temperature=moe.xmoe_temperature,
        smoe_dropout_eval_k=moe.smoe_dropout_eval_k,
        stablemoe_distill_dim=moe.stablemoe_distill_dim,
        codebook_update=moe.codebook_update,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        bos_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        dtype="float32",
    )


def write_hf(
    tensors: dict[str, torch.Tensor],
    cfg: PretrainConfig,
    tokenizer: Tokenizer,
    out_dir: Path,
) -> None:
    """Write the HF directory ``out_dir`` (model, config, code, tokenizer, generation config).

    ``tensors`` are a model built in ``cfg.moe.routing_mode`` (a discrete one has no router or
    gate); ``cfg`` must pass :func:`check_exportable`.
    """
    from transformers import GenerationConfig

    from vqmoe_megatron.hf.configuration_vqmoe import VQMoEConfig
    from vqmoe_megatron.hf.modeling_vqmoe import VQMoEForCausalLM
    from vqmoe_megatron.hf.tokenization_vqmoe import VQMoETokenizer

    config = hf_config(cfg, tokenizer)
    VQMoEConfig.register_for_auto_class()
    VQMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    VQMoETokenizer.register_for_auto_class("AutoTokenizer")
    with torch.device("meta"):
        model = VQMoEForCausalLM(config)
    state = hf_state_dict(tensors, cfg)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        suppress_tokens=[tokenizer.pad_id, *range(tokenizer.vocab_size, config.vocab_size)],
    )
    model.save_pretrained(out_dir)
    VQMoETokenizer(str(tokenizer.path)).save_pretrained(out_dir)


def load_hf(path: Path) -> torch.nn.Module:
    """The exported model, loaded as a user would (offline, fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, dtype=torch.float32, local_files_only=True
    )
    return model.eval()
