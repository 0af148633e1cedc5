"""Native Sparse Attention: the mixer against the paper's equations written per query in numpy (packed
documents included), its gradients and counts. Cached decoding: tests/layers/test_sparse_mixers.py."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_testing import compiled, filled
from effax.layers.mixer import LayerContext, mixer
from effax.models import registry
from effax.models.dense import Dense, DenseConfig

# l = 4, d = 2, l' = 4, n = 4, w = 5: several compressed and selection blocks in 24 tokens, the top-n
# choosing one block beyond the forced initial and two local ones.
CFG = DenseConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.2, pattern=("nsa",),
                  nsa_compress_block=4, nsa_compress_stride=2, nsa_select_block=4, nsa_select_blocks=4, nsa_window=5)
B, T = 2, 24
SEGMENTS = np.array([[1] * T, [1] * 9 + [2] * 15])  # row 1: a second document starting mid-block


@functools.cache
def _layer():
    return filled(lambda: mixer("nsa")(CFG, rngs=nnx.Rngs(3)), seed=3)


def _reference(layer, x_BTD, positions_BT, segments):
    """The equations of layers/nsa.py's docstring, one query at a time (float64)."""
    l, d, l_sel, n, w = (CFG.nsa_compress_block, CFG.nsa_compress_stride, CFG.nsa_select_block, CFG.nsa_select_blocks,
                         CFG.nsa_window)
    q, kv, gates = (jax.tree.map(lambda a: np.asarray(a, np.float64), t) for t in layer._project(x_BTD, positions_BT))
    K, P = kv["cmp"][0].shape[2:]
    G = q.shape[2] // K
    par = {name: np.asarray(getattr(layer, name)[...], np.float64) for name in
           ("phi_k_pos", "phi_k_in", "phi_k_out", "phi_v_pos", "phi_v_in", "phi_v_out")}

    def phi(block_lKP, which):
        h = np.einsum("lkp,lph->kh", block_lKP + par[f"phi_{which}_pos"][:, None], par[f"phi_{which}_in"])
        return np.einsum("kh,hp->kp", h / (1 + np.exp(-h)), par[f"phi_{which}_out"])

    def softmax_attend(q_P, keys_SP, values_SP):
        if not len(keys_SP):
            return np.zeros(P), np.zeros(0)
        logits = keys_SP @ q_P / math.sqrt(P)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return p @ values_SP, p

    out = np.zeros(q.shape)
    for b in range(B):
        for t in range(T):
            start = max(s for s in range(t + 1) if s == 0 or segments[b][s] != segments[b][s - 1])
            off = t - start
            blocks = [i for i in range(T) if i * d + l - 1 <= off]
            kc = np.stack([phi(kv["cmp"][0][b, start + i * d: start + i * d + l], "k") for i in blocks]) if blocks else np.zeros((0, K, P))
            vc = np.stack([phi(kv["cmp"][1][b, start + i * d: start + i * d + l], "v") for i in blocks]) if blocks else np.zeros((0, K, P))
            for k in range(K):
                p_cmp, o_cmp = [], []
                for g in range(G):
                    o, p = softmax_attend(q[b, t, k * G + g], kc[:, k], vc[:, k])
                    o_cmp.append(o)
                    p_cmp.append(p)
                cur = off // l_sel
                score = np.zeros(cur + 1)
                for j in range(cur + 1):
                    for m in range(l_sel // d):
                        for nn in range(l // d):
                            i = (l_sel // d) * j + m - nn
                            if 0 <= i < len(blocks):
                                score[j] += sum(p[i] for p in p_cmp)
                score[[0, cur, max(cur - 1, 0)]] = np.inf
                chosen = sorted(range(cur + 1), key=lambda j: (-score[j], j))[:n]
                sel = [start + o for o in range(off + 1) if o // l_sel in chosen]
                win = list(range(start + max(0, off - w + 1), t + 1))
                for g in range(G):
                    h = k * G + g
                    o_slc = softmax_attend(q[b, t, h], kv["slc"][0][b, sel, k], kv["slc"][1][b, sel, k])[0]
                    o_win = softmax_attend(q[b, t, h], kv["win"][0][b, win, k], kv["win"][1][b, win, k])[0]
                    out[b, t, h] = gates[b, t, h] @ np.stack([o_cmp[g], o_slc, o_win])
    return np.einsum("bthk,hkd->btd", out, np.asarray(layer.o[...], np.float64))


@pytest.mark.parametrize("packed", [False, True])
def test_forward_follows_the_paper_per_query(packed):
    """fp32 against float64 over ~40 keys per branch: 1e-5 relative."""
    layer = _layer()
    x = jax.random.normal(jax.random.key(0), (B, T, CFG.d_model))
    segments = SEGMENTS if packed else np.ones((B, T), np.int32)
    positions = np.asarray([[t - max(s for s in range(t + 1) if s == 0 or row[s] != row[s - 1]) for t in range(T)] for row in segments])
    ctx = LayerContext(positions_BT=jnp.asarray(positions), segment_ids_BT=jnp.asarray(segments) if packed else None)
    got = compiled(lambda x: layer(x, ctx), x)(x)
    np.testing.assert_allclose(got, _reference(layer, x, jnp.asarray(positions), segments), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    """The selection is discrete (no gradient through the top-n), but the compressed branch, whose scores
    drive it, trains through its own output: every parameter gets a gradient."""
    layer = _layer()
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (1, T, CFG.d_model))
    ctx = LayerContext(positions_BT=jnp.arange(T)[None])
    grads = compiled(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, ctx) ** 2)), params)(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(np.asarray(g)).max() > 0, path


def test_counts():
    model = nnx.eval_shape(lambda: Dense(CFG, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == CFG.param_count()
    paper = dataclasses.replace(CFG, nsa_compress_block=32, nsa_compress_stride=16, nsa_select_block=64, nsa_select_blocks=16,
                                nsa_window=512)
    D, H, K, P = paper.d_model, paper.n_heads, paper.kv_heads, paper.dim_per_head
    projections = 2 * (2 * D * H * P + 6 * D * K * P + 3 * D * H)
    phi = 2 * 2 * K * (32 * P * P + P * P) / 16
    keys = 8192 // 16 + 16 * 64 + 512  # compressed, selected, window at T = 8192
    assert mixer("nsa").flops_per_token(paper, 8192) == projections + phi + 4 * keys * H * P


def test_bad_sizes_fail_naming_the_key():
    with pytest.raises(registry.ConfigError, match="model.nsa_select_block=60 must be a multiple of model.nsa_compress_stride=16"):
        dataclasses.replace(CFG, nsa_compress_block=32, nsa_compress_stride=16, nsa_select_block=60).validate()
    with pytest.raises(registry.ConfigError, match="model.nsa_select_blocks must be >= 3"):
        dataclasses.replace(CFG, nsa_select_blocks=2).validate()
