"""MQAR: the generator (train/mqar.py) against its definition, data.source=mqar through the data
pipeline and the training loop, and the eval suite (eval/mqar.py) on hand-built models whose accuracy
is known exactly."""

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from effax.eval import mqar as mqar_eval
from effax.eval.context import EvalContext
from effax.models.dense import DenseConfig
from effax.train import config as config_lib
from effax.train import data as data_lib
from effax.train import loop
from effax.train import mesh as mesh_lib
from effax.train import metrics as metrics_lib
from effax.train.config import Config, ConfigError, DataConfig, MeshConfig
from effax.train.mqar import MQARSource
from effax.train.tokenizer import DataError, IdTokenizer, load_tokenizer

QUIET = ["logging.tensorboard=false", "logging.progress=false"]


@pytest.fixture(autouse=True)
def _cwd(repo, monkeypatch):
    monkeypatch.chdir(repo)


def check_example(x, vocab, n):
    """Every property the generator promises, checked from the arrays alone."""
    T = len(x["tokens"])
    assert {k: (v.shape, v.dtype.name) for k, v in x.items()} == {
        "tokens": ((T,), "int32"), "targets": ((T,), "int32"), "positions": ((T,), "int32"),
        "segment_ids": ((T,), "int32"), "loss_mask": ((T,), "float32"), "target_bytes": ((T,), "int32")}
    tok, tgt, mask = x["tokens"], x["targets"], x["loss_mask"]
    np.testing.assert_array_equal(tok[1:], tgt[:-1])  # one stream: targets are the inputs shifted
    np.testing.assert_array_equal(x["positions"], np.arange(T))
    np.testing.assert_array_equal(x["segment_ids"], np.ones(T))
    np.testing.assert_array_equal(x["target_bytes"], mask)
    assert tok.min() >= 0 and tok.max() < vocab and tgt.max() < vocab
    keys, values = tok[0:2 * n:2], tok[1:2 * n:2]
    assert len(set(keys)) == n and len(set(values)) == n  # unique within the example
    assert keys.max() < vocab // 2 <= values.min()
    assert set(np.unique(mask)) <= {0.0, 1.0}
    query = np.flatnonzero(mask)
    assert len(query) == n and query.min() >= 2 * n and np.all((query - 2 * n) % 2 == 0)
    assert sorted(tok[query]) == sorted(keys)  # each key queried exactly once
    answer = dict(zip(keys, values))
    np.testing.assert_array_equal(tgt[query], [answer[k] for k in tok[query]])
    # Outside the pairs and the queries a key never appears: its pair is its only earlier occurrence.
    noise = np.ones(T, bool)
    noise[:2 * n] = False
    noise[query] = False
    noise[np.minimum(query + 1, T - 1)] = False
    assert not np.isin(tok[noise], keys).any()
    return query


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(2 * n, 3 * n + 40), st.integers(4 * n, 4 * n + 60),
    st.sampled_from([0.01, 0.5, 1.0, 2.0]), st.integers(-5, 2**40), st.integers(0, 2**40 - 1),
    st.sampled_from(["train", "val"]))))
def test_examples_match_the_definition(args):
    n, vocab, T, a, seed, index, split = args  # the smallest vocab and seq_len the definition allows, and up
    src = MQARSource(vocab=vocab, seq_len=T, n_pairs=n, power_a=a, seed=seed, split=split, length=2**40)
    check_example(src[index], vocab, n)


def test_random_access_and_determinism():
    make = lambda **kw: MQARSource(**{"vocab": 64, "seq_len": 32, "n_pairs": 4, "seed": 7, **kw})
    a, b = make(), make()
    rows = [a[i]["tokens"] for i in (5, 0, 3, 5)]
    np.testing.assert_array_equal(rows[0], rows[3])  # same index, same example, whatever came before
    for i in (3, 0, 5):
        for k, v in a[i].items():
            np.testing.assert_array_equal(v, b[i][k])
    assert not np.array_equal(a[0]["tokens"], a[1]["tokens"])
    assert not np.array_equal(a[0]["tokens"], make(seed=8)[0]["tokens"])
    assert not np.array_equal(a[0]["tokens"], make(split="val")[0]["tokens"])
    assert len(a) == 2**40 and len(make(split="val")) == 4096 and len(make(length=3)) == 3
    with pytest.raises(IndexError):
        make(length=3)[3]


