"""Device portability pieces: SDPA attention equals megatron's, norms carry the SP flag, and the
process-wide CPU shims refuse to run where CUDA is present."""

from __future__ import annotations

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
