"""attention(): the xla impl against the plain-jnp oracle, mask semantics, and impl dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effax.layers.attention import Mask, attention, reference_attention

T = 37  # odd, not a multiple of any block size


def _qkv(B=2, T=T, H=4, K=2, D=16, dtype=jnp.float32, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32)
    k = jax.random.normal(kk, (B, T, K, D), jnp.float32)
    v = jax.random.normal(kv, (B, T, K, D), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _segments(B=2, T=T):
    # Row 0: documents of 20 and 17 tokens; row 1: 5, 9, 23 tokens (three packed documents).
    return jnp.array([[0] * 20 + [1] * 17, [3] * 5 + [4] * 9 + [7] * 23], jnp.int32)[:B, :T]


MASKS = {
    "causal": lambda: Mask(),
    "full": lambda: Mask(causal=False),
    "window5": lambda: Mask(window=5),
    "segments": lambda: Mask(segment_ids_BT=_segments()),
    "window5+segments": lambda: Mask(window=5, segment_ids_BT=_segments()),
    "full+segments": lambda: Mask(causal=False, segment_ids_BT=_segments()),
}
HEADS = {"gqa": (4, 2), "mha": (4, 4), "mqa": (4, 1)}
# fp32: only summation order differs (|out| <= max|v| ~ 4). bf16: both see the same bf16 inputs; the
# xla impl rounds probabilities to bf16 before AV and rounds the output (2 x 2^-8 relative, times |out| <~ 3).
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=2e-2)}


CASES = [(m, "gqa", d) for m in MASKS for d in ("fp32", "bf16")]
CASES += [(m, h, "fp32") for m in ("causal", "window5+segments") for h in ("mha", "mqa")]


@pytest.mark.parametrize("mask_name,heads,dtype", CASES)
def test_xla_matches_reference(mask_name, heads, dtype):
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
    H, K = HEADS[heads]
    q, k, v = _qkv(H=H, K=K, dtype=dtype)
    mask = MASKS[mask_name]()
    got = attention(q, k, v, mask=mask, impl="xla")
    assert got.shape == q.shape and got.dtype == dtype
    want = reference_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype])


def test_xla_gradients_match_reference():
    q, k, v = _qkv()
    mask = Mask(window=7, segment_ids_BT=_segments())
    w = jax.random.normal(jax.random.key(9), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask=mask) * w)

    got = jax.jit(jax.grad(loss(lambda *a, mask: attention(*a, mask=mask, impl="xla")), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(reference_attention), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)  # fp32; sums over up to 37 keys x 2 heads


def _allowed_by_loops(T, causal, window, seg):
    """The Mask docstring's definition, one (query, key) pair at a time."""
    out = np.zeros((len(seg), T, T), bool)
    for b in range(len(seg)):
        for i in range(T):
            for j in range(T):
                ok = (not causal or j <= i) and (window is None or i - j < window) and seg[b][i] == seg[b][j]
                out[b, i, j] = ok
    return out


@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, None), (False, 3)])
def test_masks_match_the_definition(causal, window):
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    T = seg.shape[1]
    want = _allowed_by_loops(T, causal, window, seg)
    mask = Mask(causal=causal, window=window, segment_ids_BT=jnp.asarray(seg))
    np.testing.assert_array_equal(np.broadcast_to(mask.allowed_BTS(T), want.shape), want)
    # The oracle writes its own mask: read its attention pattern back through one-hot values.
    q = jax.random.normal(jax.random.key(0), (2, T, 1, T))
    k = jax.random.normal(jax.random.key(1), (2, T, 1, T))
    v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (2, T, 1, T))  # key s carries one-hot e_s
    probs_BTS = reference_attention(q, k, v, mask=mask)[:, :, 0, :]
    np.testing.assert_array_equal(np.asarray(probs_BTS) > 0, want)


def test_documents_do_not_see_each_other():
    seg = _segments()
    mask = Mask(segment_ids_BT=seg)
    q, k, v = _qkv()
    doc0 = (seg == seg[:, :1])[:, :, None, None]  # the first document of each row
    q2, k2, v2 = (jnp.where(doc0, a + 10.0, a) for a in (q, k, v))
    out = attention(q, k, v, mask=mask, impl="xla")
    out2 = attention(q2, k2, v2, mask=mask, impl="xla")
    # Masked probabilities are exactly 0, so the other documents' outputs are bit-identical.
    np.testing.assert_array_equal(np.where(doc0, 0, out), np.where(doc0, 0, out2))
    assert not np.allclose(np.where(doc0, out, 0), np.where(doc0, out2, 0))


def test_mask_is_a_pytree_and_validates():
    mask = Mask(window=4, segment_ids_BT=_segments())
    q, k, v = _qkv()
    f = jax.jit(lambda q, k, v, m: attention(q, k, v, mask=m, impl="xla"))
    np.testing.assert_allclose(f(q, k, v, mask), attention(q, k, v, mask=mask, impl="xla"), atol=1e-6)
    with pytest.raises(ValueError, match="window"):
        Mask(window=0)
    with pytest.raises(ValueError, match="segment_ids_BT"):
        attention(q, k, v, mask=Mask(segment_ids_BT=jnp.zeros((2, 5), jnp.int32)))
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, mask=Mask(), impl="flash")


def test_cudnn_refuses_instead_of_falling_back():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="cudnn.*GPU"):
            attention(q, k, v, mask=Mask(segment_ids_BT=_segments()), impl="cudnn")
    with pytest.raises(NotImplementedError, match="window"):
        attention(q, k, v, mask=Mask(causal=False, window=4), impl="cudnn")
    with pytest.raises(NotImplementedError, match="float32"):
        attention(*_qkv(), mask=Mask(), impl="cudnn")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice of impl='auto'")
def test_auto_picks_xla_on_cpu():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    mask = Mask(segment_ids_BT=_segments())
    np.testing.assert_array_equal(attention(q, k, v, mask=mask), attention(q, k, v, mask=mask, impl="xla"))


def test_auto_sends_to_cudnn_only_what_it_takes(monkeypatch):
    import effax.layers.attention as attn

    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")  # the choice, not the kernel
    bf16 = lambda T=64, D=64: jnp.zeros((1, T, 4, D), jnp.bfloat16)
    assert attn._cudnn_ok(bf16(), Mask(window=8, segment_ids_BT=jnp.zeros((1, 64), jnp.int32)))
    assert not attn._cudnn_ok(bf16().astype(jnp.float32), Mask())  # cuDNN flash takes half precision only
    assert not attn._cudnn_ok(bf16(T=37), Mask())  # its backward refuses odd T
    assert not attn._cudnn_ok(bf16(D=256), Mask())
    assert not attn._cudnn_ok(bf16(), Mask(causal=False, window=8))
