"""``vqmoe-convert reshard``: a checkpoint trained at EP = 2 continues at EP = 1 and the reverse
with the same next-step loss, and a tensor-parallel layout computes the same logits."""

from __future__ import annotations

import pytest
import yaml
from convert_helpers import conversion_record, convert, run_of, shards
from pretrain_helpers import losses, pretrain

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resharded_checkpoint_resumes_with_the_same_next_step_loss(
    tmp_path_factory, tmp_path, before, after
):
    data = shards(tmp_path_factory)
    reference = tmp_path / "reference"
    extra = ("train.save_interval=4", "train.keep_last=2")
    pretrain(
        data,
        reference,
        "train.steps=5",
        f"parallel.expert_parallel={before}",
        *extra,
        nproc=2,
        launcher="torchrun",
    )
    out = tmp_path / "resharded"
    step4 = reference / "checkpoints" / "step_00000004"
    convert("reshard", step4, "--expert-parallel", after, "--output", out, nproc=2)
    record = conversion_record(out)
    assert record["layout"]["expert_parallel"] == after
    assert record["verified"]["max_abs_logit_diff"] <= 1e-5
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["parallel"]["expert_parallel"] == after
    assert config["train"]["output_dir"] == str(out)
    proc = pretrain(
        data,
        out,
        "train.steps=5",
        f"parallel.expert_parallel={after}",
        nproc=2,
        launcher="torchrun",
    )
    assert "at step 4" in proc.stdout
    resumed, uninterrupted = losses(out)[5][0], losses(reference)[5][0]
    assert resumed == pytest.approx(uninterrupted, rel=1e-5, abs=1e-6)


def test_reshard_checks_a_tensor_parallel_layout_without_writing(tmp_path_factory, tmp_path):
    run = run_of(tmp_path_factory, "ep2_zero2")
    proc = convert("reshard", run, "--tensor-parallel", "2", nproc=2)
    assert "checked only" in proc.stdout
    diff = float(proc.stdout.split("max |logit difference| ")[1].split()[0])
    assert diff <= 1e-5
    assert list(tmp_path.iterdir()) == []
