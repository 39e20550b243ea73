"""Blended corpora (``data.sources``): the mixture schedule's tolerance, the blended loader's
samples, exact resume and refusals; then a two-corpus pretraining run that resumes exactly and
reports per-source validation metrics, and vqmoe-evaluate on both sources."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_helpers import FIXTURE, tiny_shards
from pretrain_helpers import REPO, env, losses, pretrain, records

from vqmoe_megatron.config import ConfigError, PretrainConfig, load_config
from vqmoe_megatron.data import DataError, TokenShardLoader, load_manifest
from vqmoe_megatron.data.blend import BlendedLoader, BlendSource, next_source
from vqmoe_megatron.training.lm_task import validate_config

WEIGHTS = (0.3, 0.7)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two disjoint corpora with one tokenizer: the 1790s addresses, and the later ones."""
    early = tiny_shards(tmp_path_factory, "blend_early", inputs=[str(FIXTURE / "179*.txt")])
    later = tiny_shards(
        tmp_path_factory,
        "blend_later",
        inputs=[str(FIXTURE / "18*.txt"), str(FIXTURE / "19*.txt"), str(FIXTURE / "20*.txt")],
    )
    return early, later


def _sources(corpora, weights=WEIGHTS) -> list[BlendSource]:
    return [
        BlendSource(name, weight, load_manifest(path))
        for name, weight, path in zip(("early", "later"), weights, corpora)
    ]


def _blend(corpora, dp_rank: int = 0, **kwargs) -> BlendedLoader:
    settings = {"micro_batch_size": 6, "dp_size": 2, "num_workers": 1, "seed": 7}
    return BlendedLoader(_sources(corpora, **kwargs), dp_rank=dp_rank, **settings)


def _take(loader, batches: int) -> list[dict]:
    stream = iter(loader)
    try:
        return [next(stream) for _ in range(batches)]
    finally:
        stream.close()


@pytest.mark.parametrize("sources", [2, 3, 5, 8])
def test_mixture_stays_within_the_stated_tolerance_of_the_weights(sources: int):
    """Every prefix of n samples holds each source's share w * n to within half a sample (two
    sources) or two samples (any number), for random weights from even to very skewed."""
    rng = np.random.default_rng(sources)
    tolerance = 0.5 if sources == 2 else 2.0
    for trial in range(40):
        weights = rng.dirichlet(np.full(sources, (0.2, 1.0, 5.0)[trial % 3]))
        counts = np.zeros(sources, dtype=np.int64)
        worst = 0.0
        for n in range(1, 1500):
            counts[next_source(weights, counts)] += 1
            worst = max(worst, float(np.abs(counts - weights * n).max()))
        assert worst <= tolerance + 1e-9, (weights, worst)


def test_blend_draws_each_source_stream_in_its_own_order(corpora):
    batches = _take(_blend(corpora), 50)
    picked = np.concatenate([b["source"].numpy() for b in batches])
    counts = np.bincount(picked, minlength=2)
    assert np.abs(counts - np.array(WEIGHTS) * len(picked)).max() <= 0.5
    for k, path in enumerate(corpora):
        alone = TokenShardLoader(
            path, "train", micro_batch_size=1, dp_rank=0, dp_size=2, num_workers=1, seed=7
        )
        expected = _take(alone, int(counts[k]))
        got = [
            (b["index"][i], b["tokens"][i])
            for b in batches
            for i in np.flatnonzero(b["source"] == k)
        ]
        assert [int(i) for i, _ in got] == [int(e["index"][0]) for e in expected]
        assert all(bool((t == e["tokens"][0]).all()) for (_, t), e in zip(got, expected))
    assert batches[0]["tokens"].shape == (6, 65)


def test_blended_resume_is_exact(corpora):
    for rank in (0, 1):
        full = _take(_blend(corpora, rank), 60)
        resumed, state, done = [], None, 0
        for stop in (13, 41, 60):
            loader = _blend(corpora, rank)
            if state is not None:
                loader.load_state_dict(state)
            resumed += _take(loader, stop - done)
            state, done = json.loads(json.dumps(loader.state_dict())), stop
        for a, b in zip(full, resumed, strict=True):
            assert a["source"].tolist() == b["source"].tolist()
            assert a["index"].tolist() == b["index"].tolist()
            assert bool((a["tokens"] == b["tokens"]).all())


