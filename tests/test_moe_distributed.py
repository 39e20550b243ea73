"""Expert and tensor parallelism with real processes (2 gloo ranks) against one process.

EP = 2 vs EP = 1: every rank's outputs and input gradients equal an EP = 1 run on the same
tokens; dense gradients equal per rank; each expert's gradient on its owner rank equals the sum
of the EP = 1 gradients of that expert over both ranks' tokens (the all-to-all brings them).
Both megatron dispatchers (all-to-all and all-gather) and both routing modes are covered.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import torchrun
from moe_helpers import (
    ROUTER_EP_CASES,
    baseline_settings,
    build_moe_layer,
    init_single_process,
    moe_variant,
)

from vqmoe_megatron.parallel_tensors import gather_full_tensors, global_tensors

TOL = dict(rtol=1e-6, atol=1e-8)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_single_process()


def _reference(moe, x, proj, ids=None, step=1):
    layer = build_moe_layer(moe).double().train()
    layer.begin_step(step, seed=0)
    if hasattr(layer.router, "set_token_ids"):
        layer.router.set_token_ids(ids)
    xr = x.clone().requires_grad_(True)
    y, _ = layer(xr)
    (y * proj).sum().backward()
    grads = {}
    for name, param in layer.named_parameters():
        if param.grad is not None:
            grads.update(global_tensors(name, param.grad, layer.num_local_experts, ep_rank=0))
    return y.detach(), xr.grad, grads


@pytest.mark.parametrize(
    "dispatcher,mode,expert_input,backend",
    [
        ("alltoall", "pretrain", "paper", "grouped"),
        ("allgather", "pretrain", "paper", "grouped"),
        ("alltoall", "pretrain", "token", "grouped"),
        ("alltoall", "discrete", "paper", "grouped"),
        ("alltoall", "pretrain", "paper", "sequential"),
    ],
)
def test_expert_parallel_matches_single_process(tmp_path, dispatcher, mode, expert_input, backend):
    torchrun(
        "moe_layer_parallel.py",
        2,
        "--out",
        str(tmp_path),
        "--dispatcher",
        dispatcher,
        "--mode",
        mode,
        "--expert-input",
        expert_input,
        "--expert-backend",
        backend,
    )
    moe = moe_variant(
        token_dispatcher=dispatcher,
        routing_mode=mode,
        expert_input=expert_input,
        topk=2,
        expert_backend=backend,
    )
    _check_against_single_process(tmp_path, moe)


def _check_against_single_process(tmp_path, moe, step: int = 1) -> None:
    """Both ranks' saved results against EP = 1 runs of ``moe`` on the same tokens."""
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expert_sum: dict[str, torch.Tensor] = {}
    for result in ranks:
        y, x_grad, grads = _reference(moe, result["x"], result["proj"], result["ids"], step)
        torch.testing.assert_close(result["y"], y, **TOL)
        torch.testing.assert_close(result["x_grad"], x_grad, **TOL)
        for name, grad in result["dense"].items():
            torch.testing.assert_close(grad, grads[name], **TOL)
        for name, grad in grads.items():
            if ".local_experts." in name:
                expert_sum[name] = expert_sum.get(name, 0) + grad
    owned = {**ranks[0]["experts"], **ranks[1]["experts"]}
    assert sorted(owned) == sorted(expert_sum), "each expert lives on exactly one EP rank"
    for name, grad in owned.items():
        torch.testing.assert_close(grad, expert_sum[name], **TOL)


def test_baseline_routers_expert_parallel_match_single_process(tmp_path):
    """EP = 2 equals EP = 1 for every baseline router (``ROUTER_EP_CASES``, one launch)."""
    torchrun("moe_layer_parallel.py", 2, "--out", str(tmp_path), "--baselines")
    for index, (moe, step) in enumerate(ROUTER_EP_CASES):
        _check_against_single_process(tmp_path / str(index), moe, step)


@pytest.mark.parametrize(
    "dispatcher,backend,activation,router",
    [
        ("alltoall", "grouped", "gelu", "vqmoe"),
        ("allgather", "grouped", "gelu", "vqmoe"),
        ("alltoall", "grouped", "swiglu", "vqmoe"),
        ("alltoall", "sequential", "gelu", "vqmoe"),
        ("alltoall", "grouped", "gelu", "stablemoe"),
    ],
)
def test_tensor_parallel_whole_model_matches_single_process(
    tmp_path, dispatcher, backend, activation, router
):
    """TP = 2 with sequence parallelism: same loss and every (gathered) gradient as TP = 1.
    StableMoE (stage 1) covers the token-id routers: each TP rank routes its sequence slice
    with its slice of the ids, and its losses count tokens over the TP group."""
    from dataclasses import replace

    from moe_helpers import TINY_MODEL

    from vqmoe_megatron.config import ParallelConfig
    from vqmoe_megatron.model import build_model

    torchrun(
        "gpt_tensor_parallel.py",
        2,
        "--out",
        str(tmp_path),
        "--dispatcher",
        dispatcher,
        "--expert-backend",
        backend,
        "--activation",
        activation,
        "--router",
        router,
    )
    result = torch.load(tmp_path / "tp2.pt")
    moe = moe_variant(
        token_dispatcher=dispatcher, topk=2, expert_backend=backend, **baseline_settings(router)
    )
    model_cfg = replace(TINY_MODEL, activation=activation)
    model = build_model(model_cfg, moe, ParallelConfig(), seed=11).double()
    torch.manual_seed(5)
    tokens = torch.randint(0, TINY_MODEL.vocab_size, (4, TINY_MODEL.seq_length + 1))
    loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach(), **TOL)
    grads = gather_full_tensors(
        model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    )
    assert sorted(result["grads"]) == sorted(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-6, atol=1e-9, msg=name)
