"""The plain-JAX oracle of the chunked linear-attention kernel (kernels/linear_attention/kernel.py), and
the XLA path of ops.py; layers/linear_attention.py re-exports these functions. Scalar-gated linear
attention, written once: the chunked algorithm (training, prefill), the recurrent
step (decoding) and the quadratic reference (tests). Mamba2's SSD (layers/ssm.py), Based (below) and
any gated linear attention / retention variant with one decay per head and token are this recurrence:

    S_t = exp(g_t) S_{t-1} + v_t k_t^T          S_t: [P, N] per head, exp(g_t) in (0, 1]
    y_t = S_t q_t

i.e. y_t = sum_{s <= t} exp(g_{s+1} + ... + g_t) (q_t . k_s) v_s. Shapes: q, k [B, T, K, N] shared by
the G = H / K value heads of their group (Mamba2: K = 1 group of B/C for all heads; Based: K = H),
v [B, T, H, P], g [B, T, H]. A variant chooses q, k, v and g: Mamba2 q = C, k = B, v = dt x,
g = dt A; Based g = 0 with Taylor features; retention g = log gamma_h (a constant per head).

Chunked form (Mamba2 paper, "SSD"; flash-linear-attention's chunk kernels). Cut T into chunks of Q:
  inside a chunk, the masked quadratic form with decays exp(c_t - c_s) from the chunk-local cumulative
  log decay c (the official kernels' form; c spans at most Q tokens, so the difference keeps fp32
  precision), and each chunk's contribution to the state at its end;
  across chunks, the state passes as S_(c+1) = exp(c_last) S_c + (chunk c's contribution), a linear
  recurrence computed by an associative scan (log depth: no sequential loop over chunks), and each token
  reads exp(c_t) q_t^T S_c from the state that entered its chunk.
Cost per token O(Q N + Q P + N P) per head: flat in T.

Packed documents (segment ids): the state resets at each document start. Inside a chunk a pair (t, s)
counts only within one document; a token reads the entering state only if no document started in its
chunk before it; a token adds to the chunk's final state only if it is in the chunk's last document.
Segment ids must be equal exactly within a document and change at each boundary (train/data.py: 1, 2, ...).

Everything here runs in fp32: decays, states and outputs (inputs are upcast).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _check(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH):
    B, T, K, N = q_BTKN.shape
    H = v_BTHP.shape[2]
    if k_BTKN.shape != q_BTKN.shape or v_BTHP.shape[:2] != (B, T) or H % K or log_decay_BTH.shape != (B, T, H):
        raise ValueError(f"linear attention: q {q_BTKN.shape}, k {k_BTKN.shape} must be [B, T, K, N], v {v_BTHP.shape} "
                         f"[B, T, H, P] with K dividing H, log decay {log_decay_BTH.shape} [B, T, H]")


def _new_document_BT(segment_ids_BT):
    """True where a token starts a document after the row's first token (the state resets there)."""
    return jnp.concatenate([jnp.zeros_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], 1)


def chunked(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH, *, chunk_size: int, segment_ids_BT=None, state_BHPN=None):
    """The chunked algorithm (module docstring) -> (y [B, T, H, P] fp32, the final state [B, H, P, N]).

    state_BHPN: the state before the first token (zeros when None). Any T: the last chunk is padded with
    tokens that neither decay nor write the state."""
    _check(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH)
    B, T, K, N = q_BTKN.shape
    H, P = v_BTHP.shape[2:]
    G, Q = H // K, min(chunk_size, T)
    n_chunks = -(-T // Q)
    pad = n_chunks * Q - T

    def chunks(a, mode="constant"):  # [B, T, ...] -> [B, chunks, Q, ...]
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode=mode)
        return a.reshape(B, n_chunks, Q, *a.shape[2:])

    q, k = chunks(q_BTKN.astype(F32)), chunks(k_BTKN.astype(F32))  # [B, c, Q, K, N]
    v = chunks(v_BTHP.astype(F32)).reshape(B, n_chunks, Q, K, G, P)
    cum = jnp.cumsum(chunks(log_decay_BTH.astype(F32)).reshape(B, n_chunks, Q, K, G), axis=2)  # c_t, inclusive

    visible = jnp.tril(jnp.ones((Q, Q), bool))  # [t, s]: s <= t ...
    carries = reaches_end = None
    if segment_ids_BT is not None:  # ... in the same document
        seg = chunks(segment_ids_BT, mode="edge")  # [B, c, Q]
        visible = visible & (seg[:, :, :, None] == seg[:, :, None, :])
        entering = jnp.concatenate([seg[:, :1, 0], seg[:, :-1, -1]], axis=1)  # the document of the state entering
        carries = seg == entering[:, :, None]  # [B, c, Q]: no document started in the chunk up to t
        reaches_end = seg == seg[:, :, -1:]  # [B, c, Q]: in the chunk's last document

    # Inside each chunk: y_t += sum_{s <= t} exp(c_t - c_s) (q_t . k_s) v_s.
    cum_KGQ = jnp.moveaxis(cum, 2, -1)  # [B, c, K, G, Q]
    diff = cum_KGQ[..., :, None] - cum_KGQ[..., None, :]  # [B, c, K, G, Q(t), Q(s)]
    mask = visible if segment_ids_BT is None else visible[:, :, None, None]
    decay = jnp.exp(jnp.where(mask, diff, -jnp.inf))  # masked before exp: exp(c_t - c_s) overflows for s > t
    scores = jnp.einsum("bctkn,bcskn->bckts", q, k)
    y = jnp.einsum("bckgts,bcskgp->bctkgp", scores[:, :, :, None] * decay, v)

    # Each chunk's contribution to the state at its end, and the decay of the state across the chunk.
    to_end = jnp.exp(cum[:, :, -1:] - cum)  # [B, c, Q, K, G]
    chunk_decay = jnp.exp(cum[:, :, -1])  # [B, c, K, G]
    from_start = jnp.exp(cum)  # [B, c, Q, K, G]: decay of the entering state up to t
    if segment_ids_BT is not None:
        to_end = jnp.where(reaches_end[..., None, None], to_end, 0.0)
        chunk_decay = jnp.where(carries[:, :, -1, None, None], chunk_decay, 0.0)
        from_start = jnp.where(carries[..., None, None], from_start, 0.0)
    contribution = jnp.einsum("bcskn,bcskg,bcskgp->bckgpn", k, to_end, v)

    # Across chunks: S_c = d_c S_(c-1) + C_c is a linear recurrence, so an associative scan over the pairs
    # (d, C) with (d1, C1) then (d2, C2) = (d1 d2, d2 C1 + C2) gives every chunk's end state in log depth.
    def combine(first, second):
        (d1, C1), (d2, C2) = first, second
        return d1 * d2, d2[..., None, None] * C1 + C2

    decays, sums = jax.lax.associative_scan(combine, (chunk_decay, contribution), axis=1)  # through chunk c
    S0 = jnp.zeros((B, K, G, P, N), F32) if state_BHPN is None else state_BHPN.astype(F32).reshape(B, K, G, P, N)
    after = decays[..., None, None] * S0[:, None] + sums  # [B, c, K, G, P, N]: the state after chunk c
    entering_S = jnp.concatenate([S0[:, None], after[:, :-1]], axis=1)
    final = after[:, -1]
    y = y + jnp.einsum("bctkn,bckgpn,bctkg->bctkgp", q, entering_S, from_start)
    return y.reshape(B, n_chunks * Q, H, P)[:, :T], final.reshape(B, H, P, N)


