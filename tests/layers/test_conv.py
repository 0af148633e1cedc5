"""The short causal convolution (layers/conv.py): tap order, document resets, the decode history, and
Based's gated convolution block against its equations."""

import jax
import jax.numpy as jnp
import numpy as np

from recurrent_testing import SEGMENTS, causal_conv, close, fast, outputs, params, silu
from effax.layers import conv


@fast
@jax.jit
def _conv_cases(x, w, seg):
    """causal_conv with and without segment ids, continued from a history, and the history helpers."""
    full = conv.causal_conv(x, w, segment_ids_BT=seg)
    plain = conv.causal_conv(x, w)
    head, tail = x[:, :6], x[:, 6:]  # the same sequence in two calls, the second fed the first's history
    history = conv.history_at(head, jnp.array([6, 6]), w.shape[0])
    continued = conv.causal_conv(tail, w, history=history)
    ramp = jnp.broadcast_to(jnp.arange(1.0, x.shape[1] + 1)[None, :, None], x.shape)  # token t holds t + 1
    stepped = conv.next_history(jnp.zeros_like(history), ramp, jnp.arange(x.shape[1])[None] < jnp.array([[4], [9]]))
    return full, plain, jnp.concatenate([conv.causal_conv(head, w), continued], axis=1), stepped


def test_taps_resets_and_history():
    x = np.zeros((2, 11, 1), np.float32)
    x[:, 0, 0] = 1.0  # an impulse at t = 0 ...
    x[0, 4, 0] = 10.0  # ... and one on the last token of row 0's first document (tokens 0-4)
    w = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)  # w_3 multiplies the current token
    full, plain, split, stepped = (np.asarray(a)[..., 0] for a in _conv_cases(x, w, SEGMENTS))
    np.testing.assert_array_equal(plain[1, :5], [4, 3, 2, 1, 0])  # y_t = w_(3 - t): the impulse response
    np.testing.assert_array_equal(plain[0, 4:9], [40, 30, 20, 10, 0])  # without segment ids it crosses documents
    np.testing.assert_array_equal(full[0, 4:9], [40, 0, 0, 0, 0])  # with them, never
    np.testing.assert_array_equal(split, plain)  # continuing from a history = one call
    np.testing.assert_array_equal(stepped, [[2, 3, 4], [7, 8, 9]])  # the last 3 valid tokens: 1-3 (row 0), 6-8 (row 1)


def test_one_row_equals_its_row_of_a_batch_forward_and_gradients():
    """A batch of one takes its own path (the batch axis dropped, for XLA:CPU's speed): each row alone, with
    its segment ids, history and bias, gives the batched call's outputs and gradients for that row."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 11, 2, 3)).astype(np.float32)
    w, bias = rng.normal(size=(4, 2, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
    history = rng.normal(size=(2, 3, 2, 3)).astype(np.float32)

    @jax.jit
    def value_and_grads(x, w, bias, history, seg):
        f = lambda x, w, bias: conv.causal_conv(x, w, bias, segment_ids_BT=seg, history=history)  # noqa: E731
        y = f(x, w, bias)
        return y, jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(x, w, bias)

    y, (dx, dw, db) = value_and_grads(x, w, bias, history, SEGMENTS)
    per_row = [value_and_grads(x[b:b + 1], w, bias, history[b:b + 1], SEGMENTS[b:b + 1]) for b in range(2)]
    close(np.concatenate([r[0] for r in per_row]), y)
    close(np.concatenate([r[1][0] for r in per_row]), dx)
    close(sum(r[1][1] for r in per_row), dw)  # the weight gradients add up over rows
    close(sum(r[1][2] for r in per_row), db)


def test_gated_conv_block_follows_based():
    """y = (silu(conv(x W_u + b_u)) * (x W_g + b_g)) W_out + b_out, with a bias-free depthwise filter."""
    x, got = outputs()
    p = params("gated_conv")
    for b in range(2):
        h = x[b].astype(np.float64) @ p["w_in"].reshape(x.shape[-1], -1)
        u, gate = np.split(h + p["b_in"].reshape(-1), 2, axis=-1)
        want = (silu(causal_conv(u, p["conv"], None, SEGMENTS[b])) * gate) @ p["w_out"] + p["b_out"]
        close(got["gated_conv"][b], want)
