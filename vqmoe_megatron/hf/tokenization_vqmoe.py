"""Hugging Face tokenizer over the project's sentencepiece model (self-contained: copied into
exports; works offline with ``AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)``).

It encodes exactly as the project does (``sentencepiece.encode(text)``: no BOS/EOS added, and
strings such as ``"</s>"`` in the text are ordinary characters, never control tokens) and
decodes with sentencepiece (byte-fallback pieces become bytes again). The training data puts
EOS before and after every document, so EOS is also the BOS of this tokenizer: tools that
condition the first token on a BOS (lm-evaluation-harness' rolling log-likelihood) then use the
separator the model was trained with. ``<pad>`` is the padding token.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class VQMoETokenizer(PreTrainedTokenizer):
    """sentencepiece ``tokenizer.model`` with the project's special pieces."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        eos_token: str = "</s>",
        bos_token: str = "</s>",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        **kwargs,
    ) -> None:
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.Load(vocab_file)
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(
            eos_token=eos_token,
            bos_token=bos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def _decode(
        self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        return self.sp_model.decode([i for i in ids if 0 <= i < self.vocab_size])

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None
    ) -> list[int]:
        """No special tokens are added: documents are framed by the caller (as in training)."""
        return token_ids_0 + (token_ids_1 or [])

    def save_vocabulary(
        self, save_directory: str, filename_prefix: Optional[str] = None
    ) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        target = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
