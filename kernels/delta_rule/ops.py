"""Chunked gated DeltaNet: the op layers call (GatedDeltaNet in layers/delta_rule.py).

    y_BTHP, final_BHPN = delta_rule(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH, chunk_size=64,
                                    segment_ids_BT=None, state_BHPN=None, impl="auto")

S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, y_t = S_t q_t per head (q, k L2-normalised
by the caller); the state resets at each document start (segment ids); state_BHPN is the state before the
first token (zeros when None); y and the final state are fp32. Differentiable in q, k, v, beta, the log
decay and the initial state.

impl (dispatch):
  auto     xla: the kernel is opt-in until it has been measured on a GPU (docs/kernels.md)
  pallas   kernel.py: Pallas forward and backward kernels (Triton lowering), custom_vjp; off a GPU it runs
           in interpret mode (slow: tests only). chunk_size a power of two >= 16.
  xla      reference.chunked: the plain-JAX chunked WY/UT form (a scan over chunks), autodiff
"""

from __future__ import annotations

import jax

from effax.kernels.delta_rule import kernel, reference

IMPLS = ("auto", "xla", "pallas")


def delta_rule(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH, *, chunk_size: int = 64, segment_ids_BT=None,
               state_BHPN=None, impl: str = "auto", interpret: bool | None = None):
    """-> (y [B, T, H, P] fp32, final state [B, H, P, N] fp32); see the module docstring. interpret: run the
    Pallas kernels in interpret mode (default: whenever the default backend is not a GPU)."""
    if impl not in IMPLS:
        raise ValueError(f"delta_rule impl={impl!r} is not one of {IMPLS}")
    if impl in ("auto", "xla"):
        return reference.chunked(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH, chunk_size=chunk_size,
                                 segment_ids_BT=segment_ids_BT, state_BHPN=state_BHPN)
    on_gpu = jax.default_backend() == "gpu"
    return kernel.delta_rule(q_BTHN, k_BTHN, v_BTHP, beta_BTH, log_decay_BTH, chunk_size=chunk_size,
                             segment_ids_BT=segment_ids_BT, state_BHPN=state_BHPN,
                             interpret=(not on_gpu) if interpret is None else interpret)
