"""Worker: a third kind of training run that only a Task subclass defines, driven by the one
training loop: classify random token sequences by the parity of their first token with a
classification head on a freshly initialised VQMoE GPT (one process, CPU, gloo)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch

from vqmoe_megatron.checkpoint.training import TrainerState, tokenizer_record
from vqmoe_megatron.config import ModelConfig, MoEConfig, PretrainConfig, TrainConfig
from vqmoe_megatron.finetune.classifier import SequenceClassifier, task_loss
from vqmoe_megatron.model import build_model
from vqmoe_megatron.training.run_logger import RunLogger
from vqmoe_megatron.training.task import Task, TaskModel
from vqmoe_megatron.training.trainer import Trainer

VOCAB, LENGTH, EXAMPLES = 64, 16, 64


class FirstTokenParity(Task):
    """Label = parity of the first token id; batches are a fixed function of the step."""

    headline = ("loss", "accuracy", "lr")

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.micro_batch_size = 4
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (EXAMPLES, LENGTH), generator=generator)
        self.labels = self.ids[:, 0] % 2

    def place(self, rank: int, dp_rank: int, dp_size: int) -> None:
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def build_model(self, fresh: bool, log: RunLogger) -> TaskModel:
        cfg = self.cfg
        gpt = build_model(cfg.model, cfg.moe, cfg.parallel, seed=cfg.train.seed)
        self.model = SequenceClassifier(gpt, 2, "last", 0.0, cfg.train.seed)
        return TaskModel(gpt=gpt, module=self.model, checkpointed=self.model)

    def tokenizer(self) -> dict:
        return tokenizer_record("0" * 64, "token ids")

    def data_fingerprint(self) -> str:
        return f"parity {VOCAB} {LENGTH} {EXAMPLES}"

    def resume(
        self, path: Path, state: TrainerState, loader_state: Optional[dict], log: RunLogger
    ) -> None:
        """Nothing to restore: the batches are a function of the step."""

    def micro_batches(self, step: int) -> Iterable[torch.Tensor]:
        per_step = self.micro_batch_size * self.dp_size * self.cfg.train.gradient_accumulation_steps
        for k in range(self.cfg.train.gradient_accumulation_steps):
            start = step * per_step + (k * self.dp_size + self.dp_rank) * self.micro_batch_size
            yield torch.arange(start, start + self.micro_batch_size) % EXAMPLES

    def _logits(self, engine: Any, rows: torch.Tensor) -> torch.Tensor:
        ids = self.ids[rows].to(engine.device)
        return engine(ids, torch.full((len(rows),), LENGTH, device=engine.device))

    def forward(self, engine: Any, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(engine, batch)
        labels = self.labels[batch].to(engine.device)
        loss = task_loss(logits, labels, regression=False)
        correct = (logits.argmax(dim=-1) == labels).sum()
        count = torch.tensor(float(len(batch)), device=engine.device)
        return loss, torch.stack([loss.detach() * len(batch), correct, count]).double()

    def advance(self, state: TrainerState) -> None:
        state.consumed_samples += self.micro_batch_size * self.dp_size

    def train_metrics(self, sums: list[float], steps: int, seconds: float, step: int) -> dict:
        loss_sum, correct, count = sums
        return {"loss": loss_sum / max(count, 1.0), "accuracy": correct / max(count, 1.0)}

    def evaluation_due(self, step: int) -> bool:
        return step == self.cfg.train.steps

    @torch.no_grad()
    def evaluate(self, engine: Any, step: int, log: RunLogger) -> dict[str, float]:
        engine.eval()
        try:
            logits = self._logits(engine, torch.arange(EXAMPLES))
        finally:
            engine.train()
        accuracy = (logits.argmax(dim=-1).cpu() == self.labels).double().mean().item()
        log.info(f"eval step {step} | accuracy {accuracy:.4f}")
        return {"accuracy": accuracy}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    cfg = PretrainConfig(
        model=ModelConfig(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            ffn_hidden_size=64,
            vocab_size=VOCAB,
            seq_length=LENGTH,
        ),
        moe=MoEConfig(num_experts=4, expert_ffn_hidden_size=32),
        train=TrainConfig(
            output_dir=args.out, steps=args.steps, lr=1e-3, log_interval=1, save_interval=3,
            tensorboard=False,
        ),
    )  # fmt: skip
    trainer = Trainer(FirstTokenParity(cfg))
    try:
        return trainer.run()
    finally:
        trainer.close()


if __name__ == "__main__":
    sys.exit(main())