def step(state_BHPN, q_BKN, k_BKN, v_BHP, log_decay_BH):
    """One token of the recurrence -> (y [B, H, P], state [B, H, P, N]); fp32."""
    G = v_BHP.shape[1] // q_BKN.shape[1]
    q_BHN, k_BHN = (jnp.repeat(a.astype(F32), G, axis=1) for a in (q_BKN, k_BKN))
    state = jnp.exp(log_decay_BH.astype(F32))[..., None, None] * state_BHPN + v_BHP.astype(F32)[..., None] * k_BHN[:, :, None]
    return jnp.einsum("bhpn,bhn->bhp", state, q_BHN), state


def recurrent(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH, *, segment_ids_BT=None, valid_BT=None, state_BHPN=None):
    """Token by token (decoding, and the tests' oracle) -> (y [B, T, H, P], final state). A token with
    valid_BT False leaves the state unchanged; a new document (segment ids) starts from a zero state."""
    _check(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH)
    B, T, K, N = q_BTKN.shape
    H, P = v_BTHP.shape[2:]
    S0 = jnp.zeros((B, H, P, N), F32) if state_BHPN is None else state_BHPN.astype(F32)
    new_doc = jnp.zeros((B, T), bool) if segment_ids_BT is None else _new_document_BT(segment_ids_BT)
    valid = jnp.ones((B, T), bool) if valid_BT is None else valid_BT

    def body(S, inputs):
        q, k, v, g, new_doc_B, valid_B = inputs
        y, S_next = step(jnp.where(new_doc_B[:, None, None, None], 0.0, S), q, k, v, g)
        return jnp.where(valid_B[:, None, None, None], S_next, S), y

    time_major = [jnp.moveaxis(a, 1, 0) for a in (q_BTKN, k_BTKN, v_BTHP, log_decay_BTH, new_doc, valid)]
    final, y_TBHP = jax.lax.scan(body, S0, time_major)
    return jnp.moveaxis(y_TBHP, 0, 1), final


def segment_sums(log_decay_BHT):
    """[B, H, T, T]: sum of g over (s, t] for s <= t, summed directly (no difference of prefix sums)."""
    T = log_decay_BHT.shape[-1]
    later_TT = jnp.arange(T)[:, None] > jnp.arange(T)[None, :]  # [m, s]: m > s
    terms = jnp.where(later_TT, log_decay_BHT[..., :, None], 0.0)  # [B, H, m, s]
    return jnp.cumsum(terms, axis=-2)  # [B, H, t, s] = sum_{s < m <= t} g_m


def quadratic(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH, *, segment_ids_BT=None):
    """The test oracle: y_t = sum over s <= t in t's document of exp(sum_{s < m <= t} g_m) (q_t . k_s) v_s,
    as one masked T x T product in fp32."""
    _check(q_BTKN, k_BTKN, v_BTHP, log_decay_BTH)
    T, G = q_BTKN.shape[1], v_BTHP.shape[2] // q_BTKN.shape[2]
    q, k = (jnp.repeat(a.astype(F32), G, axis=2) for a in (q_BTKN, k_BTKN))
    visible = jnp.tril(jnp.ones((T, T), bool))[None, None]
    if segment_ids_BT is not None:
        visible = visible & (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
    weights = jnp.exp(jnp.where(visible, segment_sums(jnp.moveaxis(log_decay_BTH.astype(F32), 1, 2)), -jnp.inf))
    return jnp.einsum("bhts,bthn,bshn,bshp->bthp", weights, q, k, v_BTHP.astype(F32))
