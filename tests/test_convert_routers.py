"""Every baseline router's checkpoint exports to the consolidated and HF formats (HF logits equal
the project model's), evaluates with vqmoe-evaluate and with lm-evaluation-harness on the HF
export (the same bits per byte), and fine-tunes with the plain ``finetune/glue.py`` command (no
--routing: the fine-tune routing follows the router)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from convert_helpers import (
    cli,
    conversion_record,
    convert,
    lm_eval_bits_per_byte,
    project_logits_of,
    random_tokens,
    shards,
)
from data_helpers import FIXTURE
from finetune_helpers import finetune, glue_copy
from pretrain_helpers import records, trained_run

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
TEXT = FIXTURE / "1790_george_washington_n.txt"


@pytest.mark.parametrize(
    "router,check_use",
    [("topk", True), ("xmoe", False), ("hash", True), ("smoe_dropout", True), ("stablemoe", True)],
)
def test_router_checkpoint_exports_evaluates_and_fine_tunes(
    tmp_path_factory, tmp_path, router, check_use
):
    """X-MoE evaluates and fine-tunes as top-k does (same layer, other logits): export only."""
    from transformers import AutoModelForCausalLM

    extra = ["moe.topk=2"] if router != "stablemoe" else ["moe.stablemoe_stage1_steps=2"]
    run = trained_run(
        tmp_path_factory,
        f"router_{router}",
        shards(tmp_path_factory),
        f"moe.router={router}",
        *extra,
    )
    consolidated, hf = tmp_path / "c", tmp_path / "hf"
    convert("consolidated", run, consolidated)
    convert("hf", consolidated, hf)
    for out in (consolidated, hf):
        assert conversion_record(out)["verified"]["max_abs_logit_diff"] <= TOLERANCE
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    assert model.config.router == router
    tokens = random_tokens(400, batch=2, seed=11)
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits
    assert (logits - project_logits_of(run, tokens)).abs().max() <= TOLERANCE
    if not check_use:
        return

    result_path = tmp_path / "eval.json"
    cli(
        "vqmoe_megatron.evaluate",
        "--checkpoint",
        consolidated,
        "--text",
        TEXT,
        "--json",
        result_path,
    )
    result = json.loads(result_path.read_text())
    assert math.isfinite(result["loss"]) and 0 < result["bpb"] < 10
    theirs = lm_eval_bits_per_byte(hf, TEXT, tmp_path / "lm_eval")
    assert theirs == pytest.approx(result["bpb"], rel=1e-4)

    out = tmp_path / "ft"
    proc = finetune("sst2", glue_copy(tmp_path / "glue"), consolidated, out, "--steps", "2")
    assert "(pretrain routing)" in proc.stdout
    assert [r["step"] for r in records(out)] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records(out))
