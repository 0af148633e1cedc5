"""The Mamba2 block (layers/ssm.py) against a float64 loop over the paper's equations (packed documents,
a partial last chunk), its initialisation and weight-decay tags."""

import numpy as np

import jax

from recurrent_testing import SEGMENTS, TINY, causal_conv, close, fast, mixers, new_document, outputs, params, rms_norm, silu, \
    softplus
from effax.layers.ssm import A_INIT_RANGE, DT_FLOOR, DT_MAX, DT_MIN, a_log_init, dt_bias_init


def mamba2_reference(p, x_TD, seg_T, eps, *, heads, state):
    """[z, x, B, C, dt_raw] = x in_proj (the official column order); x, B, C through the conv and SiLU;
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D x_t  per head (B, C shared); then
    RMSNorm(y * silu(z)) * w and out_proj."""
    H, N = heads, state
    E = p["out_proj"].shape[0]
    P = E // H
    z, xbc, dt_raw = np.split(x_TD @ p["in_proj"], [E, 2 * E + 2 * N], axis=-1)
    xs, b, c = np.split(silu(causal_conv(xbc, p["conv"], p["conv_bias"], seg_T)), [E, E + N], axis=-1)
    dt, A = softplus(dt_raw + p["dt_bias"]), -np.exp(p["A_log"])
    h, y = np.zeros((H, P, N)), np.zeros((len(x_TD), H, P))
    for t in range(len(x_TD)):
        if new_document(seg_T, t):
            h[:] = 0
        x_HP = xs[t].reshape(H, P)
        h = np.exp(dt[t] * A)[:, None, None] * h + (dt[t][:, None] * x_HP)[:, :, None] * b[t]
        y[t] = h @ c[t] + p["D"][:, None] * x_HP
    return rms_norm(y.reshape(-1, E) * silu(z), p["norm"], eps) @ p["out_proj"]


def test_mamba2_block_follows_the_paper_equations():
    x, got = outputs()
    p = params("mamba2")
    for b in range(2):
        close(got["mamba2"][b], mamba2_reference(p, x[b].astype(np.float64), SEGMENTS[b], TINY.norm_eps,
                                                 heads=TINY.expand * TINY.d_model // TINY.ssm_head_dim, state=TINY.ssm_state))


def test_mamba2_init_and_weight_decay_tags():
    """A ~ U(1, 16); dt = softplus(dt_bias) log-uniform in [1e-3, 0.1] (floor 1e-4), checked on 4096 draws of
    the initialisers the layer uses; A_log, dt_bias, D, the conv biases and the norm are never decayed, the
    projections and conv filters are."""
    A_log, dt_bias = fast(jax.jit(lambda k: (a_log_init(k, (4096,), np.float32), dt_bias_init(k, (4096,), np.float32))))(
        jax.random.key(0))
    A, dt = np.exp(np.asarray(A_log, np.float64)), softplus(np.asarray(dt_bias, np.float64))
    assert A_INIT_RANGE == (1.0, 16.0) and 1 <= A.min() and A.max() <= 16 and abs(A.mean() - 8.5) < 0.3
    assert max(DT_MIN, DT_FLOOR) * 0.999 <= dt.min() and dt.max() <= DT_MAX * 1.001
    log_mid = (np.log(DT_MIN) + np.log(DT_MAX)) / 2  # log-uniform: log dt uniform, mean at the midpoint, sd 1.33
    assert abs(np.log(dt).mean() - log_mid) < 0.1 and abs(np.log(dt).std() - 1.33) < 0.1
    layer = mixers()["mamba2"]
    tags = {name: v.get_metadata().get("no_decay", False) for name, v in vars(layer).items() if hasattr(v, "get_metadata")}
    no_decay = {n for n, t in tags.items() if t}
    assert no_decay == {"A_log", "dt_bias", "D", "conv_bias", "norm"}, no_decay
    assert set(tags) - no_decay == {"in_proj", "conv", "out_proj"}
