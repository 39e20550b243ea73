"""What a kind of training run supplies to the one training loop (``training.trainer.Trainer``).

The Trainer owns everything every run does alike: the process groups, the run directory, the
DeepSpeed engine, the step (micro-batches, backward, optimizer step, non-finite handling), the
codebook upkeep, logging, evaluation cadence, checkpoints, resumption and stop requests. A
:class:`Task` supplies only what differs: its config and data, the model it trains, the batches
of a step and their loss, the metrics, what to evaluate and what to do with the result, and what
to write at the end. Language-model pretraining (``training.lm_task.LanguageModelTask``) and GLUE
fine-tuning (``finetune.glue_task.GlueTask``) are the two tasks; a new one needs a Task subclass
and a runner that hands it to ``Trainer``.

Hooks in the order the Trainer calls them (all ranks call every hook; "collective" ones must be
called on every rank):

1. ``__init__`` (the subclass's own): validate the config, read the data; no process groups yet.
2. :meth:`place`: this rank's share of the data; may complete ``cfg`` with derived values.
3. :meth:`describe`, :meth:`build_model`, :meth:`tokenizer`, :meth:`data_fingerprint`.
4. On resume: :meth:`resume`.
5. Per step: :meth:`micro_batches` and :meth:`forward` per micro-batch, then :meth:`advance`;
   at log steps :meth:`train_metrics`; when :meth:`evaluation_due`: :meth:`evaluate`; at saves
   :meth:`loader_state`.
6. After the last step and its checkpoint: :meth:`finish`. Always, last: :meth:`close`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from vqmoe_megatron.checkpoint.training import TrainerState
from vqmoe_megatron.model import VQMoEGPTModel
from vqmoe_megatron.training.run_logger import RunLogger


@dataclass
class TaskModel:
    """The modules of a task's model: ``gpt`` (the VQMoE trunk: codebook upkeep and routing
    metrics go through it), ``module`` (what the DeepSpeed engine wraps and calls: the trunk
    plus the task's head or loss) and ``checkpointed`` (the module whose weights a checkpoint
    holds; ``gpt`` itself, or a module with a ``sharded_state_dict()`` holding it)."""

    gpt: VQMoEGPTModel
    module: torch.nn.Module
    checkpointed: torch.nn.Module


class Task(ABC):
    """One kind of training run, as the Trainer sees it (see the module docstring for the order
    of the hooks)."""

    cfg: Any
    """The run config (``PretrainConfig``, ``FinetuneConfig``, ...): the Trainer reads its
    ``model``, ``moe``, ``parallel`` and ``train`` sections and saves it with each checkpoint."""
    micro_batch_size: int
    """Samples per micro-batch and data-parallel rank."""
    micro_batch_setting: str = "data.micro_batch_size"
    """The setting behind ``micro_batch_size`` (named in errors)."""
    headline: tuple[str, ...] = ("loss", "lr")
    """Train metrics shown on the progress line, in order (those present)."""
    nonfinite_remedy: str = "lower train.lr"
    """What to change when the loss keeps going non-finite (ends the abort message)."""
    done_message: str = "training complete"
    """The last log line of a finished run."""

    @abstractmethod
    def place(self, rank: int, dp_rank: int, dp_size: int) -> None:
        """Take this process's share of the data (global ``rank``, data-parallel ``dp_rank`` of
        ``dp_size``). Settings derived from the data or the layout are filled into ``cfg`` here,
        before the Trainer writes ``config.yaml``."""

    def describe(self) -> Optional[str]:
        """A line about the data for the log, once the run logger is open (None: none)."""
        return None

    @abstractmethod
    def build_model(self, fresh: bool, log: RunLogger) -> TaskModel:
        """Build the model (megatron's RNG is seeded). ``fresh``: no checkpoint will be loaded,
        so initialise what the task initialises (pretrained weights, k-means codebooks)."""

    @abstractmethod
    def tokenizer(self) -> dict:
        """The tokenizer the model reads (``checkpoint.tokenizer_record``)."""

    @abstractmethod
    def data_fingerprint(self) -> str:
        """An identifier of the training data (recorded in checkpoints)."""

    def tokenizer_remedy(self, recorded: dict) -> str:
        """What to do when a checkpoint recorded tokenizer ``recorded`` and this run reads
        another (ends the refusal message)."""
        return f"Use {recorded.get('model')}"

    @abstractmethod
    def resume(
        self, path: Path, state: TrainerState, loader_state: Optional[dict], log: RunLogger
    ) -> None:
        """Continue the data where checkpoint ``path`` left it: ``state`` as loaded (the Trainer
        already checked the model and the tokenizer), ``loader_state`` this rank's saved
        :meth:`loader_state` (None when the data-parallel layout changed)."""

    @abstractmethod
    def micro_batches(self, step: int) -> Iterable[Any]:
        """The micro-batches of optimizer step ``step`` on this rank (as many as
        ``train.gradient_accumulation_steps``)."""

    @abstractmethod
    def forward(self, engine: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``engine`` on one micro-batch: (the loss to back-propagate, this micro-batch's
        sums for the metrics as a float64 vector on the engine's device). ``sums[0]`` must be
        the loss sum: a non-finite one marks the step as non-finite."""

    @abstractmethod
    def advance(self, state: TrainerState) -> None:
        """Update the consumed-data counters of ``state`` after step ``state.step``."""

    @abstractmethod
    def train_metrics(self, sums: list[float], steps: int, seconds: float, step: int) -> dict:
        """Scalars of a log window ending at ``step``: ``sums`` are the :meth:`forward` sums of
        its finite steps over all data-parallel ranks, ``steps`` the steps it had and
        ``seconds`` their time. The Trainer adds ``lr``, ``grad_norm``, ``step_time_s``,
        ``skipped_steps`` and the routing metrics."""

    @abstractmethod
    def evaluation_due(self, step: int) -> bool:
        """Whether to evaluate after ``step``."""

    @abstractmethod
    def evaluate(self, engine: Any, step: int, log: RunLogger) -> dict[str, float]:
        """Evaluate (collective), log a line, keep what the task keeps (a best model); returns
        the scalars to record as ``kind="eval"``."""

    def loader_state(self) -> dict:
        """This rank's data position, saved with each checkpoint."""
        return {}

    def finish(self, engine: Any, state: TrainerState, log: RunLogger) -> None:  # noqa: B027 (optional hook)
        """After the last step's checkpoint (collective): write the task's final outputs."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what the task holds open (loader workers)."""
