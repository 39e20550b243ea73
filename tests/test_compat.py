"""Device portability pieces: SDPA attention equals megatron's, norms carry the SP flag, and the
process-wide CPU shims refuse to run where CUDA is present."""

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
    return build_transformer_config(TINY_MODEL, moe_variant(), ParallelConfig(), seed=0)


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
