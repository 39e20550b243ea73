"""Hugging Face exports (``vqmoe-convert hf``): the tensor-name mapping, in both directions, and
reading an export back as the project's run config and full tensors.

Weight names: megatron's fused QKV weight ``[groups * (q_per_group + 2) * d, H]`` holds, for each
query group, its query heads, then its key head, then its value head; it is split into
``q_proj`` / ``k_proj`` / ``v_proj``. SwiGLU's ``linear_fc1`` is ``[gate; up]``. Every rule of
:data:`RULES` is a pair of name templates, so the export (:func:`hf_state_dict`) and the way
back (:func:`project_tensors`) are derived from one table.

``config.json`` records the structure (:data:`CONFIG_FIELDS`); reading it back gives a
``PretrainConfig`` whose other settings are the defaults. The codebook's training statistics
(:data:`IGNORED_BUFFERS`) are not exported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.config import ConfigError, PretrainConfig, from_dict

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
IGNORED_BUFFERS = re.compile(r"\.quantizer\.(window_counts|needs_data_init|ema_count|ema_sum)$")
"""Training-only statistics of the codebook, not part of the function the model computes."""


def _qkv_pieces(cfg: PretrainConfig) -> tuple[int, int, int]:
    model = cfg.model
    groups = model.num_query_groups or model.num_attention_heads
    head_dim = model.hidden_size // model.num_attention_heads
    return groups, model.num_attention_heads // groups, head_dim


def _split_qkv(weight: torch.Tensor, cfg: PretrainConfig) -> list[torch.Tensor]:
    groups, per_group, head_dim = _qkv_pieces(cfg)
    grouped = weight.view(groups, (per_group + 2) * head_dim, -1)
    pieces = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return [piece.reshape(-1, weight.shape[-1]) for piece in pieces]


def _join_qkv(pieces: list[torch.Tensor], cfg: PretrainConfig) -> torch.Tensor:
    groups, _, _ = _qkv_pieces(cfg)
    hidden = pieces[0].shape[-1]
    grouped = [piece.reshape(groups, -1, hidden) for piece in pieces]
    return torch.cat(grouped, dim=1).reshape(-1, hidden)


def _fc1_names(cfg: PretrainConfig) -> tuple[str, ...]:
    return ("gate_proj", "up_proj") if cfg.model.activation == "swiglu" else ("up_proj",)


def _split_fc1(weight: torch.Tensor, cfg: PretrainConfig) -> list[torch.Tensor]:
    return list(weight.chunk(len(_fc1_names(cfg)), dim=0))


def _join_fc1(pieces: list[torch.Tensor], cfg: PretrainConfig) -> torch.Tensor:
    return torch.cat(pieces, dim=0)


@dataclass(frozen=True)
class Split:
    """One project tensor <-> several HF tensors ``<prefix><name>.weight``."""

    every: tuple[str, ...]
    """Every piece name any config may have."""
    names: Callable[[PretrainConfig], tuple[str, ...]]
    split: Callable[[torch.Tensor, PretrainConfig], list[torch.Tensor]]
    join: Callable[[list[torch.Tensor], PretrainConfig], torch.Tensor]


_QKV = Split(("q_proj", "k_proj", "v_proj"), lambda cfg: _QKV.every, _split_qkv, _join_qkv)
_FC1 = Split(("gate_proj", "up_proj"), _fc1_names, _split_fc1, _join_fc1)

FIELDS = {
    "layer": r"\d+",
    "e": r"\d+",
    "p": r"weight|bias",
    "n": r"projection|expert_embeddings|temperature|table|expert_centroids|distill_embedding"
    r"|distill_centroids",
    "norm": r"discrete_norm_in|discrete_norm_out",
}
"""What each ``{field}`` of a name template matches."""

_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."
_E = _L + "mlp.experts.local_experts.{e}."
_HE = _H + "mlp.experts.{e}."


def _vq(cfg: PretrainConfig) -> bool:
    return cfg.moe.router == "vqmoe"


RULES: list[tuple[str, str, Optional[Split], Optional[Callable[[PretrainConfig], bool]]]] = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", None, None),
    ("embedding.position_embeddings.weight", "model.embed_positions.weight", None, None),
    ("decoder.final_layernorm.{p}", "model.norm.{p}", None, None),
    ("output_layer.weight", "lm_head.weight", None, None),
    (_L + "input_layernorm.{p}", _H + "input_layernorm.{p}", None, None),
    (_L + "pre_mlp_layernorm.{p}", _H + "post_attention_layernorm.{p}", None, None),
    (_L + "self_attention.linear_proj.weight", _H + "self_attn.o_proj.weight", None, None),
    (_L + "self_attention.linear_qkv.weight", _H + "self_attn.", _QKV, None),
    (_L + "mlp.linear_fc1.weight", _H + "mlp.", _FC1, None),
    (_L + "mlp.linear_fc2.weight", _H + "mlp.down_proj.weight", None, None),
    (_E + "linear_fc1.weight", _HE, _FC1, None),
    (_E + "linear_fc2.weight", _HE + "down_proj.weight", None, None),
    (_L + "mlp.router.quantizer.codebook", _H + "mlp.codebook", None, None),
    (_L + "mlp.router.continuous.weight", _H + "mlp.router.weight", None, _vq),
    (_L + "mlp.router.weight", _H + "mlp.router.weight", None, lambda cfg: not _vq(cfg)),
    (_L + "mlp.router.{n}", _H + "mlp.{n}", None, None),
    (_L + "mlp.router.gate.linear.{p}", _H + "mlp.gate.{p}", None, None),
    (_L + "mlp.router.{norm}.{p}", _H + "mlp.{norm}.{p}", None, None),
]
"""(project name, HF name or, for a :class:`Split`, HF prefix, split, applies-to); a rule with
an ``applies-to`` predicate holds only for the configs it accepts (two routers' weights share
one HF name)."""


def _pattern(template: str, split: Optional[Split] = None) -> re.Pattern:
    """``{field}`` -> its :data:`FIELDS` group, the rest literal; with ``split`` the template
    is a prefix, followed by one of its pieces (group ``rest``)."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        f"(?P<{part}>{FIELDS[part]})" if i % 2 else re.escape(part) for i, part in enumerate(parts)
    )
    if split is not None:
        regex += f"(?P<rest>{'|'.join(split.every)})" + re.escape(".weight")
    return re.compile(regex)


