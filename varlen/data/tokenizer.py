"""Byte-level BPE trained on the corpus (Hugging Face `tokenizers`), with an end-of-document token.

A tokenizer directory is laid out as Hugging Face's: `tokenizer.json` plus `tokenizer_config.json`, whose
`eos_token` / `bos_token` say which ids end and start a document, so imported Llama tokenizers work too.

A prompt is framed as the model saw text in training, which depends on whose tokenizer it is: varlen's own
frame it as a document ([bos_id] + text ids); a Hugging Face tokenizer frames it with its own post-processor,
exactly as `transformers.AutoTokenizer(text).input_ids` does. `varlen_framing` in tokenizer_config.json
records which; a directory without it is an older varlen one or a Hugging Face one, and its loader says which.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD = "<|endoftext|>"


TOKENIZER_FILE, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
FRAMING_KEY = "varlen_framing"        # tokenizer_config.json: how encode_prompt frames a prompt
DOCUMENT_FRAMING = "document"         # [bos_id] + text ids, as every varlen training document starts
TOKENIZER_FRAMING = "tokenizer"       # whatever tokenizer.json's post-processor adds, as transformers does
FRAMINGS = (DOCUMENT_FRAMING, TOKENIZER_FRAMING)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """Thin wrapper: the `tokenizers` object plus the ids that frame every document.

    A document is [bos_id] + text ids + [eod_id]; varlen's own tokenizers use EOD for both ends. `framing`
    (DOCUMENT_FRAMING or TOKENIZER_FRAMING) says how encode_prompt frames a prompt.
    """

    def __init__(self, tok: Tokenizer, eod_token: str = EOD, bos_token: str | None = None,
                 framing: str = DOCUMENT_FRAMING):
        if framing not in FRAMINGS:
            raise ValueError(f"framing {framing!r} is unknown; use one of {', '.join(FRAMINGS)}")
        # A tokenizer.json may carry a fixed truncation or padding (e.g. max_length 512): varlen never wants
        # text cut or padded, and transformers turns both off per call unless asked, so turn them off here.
        tok.no_truncation()
        tok.no_padding()
        self.tok, self.framing = tok, framing
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

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A prompt's ids, framed as the model saw text start in training: [bos_id] + text ids for varlen's own
        tokenizers; for a Hugging Face one, exactly `AutoTokenizer.from_pretrained(dir)(text).input_ids`.
        add_special_tokens=False gives the bare text ids, for text that holds its own frame (a chat template
        that renders the BOS)."""
        if not add_special_tokens:
            return self.encode(text)
        if self.framing == DOCUMENT_FRAMING:
            return [self.bos_id] + self.encode(text)
        # transformers 5 frames with tokenizer.json's post_processor alone: it drops add_bos_token and
        # add_eos_token from tokenizer_config.json whenever tokenizer.json exists (which varlen requires),
        # for PreTrainedTokenizerFast and LlamaTokenizerFast alike, so they are not read here either.
        return self.tok.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def decode_stream(self) -> "TextStream":
        """Incremental decoding of one generated sequence: each token costs O(1), not a decode of the whole
        output, and a character split across tokens comes out whole once its last token arrives."""
        return TextStream(self.tok)

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
                "eos_token": self.eod_token, "model_max_length": max_len, "clean_up_tokenization_spaces": False,
                FRAMING_KEY: self.framing}

    def save_dir(self, directory: str | Path, max_len: int) -> None:
        directory = Path(directory)
        self.save(directory / TOKENIZER_FILE)
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(self.hf_config(max_len), indent=2) + "\n")

    @classmethod
    def load_dir(cls, directory: str | Path, eos_id: int | None = None,
                 framing: str = DOCUMENT_FRAMING) -> "TextTokenizer":
        """tokenizer.json (+ tokenizer_config.json when present) of a varlen or Hugging Face directory.

        `eos_id` (from a model's config.json) names the end token when tokenizer_config.json does not.
        `framing` applies when tokenizer_config.json has no varlen_framing: the default suits varlen run and
        checkpoint directories written before the key existed; a Hugging Face import passes TOKENIZER_FRAMING.
        """
        directory = Path(directory)
        tok = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        conf_path = directory / TOKENIZER_CONFIG
        conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
        eos = _token_text(conf.get("eos_token"))
        if eos is None and eos_id is not None:
            eos = tok.id_to_token(eos_id)
        bos = _token_text(conf.get("bos_token"))
        framing = conf.get(FRAMING_KEY, framing)
        if framing not in FRAMINGS:
            raise ValueError(f"{conf_path}: {FRAMING_KEY} is {framing!r}; set it to {DOCUMENT_FRAMING!r} ([bos] + "
                             f"text, varlen's own) or {TOKENIZER_FRAMING!r} (as transformers frames the text)")
        return cls(tok, eos or EOD, bos if bos != (eos or EOD) else None, framing)


class TextStream:
    """`tokenizers`' DecodeStream bound to its tokenizer: step(id) -> the text that token completes ("" while
    a multi-byte character is still partial)."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.stream = tok, decoders.DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str:
        return self.stream.step(self.tok, token) or ""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """Byte-level so any input encodes (no unknown token); EOD is id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok)
