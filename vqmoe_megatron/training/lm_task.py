"""Language-model pretraining as a ``Task`` of the training loop: token shards in, next-token
loss out.

The data is ``data.data_dir`` (one shard directory) or ``data.sources`` (a weighted blend of
shard directories, each one's valid split evaluated on its own). A fresh run with
``moe.codebook_init=kmeans`` initialises the codebooks by k-means over its first batch. Train
scalars: ``loss``, ``tokens_per_s``, ``tflops_per_device`` (and ``mfu`` when the device peak is
known); eval scalars: ``loss``, ``ppl``, ``bpb`` per valid split (``<source>/<name>`` for
``data.sources``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
from megatron.core import parallel_state

from vqmoe_megatron.checkpoint.training import TrainerState, tokenizer_record
from vqmoe_megatron.config import ConfigError, DataConfig, DataSource, PretrainConfig
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
from vqmoe_megatron.distributed import launcher_world_size
from vqmoe_megatron.model import build_model
from vqmoe_megatron.moe import metrics
from vqmoe_megatron.training.codebook import initialize_codebooks
from vqmoe_megatron.training.evaluation import all_reduce_sum, filler_batch, lm_metrics, sum_nll
from vqmoe_megatron.training.flops import device_peak_tflops, flops_per_token
from vqmoe_megatron.training.language_model import LanguageModel
from vqmoe_megatron.training.run_logger import RunLogger
from vqmoe_megatron.training.task import Task, TaskModel


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


class LanguageModelTask(Task):
    """Pretraining of a VQMoE GPT on token shards (``PretrainConfig``)."""

    nonfinite_remedy = "lower train.lr or raise train.warmup_steps / train.grad_clip"
    headline = ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device")

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
        self.cfg = cfg
        self.micro_batch_size = cfg.data.micro_batch_size
        self._batches: Optional[Iterator[dict]] = None

    def place(self, rank: int, dp_rank: int, dp_size: int) -> None:
        cfg = self.cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.train_loader = self._train_loader()
        self.tokens_per_step = (
            cfg.data.micro_batch_size
            * cfg.model.seq_length
            * cfg.train.gradient_accumulation_steps
            * dp_size
        )
        self.flops_per_step = (
            flops_per_token(cfg.model, cfg.moe, cfg.model.seq_length) * self.tokens_per_step
        )
        self.peak = cfg.train.peak_tflops or device_peak_tflops(cfg.train.precision)
        self.world_size = parallel_state.get_tensor_model_parallel_world_size() * dp_size

    def describe(self) -> Optional[str]:
        return f"{self.tokens_per_step} tokens/step"

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

    def build_model(self, fresh: bool, log: RunLogger) -> TaskModel:
        cfg = self.cfg
        gpt = build_model(
            cfg.model,
            cfg.moe,
            cfg.parallel,
            seed=cfg.train.seed,
            recompute=cfg.train.recompute_activations,
        )
        if fresh and any(bool(layer.router.quantizer.needs_data_init) for layer in gpt.vq_layers()):
            batch = next(iter(self._train_loader()))["tokens"]
            count = initialize_codebooks(gpt, batch, cfg.train.seed)
            log.info(f"k-means initialised {count} codebooks from the first batch")
        return TaskModel(gpt=gpt, module=LanguageModel(gpt, self.manifest.pad_id), checkpointed=gpt)

    def tokenizer(self) -> dict:
        return tokenizer_record(self.manifest.tokenizer_sha256, self.manifest.tokenizer_model)

    def data_fingerprint(self) -> str:
        return blend_fingerprint(self.sources) if self.sources else self.manifest.fingerprint

    def tokenizer_remedy(self, recorded: dict) -> str:
        return f"Shard the data with {recorded.get('model')}"

    def resume(
        self, path: Path, state: TrainerState, loader_state: Optional[dict], log: RunLogger
    ) -> None:
        if self.cfg.train.reset_dataloader:
            log.warning("train.reset_dataloader=true: the data stream starts afresh")
        elif loader_state is None:
            log.warning(
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

    # ------------------------------------------------------------------ one step
    def micro_batches(self, step: int) -> Iterable[dict]:
        if self._batches is None:
            self._batches = iter(self.train_loader)
        for _ in range(self.cfg.train.gradient_accumulation_steps):
            yield next(self._batches)

    def forward(self, engine: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums: [NLL sum, target tokens]."""
        loss, nll, count = engine(batch["tokens"].to(engine.device))
        return loss, torch.stack([nll.double(), count.double()])

    def advance(self, state: TrainerState) -> None:
        state.consumed_samples += self.tokens_per_step // self.cfg.model.seq_length
        state.consumed_tokens += self.tokens_per_step

    def train_metrics(self, sums: list[float], steps: int, seconds: float, step: int) -> dict:
        nll, count = sums
        elapsed = max(seconds, 1e-9)
        tflops = self.flops_per_step * steps / elapsed / self.world_size / 1e12
        values = {
            "loss": nll / max(count, 1.0),
            "tokens_per_s": self.tokens_per_step * steps / elapsed,
            "tflops_per_device": tflops,
        }
        if self.peak:
            values["mfu"] = tflops / self.peak
        return values

    def loader_state(self) -> dict:
        return self.train_loader.state_dict()

    # ------------------------------------------------------------------ evaluation
    def evaluation_due(self, step: int) -> bool:
        train = self.cfg.train
        return bool(train.eval_interval) and (
            step % train.eval_interval == 0 or step == train.steps
        )

    def evaluate(self, engine: Any, step: int, log: RunLogger) -> dict[str, float]:
        """Loss, perplexity and bits per byte on each valid split with samples: one line each;
        the scalars as ``loss``, ``bpb``, ... for ``data.data_dir`` and ``<source>/loss``,
        ``<source>/bpb``, ... for ``data.sources``."""
        values = {}
        for name, manifest in self.eval_sets:
            split = manifest.splits.get("valid")
            if split is None or split.samples == 0:
                continue
            result = self._evaluate_split(engine, manifest, split)
            log.info(
                f"eval step {step}{'' if name is None else f' {name}'} | loss "
                f"{result['loss']:.4f} | ppl {result['ppl']:.2f} | bpb {result['bpb']:.4f}"
            )
            values.update(result if name is None else {f"{name}/{k}": v for k, v in result.items()})
        return values

    @torch.no_grad()
    def _evaluate_split(self, engine: Any, manifest: Manifest, split: SplitInfo) -> dict:
        filler = filler_batch(manifest.pad_id, self.cfg.model.seq_length)
        engine.eval()
        try:
            with metrics.paused(engine):
                nll, count = sum_nll(
                    engine,
                    self._loader(manifest, "valid"),
                    engine.device,
                    filler,
                    self.cfg.train.eval_batches,
                )
        finally:
            engine.train()
        nll, count = all_reduce_sum(
            [nll, count], engine.device, parallel_state.get_data_parallel_group()
        )
        return lm_metrics(nll, count, count * split.bytes / max(split.tokens, 1))

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()  # shuts the DataLoader workers down (they ignore SIGTERM)
            self._batches = None
