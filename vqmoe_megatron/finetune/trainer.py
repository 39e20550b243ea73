"""The GLUE fine-tuning loop: data, model, DeepSpeed engine, dev evaluation, best model, results.

One step = ``gradient_accumulation_steps`` micro-batches of ``finetune.micro_batch_size``
examples per data-parallel rank, then one optimizer step. The dev split(s) are evaluated at the
end of every epoch, every ``train.eval_interval`` steps when set, and after the last step; a new
best score (the task's GLUE score on its first dev split) replaces ``<output_dir>/best/``. After
the last step the best model predicts the dev and test splits: ``results.json`` and the GLUE
submission files under ``<output_dir>/predictions/``.

Checkpoints, resumption and stops are pretraining's (``training.checkpoint``, ``StopRequest``):
a run directory with checkpoints resumes from the newest complete one, at any layout; SIGTERM or
SIGUSR1 makes every rank save, rank 0 write ``<output_dir>/preempted``, and all exit 0; the normal
end writes ``<output_dir>/complete``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state

from vqmoe_megatron.config import ConfigError, FinetuneConfig, PretrainConfig, dump_yaml
from vqmoe_megatron.config_checks import check_output_dir, check_settings
from vqmoe_megatron.convert.consolidated import load_pretrained
from vqmoe_megatron.data.files import sha256_file, write_json_atomic
from vqmoe_megatron.distributed import (
    destroy_distributed,
    init_distributed,
    launcher_world_size,
)
from vqmoe_megatron.finetune.best import BestModel
from vqmoe_megatron.finetune.classifier import SequenceClassifier, task_loss
from vqmoe_megatron.finetune.evaluation import predict
from vqmoe_megatron.finetune.features import EncodedSplit, TrainSchedule, collate, encode_split
from vqmoe_megatron.finetune.pretrained import resolve_tokenizer
from vqmoe_megatron.glue import (
    GlueDataError,
    check_task_files,
    compute_task_metrics,
    get_task,
    read_split,
    write_submission,
)
from vqmoe_megatron.model import VQMoEGPTModel, build_model
from vqmoe_megatron.moe import metrics
from vqmoe_megatron.training.checkpoint import (
    ALLOW_TOKENIZER_CHANGE,
    CheckpointManager,
    TrainerState,
    check_signature,
    check_tokenizer,
    current_layout,
    model_signature,
    tokenizer_record,
)
from vqmoe_megatron.training.codebook import maintain_codebooks
from vqmoe_megatron.training.engine import initialize_engine
from vqmoe_megatron.training.evaluation import all_reduce_sum
from vqmoe_megatron.training.run_logger import RunLogger, make_output_dir, progress_line
from vqmoe_megatron.training.trainer import (
    PREEMPTED,
    LoopControl,
    StopRequest,
    TrainingAborted,
)

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


class GlueFinetuner(LoopControl):
    """Owns one fine-tuning run (construct, then :meth:`run`)."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        validate_config(cfg, launcher_world_size())
        self.log: Optional[RunLogger] = None
        ft = cfg.finetune
        self.task = get_task(ft.task)
        self.regression = self.task.is_regression
        self.tokenizer = resolve_tokenizer(
            ft.pretrained, ft.tokenizer, allow_change=cfg.train.allow_tokenizer_change
        )
        max_length = ft.max_seq_length or cfg.model.seq_length
        train_file = self._read_data(ft.data_dir, max_length)

        self.layout = init_distributed(
            cfg.parallel.tensor_parallel, cfg.parallel.expert_parallel, seed=cfg.train.seed
        )
        self.rank0 = self.layout.rank == 0
        self.out = Path(cfg.train.output_dir)
        self.checkpoints = CheckpointManager(self.out, cfg.train.keep_last)
        resume, note = self.checkpoints.resume_point(cfg.train.resume_fallback)

        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.schedule = TrainSchedule(
            len(self.splits["train"]),
            ft.micro_batch_size,
            self.dp_size,
            cfg.train.gradient_accumulation_steps,
            cfg.train.seed,
        )
        steps = ft.steps or ft.epochs * self.schedule.steps_per_epoch
        train = replace(cfg.train, steps=steps, warmup_steps=round(ft.warmup_fraction * steps))
        self.cfg = cfg = replace(cfg, train=train)
        self.fingerprint = hashlib.sha256(
            f"{sha256_file(train_file)} {self.tokenizer.sha256} {max_length}".encode()
        ).hexdigest()
        if resume is not None:  # refuse a foreign run before writing anything
            saved = CheckpointManager.read_state(resume)
            check_signature(saved.signature, model_signature(cfg), resume)
        if self.rank0:
            make_output_dir(self.out)
            (self.out / PREEMPTED).unlink(missing_ok=True)
            dump_yaml(cfg, self.out / "config.yaml")
        self.log = RunLogger(self.out, self.rank0, train.tensorboard)
        self.log.info(f"layout: {self.layout.describe()}")
        self.log.info(
            f"{self.task.name}: "
            + ", ".join(f"{name} {len(split)}" for name, split in self.splits.items())
            + f" examples (max {max_length} tokens, {self._truncated()} truncated); "
            f"{self.schedule.steps_per_epoch} steps per epoch of {self.schedule.global_batch}, "
            f"{steps} steps"
        )

        torch.manual_seed(train.seed)
        self.gpt = build_model(cfg.model, cfg.moe, cfg.parallel, seed=train.seed)
        if resume is None:
            load_pretrained(
                self.gpt, Path(ft.pretrained), PretrainConfig(model=cfg.model, moe=cfg.moe)
            )
            self.log.info(f"loaded {ft.pretrained} ({ft.routing} routing)")
        freeze_unused(self.gpt, ft.train_codebook)
        self.model = SequenceClassifier(
            self.gpt, self.task.num_labels, ft.pooling, ft.head_dropout, train.seed
        )
        self.engine = initialize_engine(
            self.model, self.gpt, train, ft.micro_batch_size, "--micro_batch_size"
        )
        self.device = self.engine.device
        self.state = TrainerState(
            signature=model_signature(cfg),
            layout=current_layout(),
            data_fingerprint=self.fingerprint,
            tokenizer=tokenizer_record(self.tokenizer.sha256, self.tokenizer.path.resolve()),
        )
        if resume is not None:
            self._resume(resume, note)
        self.best = BestModel(self.out / BEST_DIR)
        self.stop = StopRequest()

    def _read_data(self, data_dir: str, max_length: int) -> Path:
        """Read and tokenize every split of the task (``self.splits``; the test splits' GLUE
        files also as ``self.tests``); returns the training file's path."""
        files = check_task_files(data_dir, self.task)
        self.tests = {name: read_split(data_dir, self.task, name) for name in self.task.test_splits}
        labelled = {
            name: read_split(data_dir, self.task, name) for name in ("train", *self.task.dev_splits)
        }
        self.splits: dict[str, EncodedSplit] = {
            name: encode_split(split, self.tokenizer, max_length)
            for name, split in {**labelled, **self.tests}.items()
        }
        for name in labelled:
            if len(self.splits[name]) == 0:
                raise GlueDataError(f"{files[name]} holds no examples")
        return files["train"]

    def _truncated(self) -> int:
        return sum(split.truncated for split in self.splits.values())

    def _resume(self, path: Path, note: Optional[str] = None) -> None:
        if note:
            self.log.warning(note)
        tokenizer = self.state.tokenizer
        self.state, _ = self.checkpoints.load(path, self.model, self.engine, self.cfg)
        check_tokenizer(
            self.state.tokenizer,
            tokenizer,
            path,
            self.cfg.train.allow_tokenizer_change,
            f"Pass --tokenizer {self.state.tokenizer.get('model')}, or set "
            f"{ALLOW_TOKENIZER_CHANGE} to go on with this one anyway",
        )
        self.state.tokenizer = tokenizer
        if self.state.data_fingerprint != self.fingerprint:
            self.log.warning(
                "the training data, tokenizer or max_seq_length changed since the checkpoint: "
                "the run continues, but not with the batches it would have seen"
            )
        self.state.layout = current_layout()
        self.state.data_fingerprint = self.fingerprint
        self.log.info(f"resumed from {path} at step {self.state.step}")

    # ------------------------------------------------------------------ one step
    def _train_step(self, step: int) -> tuple[list[float], bool]:
        """One optimizer step; returns ([loss sum, correct, examples] on this rank, non-finite?).

        The sums stay on the device until the step ends: one host sync per step."""
        train = self.splits["train"]
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        skipped_before = self.engine.skipped_steps
        for indices in self.schedule.micro_batches(step, self.dp_rank):
            batch = collate(train, indices, self.tokenizer.pad_id, self._multiple_of()).to(
                self.device
            )
            logits = self.engine(batch.input_ids, batch.lengths)
            loss = task_loss(logits, batch.labels, self.regression)
            if step in self.cfg.train.inject_nonfinite_steps:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            sums[0] += loss.detach().double() * len(indices)
            if not self.regression:
                sums[1] += (logits.argmax(dim=-1) == batch.labels).sum()
            sums[2] += len(indices)
        totals = sums.tolist()
        return totals, self.step_is_nonfinite(skipped_before, totals[0])

    def _multiple_of(self) -> int:
        return self.cfg.parallel.tensor_parallel if self.gpt.config.sequence_parallel else 1

    # ------------------------------------------------------------------ evaluation
    def predict(self, name: str) -> np.ndarray:
        """Predictions of the current model for every example of split ``name`` (collective)."""
        return predict(
            self.engine,
            self.splits[name],
            micro_batch_size=self.cfg.finetune.micro_batch_size,
            pad_id=self.tokenizer.pad_id,
            multiple_of=self._multiple_of(),
            regression=self.regression,
            device=self.device,
            log=self.log.info,
        )

    def evaluate(self) -> dict[str, dict[str, float]]:
        """GLUE metrics of the current model on every dev split (collective)."""
        return {
            name: compute_task_metrics(self.task, self.predict(name), self.splits[name].labels)
            for name in self.task.dev_splits
        }

    def _score(self, results: dict[str, dict[str, float]]) -> float:
        return results[self.task.dev_splits[0]][self.task.main_metric]

    def _evaluate_and_keep_best(self, step: int) -> None:
        results = self.evaluate()
        epoch = step / self.schedule.steps_per_epoch
        score = self._score(results)
        record = {"step": step, "epoch": epoch, "score": score, "dev": results}
        kept = self.best.offer(self.model, self.cfg, self.tokenizer.path, record)
        summary = " | ".join(
            f"{split} " + " ".join(f"{k} {v:.4f}" for k, v in values.items())
            for split, values in results.items()
        )
        self.log.info(
            f"eval step {step} (epoch {epoch:.2f}) | {summary}"
            + (" | new best" if kept else f" | best {self.best.score:.4f}")
        )
        flat = {f"{split}/{k}": v for split, values in results.items() for k, v in values.items()}
        self.log.scalars(step, {"epoch": epoch, **flat}, kind="eval")

    # ------------------------------------------------------------------ logging
    def _log(
        self, step: int, window: list[float], seconds: float, start: tuple[float, int]
    ) -> None:
        loss_sum, correct, count = all_reduce_sum(
            window[:3], self.device, parallel_state.get_data_parallel_group()
        )
        steps = window[3]
        values = {
            "loss": loss_sum / max(count, 1.0),
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "examples_per_s": count / max(seconds, 1e-9),
            "step_time_s": seconds / max(steps, 1),
            "epoch": step / self.schedule.steps_per_epoch,
            "skipped_steps": self.state.skipped_steps,
        }
        if not self.regression:
            values["accuracy"] = correct / max(count, 1.0)
        routing = {
            f"layer{layer}/{name}": value
            for layer, stats in metrics.summarize().items()
            for name, value in stats.items()
        }
        headline = {
            k: values[k] for k in ("loss", "accuracy", "lr", "examples_per_s") if k in values
        }
        self.log.info(
            progress_line(
                step, self.cfg.train.steps, headline, time.time() - start[0], step - start[1]
            )
        )
        self.log.scalars(step, {**values, **routing})

    # ------------------------------------------------------------------ the loop
    def save(self) -> Path:
        """Checkpoint the current step (collective)."""
        self.state.consumed_samples = self.state.step * self.schedule.global_batch
        path = self.checkpoints.save(self.model, self.engine, self.state, self.cfg, {})
        self.log.info(f"saved checkpoint {path}")
        return path

    def run(self) -> int:
        """Train, then predict with the best model; returns the exit code (0 also when
        preempted)."""
        train = self.cfg.train
        first = self.state.step + 1
        start = (time.time(), self.state.step)
        window = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss sum, correct, examples, steps, seconds
        self.log.info(f"training steps {first}..{train.steps}")
        for step in range(first, train.steps + 1):
            began = time.perf_counter()
            self.gpt.begin_step(step, train.seed)
            totals, nonfinite = self._train_step(step)
            self.state.step = step
            maintain_codebooks(self.gpt, self.engine, step, train.seed, self.log, not nonfinite)
            self.count_nonfinite(step, nonfinite, "lower --lr")
            if not nonfinite:
                window[:3] = [w + t for w, t in zip(window[:3], totals)]
            window[3] += 1
            window[4] += time.perf_counter() - began
            if step % train.log_interval == 0 or step == train.steps:
                self._log(step, window, window[4], start)
                window = [0.0, 0.0, 0.0, 0.0, 0.0]
            if (
                self.schedule.ends_epoch(step)
                or (train.eval_interval and step % train.eval_interval == 0)
                or step == train.steps
            ):
                self._evaluate_and_keep_best(step)
            if self.end_step(step):
                return 0
        self.save()
        self.finish()
        self.mark_complete("fine-tuning complete")
        return 0

    def finish(self) -> dict:
        """Predict dev and test splits with the best model; write the submission files and
        ``results.json`` (collective). Returns the results."""
        if self.best.record is None:
            raise TrainingAborted(f"no dev evaluation reached {self.best.directory}")
        self.best.load_into(self.model)
        dev = self.evaluate()
        submissions = {}
        for name, split in self.tests.items():
            values = self.predict(name)
            if self.rank0:
                path = write_submission(split, values, self.out / PREDICTIONS_DIR)
                submissions[name] = str(path.relative_to(self.out))
        results = {
            "task": self.task.name,
            "main_metric": self.task.main_metric,
            "best": {**self.best.record, "dev": dev},
            "evaluations": self._evaluations(),
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
        self.log.info(
            f"best step {self.best.record['step']}: {self.task.main_metric} "
            f"{self._score(dev):.4f} on {self.task.dev_splits[0]}; results in "
            f"{self.out / RESULTS}, test predictions in {self.out / PREDICTIONS_DIR}"
        )
        return results

    def _evaluations(self) -> list[dict]:
        """Every dev evaluation of this run directory, once per step (the last one wins when a
        resumed run repeated steps), read back from metrics.jsonl (rank 0)."""
        path = self.out / "metrics.jsonl"
        if not self.rank0 or not path.is_file():
            return []
        by_step = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("kind") == "eval" and record["step"] <= self.state.step:
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
        for name in self.task.dev_splits:
            split = self.splits[name]
            guess = np.full(len(split), constant, dtype=np.float64 if self.regression else np.int64)
            out[name] = compute_task_metrics(self.task, guess, split.labels)
        return out

    def close(self) -> None:
        """Release files and process groups."""
        if self.log is not None:
            self.log.close()
        destroy_distributed()
