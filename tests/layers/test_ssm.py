"""The Mamba2 block (layers/ssm.py) against a float64 loop over the paper's equations (packed documents,
a partial last chunk), its initialisation and weight-decay tags."""

import dataclasses

import numpy as np

from recurrent_testing import (SEGMENTS, TINY, build, causal_conv, close, inputs, new_document, params, rms_norm, run,
                               silu, softplus)
from effax.layers.ssm import DT_FLOOR, DT_MAX, DT_MIN, Mamba2


def mamba2_reference(p, x_TD, seg_T, eps):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D x_t  per head (B, C shared), after the
    conv + SiLU on x, B, C; then RMSNorm(y * silu(z)) * w and the output projection."""
    D, H, P = p["w_x"].shape
    z, xs = x_TD @ p["w_z"].reshape(D, H * P), x_TD @ p["w_x"].reshape(D, H * P)
    b, c, dt_raw = x_TD @ p["w_b"], x_TD @ p["w_c"], x_TD @ p["w_dt"]
    W, N = p["conv_b"].shape
    xs = silu(causal_conv(xs, p["conv_x"].reshape(W, H * P), p["conv_x_bias"].reshape(H * P), seg_T))
    b = silu(causal_conv(b, p["conv_b"], p["conv_b_bias"], seg_T))
    c = silu(causal_conv(c, p["conv_c"], p["conv_c_bias"], seg_T))
    dt, A = softplus(dt_raw + p["dt_bias"]), -np.exp(p["A_log"])
    h, y = np.zeros((H, P, N)), np.zeros((len(x_TD), H, P))
    for t in range(len(x_TD)):
        if new_document(seg_T, t):
            h[:] = 0
        x_HP = xs[t].reshape(H, P)
        h = np.exp(dt[t] * A)[:, None, None] * h + (dt[t][:, None] * x_HP)[:, :, None] * b[t]
        y[t] = h @ c[t] + p["D"][:, None] * x_HP
    y = rms_norm(y.reshape(-1, H * P) * silu(z), p["norm"].reshape(H * P), eps)
    return y @ p["w_out"].reshape(H * P, D)


def test_mamba2_block_follows_the_paper_equations():
    layer = build(Mamba2)
    x = inputs()
    got = run(layer, x, SEGMENTS)
    p = params(layer)
    for b in range(2):
        close(got[b], mamba2_reference(p, x[b].astype(np.float64), SEGMENTS[b], TINY.norm_eps))


def test_mamba2_init_and_weight_decay_tags():
    """A ~ U(1, 16); dt = softplus(dt_bias) log-uniform in [1e-3, 0.1] (floor 1e-4); D = 1; A_log, dt_bias,
    D, the conv biases and the norm are never decayed, the projections and conv filters are."""
    cfg = dataclasses.replace(TINY, d_model=64, ssm_head_dim=1)  # 128 heads: a sample of the init
    layer = build(Mamba2, cfg)
    A, dt = np.exp(np.asarray(layer.A_log[...])), softplus(np.asarray(layer.dt_bias[...], np.float64))
    assert A.shape == (128,) and 1 <= A.min() and A.max() <= 16 and 6 < A.mean() < 11  # U(1, 16): mean 8.5
    assert max(DT_MIN, DT_FLOOR) * 0.999 <= dt.min() and dt.max() <= DT_MAX * 1.001
    log_mid = (np.log(DT_MIN) + np.log(DT_MAX)) / 2  # log-uniform: mean of log dt at the midpoint, sd 1.33/sqrt(128)
    assert abs(np.log(dt).mean() - log_mid) < 0.5
    np.testing.assert_array_equal(np.asarray(layer.D[...]), 1.0)
    tags = {name: v.get_metadata().get("no_decay", False) for name, v in vars(layer).items() if hasattr(v, "get_metadata")}
    no_decay = {n for n, t in tags.items() if t}
    assert no_decay == {"A_log", "dt_bias", "D", "conv_x_bias", "conv_b_bias", "conv_c_bias", "norm"}, no_decay
    assert {"w_x", "w_z", "w_out", "conv_x"} <= set(tags) - no_decay
