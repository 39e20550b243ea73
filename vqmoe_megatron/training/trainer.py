"""The training loop: one :class:`Trainer` drives every kind of run; a ``training.task.Task``
supplies what differs (data, model, loss, metrics, evaluation, final outputs).

Set-up (``Trainer.__init__``): process groups, run directory (``config.yaml``, logs), model,
DeepSpeed engine, and resumption from the newest complete checkpoint of the run directory.
One step (``Trainer._train_step``) = ``train.gradient_accumulation_steps`` micro-batches, then
one optimizer step (DeepSpeed decides the boundary); then the codebooks are maintained (EMA,
dead-code restarts; collective). Every ``train.log_interval`` steps rank 0 logs a progress line
and the train scalars (``metrics.jsonl``, TensorBoard ``train/<name>``); when the task says so,
it evaluates (``eval/<name>``).

Stops: normal end (final checkpoint, the task's final outputs, ``<output_dir>/complete``);
SIGTERM or SIGUSR1 (checkpoint, ``<output_dir>/preempted``, exit 0 so that slurm can requeue);
Ctrl-C (checkpoint, exit 130 with a line naming it; a second Ctrl-C aborts at once); or too many
non-finite losses in a row (abort, the last good checkpoint left in place).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)

from vqmoe_megatron.checkpoint.training import (
    ALLOW_TOKENIZER_CHANGE,
    CheckpointManager,
    TrainerState,
    check_signature,
    check_tokenizer,
    current_layout,
    model_signature,
)
from vqmoe_megatron.config import dump_yaml
from vqmoe_megatron.distributed import destroy_distributed, init_distributed
from vqmoe_megatron.interrupt import EXIT_INTERRUPTED, INTERRUPTED
from vqmoe_megatron.training.codebook import maintain_codebooks
from vqmoe_megatron.training.engine import initialize_engine
from vqmoe_megatron.training.evaluation import all_reduce_sum
from vqmoe_megatron.training.run_logger import RunLogger, make_output_dir, progress_line
from vqmoe_megatron.training.task import Task

PREEMPTED = "preempted"
COMPLETE = "complete"


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (non-finite losses); the message says why and what to do."""


