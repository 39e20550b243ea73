"""docs/configuration.md is the reference generated from the config dataclasses, and complete."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vqmoe_megatron import config
from vqmoe_megatron.config_reference import attribute_docs, reference_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_committed_reference_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/configuration.md is stale: python -m vqmoe_megatron.config_reference "
        "> docs/configuration.md"
    )


def test_every_setting_appears_with_its_default():
    text = DOC.read_text(encoding="utf-8")
    for section in (
        config.ModelConfig,
        config.MoEConfig,
        config.ParallelConfig,
        config.DataConfig,
        config.TrainConfig,
        config.FinetuneSettings,
    ):
        for field in dataclasses.fields(section):
            assert f"| `{field.name}` |" in text, (section.__name__, field.name)


@dataclasses.dataclass
class _Documented:
    plain: int = 1
    described: float = 0.5
    """What it is,
    over two lines."""
    after: str = "x"


def test_field_docstrings_are_read_from_the_source():
    assert attribute_docs(_Documented) == {"described": "What it is, over two lines."}
