"""Documents of the ``vqmoe_text`` lm-evaluation-harness task: each local text file is one
document, read exactly as ``vqmoe-evaluate --text`` reads it (:func:`read_document`).

The files come from the task metadata: ``--metadata '{"text_files": ["a.txt", "b.txt"]}'``
(a comma-separated string works too). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union


def read_document(path: Union[str, Path]) -> str:
    """The text of ``path`` as UTF-8, line endings as stored (no newline translation)."""
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def file_list(text_files: Union[str, list, tuple]) -> list[str]:
    """``text_files`` as given in the metadata: a list, or one comma-separated string."""
    if isinstance(text_files, str):
        return [part for part in text_files.split(",") if part]
    return [str(part) for part in text_files]


def load(text_files: Union[str, list, tuple, None] = None, **_):
    """lm-eval ``custom_dataset``: a DatasetDict with one ``test`` split of ``{"path", "text"}``."""
    import datasets

    if not text_files:
        raise ValueError(
            'the vqmoe_text task needs its files: --metadata \'{"text_files": ["a.txt"]}\''
        )
    paths = file_list(text_files)
    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict(
                {"path": paths, "text": [read_document(p) for p in paths]}
            )
        }
    )


def doc_to_target(doc: dict) -> str:
    """The whole document is scored (rolling log-likelihood)."""
    return doc["text"]
