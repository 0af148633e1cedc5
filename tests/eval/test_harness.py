"""The lm-eval adapter's scorer against a direct full forward of the model, on a tiny trained run.

The reference path shares nothing with the scorer but the model: one unpadded-prefix sequence at a time on
a one-device restore, no segment ids, log-softmax in float64 on the host. A document start ("EOS in its own
segment") is computed as two separate forwards: [EOS] alone, then the text from position 0.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effax.eval import harness
from effax.eval import restore as restore_lib
from effax.models.generate import generate
from effax.train import config as config_lib
from effax.train import loop
from effax.train import mesh as mesh_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "experiments/quickstart.py") + ":smoke"  # data.seq_len = 64: max_length T
SHORT = ["train.steps=6", "checkpoint.every=6", "eval.every=6", "eval.batches=1", "logging.tensorboard=false",
         "logging.progress=false"]
T = 64
EOS = 256
WINDOW = 80  # reference sequences are right-padded to this (one compile; causal: the padding changes nothing before it)

# The scorer sums up to 64 fp32 log-probs (a few nats each) on an 8-way batch-sharded mesh; the reference sums
# float64 log-softmax of fp32 logits from a batch of 1. fp32 rounding of such a sum is at most ~n·eps ≈ 4e-6
# relative; observed: ≤ 8e-8 relative (8.2e-6 on a 104-nat sum, 0 to 1e-6 on short ones). Any semantic slip
# (an off-by-one target, a token missing or extra, the EOS attended to, a wrong cut) moves a sum by ~1 nat.
RTOL, ATOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("harness_run")
    assert loop.train(config_lib.resolve(SMOKE, SHORT), str(workdir), quiet=True) == 0
    return str(workdir)


@pytest.fixture(scope="module")
def scorer(run):
    ctx = restore_lib.restore(run)  # all 8 devices on the data axis
    assert ctx.cfg.data.seq_len == T and ctx.tokenizer.eos_id == EOS
    return harness.EffaxScorer(ctx, batch_size=8)


@pytest.fixture(scope="module")
def ref(run):
    """ref(ids, start=0) -> float64 log-softmax [len(ids), V] of the full forward, positions start, start+1, …"""
    mesh = mesh_lib.make_mesh(config_lib.MeshConfig(data=1), devices=jax.devices()[:1])
    ctx = restore_lib.restore(run, mesh=mesh)
    graphdef, state = nnx.split(ctx.model)
    fn = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, positions_BT=p)[0])

    def log_softmax(ids, start=0):
        n = len(ids)
        tokens = np.zeros((1, WINDOW), np.int32)
        tokens[0, :n] = ids
        positions = (start + np.arange(WINDOW, dtype=np.int32))[None]
        with jax.set_mesh(ctx.mesh), nnx.logical_axis_rules(ctx.rules):
            logits = np.asarray(fn(state, jnp.asarray(tokens), jnp.asarray(positions)))[0, :n].astype(np.float64)
        return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
            logits.max(-1, keepdims=True)

    return log_softmax


def b(text):
    return list(text.encode("utf-8"))


def ref_sum(ref, ids, n_scored, start=0):
    """Σ log p of the last n_scored tokens of ids, each from all of the ids before it."""
    lp = ref(ids[:-1], start)
    return sum(lp[j, ids[j + 1]] for j in range(len(ids) - 1 - n_scored, len(ids) - 1))


def ref_first_token(ref, tok):
    return ref([EOS])[0, tok]  # EOS alone: the document start


def test_loglikelihood_matches_the_full_forward(scorer, ref):
    pairs = [("The state of the", " Union"), ("Fellow citizens", " of the Senate"), ("a", "b"),
             ("We the people ", "of the United States"),  # the trailing space moves to the continuation
             ("Mr. Speaker,", ""), ("x" * 40, " y" * 11), ("", "Congress"), ("   ", "  two"),
             ("Peace", " and war"), ("In", " 1862 the Union"), ("é", "ü ok")]
    got = scorer.loglikelihood(pairs)
    for (context, cont), (logp, _) in zip(pairs, got):
        context_kept = context.rstrip()
        cont = context[len(context_kept):] + cont
        if not cont:
            want = 0.0
        elif not context_kept:  # empty context: the first token from EOS, the rest from the text alone
            want = ref_first_token(ref, b(cont)[0]) + ref_sum(ref, b(cont), len(b(cont)) - 1)
        else:
            want = ref_sum(ref, b(context_kept) + b(cont), len(b(cont)))
        np.testing.assert_allclose(logp, want, rtol=RTOL, atol=ATOL, err_msg=repr((context, cont)))
    assert got[4] == (0.0, True)
    # a batch of one and a different batching give the same numbers
    np.testing.assert_allclose(scorer.loglikelihood(pairs[:1])[0][0], got[0][0], rtol=RTOL, atol=ATOL)


def test_left_truncation_at_max_length(scorer, ref):
    context, cont = "".join(chr(97 + i % 26) for i in range(100)), " and so on"  # 110 bytes > T + 1
    long_cont = " tail" * 16  # 80 bytes: longer than T, only its last T tokens are predicted
    (got, _), (got_long, _) = scorer.loglikelihood([(context, cont), ("ab", long_cont)])
    ids = b(context + cont)[-(T + 1):]
    np.testing.assert_allclose(got, ref_sum(ref, ids, len(cont)), rtol=RTOL, atol=ATOL)
    ids = b("ab" + long_cont)[-(T + 1):]
    np.testing.assert_allclose(got_long, ref_sum(ref, ids, T), rtol=RTOL, atol=ATOL)


def greedy_bytes(ref, prompt, n):
    ids = b(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(ref(ids)[-1])))
    return ids[len(b(prompt)):]


def test_is_greedy(scorer, ref):
    prompt = "The state of the Union is"
    cont = greedy_bytes(ref, prompt, 6)
    assert all(t < 128 for t in cont), f"the model's greedy bytes {cont} are not ASCII text"
    text = bytes(cont).decode()
    changed = text[:3] + chr(ord("a") + (ord(text[3]) - ord("a") + 1) % 26) + text[4:]  # one byte off greedy
    (lp, greedy), (lp_changed, not_greedy) = scorer.loglikelihood([(prompt, text), (prompt, changed)])
    assert greedy and not not_greedy
    assert lp > lp_changed
    assert scorer.loglikelihood([(prompt, text[:1])])[0][1]  # a one-token greedy continuation


def test_loglikelihood_rolling_windows(scorer, ref):
    text = ("The President shall from time to time give to the Congress Information of the State of the "
            "Union, and recommend to their Consideration such Measures as he shall judge necessary.")[:150]
    ids = b(text)
    assert len(ids) == 150
    # lm-eval's windows for 150 tokens, T = 64: predict [0, 64) from EOS + [0, 63); [64, 128) from
    # [63, 127); the last 22, [128, 150), from a full window [85, 149).
    want = (ref_first_token(ref, ids[0]) + ref_sum(ref, ids[:64], 63)
            + ref_sum(ref, ids[63:128], 64, start=63) + ref_sum(ref, ids[85:150], 22, start=85))
    short = "Short."
    want_short = ref_first_token(ref, b(short)[0]) + ref_sum(ref, b(short), len(short) - 1)
    got = scorer.loglikelihood_rolling([text, short, ""])
    np.testing.assert_allclose(got[0], want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got[1], want_short, rtol=RTOL, atol=ATOL)
    assert got[2] == 0.0
    # the same as the empty-context loglikelihood of a text that fits one window
    np.testing.assert_allclose(scorer.loglikelihood([("", short)])[0][0], got[1], rtol=RTOL, atol=ATOL)


def test_generate_until(scorer):
    ctx = scorer.ctx
    prompts = ["The state of the Union is", "Fellow citizens", "x" * 60]
    with jax.set_mesh(ctx.mesh), nnx.logical_axis_rules(ctx.rules):
        # the third prompt as generate_until must cut it: from the left, to max_length - max_gen_toks = 40 tokens
        *full, truncated = generate(ctx.model, ctx.tokenizer, prompts[:2] + ["x" * 40], max_new_tokens=24)
    assert all(len(t) >= 8 for t in full), full
    stop = full[0][4:6]  # occurs in the completion: it is cut before its first occurrence
    got = scorer.generate_until([
        (prompts[0], {"until": [stop, "never appears"], "max_gen_toks": 24}),
        (prompts[1], {"until": "\x00", "max_gen_toks": 24, "do_sample": False, "temperature": 0.7}),
        (prompts[2], {"until": [], "max_gen_toks": 24}),
    ])
    assert got[0] == full[0][:full[0].index(stop)] and len(got[0]) <= 4
    assert got[1] == full[1]  # do_sample=False: greedy whatever the temperature
    assert got[2] == truncated


def test_cut_at_stop():
    assert harness.cut_at_stop("a, b. c", [".", ","]) == "a"
    assert harness.cut_at_stop("abc", ["", "z"]) == "abc"


def test_lm_eval_wrapper(run):
    """Only where lm_eval is installed (pip install effax[harness]): real Instances through the registry."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    lm = get_model("effax").create_from_arg_string(f"workdir={run},step=latest,batch_size=8",
                                                   {"batch_size": 1, "max_batch_size": None, "device": None})
    assert lm.scorer.batch_size == 8 and lm.max_length == T  # model_args win over lm_eval's --batch_size

    def inst(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    pairs = [("The state of the", " Union"), ("", "Congress")]
    assert lm.loglikelihood([inst("loglikelihood", p) for p in pairs]) == lm.scorer.loglikelihood(pairs)
    texts = ["TheUnion" * 25]  # no spaces: HFLM-style pair encoding would move a boundary space
    assert lm.loglikelihood_rolling([inst("loglikelihood_rolling", (t,)) for t in texts]) == \
        lm.scorer.loglikelihood_rolling(texts)
    # rolling = loglikelihood summed over lm_eval's own windows (an EOS context is the empty context)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = b(texts[0])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, EOS, T, 1)]
    assert len(windows) == 4
    pairs = [("" if c == [EOS] else bytes(c).decode(), bytes(p).decode()) for c, p in windows]
    np.testing.assert_allclose(sum(lp for lp, _ in lm.scorer.loglikelihood(pairs)),
                               lm.scorer.loglikelihood_rolling(texts)[0], rtol=RTOL, atol=ATOL)
    req = ("The state of", {"until": ["\n"], "max_gen_toks": 8})
    assert lm.generate_until([inst("generate_until", req)]) == lm.scorer.generate_until([req])
