"""Gated DeltaNet (layers/delta_rule.py): the chunked WY/UT form = the recurrence = the quadratic reference,
forward and gradients, with packed documents and partial chunks; a hand-computed delta-rule step; the
block against a float64 loop over the paper's equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_testing import SEGMENTS, TINY, causal_conv, close, fast, new_document, outputs, params, rms_norm, sigmoid, \
    silu, softplus
from effax.layers import delta_rule as dr


def rule_inputs(T, *, B=2, H=2, N=5, P=3, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, N))
    k = rng.standard_normal((B, T, H, N))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)  # the layer feeds L2-normalised keys
    v = rng.standard_normal((B, T, H, P))
    beta = sigmoid(rng.standard_normal((B, T, H)))
    g = -softplus(rng.standard_normal((B, T, H)) + 0.5)
    return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v, beta, g))


def segments(T):
    """Row 0: three documents of T // 3, T // 3 and the rest tokens (T = 37, chunk 8: one starts mid-chunk,
    at 12, one on a chunk boundary, at 24); row 1: one document."""
    a = T // 3
    return jnp.array([[1] * a + [2] * a + [3] * (T - 2 * a), [5] * T], jnp.int32)


def three_forms(q, k, v, beta, g, seg, *, chunk):
    def forms(q, k, v, beta, g, seg):
        return (dr.quadratic(q, k, v, beta, g, segment_ids_BT=seg), dr.recurrent(q, k, v, beta, g, segment_ids_BT=seg),
                dr.chunked(q, k, v, beta, g, chunk_size=chunk, segment_ids_BT=seg))

    return fast(jax.jit(forms))(q, k, v, beta, g, seg)


# As for the scalar-gated core (tests/layers/test_linear_attention.py: same tolerance, same reasoning; the
# triangular solves add ~1e-7). Shapes: T < chunk; a partial last chunk, with documents starting mid-chunk
# and on a chunk boundary. The path without segment ids runs in every prefill (tests/models/test_hybrid.py).
@pytest.mark.parametrize("T,chunk", [(3, 4), (37, 8)])
def test_chunked_equals_recurrent_equals_quadratic(T, chunk):
    args = rule_inputs(T)
    want, (y_rec, S_rec), (y_chk, S_chk) = three_forms(*args, segments(T), chunk=chunk)
    close(y_chk, want)
    close(y_rec, want)
    close(S_chk, S_rec)


def test_gradients_of_the_chunked_form_equal_the_quadratic_reference():
    args = rule_inputs(21)
    seg = segments(21)
    w = jnp.asarray(np.random.default_rng(7).standard_normal(args[2].shape), jnp.float32)
    loss = lambda f: lambda *a: jnp.sum(w * f(*a))  # noqa: E731
    chunked = loss(lambda *a: dr.chunked(*a, chunk_size=4, segment_ids_BT=seg)[0])
    quadratic = loss(lambda *a: dr.quadratic(*a, segment_ids_BT=seg))
    argnums = (0, 1, 2, 3, 4)
    grads = fast(jax.jit(lambda *a: (jax.grad(chunked, argnums)(*a), jax.grad(quadratic, argnums)(*a))))
    for got, want in zip(*grads(*args)):
        close(got, want)


def test_a_hand_computed_case():
    """S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, N = 2, P = 1, by hand:
       t=1: k=[1,0], v=2, beta=.5, alpha=1:    S1 = .5 * 2 * [1,0] = [1, 0]
       t=2: k=[.6,.8], v=1, beta=1, alpha=.5:  alpha S1 k = .3, S2 = [.5, 0] + (1 - .3) [.6, .8] = [.92, .56]
       y = S_t q_t with q = [1, 1], [1, 0]  ->  1, .92      (chunk 1: every step crosses a chunk boundary)"""
    q = jnp.array([[[[1.0, 1.0]], [[1.0, 0.0]]]])
    k = jnp.array([[[[1.0, 0.0]], [[0.6, 0.8]]]])
    v = jnp.array([[[[2.0]], [[1.0]]]])
    beta, g = jnp.array([[[0.5], [1.0]]]), jnp.log(jnp.array([[[1.0], [0.5]]]))
    for y, S in fast(jax.jit(lambda *a: (dr.chunked(*a, chunk_size=1), dr.recurrent(*a))))(q, k, v, beta, g):
        np.testing.assert_allclose(np.asarray(y)[0, :, 0, 0], [1.0, 0.92], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(S)[0, 0, 0], [0.92, 0.56], rtol=1e-6)


def gdn_reference(p, x_TD, seg_T, eps):
    """q, k, v = silu(conv(x W)); q, k L2-normalised, q / sqrt(N); beta = sigmoid(x W_b);
    alpha = exp(-exp(A_log) softplus(x W_a + dt_bias)); the gated delta rule; RMSNorm per head * w * silu(x W_g)."""
    D, H, N = p["w_q"].shape
    P = p["w_v"].shape[-1]
    W = p["conv_q"].shape[0]
    conv = lambda w, c: silu(causal_conv(x_TD @ w.reshape(D, -1), c.reshape(W, -1), None, seg_T))  # noqa: E731
    q, k, v = conv(p["w_q"], p["conv_q"]), conv(p["w_k"], p["conv_k"]), conv(p["w_v"], p["conv_v"])
    q, k, v = q.reshape(-1, H, N), k.reshape(-1, H, N), v.reshape(-1, H, P)
    q = q / np.sqrt((q**2).sum(-1, keepdims=True) + 1e-6) / np.sqrt(N)
    k = k / np.sqrt((k**2).sum(-1, keepdims=True) + 1e-6)
    beta = sigmoid(x_TD @ p["w_b"])
    alpha = np.exp(-np.exp(p["A_log"]) * softplus(x_TD @ p["w_a"] + p["dt_bias"]))
    S, y = np.zeros((H, P, N)), np.zeros((len(x_TD), H, P))
    for t in range(len(x_TD)):
        if new_document(seg_T, t):
            S[:] = 0
        for h in range(H):
            S[h] = alpha[t, h] * S[h] @ (np.eye(N) - beta[t, h] * np.outer(k[t, h], k[t, h])) + beta[t, h] * np.outer(v[t, h], k[t, h])
            y[t, h] = S[h] @ q[t, h]
    gate = (x_TD @ p["w_g"].reshape(D, -1)).reshape(-1, H, P)
    return (rms_norm(y, p["norm"], eps) * silu(gate)).reshape(len(x_TD), -1) @ p["w_o"].reshape(H * P, D)


def test_gdn_block_follows_the_paper_equations():
    x, got = outputs()
    p = params("gdn")
    for b in range(2):
        close(got["gdn"][b], gdn_reference(p, x[b].astype(np.float64), SEGMENTS[b], TINY.norm_eps))


def test_unit_lower_inverse_is_the_inverse_for_any_chunk_size():
    """The chunked form's (I + A)^-1 (blocked inversion, not a triangular solve: the solve's gradient deadlocked
    on XLA:CPU) against numpy, including sizes that are not powers of two. fp32, entries ~0.3: ~1e-7."""
    from effax.kernels.delta_rule.reference import unit_lower_inverse

    for Q in (5, 24):
        A = np.tril(np.random.default_rng(Q).standard_normal((2, Q, Q)), -1) * 0.3
        got = np.asarray(unit_lower_inverse(jnp.asarray(A, jnp.float32)))
        np.testing.assert_allclose(got, np.linalg.inv(np.eye(Q) + A), rtol=1e-5, atol=1e-5)
