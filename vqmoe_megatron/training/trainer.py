"""The pretraining loop: DeepSpeed engine, data stream, evaluation, logging, checkpoints, signals.

One step = ``gradient_accumulation_steps`` micro-batches then one optimizer step (DeepSpeed
decides the boundary). After the step, the codebooks are maintained (EMA, dead-code restarts,
collective over data parallelism). Every ``log_interval`` steps rank 0 prints loss, LR, gradient
norm, throughput (tokens/s, TFLOP/s per device, MFU) and per-layer routing metrics; every
``eval_interval`` steps the valid split is evaluated (loss, perplexity, bits per byte); with
``data.sources`` (a weighted blend of shard directories) each source's valid split on its own.

Stops: normal end (final checkpoint, ``<output_dir>/complete``), SIGTERM/SIGUSR1 (checkpoint,
``<output_dir>/preempted``, exit 0 so that slurm can requeue), or too many non-finite losses in
a row (abort with the last good checkpoint left in place).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)

from vqmoe_megatron.config import ConfigError, DataConfig, DataSource, PretrainConfig, dump_yaml
from vqmoe_megatron.config_checks import check_output_dir, check_settings, check_vocabulary
from vqmoe_megatron.data import (
    DataError,
    Manifest,
    TokenShardLoader,
    check_manifest_matches,
    load_manifest,
)
from vqmoe_megatron.data.blend import BlendedLoader, BlendSource, blend_fingerprint
from vqmoe_megatron.data.manifest import SplitInfo
from vqmoe_megatron.data.store import PIPE, FetchPolicy
from vqmoe_megatron.distributed import (
    ParallelLayout,
    destroy_distributed,
    init_distributed,
    launcher_world_size,
)
from vqmoe_megatron.model import VQMoEGPTModel, build_model
from vqmoe_megatron.moe import metrics
from vqmoe_megatron.training.checkpoint import (
    ALLOW_TOKENIZER_CHANGE,
    CheckpointManager,
    TrainerState,
    check_tokenizer,
    current_layout,
    model_signature,
    tokenizer_record,
)
from vqmoe_megatron.training.codebook import initialize_codebooks, maintain_codebooks
from vqmoe_megatron.training.engine import LanguageModel, initialize_engine
from vqmoe_megatron.training.evaluation import all_reduce_sum, filler_batch, lm_metrics, sum_nll
from vqmoe_megatron.training.flops import device_peak_tflops, flops_per_token
from vqmoe_megatron.training.run_logger import RunLogger, make_output_dir, progress_line

PREEMPTED = "preempted"
COMPLETE = "complete"


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (non-finite losses); the message says why and what to do."""


class StopRequest:
    """SIGTERM / SIGUSR1 handler: remembers the signal; the loop agrees on it across ranks."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signal = signum

    def agreed(self, device: torch.device) -> Optional[int]:
        """On every rank, as soon as any rank received a signal: its number (the highest if
        ranks received different ones); None while none did (collective)."""
        flag = torch.tensor([float(self.signal or 0)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


class LoopControl:
    """What a training loop does at every step boundary and at its end, shared by pretraining
    and fine-tuning. The loop class provides ``save()`` and the attributes ``cfg`` (with
    ``train``), ``stop`` (StopRequest), ``device``, ``out``, ``rank0``, ``log``, ``state`` (with
    ``skipped_steps``), ``engine`` and ``checkpoints``."""

    nonfinite_run = 0
    """Non-finite steps in a row, up to the current one."""

    def step_is_nonfinite(self, skipped_before: int, loss_sum: float) -> bool:
        """Whether, on any rank (collective), DeepSpeed skipped the step that began with
        ``skipped_before`` skipped steps, or the step's loss sum is not finite."""
        local = self.engine.skipped_steps > skipped_before or not math.isfinite(loss_sum)
        (flag,) = all_reduce_sum([1.0 if local else 0.0], self.device)
        return flag > 0

    def count_nonfinite(self, step: int, nonfinite: bool, remedy: str) -> None:
        """Count a skipped (non-finite) step and warn; after ``train.max_nonfinite_steps`` in a
        row, abort naming the last good checkpoint and ``remedy``. A finite step resets it."""
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
                f"{remedy} and restart from it."
            )

    def end_step(self, step: int) -> bool:
        """After step ``step`` (collective): if any rank received a stop signal, checkpoint,
        let rank 0 write ``<out>/preempted``, and return True (the run then exits 0 so that slurm
        can requeue it); else save every ``train.save_interval`` steps unless the step was
        non-finite."""
        stop_signal = self.stop.agreed(self.device)
        if stop_signal:
            self.save()
            if self.rank0:
                (self.out / PREEMPTED).write_text(f"step {step} signal {stop_signal}\n")
            self.log.info(f"stopping at step {step} on a signal; resubmit to continue")
            return True
        train = self.cfg.train
        if step % train.save_interval == 0 and step != train.steps and not self.nonfinite_run:
            self.save()
        return False

    def mark_complete(self, message: str) -> None:
        """The run is done: rank 0 writes ``<out>/complete`` (the step) and logs ``message``."""
        if self.rank0:
            (self.out / COMPLETE).write_text(f"{self.state.step}\n")
        self.log.info(message)


