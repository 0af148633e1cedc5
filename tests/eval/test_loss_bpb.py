"""The loss and bpb suites: a hand-computed case (uniform logits), an independent numpy recomputation on
a real model, the run's own val figures reproduced, and the KJV corpus."""

import argparse
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effax.eval import loss as loss_lib
from effax.eval import restore as restore_lib
from effax.eval.context import EvalContext
from effax.train import config as config_lib
from effax.train import loop
from effax.train import mesh as mesh_lib
from effax.train import metrics as metrics_lib
from effax.train.tokenizer import load_tokenizer

SMOKE = str(pathlib.Path(__file__).resolve().parents[2] / "experiments/quickstart.py") + ":smoke"
SHORT = ["train.steps=6", "checkpoint.every=3", "eval.every=3", "eval.batches=2", "logging.tensorboard=false",
         "logging.progress=false"]
T = 64  # the smoke config's data.seq_len


def opts(**kw):
    return argparse.Namespace(**{"data": None, "split": None, "batches": None, "batch_size": None, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("loss_run")
    cfg = config_lib.resolve(SMOKE, SHORT)  # all 8 devices on the data axis
    assert loop.train(cfg, str(workdir), quiet=True) == 0
    return str(workdir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """30 short documents, 1827 text bytes: the stream (text + one EOS each) is 1857 = 29·64 + 1 tokens, so
    it packs into exactly 29 windows with nothing left over, whatever the document order; 29 is not a
    multiple of the batch (8), so the last batch is padded."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    lengths = [61] * 29 + [58]
    for i, n in enumerate(lengths):
        text = "".join(rng.choice(list("abcdefgh ijklmnop.\n"), n))
        (folder / f"doc{i:02d}.txt").write_text(text)
    return str(folder), sum(lengths), len(lengths)


class UniformModel(nnx.Module):
    """Zero logits over the whole vocabulary: every token costs exactly ln V nats."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
        return jnp.zeros((*tokens_BT.shape, self.vocab), jnp.float32), {}


def test_uniform_logits_by_hand(corpus):
    folder, text_bytes, docs = corpus
    cfg = loop.resolve_vocab(config_lib.resolve(SMOKE, []), load_tokenizer("byte"))
    mesh = mesh_lib.make_mesh(cfg.mesh)
    V = cfg.model.vocab_size
    ctx = EvalContext(cfg=cfg, model=UniformModel(V), tokenizer=load_tokenizer("byte"), mesh=mesh,
                      rules=mesh_lib.rules(cfg.mesh), step=0, workdir="uniform")
    loss, bpb = loss_lib.run_loss(ctx, opts(data=folder)), loss_lib.run_bpb(ctx, opts(data=folder))
    # Every stream position but the 30 document starts is a scored target: the 1827 text bytes' worth;
    # of those, the 30 EOS targets count 0 bytes.
    assert loss["tokens"] == text_bytes
    assert bpb["bytes"] == text_bytes - docs
    assert "29 windows" in loss["corpus"] and "4 batches" in loss["corpus"]
    assert loss["loss"] == pytest.approx(math.log(V), rel=1e-6)  # fp32 logsumexp of zeros
    assert loss["perplexity"] == pytest.approx(V, rel=1e-5)
    assert bpb["bpb"] == pytest.approx(math.log2(V) * text_bytes / (text_bytes - docs), rel=1e-6)
    # --batches: only the first full batches (8 windows each), still all of their scored targets
    assert loss_lib.run_loss(ctx, opts(data=folder, batches=1))["tokens"] < 8 * T


def test_real_model_against_numpy(run, corpus):
    folder, _, _ = corpus
    ctx = restore_lib.restore(run)
    loss, bpb = loss_lib.run_loss(ctx, opts(data=folder)), loss_lib.run_bpb(ctx, opts(data=folder))
    windows = loss_lib.windows_for(ctx, folder, None)
    w = {k: np.stack([windows[i][k] for i in range(len(windows))]) for k in ("tokens", "targets", "positions",
                                                                                "segment_ids", "loss_mask")}
    logits = np.asarray(ctx.model(jnp.asarray(w["tokens"]), positions_BT=jnp.asarray(w["positions"]),
                                  segment_ids_BT=jnp.asarray(w["segment_ids"]))[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, w["targets"][..., None], -1)[..., 0]
    scored = w["loss_mask"] > 0
    nats, tokens = nll[scored].sum(), scored.sum()
    n_bytes = (scored & (w["targets"] != ctx.tokenizer.eos_id)).sum()  # byte tokenizer: 1 byte, EOS 0
    assert loss["tokens"] == tokens and bpb["bytes"] == n_bytes
    # fp32 logits and log-softmax on device vs float64 here: ≈1e-7 relative per token, summed over 1827.
    assert loss["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert bpb["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert bpb["bpb"] == pytest.approx(loss["loss"] / math.log(2) * loss["tokens"] / bpb["bytes"], rel=1e-12)


def test_reproduces_the_runs_val_line(run):
    """Same step, mesh (8 devices on data) and batches (eval.batches) as the loop's last validation: the same
    eval step function on the same arrays, summed in the same order. Observed bit-equal; 1e-6 (≈8 fp32 ulps)
    only allows XLA to compile the separately jitted program with another reduction order."""
    ctx = restore_lib.restore(run, "latest")
    final = metrics_lib.read(run, "val")[-1]
    assert final["step"] == ctx.step == 6
    o = opts(batches=ctx.cfg.eval.batches)
    loss, bpb = loss_lib.run_loss(ctx, o), loss_lib.run_bpb(ctx, o)
    assert loss["loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert bpb["bpb"] == pytest.approx(final["bpb"], rel=1e-6)
    # and the default (all of the val split) covers more than the loop's 2 batches
    assert loss_lib.run_loss(ctx, opts(batches=3))["tokens"] > loss["tokens"]


def test_kjv_corpus(run):
    docs = loss_lib.kjv_documents()
    assert len(docs) == 66 and docs[0][0] == "Genesis" and docs[-1][0] == "Revelation"
    assert docs[0][1].startswith("The First Book of Moses, called Genesis\n\n1:1 In the beginning God created")
    n_bytes = sum(len(text.encode()) for _, text in docs)
    assert 4.2e6 < n_bytes < 4.5e6  # the package holds 4.28 MB of verse text
    ctx = restore_lib.restore(run)
    windows = loss_lib.windows_for(ctx, "kjv", None)
    assert len(windows) == (n_bytes + len(docs) - 1) // T
    val = loss_lib.windows_for(ctx, "kjv", "val")
    assert 0 < len(val) < len(windows) / 5  # the run's 5% split rule, by book
    bpb = loss_lib.run_bpb(ctx, opts(data="kjv", batches=1))
    assert 0 < bpb["bpb"] < 9 and bpb["bytes"] == 8 * T  # one batch of Genesis: no EOS in it
