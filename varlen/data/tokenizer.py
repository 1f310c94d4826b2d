"""Byte-level BPE trained on the corpus (Hugging Face `tokenizers`), with an end-of-document token."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD = "<|endoftext|>"


class TextTokenizer:
    """Thin wrapper: the `tokenizers` object plus the end-of-document id every document is framed with."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        eod = tok.token_to_id(EOD)
        if eod is None:
            raise ValueError(f"tokenizer has no {EOD} token; it was not made by varlen")
        self.eod_id: int = eod

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(path)))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Byte-level so any input encodes (no unknown token); EOD is id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok)