def validate_config(cfg: PretrainConfig, world_size: int) -> None:
    """Refuse settings that cannot work for ``world_size`` processes, naming the setting and
    the fix: what ``--dry-run`` checks, plus what only a real run needs."""
    data = cfg.data
    if data.data_dir is None and not data.sources:
        raise ConfigError(
            "data.data_dir is not set: point it at a directory written by data_tools/shard.py "
            "(or list weighted directories in data.sources)"
        )
    if data.data_dir is not None and data.sources:
        raise ConfigError("data.data_dir and data.sources are both set: keep one of them")
    if any(not (source.weight > 0 and math.isfinite(source.weight)) for source in data.sources):
        raise ConfigError(
            f"data.sources: weights {[s.weight for s in data.sources]} must all be positive"
        )
    if cfg.train.recompute_activations and not torch.cuda.is_available():
        raise ConfigError(
            "train.recompute_activations needs CUDA (megatron saves the CUDA RNG state)"
        )
    check_settings(cfg, world_size)
    check_output_dir("train.output_dir", cfg.train.output_dir)


def fetch_policy(data: DataConfig) -> FetchPolicy:
    """How remote shard directories are fetched (``data.fetch_*``)."""
    return FetchPolicy(data.fetch_attempts, data.fetch_backoff_s, data.fetch_timeout_s)


def _source_name(source: DataSource, position: int) -> str:
    """A source's label: its ``name``, else the last component of its path (``source<k>`` for
    a pipe: template)."""
    if source.name:
        return source.name
    return (
        f"source{position}"
        if source.path.startswith(PIPE)
        else source.path.rstrip("/").rsplit("/", 1)[-1]
    )


def load_sources(data: DataConfig) -> list[BlendSource]:
    """The manifests of ``data.sources`` with normalised weights; [] for ``data.data_dir``."""
    total = sum(source.weight for source in data.sources)
    return [
        BlendSource(
            name=_source_name(source, k),
            weight=source.weight / total,
            manifest=load_manifest(source.path, fetch_policy(data)),
        )
        for k, source in enumerate(data.sources)
    ]


