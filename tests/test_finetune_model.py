"""The fine-tuning model, in one process: discrete-only routing (no router or gate, one expert per
token), what is trained and what is frozen, pooling and padding, the checkpointable state."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dist_utils import torchrun
from finetune_batch import classifier_batch, tiny_classifier
from moe_helpers import TINY_MODEL, expert_weights, init_single_process, moe_variant
from safetensors.torch import load_file

from vqmoe_megatron.checkpoint.consolidated import write_consolidated
from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.checkpoint.opened import load_pretrained, open_checkpoint
from vqmoe_megatron.config import FinetuneConfig, FinetuneSettings, ParallelConfig, PretrainConfig
from vqmoe_megatron.finetune.classifier import SequenceClassifier, task_loss
from vqmoe_megatron.finetune.glue_task import freeze_unused
from vqmoe_megatron.finetune.pretrained import load_pretrained_weights
from vqmoe_megatron.model import build_model
from vqmoe_megatron.parallel_tensors import gather_full_tensors

ROUTER_OR_GATE = (".router.continuous.", ".router.gate.")


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_single_process()


def _gpt(mode: str, seed: int = 3):
    return build_model(TINY_MODEL, moe_variant(routing_mode=mode), ParallelConfig(), seed=seed)


def _batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four inputs of 8, 5, 3 and 6 real tokens, right-padded with 0."""
    lengths = torch.tensor([8, 5, 3, 6])
    ids = torch.randint(5, TINY_MODEL.vocab_size, (4, 8), generator=generator)
    ids[torch.arange(8)[None, :] >= lengths[:, None]] = 0
    return ids, lengths


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A consolidated checkpoint of a model built in pretrain mode (router and gate present)."""
    gpt = _gpt("pretrain")
    cfg = PretrainConfig(model=TINY_MODEL, moe=moe_variant(routing_mode="pretrain"))
    path = write_consolidated(gpt, cfg, tmp_path_factory.mktemp("pretrained"))
    return path, gpt


def _classifier(pretrained, mode: str, train_codebook: bool = False) -> SequenceClassifier:
    path, _ = pretrained
    gpt = _gpt(mode, seed=99)  # other weights than the checkpoint's: loading must replace them
    load_pretrained(gpt, path, PretrainConfig(model=TINY_MODEL, moe=moe_variant(routing_mode=mode)))
    freeze_unused(gpt, train_codebook)
    return SequenceClassifier(gpt, 3, "last", dropout=0.0, seed=1)


def test_discrete_fine_tuning_model_has_no_router_or_gate(pretrained):
    path, source = pretrained
    discrete = _classifier(pretrained, "discrete")
    names = [n for n, _ in discrete.named_parameters()]
    assert not [n for n in names if any(part in n for part in ROUTER_OR_GATE)]
    assert not [n for n in discrete.state_dict() if any(part in n for part in ROUTER_OR_GATE)]
    assert all(layer.routing_mode == "discrete" for layer in discrete.gpt.vq_layers())
    kept = _classifier(pretrained, "pretrain")  # the ablation keeps them, so the check can fail
    assert len([n for n, _ in kept.named_parameters() if ".router.gate." in n]) == 4
    shared = dict(source.named_parameters())
    for name, param in discrete.gpt.named_parameters():
        torch.testing.assert_close(param, shared[name], msg=name)


def _capture_routing(model: SequenceClassifier) -> tuple[list, list]:
    """Per VQMoE layer call: (router input [S, B, H], RoutingPlan) and expert row counts."""
    plans, rows = [], []
    for layer in model.gpt.vq_layers():
        layer.router.register_forward_hook(lambda m, args, out: plans.append((args[0], out)))
        layer.experts.register_forward_hook(lambda m, args, out: rows.append(int(args[1].sum())))
    return plans, rows


def test_every_token_goes_to_exactly_one_expert_its_nearest_codes(pretrained):
    model = _classifier(pretrained, "discrete").train()
    plans, rows = _capture_routing(model)
    ids, lengths = _batch(torch.Generator().manual_seed(0))
    model.gpt.routing_metrics.reset()  # routing statistics of this forward pass only
    model(ids, lengths).sum().backward()
    tokens = ids.numel()
    assert len(plans) == 2 and rows == [tokens, tokens]
    for _, plan in plans:
        assert plan.num_streams == 1 and plan.routing_map.shape == (tokens, 4)
        assert torch.equal(plan.routing_map.sum(dim=1), torch.ones(tokens, dtype=torch.long))
        assert torch.equal(plan.probs, plan.routing_map.float())
    for layer, (hidden, plan) in zip(model.gpt.vq_layers(), plans):
        x = hidden.reshape(-1, hidden.shape[-1]).double()
        nearest = torch.cdist(x, layer.router.quantizer.codebook.double()).argmin(dim=1)
        assert torch.equal(plan.routing_map.float().argmax(dim=1), nearest % 4)
    stats = model.gpt.routing_metrics.summarize()
    assert [stats[layer]["rows_per_token"] for layer in (1, 2)] == [1.0, 1.0]
    # Padding is routed too (one row each) but kept out of the routing statistics.
    assert stats[1]["tokens"] == int(lengths.sum())


def test_pretrain_routing_sends_each_token_through_two_paths(pretrained):
    model = _classifier(pretrained, "pretrain").train()
    plans, rows = _capture_routing(model)
    ids, lengths = _batch(torch.Generator().manual_seed(0))
    model(ids, lengths).sum().backward()
    assert rows == [2 * ids.numel()] * 2
    assert all(plan.num_streams == 2 for _, plan in plans)


@pytest.mark.parametrize("train_codebook", [False, True])
def test_gradients_reach_the_head_and_trunk_and_the_codebook_only_when_asked(
    pretrained, train_codebook
):
    model = _classifier(pretrained, "discrete", train_codebook=train_codebook).train()
    ids, lengths = _batch(torch.Generator().manual_seed(1))
    task_loss(model(ids, lengths), torch.tensor([0, 1, 2, 1]), regression=False).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["head.weight"].abs().sum() > 0
    assert grads["gpt.embedding.word_embeddings.weight"].abs().sum() > 0
    fc1_grads, _ = expert_weights(model.gpt.decoder.layers[0].mlp, grads=True)
    assert fc1_grads[0] is not None
    for layer in model.gpt.vq_layers():
        codebook = layer.router.quantizer.codebook
        assert codebook.requires_grad == train_codebook
        assert (codebook.grad is not None) == train_codebook


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_right_padding_does_not_change_the_logits(pretrained, pooling):
    model = _classifier(pretrained, "discrete").eval()
    model.pooling = pooling
    ids, lengths = _batch(torch.Generator().manual_seed(2))
    batched = model(ids, lengths)
    alone = torch.cat(
        [model(ids[i : i + 1, :n], lengths[i : i + 1]) for i, n in enumerate(lengths)]
    )
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    shuffled = model(ids[[2, 0, 3, 1]], lengths[[2, 0, 3, 1]])
    torch.testing.assert_close(shuffled, batched[[2, 0, 3, 1]], rtol=1e-5, atol=1e-6)


def test_last_pooling_reads_what_the_lm_head_reads_at_the_last_real_token(pretrained):
    model = _classifier(pretrained, "discrete").eval()
    ids, lengths = _batch(torch.Generator().manual_seed(3))
    positions = torch.arange(8).expand(4, 8)
    hidden = model.gpt.final_hidden_states(ids, positions)  # [S, B, H]
    logits = model.gpt(ids, positions, None)  # [B, S, V]: the LM head on the same states
    embedding = model.gpt.embedding.word_embeddings.weight
    torch.testing.assert_close(hidden.transpose(0, 1) @ embedding.t(), logits, rtol=1e-4, atol=1e-5)
    pooled = model.pool(hidden, lengths)
    torch.testing.assert_close(pooled, hidden[lengths - 1, torch.arange(4)])
    model.pooling = "mean"
    torch.testing.assert_close(model.pool(hidden, lengths)[2], hidden[:3, 2].mean(dim=0))


def test_the_checkpointable_state_is_the_gpt_plus_a_replicated_head(pretrained):
    model = _classifier(pretrained, "discrete")
    state = model.sharded_state_dict()
    head = state["head.weight"]
    assert head.data is model.head.weight and head.global_shape == (3, TINY_MODEL.hidden_size)
    assert "gpt.embedding.word_embeddings.weight" in state
    params = {n for n, _ in model.named_parameters()}
    assert params <= set(state)


def _fine_tuned(pretrained, tmp_path) -> tuple[SequenceClassifier, FinetuneConfig]:
    """An MNLI classifier (3 labels, trunk and head moved off their initial values) written as a
    fine-tuning run's best/ directory, and the config of an RTE run that starts from it."""
    source = _classifier(pretrained, "discrete")
    with torch.no_grad():
        for param in source.parameters():
            param.add_(0.01)
    moe = moe_variant(routing_mode="discrete")
    written = FinetuneConfig(
        finetune=FinetuneSettings(task="MNLI", pooling="last"), model=TINY_MODEL, moe=moe
    )
    best = write_consolidated(source, written, tmp_path / "mnli" / "best")
    settings = FinetuneSettings(task="RTE", pretrained=str(best), pooling="last")
    return source, FinetuneConfig(finetune=settings, model=TINY_MODEL, moe=moe)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def test_a_fine_tuned_run_loads_its_backbone_and_a_new_task_gets_a_fresh_head(pretrained, tmp_path):
    source, cfg = _fine_tuned(pretrained, tmp_path)
    best = Path(cfg.finetune.pretrained)
    opened = open_checkpoint(best)
    assert (opened.kind, opened.task.task, opened.routing_mode) == (
        "consolidated",
        "MNLI",
        "discrete",
    )
    saved = load_file(str(best / "model.safetensors"))
    assert {k for k in saved if not k.startswith("gpt.")} == {"head.weight", "head.bias"}

    rte = SequenceClassifier(_gpt("discrete", seed=98), 2, "last", dropout=0.0, seed=4)
    fresh_head = {k: v.clone() for k, v in rte.head.state_dict().items()}
    line = load_pretrained_weights(rte, cfg)
    assert "fine-tuned on MNLI (3 labels, last pooling)" in line
    assert "its head is dropped and a new RTE head (2 labels, last pooling) is initialised" in line
    trunk = _state(source.gpt)
    for name, value in _state(rte.gpt).items():
        torch.testing.assert_close(value, trunk[name], msg=name)
    for name, value in rte.head.state_dict().items():
        torch.testing.assert_close(value, fresh_head[name], msg=name)

    same_task = replace(cfg, finetune=replace(cfg.finetune, task="MNLI"))
    mnli = SequenceClassifier(_gpt("discrete", seed=97), 3, "last", dropout=0.0, seed=4)
    assert "with the MNLI head it was fine-tuned with" in load_pretrained_weights(mnli, same_task)
    for name, value in _state(mnli).items():
        torch.testing.assert_close(value, _state(source)[name], msg=name)
    backbone = PretrainConfig(model=TINY_MODEL, moe=cfg.moe)
    with pytest.raises(CheckpointError, match="written by pretraining: it has no task head"):
        open_checkpoint(pretrained[0]).load_weights(mnli, backbone, with_head=True)


@pytest.mark.distributed
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_tensor_parallel_classifier_matches_one_process(tmp_path, pooling):
    """TP = 2 with sequence parallelism (decoder output gathered before pooling) gives the logits,
    loss and gradients of one process."""
    torchrun("finetune_tensor_parallel.py", 2, "--out", str(tmp_path), "--pooling", pooling)
    result = torch.load(tmp_path / "tp2.pt")
    model = tiny_classifier(ParallelConfig(), pooling)
    ids, lengths, labels = classifier_batch()
    logits = model(ids, lengths)
    loss = task_loss(logits, labels, regression=False)
    loss.backward()
    torch.testing.assert_close(result["logits"], logits.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-6, atol=1e-8)
    grads = gather_full_tensors(
        model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    )
    assert sorted(result["grads"]) == sorted(grads) and "head.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-6, atol=1e-8, msg=name)
