"""The scalar-gated linear attention core (layers/linear_attention.py): chunked = recurrent = quadratic
reference, forward and gradients, for lengths that are not a multiple of the chunk and packed documents;
a hand-computed case; and Based (Taylor feature map identity, normalisation, the block against its
equations)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_testing import SEGMENTS, T, fast, outputs, params
from effax.layers import linear_attention as la

# fp32 throughout. The three forms sum the same terms in different orders (chunk products vs token steps
# vs one T x T product); observed differences ~3e-7 of the output's scale. 1e-5 (the bound) is
# well above that and far below what a wrong decay placement or a missed reset gives (~1e-1).
RTOL = 1e-5


def close(got, want, rtol=RTOL):
    """Relative to the scale of `want` (elementwise relative error is meaningless near zeros)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    np.testing.assert_array_less(np.abs(got - want).max(), rtol * scale + 1e-30, err_msg=f"scale {scale}")


def inputs(T, *, B=2, K=2, G=2, N=5, P=3, seed=0):
    """q, k [B, T, K, N], v [B, T, H, P], log decays g [B, T, H] in fp32 (numpy's generator: eager
    jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    H = K * G
    q = rng.standard_normal((B, T, K, N))
    k = rng.standard_normal((B, T, K, N)) / math.sqrt(N)
    v = rng.standard_normal((B, T, H, P))
    g = -np.logaddexp(0, rng.standard_normal((B, T, H)) + 0.5)  # -softplus: decays exp(g) in ~(0.1, 0.9)
    return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v, g))


def segments(T):
    """Row 0: three documents of T // 3, T // 3 and the rest tokens (T = 37, chunk 8: one starts mid-chunk,
    at 12, one on a chunk boundary, at 24); row 1: one document."""
    a = T // 3
    return jnp.array([[1] * a + [2] * a + [3] * (T - 2 * a), [5] * T], jnp.int32)


def three_forms(q, k, v, g, seg, *, chunk):
    """(quadratic y, recurrent (y, state), chunked (y, state)): one compile per shape."""
    def forms(q, k, v, g, seg):
        return (la.quadratic(q, k, v, g, segment_ids_BT=seg), la.recurrent(q, k, v, g, segment_ids_BT=seg),
                la.chunked(q, k, v, g, chunk_size=chunk, segment_ids_BT=seg))

    return fast(jax.jit(forms))(q, k, v, g, seg)


# (T, chunk): one token (T < chunk); a partial last chunk, with documents starting mid-chunk and on a chunk
# boundary (`segments`). The path without segment ids runs in every prefill (tests/models/test_hybrid.py).
SHAPES = [(1, 4), (37, 8)]


@pytest.mark.parametrize("T,chunk", SHAPES)
def test_chunked_equals_recurrent_equals_quadratic(T, chunk):
    q, k, v, g = inputs(T)
    want, (y_rec, S_rec), (y_chk, S_chk) = three_forms(q, k, v, g, segments(T), chunk=chunk)
    close(y_chk, want)
    close(y_rec, want)
    close(S_chk, S_rec)  # the state after the last token (the last document only, when packed)


def test_gradients_of_the_chunked_form_equal_the_quadratic_reference():
    q, k, v, g = inputs(21)
    seg = segments(21)
    w = jnp.asarray(np.random.default_rng(7).standard_normal(v.shape), jnp.float32)
    loss = lambda f: lambda *a: jnp.sum(w * f(*a))  # noqa: E731
    chunked = loss(lambda *a: la.chunked(*a, chunk_size=4, segment_ids_BT=seg)[0])
    quadratic = loss(lambda *a: la.quadratic(*a, segment_ids_BT=seg))
    grads = fast(jax.jit(lambda *a: (jax.grad(chunked, argnums=(0, 1, 2, 3))(*a), jax.grad(quadratic, argnums=(0, 1, 2, 3))(*a))))
    for got, want in zip(*grads(q, k, v, g)):
        close(got, want)


def test_a_hand_computed_case():
    """One head, N = 2, P = 1, three tokens; the recurrence by hand:
       S1 = k1 v1 = [1, 0];  S2 = 0.5 S1 + [0, 2] = [0.5, 2];  S3 = 0.25 S2 + [3, 3] = [3.125, 3.5]
       y_t = S_t . q_t with q = [1, 1], [2, 0], [0, 1]  ->  1, 1, 3.5
    (v = [1, 2, 3], k = [1, 0], [0, 1], [1, 1], decays 1, 0.5, 0.25). Chunk 2 puts a boundary mid-way."""
    q = jnp.array([[[[1.0, 1.0]], [[2.0, 0.0]], [[0.0, 1.0]]]])
    k = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]])
    v = jnp.array([[[[1.0]], [[2.0]], [[3.0]]]])
    g = jnp.log(jnp.array([[[1.0], [0.5], [0.25]]]))
    for y, S in fast(jax.jit(lambda *a: (la.chunked(*a, chunk_size=2), la.recurrent(*a))))(q, k, v, g):
        np.testing.assert_allclose(np.asarray(y)[0, :, 0, 0], [1.0, 1.0, 3.5], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(S)[0, 0, 0], [3.125, 3.5], rtol=1e-6)


# --- Based ----------------------------------------------------------------------------------------------


def test_taylor_features_give_the_second_order_expansion():
    """phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q'.k' on the scaled q' = q / d^(1/4), k' = k / d^(1/4)."""
    d = 16
    q, k = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 5, d)), jnp.float32)
    s = jnp.sum((q / d**0.25) * (k / d**0.25), axis=-1)
    phi_q, phi_k = fast(jax.jit(lambda q, k: (la.taylor_features(q), la.taylor_features(k))))(q, k)
    np.testing.assert_allclose(jnp.sum(phi_q * phi_k, axis=-1), 1 + s + s**2 / 2, rtol=1e-5)
    assert phi_q.shape[-1] == 1 + d + d * d  # 273 for Based's d = 16
    # A batch of one (its own path, for XLA:CPU's speed) gives its row of the batch, forward and gradient.
    grad = jax.jit(jax.grad(lambda q: jnp.sum(jnp.sin(la.taylor_features(q)))))
    np.testing.assert_array_equal(fast(jax.jit(la.taylor_features))(q[:1]), phi_q[:1])
    np.testing.assert_allclose(grad(q[:1]), grad(q)[:1], rtol=1e-6, atol=1e-7)


def test_based_block_follows_its_equations():
    """y_t = sum_{s <= t} w_ts v_s / sum_{s <= t} w_ts with w_ts = 1 + a + a^2 / 2, a = q_t . k_s / sqrt(f),
    within each document, then W_o: written with the kernel directly, not with the feature map."""
    x, got = outputs()
    p = params("based")
    f = p["q"].shape[-1]
    for b in range(2):
        x_TD = x[b].astype(np.float64)
        q, k, v = (np.einsum("td,dhk->thk", x_TD, p[name]) for name in ("q", "k", "v"))
        a = np.einsum("thk,shk->hts", q, k) / np.sqrt(f)
        seg = SEGMENTS[b]
        visible = np.tril(np.ones((T, T), bool)) & (seg[:, None] == seg[None, :])
        w = np.where(visible, 1 + a + a**2 / 2, 0.0)
        y = np.einsum("hts,shp->thp", w, v) / w.sum(-1).T[..., None]
        close(got["based"][b], np.einsum("thp,hpd->td", y, p["o"]))
