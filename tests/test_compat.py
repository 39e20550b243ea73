"""Every patch of ``vqmoe_megatron.compat``: the portable layers equal megatron's, the CPU shims
refuse to run where CUDA is present, and for each patch a check that fails when upstream changes
or fixes the code it works around (megatron-core 0.16.1, DeepSpeed 0.19.8, torch 2.13)."""

from __future__ import annotations

import inspect

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from moe_helpers import TINY_MODEL, init_single_process, moe_variant

from vqmoe_megatron.compat import SDPACoreAttention, SPTorchNorm, shims
from vqmoe_megatron.config import ParallelConfig
from vqmoe_megatron.model import build_transformer_config


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_single_process()


@pytest.fixture()
def config():
    return build_transformer_config(TINY_MODEL, moe_variant(), ParallelConfig())


def test_sdpa_attention_equals_megatron_dot_product_attention(config):
    args = dict(
        config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
    )
    reference, sdpa = DotProductAttention(**args), SDPACoreAttention(**args)
    torch.manual_seed(0)
    s, b, heads, dim = 7, 3, config.num_attention_heads, config.kv_channels
    q, k, v = (torch.randn(s, b, heads, dim) for _ in range(3))
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    torch.testing.assert_close(
        sdpa(q, k, v, None), reference(q, k, v, causal), rtol=1e-5, atol=1e-5
    )
    padding = causal.expand(b, 1, s, s).clone()
    padding[0, :, :, -2:] = True  # the last two keys of sample 0 are padding
    torch.testing.assert_close(
        sdpa(q, k, v, padding), reference(q, k, v, padding), rtol=1e-5, atol=1e-5
    )


