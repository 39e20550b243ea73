"""Routed experts as two grouped GEMMs, checkpoint-compatible with megatron's ``SequentialMLP``.

``GroupedGemmExperts`` drops into megatron's ``MoESubmodules.experts`` slot (same constructor and
``forward(hidden, tokens_per_expert, probs)`` as ``SequentialMLP``) and computes every local
expert's MLP with one :func:`grouped_gemm.grouped_linear` call per projection instead of a
Python loop of two matmuls per expert, on CPU and CUDA. It needs no Transformer Engine and no
``grouped_gemm`` package (what megatron's ``TEGroupedMLP`` / ``GroupedMLP`` need).

Weights are one parameter per projection, in ``F.linear`` layout per expert:
``fc1_weight`` [L, F1 / tp, H] (F1 = 2F for SwiGLU, [gate; up] per TP rank as in megatron's
MLP) and ``fc2_weight`` [L, H, F / tp], for L local experts. ``sharded_state_dict`` writes them
under SequentialMLP's sharded keys and global shapes (``...experts.experts.linear_fc{1,2}.weight``,
[E, F1, H] / [E, H, F], expert axis first), so a distributed checkpoint does not know which of the
two backends wrote it; :mod:`vqmoe_megatron.parallel_tensors` names them per global expert like
SequentialMLP's parameters for consolidated and HF exports.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from vqmoe_megatron.moe.grouped_gemm import expert_offsets, grouped_linear


class GroupedGemmExperts(MegatronModule):
    """All local experts' MLPs in two ``torch._grouped_mm`` calls (see module doc).

    Inputs are megatron's expert inputs: ``permuted_local_hidden_states`` [R, H] sorted by local
    expert, ``tokens_per_expert`` [L] row counts (summing to R), ``permuted_probs`` [R] scaling
    each row's expert output (as megatron's expert MLP does). Returns ([R, H], None).
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        submodules: object = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        unsupported = {
            "add_bias_linear": config.add_bias_linear,
            "moe_apply_probs_on_input": config.moe_apply_probs_on_input,
            "fp8": bool(config.fp8),
            "fp4": bool(config.fp4),
            "activation_func_clamp_value": config.activation_func_clamp_value is not None,
            "moe_latent_size": config.moe_latent_size is not None,
        }
        refused = [name for name, on in unsupported.items() if on]
        if refused:
            raise ValueError(
                f"the grouped expert backend does not support {', '.join(refused)}; use "
                "moe.expert_backend=sequential"
            )
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        ffn = divide(config.moe_ffn_hidden_size, self.tp_group.size())
        glu = config.gated_linear_unit
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        shape1 = (num_local_experts, 2 * ffn if glu else ffn, config.hidden_size)
        shape2 = (num_local_experts, config.hidden_size, ffn)
        self.fc1_weight = torch.nn.Parameter(
            torch.empty(shape1, dtype=config.params_dtype, device=device)
        )
        self.fc2_weight = torch.nn.Parameter(
            torch.empty(shape2, dtype=config.params_dtype, device=device)
        )
        # megatron's TP attributes on the [L, out, in] stack: fc1 column-parallel (stride 2 under
        # GLU: [gate; up] per rank), fc2 row-parallel; not all-reduced over DP when EP > 1.
        set_tensor_model_parallel_attributes(self.fc1_weight, True, 1, 2 if glu else 1)
        set_tensor_model_parallel_attributes(self.fc2_weight, True, 2, 1)
        for weight in (self.fc1_weight, self.fc2_weight):
            weight.allreduce = not config.expert_model_parallel_size > 1

    def expert_weights(self, local_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (fc1 [F1 / tp, H], fc2 [H, F / tp]) of local expert ``local_idx``'s weights."""
        return self.fc1_weight[local_idx], self.fc2_weight[local_idx]

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        """megatron MLP's (unfused) activation: ``act(gate) * (up + offset)`` under GLU."""
        if self.config.gated_linear_unit:
            gate, up = torch.chunk(h, 2, dim=-1)
            return self.config.activation_func(gate) * (up + self.config.glu_linear_offset)
        return self.config.activation_func(h)

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, None]:
        x = permuted_local_hidden_states
        counts = torch.as_tensor(tokens_per_expert)
        rows = int(counts.sum()) if counts.device.type == "cpu" else None
        offsets = expert_offsets(counts, x.device)
        h = self._activation(grouped_linear(x, self.fc1_weight, offsets, rows))
        probs = permuted_probs.unsqueeze(-1)
        # fc2 is linear without bias: scaling its input or its output rows is the same function;
        # scale the narrower of [R, F / tp] and [R, H] (megatron always scales the former).
        if h.shape[-1] <= x.shape[-1]:
            return grouped_linear((h * probs).to(h.dtype), self.fc2_weight, offsets, rows), None
        out = grouped_linear(h, self.fc2_weight, offsets, rows)
        return (out * probs).to(out.dtype), None

    def backward_dw(self) -> None:
        """Nothing deferred: weight gradients are computed in the backward pass."""

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> dict:
        """The two stacks under SequentialMLP's sharded keys: expert axis, then TP slices."""
        if (metadata or {}).get("singleton_local_shards", False):
            raise NotImplementedError("singleton_local_shards is not supported by grouped experts")
        axis = len(sharded_offsets)
        experts = (axis, self.ep_group.rank(), self.ep_group.size())
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        replica_id = (0, 0, self.dp_group.rank())
        key = f"{prefix}experts."

        def sharded(name: str, data: torch.Tensor, *tp_offset: tuple) -> ShardedTensor:
            return ShardedTensor.from_rank_offsets(
                name,
                data,
                *sharded_offsets,
                experts,
                *tp_offset,
                replica_id=replica_id,
                prepend_axis_num=axis,
            )

        fc2 = sharded(f"{key}linear_fc2.weight", self.fc2_weight, (axis + 2, tp_rank, tp_size))
        if not self.config.gated_linear_unit:
            fc1 = sharded(f"{key}linear_fc1.weight", self.fc1_weight, (axis + 1, tp_rank, tp_size))
        else:
            # SequentialMLP's SwiGLU layout: each rank's [gate; up] halves land in the gate
            # and up halves of the global [E, 2F, H] tensor. ``name`` is the factory's key as
            # megatron has re-prefixed it by then (e.g. per-layer -> stacked layers).
            @torch.no_grad()
            def build(name, data, replica, flattened_range):
                gate, up = torch.chunk(data, 2, dim=1)
                return [
                    sharded(name, gate, (axis + 1, tp_rank, 2 * tp_size)),
                    sharded(name, up, (axis + 1, tp_rank + tp_size, 2 * tp_size)),
                ]

            def merge(parts):
                return torch.cat(parts, dim=1)

            fc1 = ShardedTensorFactory(
                f"{key}linear_fc1.weight", self.fc1_weight, build, merge, replica_id
            )
        state = {f"{prefix}fc1_weight": fc1, f"{prefix}fc2_weight": fc2}
        # SequentialMLP's linears also store an (empty) extra state per expert; writing the same
        # objects keeps a checkpoint of this backend loadable by SequentialMLP.
        first = self.ep_group.rank() * self.num_local_experts
        num_experts = self.ep_group.size() * self.num_local_experts
        for i in range(self.num_local_experts):
            for fc in ("linear_fc1", "linear_fc2"):
                state[f"{prefix}local_experts.{i}.{fc}._extra_state"] = ShardedObject(
                    f"{key}{fc}._extra_state",
                    None,
                    (*(size for _, _, size in sharded_offsets), num_experts),
                    (*(offset for _, offset, _ in sharded_offsets), first + i),
                    replica_id=(0, tp_rank, self.dp_group.rank()),
                )
        return state

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Accept (and drop) the SequentialMLP extra states a checkpoint carries."""
        for key in [k for k in state_dict if k.startswith(f"{prefix}local_experts.")]:
            if key.endswith("._extra_state"):
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
