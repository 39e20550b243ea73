"""megatron-core's all-to-all token dispatcher, portable and fit for variable rows per token.

Three changes to ``MoEAlltoAllTokenDispatcher`` (0.16.1), nothing else:

* It runs without CUDA: the base class uses a CUDA side stream in
  ``_maybe_dtoh_and_synchronize`` for its device-to-host copies; on CPU there is nothing to
  copy, so the split sizes are simply turned into host arrays. (The base ``__init__`` creates
  that stream; on CPU ``compat.shims`` fills its class slot with a placeholder first.)
* It knows how many rows a fused VQMoE routing map holds. The base class assumes
  ``tokens * topk`` rows when dropless, which is what its permutation kernels are told
  (``num_out_tokens``); a VQMoE map has ``T * (k + 1)`` rows (stacked streams) or a data-dependent
  count (merged rows), set per dispatch through :attr:`num_routed_rows`.
* It can fold stacked streams on combine (:attr:`fold_streams`): the expert outputs of input
  rows ``r`` and ``r + T`` are scatter-added into the same output row, so the layer gets the sum
  of both routing paths directly instead of a ``[2T, H]`` tensor to add up.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from megatron.core.transformer.moe.moe_utils import unpermute
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

COUNT_ROWS = -1
"""``num_routed_rows`` value meaning: count the routing map (costs one device sync on GPU)."""


def _as_numpy(value: Union[torch.Tensor, np.ndarray, None]) -> Optional[np.ndarray]:
    """Split sizes as the host arrays the base class produces after its D2H copy."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return value


class PortableAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """All-to-all dispatcher usable on CPU/gloo and with VQMoE's fused routing maps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_routed_rows: Optional[int] = None
        """Rows of the next routing map: None (megatron's tokens*topk), an int, or COUNT_ROWS."""
        self.fold_streams = 1
        """Streams stacked on the sequence axis of the next input to sum on combine."""

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        tokens_per_local_expert = super().preprocess(routing_map)
        if self.drop_and_pad or self.num_routed_rows is None:
            return tokens_per_local_expert
        if self.num_routed_rows == COUNT_ROWS:
            self.num_out_tokens = routing_map.sum()
            self._maybe_update_cuda_sync_point("before_permutation_1")
        else:
            self.num_out_tokens = self.num_routed_rows
        return tokens_per_local_expert

    def folds(self) -> bool:
        """Whether the next combine sums the stacked streams (unfused, dropless path only)."""
        return (
            self.fold_streams > 1
            and not self.config.moe_permute_fusion
            and not self.drop_and_pad
            and self.shared_experts is None
        )

    def combine_postprocess(self, permutated_local_input_tokens: torch.Tensor) -> torch.Tensor:
        if not self.folds():
            return super().combine_postprocess(permutated_local_input_tokens)
        rows = self.hidden_shape_before_permute[0] // self.fold_streams
        output = unpermute(
            permutated_local_input_tokens,
            self.reversed_local_input_permutation_mapping % rows,
            restore_shape=torch.Size((rows, self.hidden_shape_before_permute[1])),
            routing_map=self.routing_map,
            fused=False,
        )
        return output.view(self.hidden_shape[0] // self.fold_streams, *self.hidden_shape[1:])

    def _maybe_dtoh_and_synchronize(
        self, point: str, tokens_per_expert: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        if torch.cuda.is_available():
            return super()._maybe_dtoh_and_synchronize(point, tokens_per_expert)
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            self.input_splits = _as_numpy(self.input_splits)
            self.output_splits = _as_numpy(self.output_splits)
            self.output_splits_tp = _as_numpy(self.output_splits_tp)
        return tokens_per_expert
