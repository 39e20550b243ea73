"""Routing fluctuation (StableMoE, Dai et al. 2022): the share of a fixed token set whose top-1
expert differs between two checkpoints, per MoE layer and over all layers.

A token's **top-1 expert** is the expert with the largest total routing weight the layer gives
it, summed over the routing streams, ties to the lowest expert id:

- ``topk``, ``xmoe``, ``smoe_dropout``, ``hash``, ``stablemoe``: the argmax of the router's
  ``probs`` [T, E] (``hash`` weighs its k experts equally: the lowest id of its table row);
- ``vqmoe`` in ``pretrain`` mode: the argmax of the combined routing ``g_c * p_c + g_d *
  onehot(VQ expert)`` (with ``discrete_layernorm``, the discrete stream's weight is its
  post-norm scale ``g_d``);
- ``vqmoe`` in ``discrete`` mode: the nearest code's expert.

:class:`Top1Recorder` collects each layer's top-1 experts [T] (T = S * B, sequence-major, as
megatron's MoE layer sees them) over forward passes, -1 for padding; :func:`count_changes` and
:func:`fluctuation` compare two such records.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Union

import torch
from torch import nn

Assignments = dict[int, torch.Tensor]
"""layer number -> top-1 expert id of every token [N] (long), -1 where the token is padding."""


def count_changes(before: Assignments, after: Assignments) -> dict[int, tuple[int, int]]:
    """Per layer ``(changed, compared)``: tokens whose top-1 expert differs, tokens compared.

    A token padded (-1) in either record is not compared. Both records must hold the same
    layers with the same number of tokens (the same fixed token set).
    """
    if sorted(before) != sorted(after):
        raise ValueError(
            f"the records hold different MoE layers: {sorted(before)} vs {sorted(after)}"
        )
    counts = {}
    for layer in sorted(before):
        a, b = before[layer], after[layer]
        if a.shape != b.shape:
            raise ValueError(
                f"layer {layer}: {tuple(a.shape)} vs {tuple(b.shape)} tokens; fluctuation needs "
                "the same token set in both records"
            )
        compared = (a >= 0) & (b >= 0)
        counts[layer] = (int((compared & (a != b)).sum()), int(compared.sum()))
    return counts


def fluctuation(counts: dict[int, tuple[int, int]]) -> dict[str, Union[float, dict[int, float]]]:
    """``{"layers": {layer: changed / compared}, "overall": share over all layers' tokens,
    "tokens": tokens compared per layer (the first layer's)}``; 0.0 where nothing is compared."""
    changed = sum(c for c, _ in counts.values())
    compared = sum(n for _, n in counts.values())
    return {
        "layers": {layer: c / n if n else 0.0 for layer, (c, n) in counts.items()},
        "overall": changed / compared if compared else 0.0,
        "tokens": next(iter(counts.values()))[1] if counts else 0,
    }


def top1_of(output, num_tokens: int) -> torch.Tensor:
    """The top-1 expert [T] of a router's output: ``(probs, routing_map)`` [T, E] or a VQMoE
    ``RoutingPlan`` (its ``[P * T, E]`` probs summed over the P streams)."""
    if isinstance(output, tuple):
        return output[0].argmax(dim=-1)
    weights = output.probs.float().view(output.num_streams, num_tokens, -1)
    if output.post_norm_scale is not None and output.num_streams == 2:
        scale = output.post_norm_scale.float().reshape(1, num_tokens, 1)
        weights = torch.cat([weights[:1], weights[1:] * scale])
    return weights.sum(dim=0).argmax(dim=-1)


class Top1Recorder:
    """Record the top-1 expert of every token at every MoE layer of ``model`` while active.

    ``with Top1Recorder(model) as rec: model(...)``; then ``rec.assignments()``. Padding (the
    router's ``padding_mask``, or positions given to :meth:`mark_padding`) becomes -1.
    """

    def __init__(self, model: nn.Module) -> None:
        self._routers = [
            module.router
            for module in model.modules()
            if hasattr(module, "router") and hasattr(module.router, "layer_number")
        ]
        self._chunks: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._handles: list = []
        self._padding: Optional[torch.Tensor] = None

    def mark_padding(self, padding: Optional[torch.Tensor]) -> None:
        """Padding [S, B] (True = pad) of the next forward, for models called without a mask."""
        self._padding = padding

    def _hook(self, router: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden = args[0]
        mask = args[1] if len(args) > 1 else kwargs.get("padding_mask")
        top1 = top1_of(output, hidden.shape[0] * hidden.shape[1]).detach().long().cpu()
        for padding in (mask, self._padding):
            if padding is not None:
                top1[padding.reshape(-1).cpu().bool()] = -1
        self._chunks[router.layer_number].append(top1)

    def __enter__(self) -> Top1Recorder:
        self._handles = [
            router.register_forward_hook(self._hook, with_kwargs=True) for router in self._routers
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def assignments(self) -> Assignments:
        """layer -> top-1 experts [N] of all recorded tokens, in forward order."""
        return {layer: torch.cat(chunks) for layer, chunks in sorted(self._chunks.items())}