_FORWARD = [(_pattern(src), dst, split, when) for src, dst, split, when in RULES]
_BACKWARD = [(_pattern(dst, split), src, split, when) for src, dst, split, when in RULES]


def hf_state_dict(tensors: dict[str, torch.Tensor], cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """HF names -> fp32 tensors from the project's full global tensors (see the module doc).

    An unknown tensor is an error (the mapping must account for every weight of the model).
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if IGNORED_BUFFERS.search(key):
            continue
        for pattern, target, split, when in _FORWARD:
            match = pattern.fullmatch(key)
            if match is None or (when is not None and not when(cfg)):
                continue
            target = target.format(**match.groupdict())
            pieces = (
                {"": tensor}
                if split is None
                else {
                    f"{name}.weight": piece
                    for name, piece in zip(split.names(cfg), split.split(tensor, cfg))
                }
            )
            for name, value in pieces.items():
                value = value.float() if value.is_floating_point() else value  # hash tables
                out[target + name] = value.contiguous().clone()
            break
        else:
            raise CheckpointError(f"no HF name for tensor {key!r}: the export does not know it")
    return out


def project_tensors(
    hf: dict[str, torch.Tensor], cfg: PretrainConfig, source: Path
) -> dict[str, torch.Tensor]:
    """The project's full global tensors from an export's (the inverse of :func:`hf_state_dict`
    for ``cfg``); an unknown or missing tensor is an error naming ``source``."""
    if not cfg.model.untie_embeddings_and_output_weights:
        hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    out: dict[str, torch.Tensor] = {}
    joined: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    splits: dict[tuple[str, str], Split] = {}
    for key, tensor in hf.items():
        for pattern, target, split, when in _BACKWARD:
            match = pattern.fullmatch(key)
            if match is None or (when is not None and not when(cfg)):
                continue
            fields = {k: v for k, v in match.groupdict().items() if k != "rest"}
            name = target.format(**fields)
            if split is None:
                out[name] = tensor
            else:
                prefix = key[: match.start("rest")]
                joined.setdefault((name, prefix), {})[match["rest"]] = tensor
                splits[(name, prefix)] = split
            break
        else:
            raise CheckpointError(
                f"{source} holds tensor {key!r} that no project weight exports to"
            )
    for (name, prefix), pieces in joined.items():
        names = splits[(name, prefix)].names(cfg)
        missing = [prefix + n + ".weight" for n in names if n not in pieces]
        if missing or len(pieces) != len(names):
            raise CheckpointError(
                f"{source} has {sorted(prefix + n for n in pieces)} but the config asks for "
                f"{[prefix + n for n in names]}"
            )
        try:
            out[name] = splits[(name, prefix)].join([pieces[n] for n in names], cfg)
        except RuntimeError as exc:
            shapes = {prefix + n: tuple(pieces[n].shape) for n in names}
            raise CheckpointError(
                f"{source} does not fit its config.json: {shapes} do not join into {name} ({exc})"
            ) from exc
    return out


CONFIG_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "model.num_layers": ("num_hidden_layers", int),
    "model.hidden_size": ("hidden_size", int),
    "model.num_attention_heads": ("num_attention_heads", int),
    "model.num_query_groups": ("num_key_value_heads", int),
    "model.ffn_hidden_size": ("intermediate_size", int),
    "model.vocab_size": ("tokenizer_vocab_size", int),
    "model.seq_length": ("max_position_embeddings", int),
    "model.normalization": ("normalization", str),
    "model.activation": ("activation", str),
    "model.position_embedding_type": ("position_embedding_type", str),
    "model.rotary_base": ("rope_theta", lambda v: int(round(v))),
    "model.untie_embeddings_and_output_weights": ("tie_word_embeddings", lambda v: not v),
    "moe.num_experts": ("num_experts", int),
    "moe.expert_ffn_hidden_size": ("expert_intermediate_size", int),
    "moe.layer_freq": ("moe_layer_freq", int),
    "moe.num_codes": ("num_codes", int),
    "moe.router": ("router", str),
    "moe.routing_mode": ("routing_mode", str),
    "moe.topk": ("router_topk", int),
    "moe.pre_softmax": ("router_pre_softmax", bool),
    "moe.reference_router": ("reference_router", bool),
    "moe.router_dtype": ("router_dtype", str),
    "moe.distance": ("distance", str),
    "moe.expert_input": ("expert_input", str),
    "moe.contrib_rate": ("contrib_rate", float),
    "moe.discrete_layernorm": ("discrete_layernorm", bool),
    "moe.xmoe_dim": ("xmoe_dim", int),
    "moe.xmoe_temperature": ("xmoe_temperature", lambda v: v if v is None else float(v)),
    "moe.smoe_dropout_eval_k": ("smoe_dropout_eval_k", lambda v: v if v is None else int(v)),
    "moe.stablemoe_distill_dim": ("stablemoe_distill_dim", int),
    "moe.codebook_update": ("codebook_update", str),
}
"""Run-config setting -> (``config.json`` key, its conversion). Every one is written by the
exporter (``vqmoe_megatron.convert.hf.hf_config``); an export lacking one is refused naming it."""


def read_hf_config(path: Path) -> PretrainConfig:
    """The backbone config an export's ``config.json`` records (other settings: defaults)."""
    file = path / HF_CONFIG
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: export the checkpoint again") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is damaged ({exc}): export the checkpoint again") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} is damaged (not a JSON object): export it again")
    missing = [key for key, _ in CONFIG_FIELDS.values() if key not in raw]
    if missing:
        raise CheckpointError(
            f"{file} lacks {', '.join(missing)}: it was written by an older exporter; export "
            "the checkpoint again"
        )
    tree: dict[str, dict] = {"model": {}, "moe": {}}
    try:
        for setting, (key, convert) in CONFIG_FIELDS.items():
            section, name = setting.split(".")
            tree[section][name] = convert(raw[key])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file} is damaged ({exc}): export the checkpoint again") from exc
    model, moe = tree["model"], tree["moe"]
    if model["num_query_groups"] == model["num_attention_heads"]:
        model["num_query_groups"] = None
    if moe["num_codes"] == moe["num_experts"]:
        moe["num_codes"] = None
    try:
        return from_dict(PretrainConfig, tree, str(file))
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{file} is not a VQMoE export: {exc}") from exc


def read_hf_tensors(path: Path, cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """The project's full tensors of the export at ``path`` (``cfg`` from its config)."""
    file = path / HF_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: export the checkpoint again")
    try:
        tensors = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"{file} is damaged or truncated ({exc})") from exc
    return project_tensors(tensors, cfg, file)
