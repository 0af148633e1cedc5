"""Tokenizers: byte-level (the default) and BPE from a local `tokenizer.json` (HF `tokenizers`).

All expose the same small interface, used by `train/data.py` and evaluation:

    tok = load_tokenizer("byte")            # or a path to a tokenizer.json, or "ids:8192" (synthetic tasks)
    tok.vocab_size, tok.eos_id              # 257, 256 for "byte"
    tok.encode("text") -> int32 array       # no EOS appended
    tok.decode(ids) -> str                  # special tokens dropped; invalid UTF-8 → U+FFFD
    tok.token_bytes -> int32 [vocab_size]   # UTF-8 bytes each token stands for (0 for EOS/specials)

`token_bytes` makes bits-per-byte exact: the bytes of a text are `token_bytes[tok.encode(text)].sum()`.
Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

__all__ = ["DataError", "Tokenizer", "ByteTokenizer", "IdTokenizer", "BPETokenizer", "load_tokenizer", "train_bpe", "EOS_TOKEN"]

EOS_TOKEN = "<|endoftext|>"  # the special token `train_bpe` adds and `BPETokenizer` looks for first
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|eos|>", "[EOS]")


class DataError(ValueError):
    """A corpus, shard or tokenizer that cannot be used; the message names the path or key at fault."""


class Tokenizer:
    """Base class. `key` identifies the vocabulary (equal keys ⇒ identical encodings); used for caching."""

    spec: str  # what load_tokenizer was given
    vocab_size: int
    eos_id: int
    token_bytes: np.ndarray
    key: tuple

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and self.key == other.key

    def __hash__(self):
        return hash(self.key)

    def __repr__(self):
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus EOS = 256. Round-trips any text exactly."""

    def __init__(self):
        self.spec, self.key = "byte", ("byte",)
        self.vocab_size, self.eos_id = 257, 256
        self.token_bytes = np.ones(257, np.int32)
        self.token_bytes[256] = 0

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class IdTokenizer(Tokenizer):
    """Synthetic tasks (data.source=mqar): token i is just the id i; text is the ids, space-separated.

    No EOS (eos_id = -1 matches no token: examples are not documents); every token counts one "byte",
    so bits per byte on such data is bits per scored token."""

    def __init__(self, vocab_size: int):
        if vocab_size < 1:
            raise DataError(f"an id tokenizer needs a positive vocabulary size, got {vocab_size}")
        self.spec, self.key = f"ids:{vocab_size}", ("ids", vocab_size)
        self.vocab_size, self.eos_id = vocab_size, -1
        self.token_bytes = np.ones(vocab_size, np.int32)

    def encode(self, text: str) -> np.ndarray:
        try:
            ids = np.asarray([int(t) for t in text.split()], np.int32)
        except ValueError:
            raise DataError(f"{self.spec}: text must be whitespace-separated integer ids, got {text[:80]!r}") from None
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DataError(f"{self.spec}: ids must lie in [0, {self.vocab_size}), got {text[:80]!r}")
        return ids

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in np.asarray(ids).reshape(-1))


class BPETokenizer(Tokenizer):
    """A HF `tokenizers` tokenizer.json. Its EOS is the first of `_EOS_CANDIDATES` it defines.

    `token_bytes` is exact for byte-level BPE (every character of a token string is one byte, as
    `train_bpe` makes); for other tokenizers it is len(decode([id]).encode()), an approximation.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import pre_tokenizers

        if not os.path.isfile(path):
            raise DataError(f"tokenizer file not found: {path} (use 'byte' or a path to a tokenizer.json)")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            tok = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"cannot load tokenizer {path}: {e}") from None
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.spec, self.key = path, ("bpe", hashlib.sha256(raw).hexdigest())
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eos = next((tok.token_to_id(t) for t in _EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eos is None:
            raise DataError(f"tokenizer {path} defines no EOS special token (expected one of {list(_EOS_CANDIDATES)})")
        self.eos_id = eos

        added = tok.get_added_tokens_decoder()  # id -> AddedToken
        decoder = (json.loads(tok.to_str()).get("decoder") or {}).get("type")
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        nbytes = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if i in added:  # added tokens are stored as plain text, not byte-level characters
                nbytes[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
                continue
            piece = tok.id_to_token(i)
            if piece is None:
                continue
            if decoder == "ByteLevel" and set(piece) <= alphabet:
                nbytes[i] = len(piece)
            else:
                nbytes[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        self.token_bytes = nbytes
        specials = sorted((t.content for t in added.values() if t.special), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        for i, text in enumerate(texts):
            if self._special_re is not None and self._special_re.search(text):
                out[i] = self._encode_literal_specials(text)
        return out

    def _encode_literal_specials(self, text: str) -> np.ndarray:
        # `tokenizers` turns the text "<|endoftext|>" into the EOS id, which would end a document early
        # in the model's eyes and break round trips and byte counts: encode such strings as plain text,
        # in two pieces that no special token matches.
        parts, last = [], 0
        for m in self._special_re.finditer(text):
            parts += [text[last:m.start()], m.group()[:-1], m.group()[-1:]]
            last = m.end()
        parts.append(text[last:])
        encoded = self._tok.encode_batch([p for p in parts if p], add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, np.int32) for e in encoded])

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


def load_tokenizer(spec: str = "byte") -> Tokenizer:
    """`"byte"` → ByteTokenizer; `"ids:V"` → IdTokenizer(V); anything else is a path to a tokenizer.json."""
    if spec in ("byte", ""):
        return ByteTokenizer()
    if spec.startswith("ids:") and spec[4:].isdigit():
        return IdTokenizer(int(spec[4:]))
    return BPETokenizer(spec)


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str) -> BPETokenizer:
    """Trains a byte-level BPE (GPT-2 style, no normalizer, no prefix space, so it round-trips text
    exactly) with `EOS_TOKEN` as its one special token; saves it to `out_path` and loads it back."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size <= 257:
        raise DataError(f"--train-bpe {vocab_size}: the vocabulary must exceed 257 (256 bytes + EOS)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(out_path)
    return BPETokenizer(out_path)
