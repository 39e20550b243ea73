"""A filter on one megatron-core 0.16.1 warning that every VQMoE model would print per layer.

``TransformerLayer.__init__`` (``transformer/transformer_layer.py``) chooses the MLP's keyword
arguments by the exact class of ``submodules.mlp.module`` (``MoELayer``, ``MLP``, ...) and warns
"Unknown MLP type ... Using default kwargs." for anything else, subclasses included. Our MoE
layers (``PortableMoELayer``, ``VQMoELayer``) are ``MoELayer`` subclasses that take the default
kwargs on purpose (they fetch megatron's default process groups themselves), so the warning says
nothing. Upstream: no issue filed; the check is an equality test, not ``issubclass``.
Applied process-wide by :func:`vqmoe_megatron.compat.apply_process_patches`.
"""

from __future__ import annotations

import logging

LOGGER = "megatron.core.transformer.transformer_layer"
MESSAGE = "Unknown MLP type"


class UnknownMlpTypeFilter(logging.Filter):
    """Drops megatron's "Unknown MLP type" warning; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return MESSAGE not in record.getMessage()


def filter_unknown_mlp_type_warning() -> None:
    """Attach :class:`UnknownMlpTypeFilter` to megatron's transformer-layer logger (once)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, UnknownMlpTypeFilter) for f in logger.filters):
        logger.addFilter(UnknownMlpTypeFilter())