def _slots(src, count):
    """[count, n]: the query slot of pair 0, 1, …, n-1 of each example."""
    n, out = src.n_pairs, []
    for i in range(count):
        tok, query = src[i]["tokens"], np.flatnonzero(src[i]["loss_mask"])
        by_key = dict(zip(tok[query], (query - 2 * n) // 2))
        out.append([by_key[k] for k in tok[0:2 * n:2]])
    return np.array(out)


def test_power_law_gaps():
    # T=256, 4 pairs: S = 124 query slots. Slot s is drawn with p(s) ∝ (s+1)^(a-1), without replacement,
    # and pair i is queried in the i-th slot drawn, so pair 0's slot has exactly the distribution p.
    T, n, count = 256, 4, 2000
    S = (T - 2 * n) // 2
    skewed = _slots(MQARSource(vocab=512, seq_len=T, n_pairs=n, power_a=0.01), count)
    uniform = _slots(MQARSource(vocab=512, seq_len=T, n_pairs=n, power_a=1.0), count)
    short = lambda slots: np.mean(slots < S // 10)  # the first tenth of the query region
    assert short(skewed) > 0.35 and abs(short(uniform) - 0.1) < 0.03
    assert np.mean(skewed < S // 2) > 2 * np.mean(skewed >= S // 2)  # more short gaps than long
    p = np.arange(1, S + 1) ** (0.01 - 1.0)
    p /= p.sum()
    # pair 0's slot: P(slot 0) = p[0] ≈ 0.185; 5 binomial standard deviations (~0.043) of slack.
    sd = math.sqrt(p[0] * (1 - p[0]) / count)
    assert abs(np.mean(skewed[:, 0] == 0) - p[0]) < 5 * sd
    # later draws come from what is left, so later pairs are queried after longer gaps on average
    assert np.mean(skewed[:, 0]) < np.mean(skewed[:, -1])


@pytest.mark.parametrize("kwargs, needle", [
    ({"n_pairs": 0}, "n_pairs"), ({"seq_len": 15}, "seq_len.*>= 4n = 16"), ({"vocab": 7}, "vocab.*at least 8"),
    ({"power_a": 0.0}, "power_a"), ({"split": "test"}, "split"),
])
def test_generator_errors_name_the_parameter(kwargs, needle):
    with pytest.raises(DataError, match=needle):
        MQARSource(**{"vocab": 64, "seq_len": 16, "n_pairs": 4, **kwargs})


SMOKE = "experiments/quickstart.py:smoke"


@pytest.mark.parametrize("overrides, needle", [
    (["data.mqar_pairs=17"], "data.seq_len: 64 is too short for 17 pairs"),
    (["data.mqar_pairs=0"], "data.mqar_pairs"),
    (["data.mqar_vocab=15"], "data.mqar_vocab"),
    (["data.mqar_power_a=-1"], "data.mqar_power_a"),
])
def test_config_validation_names_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        config_lib.resolve(SMOKE, ["data.source=mqar", "data.mqar_vocab=64", *overrides])
    config_lib.resolve(SMOKE, overrides)  # ignored unless data.source=mqar
    with pytest.raises(ConfigError, match="mqar"):
        config_lib.resolve(SMOKE, ["data.source=nope"])  # listed among the choices


def test_experiment_variants_resolve():
    for variant in ("", ":seq128", ":seq256", ":smoke"):
        cfg = config_lib.resolve("experiments/mqar.py" + variant)
        assert cfg.data.source == "mqar" and cfg.model.n_layers == 2
    with pytest.raises(ConfigError, match="seq128"):
        config_lib.resolve("experiments/mqar.py:nope")


def test_id_tokenizer():
    cfg = DataConfig(source="mqar", seq_len=32, mqar_vocab=64, mqar_pairs=4)
    tok = data_lib.tokenizer_for(cfg)
    assert tok == IdTokenizer(64) == load_tokenizer("ids:64") and tok != IdTokenizer(65)
    assert tok.vocab_size == 64 and tok.eos_id == -1 and tok.token_bytes.tolist() == [1] * 64
    assert tok.decode(np.array([3, 40, 0])) == "3 40 0"
    np.testing.assert_array_equal(tok.encode(" 3 40\n0 "), [3, 40, 0])
    for bad in ("3 x", "64", "-1"):
        with pytest.raises(DataError, match="ids:64"):
            tok.encode(bad)
    with pytest.raises(DataError, match="ids:64"):
        data_lib.corpus_windows(cfg, "val", load_tokenizer("byte"))
    with pytest.raises(DataError, match="'all'"):
        data_lib.corpus_windows(cfg, "all")


def test_iterators_resume_split_and_hold_out_val():
    cfg = DataConfig(source="mqar", seq_len=32, mqar_vocab=64, mqar_pairs=4)
    it = data_lib.train_iterator(cfg, batch_size=8, seed=3)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    it.close()
    resumed = data_lib.train_iterator(cfg, batch_size=8, seed=3)
    resumed.set_state(state)
    for a, b in zip(rest, [next(resumed) for _ in range(2)]):
        for k in data_lib.KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    resumed.close()
    for b in first:
        assert b["loss_mask"].sum() == 8 * 4 and b["target_bytes"].sum() == 8 * 4
        for row in range(8):
            check_example({k: v[row] for k, v in b.items()}, 64, 4)
    # two processes together see exactly the one-process batch
    halves = [data_lib.train_iterator(cfg, batch_size=8, seed=3, process_index=p, process_count=2).batch(1) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in halves]), first[1]["tokens"])
    with pytest.raises(DataError, match="seed"):
        other = data_lib.train_iterator(cfg, batch_size=8, seed=4)
        other.set_state(state)
    assert not np.array_equal(data_lib.train_iterator(cfg, batch_size=8, seed=4).batch(0)["tokens"], first[0]["tokens"])
    # val: a fixed stream of its own, the same whatever train.seed, never one of the train examples
    val = data_lib.val_batches(cfg, batch_size=8, num_batches=4)
    assert len(val) == 4
    train_rows = {r.tobytes() for b in first + rest for r in b["tokens"]}
    assert not train_rows & {r.tobytes() for b in val for r in b["tokens"]}
    assert len(data_lib.val_batches(cfg, batch_size=1024, num_batches=None)) == 4  # 4096 val examples


# ---------------------------------------------------------------------------------------------------
# The eval suite on models whose answers are known


class Lookup(nnx.Module):
    """Perfect recall by construction: at each position, find the most recent earlier occurrence of the
    current token and predict the token that followed it (one-hot logits). Positions >= `cutoff`
    predict id 0, never a value, so they are always wrong."""

    def __init__(self, vocab: int, cutoff: int | None = None):
        self.vocab, self.cutoff = vocab, cutoff

    def __call__(self, tokens_BT, *, positions_BT, segment_ids_BT):
        T = tokens_BT.shape[1]
        t, s = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
        earlier_BTS = (tokens_BT[:, :, None] == tokens_BT[:, None, :]) & (s < t)
        last_BT = jnp.max(jnp.where(earlier_BTS, s, -1), axis=-1)
        follower_BT = jnp.take_along_axis(tokens_BT, jnp.clip(last_BT + 1, 0, T - 1), axis=1)
        answer_BT = jnp.where((last_BT >= 0) & (positions_BT < (self.cutoff or T)), follower_BT, 0)
        return jax.nn.one_hot(answer_BT, self.vocab) * 10.0, {}


class RandomLogits(nnx.Module):
    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, tokens_BT, *, positions_BT, segment_ids_BT):
        key = jax.random.fold_in(jax.random.key(0), jnp.sum(tokens_BT * (positions_BT + 1)))
        return jax.random.normal(key, (*tokens_BT.shape, self.vocab)), {}


def _ctx(model, data=None, vocab=64):
    cfg = Config(model=DenseConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2),
                 data=data or DataConfig(source="mqar", seq_len=64, mqar_vocab=vocab, mqar_pairs=8))
    mesh_cfg = MeshConfig()
    return EvalContext(cfg=cfg, model=model, tokenizer=data_lib.tokenizer_for(cfg.data), mesh=mesh_lib.make_mesh(mesh_cfg),
                       rules=mesh_lib.rules(mesh_cfg), step=0, workdir="")


