"""GLUE fine-tuning as a ``Task`` of the training loop: a classification (or regression) head on
the pretrained VQMoE GPT, the router dropped unless ``finetune.routing=pretrain``.

One step = ``train.gradient_accumulation_steps`` micro-batches of ``finetune.micro_batch_size``
examples per data-parallel rank. The dev split(s) are evaluated at the end of every epoch, every
``train.eval_interval`` steps when set, and after the last step; a new best score (the task's
GLUE score on its first dev split) replaces ``<output_dir>/best/``. After the last step the best
model predicts the dev and test splits: ``results.json`` and the GLUE submission files under
``<output_dir>/predictions/``. Checkpoints, resumption and stops are the Trainer's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vqmoe_megatron.checkpoint.training import TrainerState, tokenizer_record
from vqmoe_megatron.config import ConfigError, FinetuneConfig, finetune_schedule
from vqmoe_megatron.config_checks import check_output_dir, check_settings
from vqmoe_megatron.data.files import sha256_file, write_json_atomic
from vqmoe_megatron.distributed import launcher_world_size
from vqmoe_megatron.finetune.best import BestModel
from vqmoe_megatron.finetune.classifier import SequenceClassifier, task_loss
from vqmoe_megatron.finetune.evaluation import predict
from vqmoe_megatron.finetune.features import (
    Batch,
    EncodedSplit,
    TrainSchedule,
    collate,
    encode_split,
)
from vqmoe_megatron.finetune.pretrained import load_pretrained_weights, resolve_tokenizer
from vqmoe_megatron.glue import (
    GlueDataError,
    check_task_files,
    compute_task_metrics,
    get_task,
    read_split,
    write_submission,
)
from vqmoe_megatron.model import VQMoEGPTModel, build_model
from vqmoe_megatron.training.run_logger import RunLogger
from vqmoe_megatron.training.task import Task, TaskModel
from vqmoe_megatron.training.trainer import TrainingAborted

RESULTS = "results.json"
BEST_DIR = "best"
PREDICTIONS_DIR = "predictions"


def validate_config(cfg: FinetuneConfig, world_size: int) -> None:
    """Refuse settings that cannot work for ``world_size`` processes, naming the setting and
    the fix."""
    ft = cfg.finetune
    if ft.epochs < 1 and ft.steps is None:
        raise ConfigError("finetune.epochs must be >= 1 (or set finetune.steps)")
    check_settings(cfg, world_size)
    check_output_dir("train.output_dir", cfg.train.output_dir)
    limit = cfg.model.seq_length
    if ft.max_seq_length is not None and not 4 <= ft.max_seq_length <= limit:
        raise ConfigError(
            f"finetune.max_seq_length={ft.max_seq_length}: use 4..{limit} (the pretrained "
            "model's model.seq_length)"
        )


def freeze_unused(gpt: VQMoEGPTModel, train_codebook: bool) -> None:
    """Freeze what fine-tuning does not learn: the codebooks (unless ``train_codebook``, in
    either routing mode) and an untied LM output layer (the head replaces it)."""
    for layer in gpt.vq_layers():
        layer.router.quantizer.set_trainable(train_codebook)
    weight = getattr(gpt.output_layer, "weight", None)
    if weight is not None:
        weight.requires_grad_(False)


class GlueTask(Task):
    """Fine-tuning on one GLUE task (``FinetuneConfig``)."""

    micro_batch_setting = "--micro_batch_size"
    headline = ("loss", "accuracy", "lr", "examples_per_s")
    nonfinite_remedy = "lower --lr"
    done_message = "fine-tuning complete"

    def __init__(self, cfg: FinetuneConfig) -> None:
        validate_config(cfg, launcher_world_size())
        ft = cfg.finetune
        self.cfg = cfg
        self.micro_batch_size = ft.micro_batch_size
        self.glue = get_task(ft.task)
        self.regression = self.glue.is_regression
        self.tokenizer_model = resolve_tokenizer(
            ft.pretrained, ft.tokenizer, allow_change=cfg.train.allow_tokenizer_change
        )
        self.max_length = ft.max_seq_length or cfg.model.seq_length
        train_file = self._read_data(ft.data_dir)
        self.fingerprint = hashlib.sha256(
            f"{sha256_file(train_file)} {self.tokenizer_model.sha256} {self.max_length}".encode()
        ).hexdigest()
        self.out = Path(cfg.train.output_dir)
        self.best = BestModel(self.out / BEST_DIR)

    def _read_data(self, data_dir: str) -> Path:
        """Read and tokenize every split of the task (``self.splits``; the test splits' GLUE
        files also as ``self.tests``); returns the training file's path."""
        files = check_task_files(data_dir, self.glue)
        self.tests = {name: read_split(data_dir, self.glue, name) for name in self.glue.test_splits}
        labelled = {
            name: read_split(data_dir, self.glue, name) for name in ("train", *self.glue.dev_splits)
        }
        self.splits: dict[str, EncodedSplit] = {
            name: encode_split(split, self.tokenizer_model, self.max_length)
            for name, split in {**labelled, **self.tests}.items()
        }
        for name in labelled:
            if len(self.splits[name]) == 0:
                raise GlueDataError(f"{files[name]} holds no examples")
        return files["train"]

    def place(self, rank: int, dp_rank: int, dp_size: int) -> None:
        self.rank0 = rank == 0
        self.dp_rank = dp_rank
        cfg = self.cfg
        ft = cfg.finetune
        self.schedule = TrainSchedule(
            len(self.splits["train"]),
            ft.micro_batch_size,
            dp_size,
            cfg.train.gradient_accumulation_steps,
            cfg.train.seed,
        )
        steps, warmup = finetune_schedule(ft, self.schedule.steps_per_epoch)
        self.cfg = replace(cfg, train=replace(cfg.train, steps=steps, warmup_steps=warmup))

    def describe(self) -> Optional[str]:
        truncated = sum(split.truncated for split in self.splits.values())
        return (
            f"{self.glue.name}: "
            + ", ".join(f"{name} {len(split)}" for name, split in self.splits.items())
            + f" examples (max {self.max_length} tokens, {truncated} truncated); "
            f"{self.schedule.steps_per_epoch} steps per epoch of {self.schedule.global_batch}, "
            f"{self.cfg.train.steps} steps"
        )

    def build_model(self, fresh: bool, log: RunLogger) -> TaskModel:
        cfg, ft = self.cfg, self.cfg.finetune
        gpt = build_model(cfg.model, cfg.moe, cfg.parallel, seed=cfg.train.seed)
        freeze_unused(gpt, ft.train_codebook)
        self.model = SequenceClassifier(
            gpt, self.glue.num_labels, ft.pooling, ft.head_dropout, cfg.train.seed
        )
        if fresh:
            log.info(load_pretrained_weights(self.model, cfg))
        self.multiple_of = cfg.parallel.tensor_parallel if gpt.config.sequence_parallel else 1
        return TaskModel(gpt=gpt, module=self.model, checkpointed=self.model)

    def tokenizer(self) -> dict:
        return tokenizer_record(self.tokenizer_model.sha256, self.tokenizer_model.path.resolve())

    def data_fingerprint(self) -> str:
        return self.fingerprint

    def tokenizer_remedy(self, recorded: dict) -> str:
        return f"Pass --tokenizer {recorded.get('model')}"

    def resume(
        self, path: Path, state: TrainerState, loader_state: Optional[dict], log: RunLogger
    ) -> None:
        if state.data_fingerprint != self.fingerprint:
            log.warning(
                "the training data, tokenizer or max_seq_length changed since the checkpoint: "
                "the run continues, but not with the batches it would have seen"
            )
        state.data_fingerprint = self.fingerprint

    # ------------------------------------------------------------------ one step
    def micro_batches(self, step: int) -> Iterable[tuple[Batch, int]]:
        train = self.splits["train"]
        for indices in self.schedule.micro_batches(step, self.dp_rank):
            batch = collate(train, indices, self.tokenizer_model.pad_id, self.multiple_of)
            yield batch, len(indices)

    def forward(self, engine: Any, batch: tuple[Batch, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums: [loss sum, correct predictions (0 for regression), examples]."""
        examples, size = batch[0].to(engine.device), batch[1]
        logits = engine(examples.input_ids, examples.lengths)
        loss = task_loss(logits, examples.labels, self.regression)
        sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
        sums[0] = loss.detach().double() * size
        if not self.regression:
            sums[1] = (logits.argmax(dim=-1) == examples.labels).sum()
        sums[2] = size
        return loss, sums

    def advance(self, state: TrainerState) -> None:
        state.consumed_samples = state.step * self.schedule.global_batch

    def train_metrics(self, sums: list[float], steps: int, seconds: float, step: int) -> dict:
        loss_sum, correct, count = sums
        values = {
            "loss": loss_sum / max(count, 1.0),
            "examples_per_s": count / max(seconds, 1e-9),
            "epoch": step / self.schedule.steps_per_epoch,
        }
        if not self.regression:
            values["accuracy"] = correct / max(count, 1.0)
        return values

    # ------------------------------------------------------------------ evaluation
    def evaluation_due(self, step: int) -> bool:
        train = self.cfg.train
        return (
            self.schedule.ends_epoch(step)
            or bool(train.eval_interval and step % train.eval_interval == 0)
            or step == train.steps
        )

    def predict(self, engine: Any, name: str, log: RunLogger) -> np.ndarray:
        """Predictions of the current model for every example of split ``name`` (collective)."""
        return predict(
            engine,
            self.splits[name],
            micro_batch_size=self.micro_batch_size,
            pad_id=self.tokenizer_model.pad_id,
            multiple_of=self.multiple_of,
            regression=self.regression,
            device=engine.device,
            log=log.info,
        )

    def dev_metrics(self, engine: Any, log: RunLogger) -> dict[str, dict[str, float]]:
        """GLUE metrics of the current model on every dev split (collective)."""
        return {
            name: compute_task_metrics(
                self.glue, self.predict(engine, name, log), self.splits[name].labels
            )
            for name in self.glue.dev_splits
        }

    def score(self, results: dict[str, dict[str, float]]) -> float:
        """What "best" means: the task's main GLUE metric on its first dev split."""
        return results[self.glue.dev_splits[0]][self.glue.main_metric]

    def evaluate(self, engine: Any, step: int, log: RunLogger) -> dict[str, float]:
        """Dev metrics; a new best score replaces ``<output_dir>/best/``. Scalars: ``epoch``
        and ``<dev split>/<metric>``."""
        results = self.dev_metrics(engine, log)
        epoch = step / self.schedule.steps_per_epoch
        score = self.score(results)
        record = {"step": step, "epoch": epoch, "score": score, "dev": results}
        kept = self.best.offer(self.model, self.cfg, self.tokenizer_model.path, record)
        summary = " | ".join(
            f"{split} " + " ".join(f"{k} {v:.4f}" for k, v in values.items())
            for split, values in results.items()
        )
        log.info(
            f"eval step {step} (epoch {epoch:.2f}) | {summary}"
            + (" | new best" if kept else f" | best {self.best.score:.4f}")
        )
        flat = {f"{split}/{k}": v for split, values in results.items() for k, v in values.items()}
        return {"epoch": epoch, **flat}

    # ------------------------------------------------------------------ the end
    def finish(self, engine: Any, state: TrainerState, log: RunLogger) -> None:
        """Predict dev and test splits with the best model; write the submission files and
        ``results.json`` (collective)."""
        if self.best.record is None:
            raise TrainingAborted(f"no dev evaluation reached {self.best.directory}")
        self.best.load_into(self.model)
        dev = self.dev_metrics(engine, log)
        submissions = {}
        for name, split in self.tests.items():
            values = self.predict(engine, name, log)
            if self.rank0:
                path = write_submission(split, values, self.out / PREDICTIONS_DIR)
                submissions[name] = str(path.relative_to(self.out))
        results = {
            "task": self.glue.name,
            "main_metric": self.glue.main_metric,
            "best": {**self.best.record, "dev": dev},
            "evaluations": self._evaluations(state.step),
            "baseline": self._baseline(),
            "test_predictions": submissions,
            "steps": self.cfg.train.steps,
            "steps_per_epoch": self.schedule.steps_per_epoch,
            "examples": {name: len(split) for name, split in self.splits.items()},
            "truncated": {name: split.truncated for name, split in self.splits.items()},
            "settings": {
                key: getattr(self.cfg.finetune, key)
                for key in ("pretrained", "routing", "pooling", "train_codebook", "vq_loss")
            },
        }
        if self.rank0:
            write_json_atomic(self.out / RESULTS, results)
        log.info(
            f"best step {self.best.record['step']}: {self.glue.main_metric} "
            f"{self.score(dev):.4f} on {self.glue.dev_splits[0]}; results in "
            f"{self.out / RESULTS}, test predictions in {self.out / PREDICTIONS_DIR}"
        )

    def _evaluations(self, last_step: int) -> list[dict]:
        """Every dev evaluation of this run directory up to ``last_step``, once per step (the
        last one wins when a resumed run repeated steps), read back from metrics.jsonl (rank 0)."""
        path = self.out / "metrics.jsonl"
        if not self.rank0 or not path.is_file():
            return []
        by_step = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("kind") == "eval" and record["step"] <= last_step:
                by_step[record["step"]] = {
                    k: v for k, v in record.items() if k not in ("kind", "time")
                }
        return [by_step[step] for step in sorted(by_step)]

    def _baseline(self) -> dict[str, dict[str, float]]:
        """Dev metrics of a constant prediction: the most frequent training label (the mean
        score for STS-B)."""
        labels = self.splits["train"].labels
        if self.regression:
            constant = float(labels.mean())
        else:
            constant = int(np.bincount(labels).argmax())
        out = {}
        for name in self.glue.dev_splits:
            split = self.splits[name]
            guess = np.full(len(split), constant, dtype=np.float64 if self.regression else np.int64)
            out[name] = compute_task_metrics(self.glue, guess, split.labels)
        return out
