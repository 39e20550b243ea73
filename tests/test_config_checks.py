"""Setting ranges and layout constraints, checked before any process group or model exists:
the same checks in ``--dry-run`` and in a real run, one ``error:`` line naming the setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import child_env

from vqmoe_megatron.config import ConfigError, FinetuneConfig, PretrainConfig, load_config
from vqmoe_megatron.config_checks import check_settings

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "pretrain" / "configs" / "tiny.yaml"
SCRIPT = ROOT / "pretrain" / "pretrain_vqmoe.py"


@pytest.mark.parametrize("name, world", [("tiny", 1), ("tiny", 4), ("base", 8), ("large", 32)])
def test_shipped_configs_pass(name: str, world: int):
    cfg = load_config(PretrainConfig, ROOT / "pretrain" / "configs" / f"{name}.yaml")
    check_settings(cfg, world)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["train.lr=-1"], 1, r"train\.lr=-1\.0 is out of range: use a value > 0 \(e\.g\. 0\.00035\)"),
        (["train.lr=.nan"], 1, r"train\.lr=nan is out of range"),
        (["data.micro_batch_size=0"], 1, r"data\.micro_batch_size=0 .* >= 1 \(e\.g\. 8\)"),
        (["model.hidden_dropout=1"], 1, r"model\.hidden_dropout=1\.0 .* in \[0, 1\)"),
        (["moe.ema_decay=1"], 1, r"moe\.ema_decay=1\.0 .* in \(0, 1\)"),
        (["train.zero_stage=3"], 1, r"train\.zero_stage=3 .* in \[1, 2\]"),
        (["train.min_lr=1"], 1, r"train\.min_lr=1 is above train\.lr=0\.003"),
        (["moe.topk=5"], 1, r"moe\.topk=5 exceeds moe\.num_experts=4: use moe\.topk between 1 and 4"),
        (["moe.pre_softmax=false"], 1, r"moe\.pre_softmax=false with moe\.topk=1"),
        (["model.num_attention_heads=3"], 1, r"model\.hidden_size=64 is not divisible by model\.num_attention_heads=3"),
        (["model.num_query_groups=3"], 1, r"model\.num_query_groups=3 does not divide .*: use one of 1, 2"),
        (["model.num_attention_heads=64"], 1, r"rotary embeddings need an even head size"),
        (["moe.num_experts=3", "parallel.expert_parallel=2"], 2, r"moe\.num_experts=3 is not divisible by parallel\.expert_parallel=2: use moe\.num_experts a multiple of 2 \(e\.g\. 4\) or parallel\.expert_parallel one of 1, 3"),
        (["parallel.expert_parallel=2"], 3, r"world size 3 is not divisible by parallel\.tensor_parallel=1 x parallel\.expert_parallel=2"),
        (["parallel.tensor_parallel=2", "model.ffn_hidden_size=129"], 2, r"model\.ffn_hidden_size=129 is not divisible by parallel\.tensor_parallel=2"),
        (["parallel.tensor_parallel=8"], 8, r"model\.num_attention_heads=4 is not divisible by parallel\.tensor_parallel=8"),
        (["parallel.tensor_parallel=2", "moe.expert_ffn_hidden_size=127"], 2, r"moe\.expert_ffn_hidden_size=127 is not divisible"),
        (["parallel.tensor_parallel=2", "parallel.sequence_parallel=false"], 2, r"parallel\.sequence_parallel=false with parallel\.tensor_parallel=2"),
        (["parallel.tensor_parallel=2", "model.seq_length=63"], 2, r"model\.seq_length=63 is not divisible by parallel\.tensor_parallel=2: .*\(sequence parallelism splits the sequence\)"),
        (["parallel.tensor_parallel=3", "model.num_attention_heads=6", "model.hidden_size=96", "model.ffn_hidden_size=96", "moe.expert_ffn_hidden_size=96", "model.seq_length=63", "model.vocab_size=400"], 3, r"padded vocabulary 512 is not divisible by tensor_parallel=3 \(model\.vocab_size 400\): use"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_setting_and_a_valid_value(overrides, world, message):
    cfg = load_config(PretrainConfig, TINY, overrides)
    with pytest.raises(ConfigError, match=message):
        check_settings(cfg, world)


def test_deepspeed_json_batch_is_checked_against_the_data_parallel_size(tmp_path: Path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_batch_size": 16}')
    cfg = load_config(PretrainConfig, TINY, [f"train.deepspeed_config={ds}"])
    check_settings(cfg, 2)  # 8 per rank x 2 ranks
    with pytest.raises(ConfigError, match=r"ds\.json sets train_batch_size=16"):
        check_settings(cfg, 4)


def test_fine_tuning_settings_are_checked_too():
    cfg = load_config(FinetuneConfig, None, ["finetune.warmup_fraction=1", "model.vocab_size=400"])
    with pytest.raises(ConfigError, match=r"finetune\.warmup_fraction=1\.0 .* in \[0, 1\)"):
        check_settings(cfg, 1)
    cfg = load_config(FinetuneConfig, None, ["moe.num_experts=16", "parallel.expert_parallel=3"])
    with pytest.raises(ConfigError, match=r"moe\.num_experts=16 is not divisible"):
        check_settings(cfg, 3)


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(TINY), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=child_env(env),
    )


@pytest.mark.slow  # three CLI start-ups with torch imports (~13 s each on a busy 2-core box)
def test_dry_run_and_every_rank_of_a_real_run_refuse_before_starting(tmp_path: Path):
    bad = ["moe.num_experts=3", "parallel.expert_parallel=2"]
    dry = _run("--dry-run", "--world-size", "2", "model.vocab_size=400", *bad, env={})
    assert dry.returncode == 2 and dry.stdout == ""
    [line] = dry.stderr.splitlines()
    assert line.startswith("error: moe.num_experts=3 is not divisible by parallel.expert_parallel")
    out = tmp_path / "run"
    for rank in ("0", "1"):  # as torchrun starts them; no peer is needed to fail
        run = _run(
            f"data.data_dir={tmp_path / 'unused'}",
            f"train.output_dir={out}",
            *bad,
            env={"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank},
        )
        assert run.returncode == 2, run.stderr
        assert run.stderr.splitlines() == ([line] if rank == "0" else []), run.stderr
    assert not out.exists()
