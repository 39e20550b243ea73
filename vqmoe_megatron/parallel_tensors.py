"""Local parameter shards <-> full, layout-free tensors with global names.

A megatron model at TP x EP holds, on each rank, slices of the tensor-parallel weights (split
along ``param.partition_dim``, possibly strided) and the experts ``ep_rank * L .. ep_rank * L +
L - 1`` under local names. Checkpoint conversion, resharding and the distributed tests need the
layout-free view: full tensors keyed by *global* names, where local expert ``i`` of EP rank ``r``
is called expert ``r * L + i``. These functions go both ways; gathering is a collective.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

_SEQUENTIAL_EXPERT = re.compile(
    r"^(?P<pre>(?:.*\.)?experts\.local_experts\.)(?P<idx>\d+)(?P<post>\..*)$"
)
_GROUPED_EXPERT = re.compile(
    r"^(?P<pre>(?:.*\.)?experts\.linear_fc[12]\.weight)(?P<idx>\d+)(?P<post>)$"
)

_STACKED_EXPERTS = re.compile(r"^(?P<pre>(?:.*\.)?experts\.)fc(?P<fc>[12])_weight$")
"""``GroupedGemmExperts``' [L, out, in] stacks; named per expert like SequentialMLP's weights."""


def _expert_match(name: str) -> Optional[re.Match]:
    return _SEQUENTIAL_EXPERT.match(name) or _GROUPED_EXPERT.match(name)


def is_expert_param(name: str) -> bool:
    """Whether a parameter name belongs to routed experts (SequentialMLP, TE grouped GEMM or the
    grouped-GEMM stacks).

    By name, because megatron's ``allreduce`` flag on expert weights is only False at EP > 1.
    """
    return _expert_match(name) is not None or _STACKED_EXPERTS.match(name) is not None


def _stacked_names(name: str, num_local_experts: int, ep_rank: int) -> Optional[list[str]]:
    """SequentialMLP-style global names of the experts in stack ``name`` (None: not a stack)."""
    match = _STACKED_EXPERTS.match(name)
    if match is None:
        return None
    first = ep_rank * num_local_experts
    return [
        f"{match['pre']}local_experts.{first + i}.linear_fc{match['fc']}.weight"
        for i in range(num_local_experts)
    ]


def global_tensors(
    name: str, tensor: torch.Tensor, num_local_experts: int, ep_rank: int
) -> dict[str, torch.Tensor]:
    """``{global name: tensor}`` for local parameter ``name``: one entry per expert of a
    grouped-GEMM stack (copies, so a pickled entry does not carry the whole stack)."""
    names = _stacked_names(name, num_local_experts, ep_rank)
    if names is None:
        return {global_name(name, num_local_experts, ep_rank): tensor}
    return {key: tensor[i].clone() for i, key in enumerate(names)}


def _ep_info() -> tuple[int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (
        parallel_state.get_expert_model_parallel_rank(),
        parallel_state.get_expert_model_parallel_world_size(),
    )


def global_name(name: str, num_local_experts: int, ep_rank: int) -> str:
    """Rename local expert ``i`` to its global index ``ep_rank * num_local_experts + i``."""
    match = _expert_match(name)
    if match is None:
        return name
    index = ep_rank * num_local_experts + int(match["idx"])
    return f"{match['pre']}{index}{match['post']}"


def _tp_group(name: str, param: nn.Parameter) -> Optional[dist.ProcessGroup]:
    if not getattr(param, "tensor_model_parallel", False):
        return None
    if is_expert_param(name):
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _gather_tp(tensor: torch.Tensor, name: str, param: nn.Parameter) -> torch.Tensor:
    """Reassemble a TP-sharded tensor (megatron's strided split along ``partition_dim``)."""
    group = _tp_group(name, param)
    if group is None or group.size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(group.size())]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = [part.chunk(stride, dim=dim) for part in parts]
    world = len(parts)
    return torch.cat([chunks[k % world][k // world] for k in range(stride * world)], dim=dim)


def _shard_tp(full: torch.Tensor, name: str, param: nn.Parameter) -> torch.Tensor:
    """This rank's slice of a full tensor (inverse of :func:`_gather_tp`)."""
    group = _tp_group(name, param)
    if group is None or group.size() == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    world, rank = group.size(), group.rank()
    pieces = full.chunk(stride * world, dim=dim)
    return torch.cat(pieces[rank::world], dim=dim)


def _num_local_experts(model: nn.Module) -> int:
    counts = [len(getattr(m, "local_expert_indices", [])) for m in model.modules()]
    counts = [c for c in counts if c]
    return counts[0] if counts else 0


def gather_full_tensors(
    model: nn.Module, tensors: Optional[Mapping[str, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """Full tensors with global names, on every rank (collective over the world).

    ``tensors`` maps the model's local parameter names to tensors shaped like those parameters
    (their gradients, optimizer moments, ...); by default the parameters themselves.
    """
    params = dict(model.named_parameters())
    tensors = {n: p.detach() for n, p in params.items()} if tensors is None else tensors
    ep_rank, ep_size = _ep_info()
    num_local = _num_local_experts(model)
    dense, experts = {}, {}
    for name, tensor in tensors.items():
        full = _gather_tp(tensor, name, params[name]).cpu()
        if is_expert_param(name):
            experts.update(global_tensors(name, full, num_local, ep_rank))
        else:
            dense[name] = full
    if ep_size > 1:
        gathered: list = [None] * ep_size
        dist.all_gather_object(
            gathered, experts, group=parallel_state.get_expert_model_parallel_group()
        )
        experts = {k: v for part in gathered for k, v in part.items()}
    return {**dense, **experts}


def shard_full_tensors(
    model: nn.Module, full: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """This rank's local tensors (keyed by local parameter names) from global full tensors.

    Raises KeyError naming every parameter of the model that ``full`` lacks.
    """
    ep_rank, _ = _ep_info()
    num_local = _num_local_experts(model)
    wanted = {
        name: _stacked_names(name, num_local, ep_rank) or [global_name(name, num_local, ep_rank)]
        for name, _ in model.named_parameters()
    }
    missing = sorted(key for keys in wanted.values() for key in keys if key not in full)
    if missing:
        raise KeyError(f"missing {len(missing)} tensors, e.g. {missing[:5]}")
    params = dict(model.named_parameters())
    local: dict[str, torch.Tensor] = {}
    for name, keys in wanted.items():
        tensor = (
            full[keys[0]]
            if _STACKED_EXPERTS.match(name) is None
            else torch.stack([full[key] for key in keys])
        )
        local[name] = _shard_tp(tensor, name, params[name])
    return local