def test_sp_norm_tags_its_parameters(config):
    config.sequence_parallel = True
    norm = SPTorchNorm(config, 16)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def test_cpu_shims_refuse_to_apply_where_cuda_is_present(monkeypatch):
    monkeypatch.setattr(shims, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must never run on a GPU node"):
        shims.apply_cpu_process_shims()


def test_deepspeed_reads_the_expert_groups_registered_from_megatron():
    """DeepSpeed looks its expert groups up in the private tables the patch writes to."""
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state

    from vqmoe_megatron.compat.deepspeed_moe import expert_group_name, register_expert_groups

    name = register_expert_groups(1)
    try:
        assert name == expert_group_name(1) == "ep_size_1"
        ep = parallel_state.get_expert_model_parallel_group()
        edp = parallel_state.get_expert_data_parallel_group()
        assert ds_groups._get_expert_parallel_group(name) is ep
        assert ds_groups._get_expert_data_parallel_group(name) is edp
        assert ds_groups._get_expert_parallel_group_dict()[name] is ep
        assert ds_groups._get_expert_data_parallel_group_dict()[name] is edp
        assert ds_groups._get_expert_data_parallel_world_size(name) == edp.size()
    finally:
        for table in (
            ds_groups._EXPERT_PARALLEL_GROUP,
            ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
            ds_groups._EXPERT_DATA_PARALLEL_GROUP,
            ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
        ):
            table.pop(name, None)


def test_deepspeed_names_expert_groups_and_detects_moe_layers_as_the_marker_assumes():
    """The marker works only while DeepSpeed (a) names an EP size's groups ``ep_size_<EP>``,
    (b) switches MoE handling on by ``isinstance(module, MoE)`` and (c) then asks each MoE
    layer to set up its groups, with the groups' name as the skip condition."""
    from deepspeed.moe.layer import MoE
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups as ds_groups

    from vqmoe_megatron.compat.deepspeed_moe import DeepSpeedMoEMarker

    assert 'group_name = f"ep_size_{expert_parallel_size_}"' in inspect.getsource(
        ds_groups._create_expert_and_data_parallel
    )
    engine_source = inspect.getsource(DeepSpeedEngine)
    assert "isinstance(module, MoE)" in engine_source
    assert "module.set_deepspeed_parallelism(" in engine_source
    assert "self.expert_group_name not in groups._get_expert_parallel_group_dict()" in (
        inspect.getsource(MoE._create_process_groups)
    )
    marker = DeepSpeedMoEMarker(num_experts=4, expert_parallel=2)
    assert isinstance(marker, MoE) and list(marker.parameters()) == []
    assert (marker.num_local_experts, marker.expert_group_name) == (2, "ep_size_2")
    marker.set_deepspeed_parallelism()  # creates nothing
    assert "ep_size_2" not in ds_groups._get_expert_parallel_group_dict()


def _two_group_engine():
    """A single-process ZeRO-1 engine on a tiny model with two parameter groups."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.LayerNorm(4))
    groups = [
        {"params": [model[0].weight], "weight_decay": 0.1},
        {"params": list(model[1].parameters()), "weight_decay": 0.0},
    ]
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    loss = engine(torch.randn(2, 4)).square().sum()
    engine.backward(loss)
    engine.step()
    return engine, model


def test_deepspeed_still_links_only_the_first_groups_optimizer_state():
    """DeepSpeed 0.19.8's bug the re-linking works around: after the first step only the first
    parameter group's fragments see their Adam state. When this test fails, DeepSpeed fixed
    it: drop ``link_optimizer_state_fragments`` from ``compat.deepspeed_zero``."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import safe_get_full_optimizer_state

    from vqmoe_megatron.compat.deepspeed_zero import (
        flat_optimizer_groups,
        optimizer_state_reader,
        optimizer_steps_taken,
    )

    engine, model = _two_group_engine()
    assert isinstance(engine.optimizer, DeepSpeedZeroOptimizer)
    assert len(flat_optimizer_groups(engine)) == 2
    assert optimizer_steps_taken(engine) == 1
    assert safe_get_full_optimizer_state(model[0].weight, "exp_avg") is not None
    with pytest.raises(ValueError, match="exp_avg not found in optimizer state fragment"):
        safe_get_full_optimizer_state(model[1].weight, "exp_avg")
    read = optimizer_state_reader(engine)  # re-links every group
    flat = flat_optimizer_groups(engine)[1][1]
    expected = engine.optimizer.optimizer.state[flat]["exp_avg"][: model[1].weight.numel()]
    torch.testing.assert_close(read(model[1].weight, "exp_avg"), expected)


def test_megatron_rope_still_moves_its_table_to_the_cuda_device_and_ours_does_not(monkeypatch):
    """megatron's ``get_emb`` moves a CPU ``inv_freq`` to ``torch.cuda.current_device()`` (here
    a stand-in device, "meta"); the swapped class keeps the module's device."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from vqmoe_megatron.compat import DeviceSafeRotaryEmbedding, use_device_safe_rotary_embedding

    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("meta"))
    upstream = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
    assert upstream.get_emb(5).device.type == "meta"

    holder = torch.nn.Module()
    holder.rotary_pos_emb = RotaryEmbedding(
        kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True
    )
    use_device_safe_rotary_embedding(holder)
    assert type(holder.rotary_pos_emb) is DeviceSafeRotaryEmbedding
    emb = holder.rotary_pos_emb.get_emb(5)
    assert emb.device.type == "cpu" and emb.shape == (5, 1, 1, 8)
    expected = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    torch.testing.assert_close(emb, expected.get_emb(5), rtol=0, atol=0)


def test_megatron_still_warns_about_moe_layer_subclasses_and_the_filter_drops_only_that(
    config, caplog
):
    """Building a transformer layer whose MLP is our MoELayer subclass makes megatron warn
    "Unknown MLP type" unfiltered; with the filter nothing is logged, other records pass."""
    import logging

    from megatron.core.transformer.spec_utils import build_module

    from vqmoe_megatron.compat.megatron_logging import LOGGER, UnknownMlpTypeFilter
    from vqmoe_megatron.model import build_block_spec

    logger = logging.getLogger(LOGGER)
    spec = build_block_spec(config, moe_variant(), use_te=False).layer_specs[0]

    def build_and_collect() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            build_module(spec, config=config, layer_number=1)
        return [r.getMessage() for r in caplog.records if r.name == LOGGER]

    ours = [f for f in logger.filters if isinstance(f, UnknownMlpTypeFilter)]
    assert ours, "apply_process_patches() did not install the filter"
    for f in ours:
        logger.removeFilter(f)
    try:
        assert any("Unknown MLP type" in m for m in build_and_collect())
    finally:
        for f in ours:
            logger.addFilter(f)
    assert build_and_collect() == []
    record = logging.LogRecord(LOGGER, logging.WARNING, __file__, 1, "other news", None, None)
    assert UnknownMlpTypeFilter().filter(record)


def test_alltoall_dispatcher_still_creates_a_cuda_stream_unless_the_slot_is_filled(
    config, monkeypatch
):
    """megatron's dispatcher ``__init__`` creates ``torch.cuda.Stream()`` (which fails without
    CUDA) when the class slot is empty; the shim's placeholder lets it build."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    config.num_moe_experts = 4
    config.moe_token_dispatcher_type = "alltoall"
    args = dict(config=config, pg_collection=get_default_pg_collection())
    assert isinstance(MoEAlltoAllTokenDispatcher.cuda_dtoh_stream, shims.NoCudaStream)
    MoEAlltoAllTokenDispatcher(4, list(range(4)), **args)
    monkeypatch.setattr(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", None)
    with pytest.raises(RuntimeError, match="torch.cuda.Stream requires CUDA support"):
        MoEAlltoAllTokenDispatcher(4, list(range(4)), **args)


def test_deepspeed_builds_the_shared_memory_op_only_when_its_op_table_allows():
    """DeepSpeed's communication backend consults the op table by the name the shim switches
    off; with the shim in place it builds nothing."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    assert builder is not None and builder.NAME == shims.SHM_COMM_OP
    assert deepspeed.ops.__compatible_ops__[shims.SHM_COMM_OP] is False
    assert "__compatible_ops__.get(builder.NAME" in inspect.getsource(build_shm_op)
    assert build_shm_op() is None