class StopRequest:
    """The stop signals: SIGTERM / SIGUSR1 (preemption) and the first Ctrl-C (SIGINT) are
    remembered, and the loop agrees on them across ranks at the next step boundary. A second
    Ctrl-C, at least ``REPEAT_S`` after the first (launchers such as torchrun forward the
    terminal's Ctrl-C to the process group that already received it), exits 130 at once."""

    REPEAT_S = 1.0

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._interrupted_at: Optional[float] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self._handle_interrupt)

    def _handle(self, signum: int, frame) -> None:
        self.signal = signum

    def _handle_interrupt(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._interrupted_at is None:
            self._interrupted_at = now
            self.signal = signum
        elif now - self._interrupted_at >= self.REPEAT_S:
            os.write(2, f"{INTERRUPTED} again: stopped without saving\n".encode())
            os._exit(EXIT_INTERRUPTED)

    def release(self) -> None:
        """Give Ctrl-C back to ``interrupt.run`` (KeyboardInterrupt): nothing left to save."""
        if signal.getsignal(signal.SIGINT) == self._handle_interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, device: torch.device) -> Optional[int]:
        """On every rank, as soon as any rank received a signal: its number (the highest if
        ranks received different ones); None while none did (collective)."""
        flag = torch.tensor([float(self.signal or 0)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


class Trainer:
    """Owns one training run of ``task`` (construct, then :meth:`run`, then :meth:`close`)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.log: Optional[RunLogger] = None
        cfg = task.cfg
        self.layout = init_distributed(
            cfg.parallel.tensor_parallel, cfg.parallel.expert_parallel, seed=cfg.train.seed
        )
        self.rank0 = self.layout.rank == 0
        self.out = Path(cfg.train.output_dir)
        self.checkpoints = CheckpointManager(self.out, cfg.train.keep_last)
        resume, note = self.checkpoints.resume_point(cfg.train.resume_fallback)
        task.place(
            self.layout.rank,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
        )
        self.cfg = cfg = task.cfg
        if resume is not None:  # refuse a foreign run before writing anything
            saved = CheckpointManager.read_state(resume)
            check_signature(saved.signature, model_signature(cfg), resume)
        self._open_run_directory()
        torch.manual_seed(cfg.train.seed)
        self.model = task.build_model(fresh=resume is None, log=self.log)
        self.gpt = self.model.gpt
        self.engine = initialize_engine(
            self.model.module,
            self.gpt,
            cfg.train,
            task.micro_batch_size,
            task.micro_batch_setting,
        )
        self.device = self.engine.device
        self.state = TrainerState(
            signature=model_signature(cfg),
            layout=current_layout(),
            data_fingerprint=task.data_fingerprint(),
            tokenizer=task.tokenizer(),
        )
        if resume is not None:
            self._resume(resume, note)
        self.stop = StopRequest()
        self.nonfinite_run = 0
        """Non-finite steps in a row, up to the current one."""

    # ------------------------------------------------------------------ set-up
    def _open_run_directory(self) -> None:
        """Create the run directory, write ``config.yaml``, open the logs (rank 0)."""
        if self.rank0:
            make_output_dir(self.out)
            (self.out / PREEMPTED).unlink(missing_ok=True)
            dump_yaml(self.cfg, self.out / "config.yaml")
        self.log = RunLogger(self.out, self.rank0, self.cfg.train.tensorboard)
        self.log.info(f"layout: {self.layout.describe()}")
        summary = self.task.describe()
        if summary:
            self.log.info(summary)

    def _resume(self, path: Path, note: Optional[str]) -> None:
        """Load checkpoint ``path`` into model, engine and state; the task continues its data."""
        if note:
            self.log.warning(note)
        tokenizer = self.state.tokenizer
        self.state, loader_state = self.checkpoints.load(
            path, self.model.checkpointed, self.engine, self.cfg
        )
        recorded = self.state.tokenizer
        if check_tokenizer(
            recorded,
            tokenizer,
            path,
            self.cfg.train.allow_tokenizer_change,
            f"{self.task.tokenizer_remedy(recorded)}, or set {ALLOW_TOKENIZER_CHANGE} to go on "
            "with this one anyway",
        ):
            self.log.warning(
                f"train.allow_tokenizer_change=true: continuing {path} (tokenizer sha256 "
                f"{recorded['sha256']}) with tokenizer sha256 {tokenizer['sha256']}"
            )
        self.state.tokenizer = tokenizer
        self.state.layout = current_layout()
        self.task.resume(path, self.state, loader_state, self.log)
        self.log.info(f"resumed from {path} at step {self.state.step}")

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Train to ``train.steps``, then let the task finish; returns the process exit code
        (0 also when preempted, 130 after Ctrl-C)."""
        train = self.cfg.train
        start = (time.time(), self.state.step)
        window = _Window()
        if self.state.step < train.steps:
            self.log.info(f"training steps {self.state.step + 1}..{train.steps}")
        else:
            self.log.info(f"no steps left: resumed at step {self.state.step} of {train.steps}")
        for step in range(self.state.step + 1, train.steps + 1):
            began = time.perf_counter()
            self.gpt.begin_step(step, train.seed)
            sums, nonfinite = self._train_step(step)
            self.state.step = step
            self.task.advance(self.state)
            maintain_codebooks(self.gpt, self.engine, step, train.seed, self.log, not nonfinite)
            self._count_nonfinite(step, nonfinite)
            window.add(torch.zeros_like(sums) if nonfinite else sums, time.perf_counter() - began)
            if step % train.log_interval == 0 or step == train.steps:
                self._log(step, window, start)
                window = _Window()
            if self.task.evaluation_due(step):
                values = self.task.evaluate(self.engine, step, self.log)
                if values:
                    self.log.scalars(step, values, kind="eval")
            stopped = self._stop_requested(step)
            if stopped is not None:
                return stopped
            if step % train.save_interval == 0 and step != train.steps and not self.nonfinite_run:
                self.save()
        if self.state.step > start[1]:  # else the checkpoint resumed from is this step's
            self.save()
        self.stop.release()
        self.task.finish(self.engine, self.state, self.log)
        if self.rank0:
            (self.out / COMPLETE).write_text(f"{self.state.step}\n")
        self.log.info(self.task.done_message)
        return 0

    def _train_step(self, step: int) -> tuple[torch.Tensor, bool]:
        """One optimizer step; returns (this rank's metric sums, non-finite on any rank?).

        The sums stay on the device until the step ends: one host sync per step."""
        sums = None
        skipped_before = self.engine.skipped_steps
        for batch in self.task.micro_batches(step):
            loss, batch_sums = self.task.forward(self.engine, batch)
            if step in self.cfg.train.inject_nonfinite_steps:
                loss = loss * float("nan")
                batch_sums = batch_sums * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            sums = batch_sums if sums is None else sums + batch_sums
        local = self.engine.skipped_steps > skipped_before or not math.isfinite(sums[0].item())
        (flag,) = all_reduce_sum([1.0 if local else 0.0], self.device)
        return sums, flag > 0

    def _count_nonfinite(self, step: int, nonfinite: bool) -> None:
        """Count a skipped (non-finite) step and warn; after ``train.max_nonfinite_steps`` in a
        row, abort naming the last good checkpoint. A finite step resets the count."""
        if not nonfinite:
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        self.state.skipped_steps += 1
        run = self.nonfinite_run
        self.log.warning(f"step {step}: non-finite loss, update skipped ({run} in a row)")
        if run >= self.cfg.train.max_nonfinite_steps:
            last = self.checkpoints.latest()
            raise TrainingAborted(
                f"{run} non-finite losses in a row (steps {step - run + 1}..{step}); stopping. "
                f"The last good checkpoint is {last or 'none (no checkpoint was saved yet)'}; "
                f"{self.task.nonfinite_remedy} and restart from it."
            )

    def _stop_requested(self, step: int) -> Optional[int]:
        """After step ``step`` (collective): if any rank received a stop signal, checkpoint and
        return the exit code: 0 after SIGTERM/SIGUSR1 (rank 0 writes ``<out>/preempted``, so
        that slurm requeues the run), 130 after Ctrl-C. None: go on."""
        stop_signal = self.stop.agreed(self.device)
        if not stop_signal:
            return None
        path = self.save()
        if stop_signal == signal.SIGINT:
            if self.rank0:
                print(
                    f"{INTERRUPTED} at step {step}: saved checkpoint {path}; run the same command "
                    "again to resume from it",
                    file=sys.stderr,
                    flush=True,
                )
            return EXIT_INTERRUPTED
        if self.rank0:
            (self.out / PREEMPTED).write_text(f"step {step} signal {stop_signal}\n")
        self.log.info(f"stopping at step {step} on a signal; resubmit to continue")
        return 0

    def save(self) -> Path:
        """Checkpoint the current step (collective)."""
        path = self.checkpoints.save(
            self.model.checkpointed,
            self.engine,
            self.state,
            self.cfg,
            self.task.loader_state(),
        )
        self.log.info(f"saved checkpoint {path}")
        return path

    # ------------------------------------------------------------------ logging
    def _log(self, step: int, window: _Window, start: tuple[float, int]) -> None:
        """The progress line and the train scalars of a log window (collective)."""
        sums = all_reduce_sum(
            window.sums.tolist(), self.device, parallel_state.get_data_parallel_group()
        )
        values = {
            **self.task.train_metrics(sums, window.steps, window.seconds, step),
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "step_time_s": window.seconds / max(window.steps, 1),
            "skipped_steps": self.state.skipped_steps,
        }
        headline = {k: values[k] for k in self.task.headline if k in values}
        self.log.info(
            progress_line(
                step, self.cfg.train.steps, headline, time.time() - start[0], step - start[1]
            )
        )
        self.log.scalars(step, {**values, **self._routing_summary(window.steps)})

    def _routing_summary(self, steps: int) -> dict[str, float]:
        """Per-layer routing metrics and megatron's aux losses of a log window of ``steps``
        steps, flattened to ``layer<k>/<name>``; warns about dead codes and imbalance."""
        values: dict[str, float] = {}
        train, moe = self.cfg.train, self.cfg.moe
        codes = moe.codebook_size
        for layer, stats in self.gpt.routing_metrics.summarize().items():
            for name, value in stats.items():
                values[f"layer{layer}/{name}"] = value
            if stats.get("dead_codes", 0) >= train.dead_code_warn_fraction * codes:
                self.log.warning(f"layer {layer}: {int(stats['dead_codes'])}/{codes} codes unused")
            if stats.get("imbalance", 0) >= train.imbalance_warn_ratio:
                self.log.warning(f"layer {layer}: expert imbalance {stats['imbalance']:.2f}x mean")
        reduce_aux_losses_tracker_across_ranks()
        micro_steps = steps * train.gradient_accumulation_steps
        for name, entry in get_moe_layer_wise_logging_tracker().items():
            for layer, value in enumerate(entry["values"].tolist(), start=1):
                if value:
                    values[f"layer{layer}/{name}"] = value / micro_steps
        clear_aux_losses_tracker()
        return values

    def close(self) -> None:
        """Stop the task's loader workers, release files and process groups."""
        self.task.close()
        if self.log is not None:
            self.log.close()
        destroy_distributed()


class _Window:
    """What a log window accumulates: the metric sums of its finite steps (on the device), its
    steps and their seconds."""

    def __init__(self) -> None:
        self.sums: torch.Tensor = torch.zeros(0, dtype=torch.float64)
        self.steps = 0
        self.seconds = 0.0

    def add(self, sums: torch.Tensor, seconds: float) -> None:
        """Add one step: its ``sums`` (zeros for a non-finite step) and its ``seconds``."""
        self.sums = sums if self.steps == 0 else self.sums + sums
        self.steps += 1
        self.seconds += seconds
