"""The sentencepiece tokenizer as the rest of the project sees it: ids, special tokens, checksum.

Models made by ``data_tools/train_tokenizer.py`` reserve ``<unk>``, ``<s>`` (bos), ``</s>`` (eos),
``<pad>`` and ``<sep>`` as control symbols: encoding text never produces them, so a pad id in a
sample always means padding and a separator id always means a real sentence-pair boundary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import sentencepiece as spm

from vqmoe_megatron.data.errors import DataError

UNK_PIECE = "<unk>"
BOS_PIECE = "<s>"
EOS_PIECE = "</s>"
PAD_PIECE = "<pad>"
SEP_PIECE = "<sep>"


class Tokenizer:
    """A sentencepiece model file with the pad, bos, eos and separator ids the pipeline needs."""

    def __init__(self, model_path: Union[str, Path]):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataError(
                f"tokenizer model {self.path} does not exist; train one with "
                "data_tools/train_tokenizer.py or pass the path of an existing .model file"
            )
        data = self.path.read_bytes()
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(data)
        except (RuntimeError, OSError, TypeError) as exc:
            raise DataError(
                f"tokenizer model {self.path} is not a sentencepiece model ({exc}); "
                "pass the .model file written by data_tools/train_tokenizer.py"
            ) from exc
        self._sha256 = hashlib.sha256(data).hexdigest()
        for name, token_id in (("pad", self.processor.pad_id()), ("eos", self.processor.eos_id())):
            if token_id < 0:
                raise DataError(
                    f"tokenizer model {self.path} has no {name} token; retrain it with "
                    "data_tools/train_tokenizer.py, which reserves pad, bos, eos and <sep>"
                )
        sep = self.processor.piece_to_id(SEP_PIECE)
        self._sep_id = None if sep == self.processor.unk_id() else sep

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special tokens included (the model's embedding rows)."""
        return self.processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def unk_id(self) -> int:
        return self.processor.unk_id()

    @property
    def sep_id(self) -> Optional[int]:
        """Id of ``<sep>`` (sentence pairs), or None for a model trained without it."""
        return self._sep_id

    @property
    def sha256(self) -> str:
        """Hex sha256 of the model file: data and checkpoints record it to detect a swapped model."""
        return self._sha256

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return self.processor.encode(text)

    def decode(self, ids: Union[Sequence[int], Any]) -> str:
        """Text of ``ids`` (a list, numpy array or tensor); pad ids are dropped first."""
        values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.processor.decode([int(i) for i in values if i != self.pad_id])
