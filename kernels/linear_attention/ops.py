"""Chunked scalar-gated linear attention / SSD: the op layers call (Mamba2's SSD, GLA/retention, Based with
its feature map applied outside).

    y_BTHP, final_BHPN = linear_attention(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH, chunk_size=64,
                                          segment_ids_BT=None, state_BHPN=None, impl="auto")

S_t = exp(g_t) S_{t-1} + v_t k_t^T, y_t = S_t q_t per value head h, q/k of group h // (H / K); the state
resets at each document start (segment ids); state_BHPN is the state before the first token (zeros when
None); y and the final state are fp32. Differentiable in q, k, v, the log decay and the initial state.

impl (dispatch):
  auto     pallas on GPU, xla elsewhere
  pallas   kernel.py: Pallas forward and backward kernels (Triton lowering), custom_vjp; off a GPU it runs
           in interpret mode (slow: tests only). chunk_size a power of two >= 16.
  xla      reference.chunked: the plain-JAX chunked algorithm (associative scan across chunks), autodiff
"""

from __future__ import annotations

import jax

from effax.kernels.linear_attention import kernel, reference

IMPLS = ("auto", "xla", "pallas")


def linear_attention(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH, *, chunk_size: int = 64, segment_ids_BT=None,
                     state_BHPN=None, impl: str = "auto", interpret: bool | None = None):
    """-> (y [B, T, H, P] fp32, final state [B, H, P, N] fp32); see the module docstring. interpret: run the
    Pallas kernels in interpret mode (default: whenever the default backend is not a GPU)."""
    if impl not in IMPLS:
        raise ValueError(f"linear_attention impl={impl!r} is not one of {IMPLS}")
    on_gpu = jax.default_backend() == "gpu"
    if impl == "auto":
        impl = "pallas" if on_gpu else "xla"
    if impl == "xla":
        return reference.chunked(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH, chunk_size=chunk_size,
                                 segment_ids_BT=segment_ids_BT, state_BHPN=state_BHPN)
    return kernel.linear_attention(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH, chunk_size=chunk_size,
                                   segment_ids_BT=segment_ids_BT, state_BHPN=state_BHPN,
                                   interpret=(not on_gpu) if interpret is None else interpret)
