"""Tiny pretraining runs of the real CLI with every baseline router (CPU, one process).

Each router trains a few steps, logs its per-layer routing diagnostics every log step and writes
a checkpoint; the presets write what they mean into
config.yaml; StableMoE's stage switch (after ``moe.stablemoe_stage1_steps``) falls between a
stop and its resume, and the resumed run repeats the uninterrupted one's losses exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from data_helpers import tiny_shards
from pretrain_helpers import losses, pretrain, records, resumed_like_uninterrupted

from vqmoe_megatron.checkpoint.training import find_latest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory, "routers", shard_size_mb=0.05)


@pytest.mark.parametrize(
    "router,expected",
    [
        ("xmoe", {"router": "xmoe", "num_experts": 4}),
        ("hash", {"router": "hash"}),
        ("smoe_dropout", {"router": "smoe_dropout"}),
        ("dense", {"router": "dense", "num_experts": 0}),
        ("vq_only", {"router": "vqmoe", "routing_mode": "discrete"}),
    ],
)
def test_tiny_run_per_router(shards, tmp_path, router, expected):
    out = tmp_path / "run"
    pretrain(
        shards,
        out,
        "train.steps=3",
        "moe.topk=2",
        f"moe.router={router}",
        "moe.smoe_dropout_ramp_steps=2",
    )
    assert all(math.isfinite(loss) for loss, _ in losses(out).values())
    assert len(losses(out)) == 3
    assert find_latest(out / "checkpoints").name == "step_00000003"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    for key, value in expected.items():
        assert saved["moe"][key] == value, key
    if router == "dense":
        assert saved["model"]["ffn_hidden_size"] == 2 * saved["moe"]["expert_ffn_hidden_size"]
        return
    for record in records(out):  # every log step: each MoE layer's routing diagnostics
        for layer in (1, 2):
            assert record[f"layer{layer}/tokens"] > 0
            assert sum(record[f"layer{layer}/expert_load"]) == pytest.approx(1.0)
            assert record[f"layer{layer}/imbalance"] >= 1.0
            assert 0 <= record[f"layer{layer}/dead_experts"] < saved["moe"]["num_experts"]
            # a router entropy needs router scores: not the hash table, not VQ routing alone
            scored = router not in ("hash", "vq_only")
            assert (f"layer{layer}/router_entropy" in record) == scored


def test_stablemoe_stage_switch_survives_resume(shards, tmp_path):
    """Stage 1 for steps 1-2, stage 2 from step 3; stopping after step 2 and resuming gives the
    uninterrupted run's losses (a step counter that restarted would route steps 3-4 in stage 1)."""
    extra = ("moe.router=stablemoe", "moe.stablemoe_stage1_steps=2")
    resumed_like_uninterrupted(shards, tmp_path, 4, 2, *extra)


def test_vqmoe_discrete_phase_and_gate_loss_survive_resume(shards, tmp_path):
    """VQMoE with all three options of METHOD.md section 8: router alignment, the gate loss from
    step 2, and the discrete phase from step 3. Steps 1-2 route both paths (2 rows per token),
    steps 3-4 the nearest code only (1 row); stopping after step 2 and resuming gives the
    uninterrupted run's losses and the same switch."""
    extra = (
        "moe.router=vqmoe",
        "moe.router_alignment_coeff=0.1",
        "moe.gate_discrete_coeff=0.5",
        "moe.gate_discrete_start=2",
        "moe.discrete_phase_start=3",
    )
    resumed_like_uninterrupted(shards, tmp_path, 4, 2, *extra)
    rows = {r["step"]: r["layer1/rows_per_token"] for r in records(tmp_path / "b")}
    assert rows == {1: 2.0, 2: 2.0, 3: 1.0, 4: 1.0}