def test_blends_that_cannot_work_are_refused(corpora, tmp_path: Path):
    state = _blend(corpora).state_dict()
    with pytest.raises(DataError, match="blend_fingerprint was .* weights or data changed"):
        _blend(corpora, weights=(0.5, 0.5)).load_state_dict(state)
    single = TokenShardLoader(
        corpora[0], "train", micro_batch_size=6, dp_rank=0, dp_size=2, num_workers=1, seed=7
    )
    with pytest.raises(DataError, match="not a blended-sources state"):
        _blend(corpora).load_state_dict(single.state_dict())
    other = tmp_path / "other_tokenizer"
    shutil.copytree(corpora[1], other)
    raw = json.loads((other / "manifest.json").read_text())
    raw["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"tokenizer sha256 0000.* same tokenizer"):
        _blend((corpora[0], other))
    with pytest.raises(DataError, match="not distinct"):
        BlendedLoader(
            [BlendSource("x", 0.5, load_manifest(p)) for p in corpora],
            micro_batch_size=2,
            dp_rank=0,
            dp_size=1,
            num_workers=0,
            seed=0,
        )


@pytest.mark.slow
def test_blended_run_trains_resumes_exactly_and_reports_each_source(corpora, tmp_path: Path):
    """Two corpora at 0.3 / 0.7: 6 steps straight equal 3 steps + a resumed 3; every eval has
    loss / ppl / bpb per source; vqmoe-evaluate scores both sources of the checkpoint."""
    early, later = corpora
    blend = (
        "data.data_dir=null",
        f"data.sources=[{{path: '{early}', weight: 0.3}}, {{path: '{later}', weight: 0.7}}]",
        "train.eval_interval=3",
        "train.eval_batches=2",
    )
    pretrain(early, tmp_path / "a", "train.steps=6", *blend)
    pretrain(early, tmp_path / "b", "train.steps=3", *blend)
    proc = pretrain(early, tmp_path / "b", "train.steps=6", *blend)
    assert "at step 3" in proc.stdout
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert "eval step 6 blend_later | loss" in proc.stdout
    evals = records(tmp_path / "a", "eval")
    assert [r["step"] for r in evals] == [3, 6]
    for name in ("blend_early", "blend_later"):
        assert 0 < evals[-1][f"{name}/bpb"] < evals[-1][f"{name}/loss"]
    untimed = [{k: v for k, v in r.items() if k != "time"} for r in evals]
    assert untimed == [
        {k: v for k, v in r.items() if k != "time"} for r in records(tmp_path / "b", "eval")
    ]
    result = tmp_path / "eval.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vqmoe_megatron.evaluate",
            "--checkpoint",
            str(tmp_path / "a"),
            "--data-dir",
            str(early),
            str(later),
            "--json",
            str(result),
        ],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scored = json.loads(result.read_text())["sources"]
    assert [s["data"] for s in scored] == [f"{early}:valid", f"{later}:valid"]
    assert all(s["bpb"] > 0 for s in scored) and scored[0]["loss"] != scored[1]["loss"]


def test_blend_settings_are_checked():
    def settings(*overrides: str) -> PretrainConfig:
        return load_config(PretrainConfig, None, overrides)

    with pytest.raises(ConfigError, match="data.data_dir and data.sources are both set"):
        validate_config(settings("data.data_dir=a", "data.sources=[{path: b, weight: 1}]"), 1)
    with pytest.raises(ConfigError, match=r"weights \[0.5, 0.0\] must all be positive"):
        validate_config(settings("data.sources=[{path: a, weight: 0.5}, {path: b, weight: 0}]"), 1)
    with pytest.raises(ConfigError, match="'data.sources'.0.: 'weight' is required"):
        settings("data.sources=[{path: a}]")
    with pytest.raises(ConfigError, match="data.data_dir is not set"):
        validate_config(settings(), 1)
