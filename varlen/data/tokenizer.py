"""Byte-level BPE trained on the corpus (Hugging Face `tokenizers`), with an end-of-document token.

A tokenizer directory is laid out as Hugging Face's: `tokenizer.json` plus `tokenizer_config.json`, whose
`eos_token` / `bos_token` say which ids end and start a document, so imported Llama tokenizers work too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD = "<|endoftext|>"


TOKENIZER_FILE, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """Thin wrapper: the `tokenizers` object plus the ids that frame every document.

    A document is [bos_id] + text ids + [eod_id]; varlen's own tokenizers use EOD for both ends.
    """

    def __init__(self, tok: Tokenizer, eod_token: str = EOD, bos_token: str | None = None):
        self.tok = tok
        eod = tok.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"tokenizer has no end-of-document token {eod_token!r}; name it as eos_token in "
                             f"{TOKENIZER_CONFIG}")
        bos = tok.token_to_id(bos_token) if bos_token else None
        if bos_token and bos is None:
            raise ValueError(f"tokenizer has no bos_token {bos_token!r} named in {TOKENIZER_CONFIG}")
        self.eod_token, self.bos_token = eod_token, bos_token
        self.eod_id: int = eod
        self.bos_id: int = eod if bos is None else bos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text ids alone: the frame (bos/eod) is added by whoever builds a document or prompt."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """A bare varlen tokenizer.json (its EOD token frames documents)."""
        return cls(Tokenizer.from_file(str(path)))

    def hf_config(self, max_len: int) -> dict:
        """tokenizer_config.json that `transformers.AutoTokenizer` loads as a fast tokenizer."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token or self.eod_token,
                "eos_token": self.eod_token, "model_max_length": max_len, "clean_up_tokenization_spaces": False}

    def save_dir(self, directory: str | Path, max_len: int) -> None:
        directory = Path(directory)
        self.save(directory / TOKENIZER_FILE)
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(self.hf_config(max_len), indent=2) + "\n")

    @classmethod
    def load_dir(cls, directory: str | Path, eos_id: int | None = None) -> "TextTokenizer":
        """tokenizer.json (+ tokenizer_config.json when present) of a varlen or Hugging Face directory.

        `eos_id` (from a model's config.json) names the end token when tokenizer_config.json does not.
        """
        directory = Path(directory)
        tok = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        conf_path = directory / TOKENIZER_CONFIG
        conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
        eos = _token_text(conf.get("eos_token"))
        if eos is None and eos_id is not None:
            eos = tok.id_to_token(eos_id)
        bos = _token_text(conf.get("bos_token"))
        return cls(tok, eos or EOD, bos if bos != (eos or EOD) else None)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Byte-level so any input encodes (no unknown token); EOD is id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok)
