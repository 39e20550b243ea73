"""Export to a Hugging Face directory (``AutoModelForCausalLM`` with ``trust_remote_code``).

The directory holds ``config.json`` (:class:`~vqmoe_megatron.hf.configuration_vqmoe.VQMoEConfig`
with ``auto_map``), ``model.safetensors`` (fp32), the modelling and tokenizer code of
``vqmoe_megatron/hf/`` (pure PyTorch + sentencepiece), ``tokenizer.model`` with its
``tokenizer_config.json``, and ``generation_config.json`` (EOS stops generation; the padding
rows of the vocabulary and ``<pad>`` are suppressed).

Weight names: megatron's fused QKV weight ``[groups * (q_per_group + 2) * d, H]`` holds, for each
query group, its query heads, then its key head, then its value head; it is split into
``q_proj`` / ``k_proj`` / ``v_proj``. SwiGLU's ``linear_fc1`` is ``[gate; up]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.config import PretrainConfig
from vqmoe_megatron.data import Tokenizer
from vqmoe_megatron.model import padded_vocab_size

IGNORED_BUFFERS = re.compile(r"\.quantizer\.(window_counts|needs_data_init|ema_count|ema_sum)$")
"""Training-only statistics of the codebook, not part of the function the model computes."""


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
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        bos_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        dtype="float32",
    )


def _split_qkv(weight: torch.Tensor, cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    model = cfg.model
    groups = model.num_query_groups or model.num_attention_heads
    head_dim = model.hidden_size // model.num_attention_heads
    per_group = model.num_attention_heads // groups
    grouped = weight.view(groups, (per_group + 2) * head_dim, -1)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return {
        "q_proj.weight": q.reshape(-1, weight.shape[-1]),
        "k_proj.weight": k.reshape(-1, weight.shape[-1]),
        "v_proj.weight": v.reshape(-1, weight.shape[-1]),
    }


def _fc1(weight: torch.Tensor, cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    if cfg.model.activation != "swiglu":
        return {"up_proj.weight": weight}
    gate, up = weight.chunk(2, dim=0)
    return {"gate_proj.weight": gate, "up_proj.weight": up}


_L = r"decoder\.layers\.(?P<layer>\d+)\."
_E = _L + r"mlp\.experts\.local_experts\.(?P<e>\d+)\."
_WB = r"(?P<p>weight|bias)$"
_RENAMES = {
    r"embedding\.word_embeddings\.weight$": "model.embed_tokens.weight",
    r"embedding\.position_embeddings\.weight$": "model.embed_positions.weight",
    r"decoder\.final_layernorm\." + _WB: "model.norm.{p}",
    r"output_layer\.weight$": "lm_head.weight",
    _L + r"input_layernorm\." + _WB: "model.layers.{layer}.input_layernorm.{p}",
    _L + r"pre_mlp_layernorm\." + _WB: "model.layers.{layer}.post_attention_layernorm.{p}",
    _L + r"self_attention\.linear_proj\.weight$": "model.layers.{layer}.self_attn.o_proj.weight",
    _L + r"mlp\.linear_fc2\.weight$": "model.layers.{layer}.mlp.down_proj.weight",
    _E + r"linear_fc2\.weight$": "model.layers.{layer}.mlp.experts.{e}.down_proj.weight",
    _L + r"mlp\.router\.quantizer\.codebook$": "model.layers.{layer}.mlp.codebook",
    _L + r"mlp\.router\.continuous\.weight$": "model.layers.{layer}.mlp.router.weight",
    _L + r"mlp\.router\.weight$": "model.layers.{layer}.mlp.router.weight",
    _L + r"mlp\.router\.(?P<n>projection|expert_embeddings|temperature|table|expert_centroids|"
    r"distill_embedding|distill_centroids)$": "model.layers.{layer}.mlp.{n}",
    _L + r"mlp\.router\.gate\.linear\." + _WB: "model.layers.{layer}.mlp.gate.{p}",
    _L
    + r"mlp\.router\.(?P<n>discrete_norm_(?:in|out))\."
    + _WB: "model.layers.{layer}.mlp.{n}.{p}",
}
"""One project tensor -> one HF tensor (``{field}``: named groups of the pattern)."""
_SPLITS: dict[str, tuple[str, Callable[[torch.Tensor, PretrainConfig], dict]]] = {
    _L + r"self_attention\.linear_qkv\.weight$": ("model.layers.{layer}.self_attn.", _split_qkv),
    _L + r"mlp\.linear_fc1\.weight$": ("model.layers.{layer}.mlp.", _fc1),
    _E + r"linear_fc1\.weight$": ("model.layers.{layer}.mlp.experts.{e}.", _fc1),
}
"""One project tensor -> several HF tensors under a prefix."""
_RULES = [(re.compile(pattern), target, None) for pattern, target in _RENAMES.items()] + [
    (re.compile(pattern), prefix, split) for pattern, (prefix, split) in _SPLITS.items()
]


def hf_state_dict(tensors: dict[str, torch.Tensor], cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """HF names -> fp32 tensors from the project's full global tensors (see the module doc).

    An unknown tensor is an error (the mapping must account for every weight of the model).
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if IGNORED_BUFFERS.search(key):
            continue
        for pattern, prefix, convert in _RULES:
            match = pattern.search(key)
            if match is None:
                continue
            target = prefix.format(**match.groupdict())
            pieces = {"": tensor} if convert is None else convert(tensor, cfg)
            for name, value in pieces.items():
                value = value.float() if value.is_floating_point() else value  # hash tables
                out[target + name] = value.contiguous().clone()
            break
        else:
            raise CheckpointError(f"no HF name for tensor {key!r}: the export does not know it")
    return out


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