def test_lookup_model_recalls_exactly_and_padding_is_not_counted():
    out = mqar_eval.run(_ctx(Lookup(64)), {"mqar_examples": 13, "mqar_batch_size": 8})  # 2 batches, 3 rows padded
    assert out["accuracy"] == 1.0 and out["all_correct"] == 1.0
    assert (out["examples"], out["queries"], out["pairs"], out["seq_len"], out["vocab"]) == (13, 13 * 8, 8, 64, 64)


def test_partial_recall_is_scored_per_query_and_per_example():
    cutoff, n, N = 40, 8, 50
    out = mqar_eval.run(_ctx(Lookup(64, cutoff)), {"mqar_examples": N})
    src = MQARSource(vocab=64, seq_len=64, n_pairs=n, split="val")
    query = np.array([np.flatnonzero(src[i]["loss_mask"]) for i in range(N)])  # the suite scores the val stream
    assert out["accuracy"] == pytest.approx(np.mean(query < cutoff), abs=1e-12)
    assert out["all_correct"] == pytest.approx(np.mean(np.all(query < cutoff, axis=1)), abs=1e-12)
    assert 0 < out["all_correct"] < out["accuracy"] < 1


def test_random_logits_score_chance():
    V = 64
    out = mqar_eval.run(_ctx(RandomLogits(V), vocab=V), {"mqar_examples": 400})
    q = out["queries"]  # 3200; argmax is uniform over V, so E[accuracy] = 1/V, sd = sqrt(p(1-p)/q) ≈ 0.0044
    assert abs(out["accuracy"] - 1 / V) < 5 * math.sqrt((1 / V) * (1 - 1 / V) / q)
    assert out["accuracy"] < 1 / (V // 2) and out["all_correct"] < 0.01


def test_settings_defaults_and_errors():
    parser = argparse.ArgumentParser()
    mqar_eval.add_arguments(parser)
    opts = parser.parse_args(["--mqar-pairs", "4", "--mqar-seq-len", "32"])
    mqar_run = _ctx(None).cfg
    text_run = dataclasses.replace(mqar_run, data=DataConfig(), model=DenseConfig(vocab_size=384))
    assert mqar_eval.settings(mqar_run, None) == {"seq_len": 64, "n_pairs": 8, "vocab": 64, "power_a": 0.01}
    assert mqar_eval.settings(text_run, None) == {"seq_len": 128, "n_pairs": 8, "vocab": 384, "power_a": 0.01}
    assert mqar_eval.settings(mqar_run, opts) == {"seq_len": 32, "n_pairs": 4, "vocab": 64, "power_a": 0.01}
    with pytest.raises(ValueError, match="--mqar-seq-len"):
        mqar_eval.settings(mqar_run, parser.parse_args(["--mqar-pairs", "9", "--mqar-seq-len", "32"]))
    with pytest.raises(ValueError, match="--mqar-vocab=128 exceeds the model's vocabulary"):
        mqar_eval.settings(mqar_run, {"mqar_vocab": 128})
    with pytest.raises(ValueError, match="--mqar-batch-size"):
        mqar_eval.run(_ctx(Lookup(64)), {"mqar_batch_size": 12})  # 8 fake devices on the data axis
    with pytest.raises(ValueError, match="--mqar-examples must be positive"):
        mqar_eval.run(_ctx(Lookup(64)), {"mqar_examples": 0})


# ---------------------------------------------------------------------------------------------------
# End to end: training on data.source=mqar


def test_training_on_mqar_scores_only_the_answers(tmp_path):
    cfg = config_lib.resolve("experiments/mqar.py:smoke",
                             QUIET + ["train.steps=4", "eval.every=2", "eval.batches=1", "checkpoint.every=0"])
    assert loop.train(cfg, str(tmp_path), quiet=True) == 0
    val = metrics_lib.read(str(tmp_path), "val")
    assert [r["step"] for r in val] == [2, 4]
    for r in val:  # target_bytes is 1 at each answer and 0 elsewhere, so bits per byte = loss / ln 2 exactly
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2), rel=1e-6)
    assert len(metrics_lib.read(str(tmp_path), "train")) == 4

    # The loss sums over the query positions only: the targets elsewhere do not change it.
    cfg = loop.resolve_vocab(cfg, data_lib.tokenizer_for(cfg.data))
    mesh, rules = mesh_lib.make_mesh(cfg.mesh), mesh_lib.rules(cfg.mesh)
    trainer = loop.build_trainer(cfg, mesh, rules)
    batch = data_lib.train_iterator(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed).batch(0)
    scrambled = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"],
                                             np.random.default_rng(0).integers(0, 128, batch["targets"].shape)).astype(np.int32))
    assert (scrambled["targets"] != batch["targets"]).mean() > 0.5
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = trainer.init_state()
        a, b = (jax.device_get(trainer.eval_step(state, trainer.to_global(x))) for x in (batch, scrambled))
        assert a["tokens"] == a["bytes"] == cfg.train.batch_size * cfg.data.mqar_pairs
        assert float(a["ce_sum"]) == float(b["ce_sum"])
        # the suite runs a real model on the run's own settings
        model = nnx.merge(trainer.graphdef, state["params"], state["other"])
    ctx = EvalContext(cfg=cfg, model=model, tokenizer=data_lib.tokenizer_for(cfg.data), mesh=mesh, rules=rules,
                      step=0, workdir=str(tmp_path))
    out = mqar_eval.run(ctx, {"mqar_examples": 40})
    assert (out["examples"], out["queries"], out["seq_len"], out["vocab"]) == (40, 160, 64, 128)
    assert 0.0 <= out["accuracy"] <= 1.0
