"""DeepSpeed ZeRO with megatron expert parallelism: EP = 2 against EP = 1 on the same data.

Both layouts run on 2 gloo ranks with the same per-rank batches and the same (layout-free)
initial weights. The gradients DeepSpeed hands to the optimizer must agree for dense AND expert
parameters (DeepSpeed issue #5618 was expert gradients scaled by the EP size), and so must the
parameters after one step, also when gradient clipping is active (the global norm must count
every expert once). At EP = 2 the ranks hold different experts and identical dense weights.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _assert_same_step(result: dict, reference: dict) -> None:
    assert sorted(result["grads"]) == sorted(reference["grads"])
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    for name, param in reference["params"].items():
        torch.testing.assert_close(result["params"][name], param, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("zero,clip", [(2, 1e9), (1, 1e9), (2, 0.05)])
def test_ep2_gradients_and_update_match_ep1(tmp_path, zero, clip):
    for ep in (1, 2):
        torchrun(
            "deepspeed_expert_parallel.py",
            2,
            "--out",
            str(tmp_path),
            "--ep",
            str(ep),
            "--zero",
            str(zero),
            "--clip",
            str(clip),
        )
    ep1 = torch.load(tmp_path / "tp1_ep1.pt", weights_only=False)
    ep2 = torch.load(tmp_path / "tp1_ep2.pt", weights_only=False)
    torch.testing.assert_close(ep2["losses"], ep1["losses"], rtol=1e-5, atol=1e-6)
    _assert_same_step(ep2, ep1)
    views = ep2["views"]
    assert not torch.equal(views[0]["expert"], views[1]["expert"]), "EP ranks hold other experts"
    assert torch.equal(views[0]["dense"], views[1]["dense"]), "dense weights stay in sync"
    views1 = ep1["views"]
    assert torch.equal(views1[0]["expert"], views1[1]["expert"]), "EP=1: experts are replicas"


def test_tensor_parallel_under_deepspeed_matches_one_process(tmp_path):
    """TP = 2 + SP under ZeRO-2 (sequence-parallel gradients summed by the TP hooks) takes the
    same step as one process; gradient clipping is active so the TP-aware norm matters."""
    torchrun(
        "deepspeed_expert_parallel.py", 2, "--out", str(tmp_path), "--tp", "2", "--clip", "0.05"
    )
    torchrun(
        "deepspeed_expert_parallel.py", 1, "--out", str(tmp_path), "--tp", "1", "--clip", "0.05"
    )
    tp2 = torch.load(tmp_path / "tp2_ep1.pt", weights_only=False)
    tp1 = torch.load(tmp_path / "tp1_ep1.pt", weights_only=False)
    torch.testing.assert_close(tp2["losses"], tp1["losses"].expand(2), rtol=1e-5, atol=1e-6)
    _assert_same_step(tp2, tp1)