class Pretrainer(LoopControl):
    """Owns one pretraining run (construct, then :meth:`run`)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        validate_config(cfg, launcher_world_size())
        self.sources = load_sources(cfg.data)
        self.manifest: Manifest = (
            self.sources[0].manifest
            if self.sources
            else load_manifest(cfg.data.data_dir, fetch_policy(cfg.data))
        )
        self.eval_sets: list[tuple[Optional[str], Manifest]] = (
            [(source.name, source.manifest) for source in self.sources]
            if self.sources
            else [(None, self.manifest)]
        )
        if cfg.model.vocab_size is None:
            cfg = replace(cfg, model=replace(cfg.model, vocab_size=self.manifest.vocab_size))
            check_vocabulary(cfg.model.vocab_size, cfg.parallel.tensor_parallel)
        check_manifest_matches(
            self.manifest, vocab_size=cfg.model.vocab_size, seq_length=cfg.model.seq_length
        )
        self.layout: ParallelLayout = init_distributed(
            cfg.parallel.tensor_parallel, cfg.parallel.expert_parallel, seed=cfg.train.seed
        )
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.rank0 = self.layout.rank == 0
        if self.rank0:
            make_output_dir(self.out)
            (self.out / PREEMPTED).unlink(missing_ok=True)
            dump_yaml(cfg, self.out / "config.yaml")
        self.log = RunLogger(self.out, self.rank0, cfg.train.tensorboard)
        self.log.info(f"layout: {self.layout.describe()}")
        torch.manual_seed(cfg.train.seed)
        self.gpt: VQMoEGPTModel = build_model(
            cfg.model,
            cfg.moe,
            cfg.parallel,
            seed=cfg.train.seed,
            recompute=cfg.train.recompute_activations,
        )
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.train_loader = self._train_loader()
        self.checkpoints = CheckpointManager(self.out, cfg.train.keep_last)
        resume, note = self.checkpoints.resume_point(cfg.train.resume_fallback)
        if resume is None and any(
            bool(layer.router.quantizer.needs_data_init) for layer in self.gpt.vq_layers()
        ):
            batch = next(iter(self._train_loader()))["tokens"]
            count = initialize_codebooks(self.gpt, batch, cfg.train.seed)
            self.log.info(f"k-means initialised {count} codebooks from the first batch")
        self.module = LanguageModel(self.gpt, self.manifest.pad_id)
        self.engine = initialize_engine(self.module, self.gpt, cfg.train, cfg.data.micro_batch_size)
        self.device = self.engine.device
        self.state = TrainerState(
            signature=model_signature(cfg),
            layout=current_layout(),
            data_fingerprint=(
                blend_fingerprint(self.sources) if self.sources else self.manifest.fingerprint
            ),
            tokenizer=tokenizer_record(
                self.manifest.tokenizer_sha256, self.manifest.tokenizer_model
            ),
        )
        if resume is not None:
            self._resume(resume, note)
        self.tokens_per_step = (
            cfg.data.micro_batch_size
            * cfg.model.seq_length
            * cfg.train.gradient_accumulation_steps
            * self.dp_size
        )
        self.flops_per_step = (
            flops_per_token(cfg.model, cfg.moe, cfg.model.seq_length) * self.tokens_per_step
        )
        self.peak = cfg.train.peak_tflops or device_peak_tflops(cfg.train.precision)
        self.stop = StopRequest()
        self._batches: Optional[Iterator[dict]] = None

    # ------------------------------------------------------------------ set-up helpers
    def _train_loader(self) -> Union[TokenShardLoader, BlendedLoader]:
        """The endless training stream: of ``data.data_dir``, or the blend of ``data.sources``."""
        if not self.sources:
            return self._loader(self.manifest, "train")
        data = self.cfg.data
        return BlendedLoader(
            self.sources,
            micro_batch_size=data.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            num_workers=data.num_workers,
            seed=data.seed,
            verify_checksums=data.verify_checksums,
        )

    def _loader(self, manifest: Manifest, split: str) -> TokenShardLoader:
        data = self.cfg.data
        return TokenShardLoader(
            manifest,
            split,
            micro_batch_size=data.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            num_workers=data.num_workers if split == "train" else 0,
            seed=data.seed,
            verify_checksums=data.verify_checksums,
        )

    def _resume(self, path: Path, note: Optional[str] = None) -> None:
        if note:
            self.log.warning(note)
        tokenizer = self.state.tokenizer
        self.state, loader_state = self.checkpoints.load(path, self.gpt, self.engine, self.cfg)
        if check_tokenizer(
            self.state.tokenizer,
            tokenizer,
            path,
            self.cfg.train.allow_tokenizer_change,
            f"Shard the data with {self.state.tokenizer.get('model')}, or set "
            f"{ALLOW_TOKENIZER_CHANGE} to go on with the new tokenizer anyway",
        ):
            self.log.warning(
                f"train.allow_tokenizer_change=true: continuing {path} (tokenizer sha256 "
                f"{self.state.tokenizer['sha256']}) with tokenizer sha256 {tokenizer['sha256']}"
            )
        self.state.tokenizer = tokenizer
        self.state.layout = current_layout()
        if self.cfg.train.reset_dataloader:
            self.log.warning("train.reset_dataloader=true: the data stream starts afresh")
        elif loader_state is None:
            self.log.warning(
                f"resumed {path} at another parallel layout: the per-rank data positions do not "
                "carry over, so the data stream starts afresh (samples may repeat)"
            )
        else:
            try:
                self.train_loader.load_state_dict(loader_state)
            except DataError as exc:
                raise DataError(
                    f"{exc}. To continue training on other data set train.reset_dataloader=true"
                ) from exc
        self.log.info(f"resumed from {path} at step {self.state.step}")

    # ------------------------------------------------------------------ one step
    def _train_step(self, batches: Iterator[dict], step: int) -> tuple[float, float, bool]:
        """Run one optimizer step; returns (NLL sum, target count, non-finite?) on this rank.

        The sums stay on the device until the step ends: one host sync per step, not per
        micro-batch."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        skipped_before = self.engine.skipped_steps
        for _ in range(self.cfg.train.gradient_accumulation_steps):
            tokens = next(batches)["tokens"].to(self.device)
            loss, nll, count = self.engine(tokens)
            if step in self.cfg.train.inject_nonfinite_steps:
                loss = loss * float("nan")
                nll = nll * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            totals[0] += nll
            totals[1] += count
        nll_total, count_total = totals.tolist()
        return nll_total, count_total, self.step_is_nonfinite(skipped_before, nll_total)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[Optional[str], dict[str, float]]:
        """Loss, perplexity and bits per byte on each valid split (all ranks): keyed by source
        name for ``data.sources``, by None for ``data.data_dir``; splits without samples are
        left out."""
        results = {}
        for name, manifest in self.eval_sets:
            split = manifest.splits.get("valid")
            if split is not None and split.samples > 0:
                results[name] = self._evaluate_split(manifest, split)
        return results

    def _evaluate_split(self, manifest: Manifest, split: SplitInfo) -> dict[str, float]:
        filler = filler_batch(manifest.pad_id, self.cfg.model.seq_length)
        self.engine.eval()
        metrics.set_enabled(False)
        try:
            nll, count = sum_nll(
                self.engine,
                self._loader(manifest, "valid"),
                self.device,
                filler,
                self.cfg.train.eval_batches,
            )
        finally:
            metrics.set_enabled(True)
            self.engine.train()
        nll, count = all_reduce_sum(
            [nll, count], self.device, parallel_state.get_data_parallel_group()
        )
        return lm_metrics(nll, count, count * split.bytes / max(split.tokens, 1))

    # ------------------------------------------------------------------ logging
    def _routing_summary(self, steps: int) -> dict[str, float]:
        """Flatten per-layer routing metrics and megatron's aux losses for logging."""
        values: dict[str, float] = {}
        warn = self.cfg.train
        for layer, stats in metrics.summarize().items():
            for name, value in stats.items():
                values[f"layer{layer}/{name}"] = value
            codes = self.cfg.moe.num_codes or self.cfg.moe.num_experts
            if stats.get("dead_codes", 0) >= warn.dead_code_warn_fraction * codes:
                self.log.warning(f"layer {layer}: {int(stats['dead_codes'])}/{codes} codes unused")
            if stats.get("imbalance", 0) >= warn.imbalance_warn_ratio:
                self.log.warning(f"layer {layer}: expert imbalance {stats['imbalance']:.2f}x mean")
        reduce_aux_losses_tracker_across_ranks()
        micro_steps = steps * self.cfg.train.gradient_accumulation_steps
        for name, entry in get_moe_layer_wise_logging_tracker().items():
            for layer, value in enumerate(entry["values"].tolist(), start=1):
                if value:
                    values[f"layer{layer}/{name}"] = value / micro_steps
        clear_aux_losses_tracker()
        return values

    def _log(self, step: int, window: dict, start_time: float, start_step: int) -> None:
        nll, count = all_reduce_sum(
            [window["nll"], window["count"]], self.device, parallel_state.get_data_parallel_group()
        )
        elapsed = window["time"]
        steps = window["steps"]
        tflops = self.flops_per_step * steps / max(elapsed, 1e-9) / self.layout.world_size / 1e12
        values: dict[str, Any] = {
            "loss": nll / max(count, 1.0),
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": self.tokens_per_step * steps / max(elapsed, 1e-9),
            "tflops_per_device": tflops,
            "step_time_s": elapsed / max(steps, 1),
            "skipped_steps": self.state.skipped_steps,
        }
        if self.peak:
            values["mfu"] = tflops / self.peak
        routing = self._routing_summary(steps)
        headline = {
            k: values[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device")
        }
        self.log.info(
            progress_line(
                step, self.cfg.train.steps, headline, time.time() - start_time, step - start_step
            )
        )
        self.log.scalars(step, {**values, **routing})

    def _log_eval(self, step: int, results: dict[Optional[str], dict[str, float]]) -> None:
        """One line per evaluated split; the scalars as ``loss``, ``bpb``, ... for
        ``data.data_dir`` and ``<source>/loss``, ``<source>/bpb``, ... for ``data.sources``."""
        values = {}
        for name, result in results.items():
            self.log.info(
                f"eval step {step}{'' if name is None else f' {name}'} | loss "
                f"{result['loss']:.4f} | ppl {result['ppl']:.2f} | bpb {result['bpb']:.4f}"
            )
            values.update(result if name is None else {f"{name}/{k}": v for k, v in result.items()})
        if values:
            self.log.scalars(step, values, kind="eval")

    # ------------------------------------------------------------------ the loop
    def save(self) -> Path:
        """Checkpoint the current step (collective)."""
        path = self.checkpoints.save(
            self.gpt, self.engine, self.state, self.cfg, self.train_loader.state_dict()
        )
        self.log.info(f"saved checkpoint {path}")
        return path

    def run(self) -> int:
        """Train to ``train.steps``; returns the process exit code (0 also when preempted)."""
        train = self.cfg.train
        self._batches = batches = iter(self.train_loader)
        start_step = self.state.step
        start_time = time.time()
        window = {"nll": 0.0, "count": 0.0, "time": 0.0, "steps": 0}
        self.log.info(
            f"training steps {start_step + 1}..{train.steps}: {self.tokens_per_step} tokens/step"
        )
        for step in range(start_step + 1, train.steps + 1):
            began = time.perf_counter()
            self.gpt.begin_step(step, train.seed)
            nll, count, nonfinite = self._train_step(batches, step)
            self.state.step = step
            self.state.consumed_samples += self.tokens_per_step // self.cfg.model.seq_length
            self.state.consumed_tokens += self.tokens_per_step
            maintain_codebooks(self.gpt, self.engine, step, train.seed, self.log, not nonfinite)
            self.count_nonfinite(
                step, nonfinite, "lower train.lr or raise train.warmup_steps / train.grad_clip"
            )
            if not nonfinite:
                window["nll"] += nll
                window["count"] += count
            window["time"] += time.perf_counter() - began
            window["steps"] += 1
            if step % train.log_interval == 0 or step == train.steps:
                self._log(step, window, start_time, start_step)
                window = {"nll": 0.0, "count": 0.0, "time": 0.0, "steps": 0}
            if train.eval_interval and (step % train.eval_interval == 0 or step == train.steps):
                self._log_eval(step, self.evaluate())
            if self.end_step(step):
                return 0
        self.save()
        self.mark_complete("training complete")
        return 0

    def close(self) -> None:
        """Stop the loader workers, release files and process groups."""
        if self._batches is not None:
            self._batches.close()  # shuts the DataLoader workers down (they ignore SIGTERM)
            self._batches = None
        self.log.close()
        destroy_distributed()
