"""The best model of a fine-tuning run by dev score, kept as a consolidated directory.

``<output_dir>/best/`` holds ``model.safetensors`` (GPT and head, full fp32 tensors under
layout-free names), ``config.yaml`` (the fine-tuning config), ``tokenizer.model`` and, written
last, ``best.json`` (step, epoch, dev metrics, score). It loads at any parallel layout. A new best
replaces the weights file atomically; ``best.json`` follows, so a run killed in between keeps a
model at least as good as the one ``best.json`` describes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from vqmoe_megatron.checkpoint.consolidated import (
    WEIGHTS,
    load_full_tensors,
    read_tensors,
    write_consolidated,
)
from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.data.files import write_json_atomic

RECORD = "best.json"


class BestModel:
    """Tracks and stores the best-scoring model of a run (higher score is better)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.record: Optional[dict] = None
        path = self.directory / RECORD
        if path.is_file():
            try:
                self.record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise CheckpointError(
                    f"{path} is damaged ({exc}); remove {self.directory} to start afresh"
                ) from exc

    @property
    def score(self) -> Optional[float]:
        return None if self.record is None else float(self.record["score"])

    def offer(
        self,
        model: torch.nn.Module,
        cfg: Any,
        tokenizer_model: Path,
        record: dict,
    ) -> bool:
        """Keep ``model`` if ``record["score"]`` beats the best so far (collective); returns
        whether it did."""
        if self.score is not None and not record["score"] > self.score:
            return False
        write_consolidated(model, cfg, self.directory, tokenizer_model)
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_json_atomic(self.directory / RECORD, record)
        if dist.is_initialized():
            dist.barrier()
        self.record = record
        return True

    def load_into(self, model: torch.nn.Module) -> None:
        """Load the best weights into ``model`` (at its layout)."""
        load_full_tensors(model, read_tensors(self.directory), self.directory / WEIGHTS)
