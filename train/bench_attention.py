"""`effax bench attention`: the attention impls and masks, timed in one process.

    effax bench attention [--lengths 1024,4096,16384] [--repeats 5] [--out FILE.json]

Three tables:
1. The quickstart shape (B16 T256 H4/KV2 P64, fp32, causal): forward and forward+backward of the masked
   einsum over all T x T pairs (the xla impl before it skipped blocks), impl="xla" (on CPU: each query
   block over its key span), the blockwise path, the xla impl's einsums alone without mask or softmax
   ("span einsums only": a floor for that schedule, not attention), and PyTorch's
   `scaled_dot_product_attention` (when torch is installed: `pip install -e '.[bench]'`), with ratios to
   the all-pairs einsum measured in the same run.
2. Causal vs sliding window (512) vs block-sparse (blocks of 64: 3 local, 1 global, every 4th) through
   the blockwise path at each length: forward+backward time, time per token, and the peak memory XLA
   plans for the compiled program (arguments, outputs and temporaries); impl="xla" alongside while its
   saved probabilities fit (its memory is reported from the compiled plan at every length).
3. `auto`'s CPU threshold: causal forward+backward at 4,096 tokens per batch (T 256 to 2048) of the
   all-pairs einsum, impl="xla" and the blockwise path.

Everything is compiled as the training loop compiles its step (`loop.step_jit`: on CPU, XLA's own dots and
the split scratch). Times are the median of --repeats calls after one untimed call (compilation); variants are
interleaved so that load on a shared machine spreads over all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

QUICKSTART = dict(B=16, T=256, H=4, K=2, P=64)
LONG = dict(B=1, H=4, K=2, P=64)  # one row: the longest sequences still fit and run in minutes on 2 cores
XLA_MAX_T = 4096  # impl="xla" saves each kept block's probabilities: T^2 / 2 x H fp32 under causal, 2 GiB at 16384


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effax bench attention", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,16384", help="sequence lengths of the mask table (comma-separated)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant; the median is reported")
    p.add_argument("--out", help="also write the rows as JSON to this file")
    return p


def _inputs(B, T, H, K, P, seed=0):
    import jax

    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(kq, (B, T, H, P)), jax.random.normal(kk, (B, T, K, P)), jax.random.normal(kv, (B, T, K, P)),
            jax.random.normal(kw, (B, T, H, P)))


def _spans_einsums_only(q_BTHP, k_BTKP, v_BTKP, mask):
    """The xla impl's two einsums per query block over its key span, with no mask and no softmax (the logits
    go straight into the AV einsum): a floor for any softmax on that schedule, not attention."""
    import jax.numpy as jnp

    from effax.layers.attention import _key_spans, xla_query_block

    B, T, H, P = q_BTHP.shape
    K = k_BTKP.shape[2]
    q = q_BTHP.reshape(B, T, K, H // K, P).transpose(0, 2, 1, 3, 4)
    k, v = k_BTKP.transpose(0, 2, 1, 3), v_BTKP.transpose(0, 2, 1, 3)
    outs = []
    for q_lo, q_hi, k_lo, k_hi in _key_spans(mask.static, T, K, xla_query_block(T), False):
        s = jnp.einsum("bktgd,bksd->bktgs", q[:, :, q_lo:q_hi], k[:, :, k_lo:k_hi])
        outs.append(jnp.einsum("bktgs,bksd->bktgd", s, v[:, :, k_lo:k_hi]))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3, 4).reshape(B, T, H, P)


def _jax_fns(impl, mask, cotangent):
    """(forward, forward+backward) as jitted functions of (q, k, v), compiled as the training loop compiles
    its step (`loop.step_jit`); impl "all pairs" is the masked einsum over every T x T pair, "span
    einsums only" `_spans_einsums_only`."""
    import math

    import jax
    import jax.numpy as jnp

    from effax.layers.attention import _xla_attention, attention
    from effax.train import loop

    def forward(q, k, v):
        if impl == "all pairs":
            return _xla_attention(q, k, v, mask, 1 / math.sqrt(q.shape[-1]))
        if impl == "span einsums only":
            return _spans_einsums_only(q, k, v, mask)
        return attention(q, k, v, mask=mask, impl=impl)

    def loss(q, k, v):
        return jnp.sum(forward(q, k, v) * cotangent)

    return loop.step_jit(forward), loop.step_jit(jax.grad(loss, argnums=(0, 1, 2)))


def _torch_fns(cotangent):
    import torch
    import torch.nn.functional as F

    import numpy as np

    w = torch.from_numpy(np.array(cotangent)).transpose(1, 2).contiguous()

    def prepare(q, k, v, grad):
        # [B, T, H, P] -> [B, H, T, P]; GQA through enable_gqa (kv heads shared by H / K query heads)
        return [torch.from_numpy(np.array(a)).transpose(1, 2).contiguous().requires_grad_(grad) for a in (q, k, v)]

    def forward(q, k, v):
        with torch.no_grad():
            return F.scaled_dot_product_attention(*prepare(q, k, v, False), is_causal=True, enable_gqa=True)

    def both(q, k, v):
        tq, tk, tv = prepare(q, k, v, True)
        (F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True) * w).sum().backward()
        return tq.grad, tk.grad, tv.grad

    return forward, both, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def _timed(fns: dict, args, repeats: int) -> dict:
    """Median seconds per call of each fn, after one untimed call; interleaved."""
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _planned_bytes(jitted, args) -> int:
    """Peak memory XLA plans for the compiled program: arguments + outputs + temporaries."""
    from effax.train import loop

    m = loop.compiled_step(jitted, *args).memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def quickstart_rows(repeats: int) -> tuple[list, str]:
    from effax.layers.attention import Mask

    q, k, v, w = _inputs(**QUICKSTART)
    fns, note = {}, "torch not installed (pip install -e '.[bench]')"
    for impl in ("all pairs", "xla", "blockwise", "span einsums only"):
        fns[f"{impl} forward"], fns[f"{impl} forward+backward"] = _jax_fns(impl, Mask(), w)
    try:
        fns["torch sdpa forward"], fns["torch sdpa forward+backward"], note = _torch_fns(w)
    except ImportError:
        pass
    times = _timed(fns, (q, k, v), repeats)
    rows = []
    for name, seconds in times.items():
        kind = name.split(" ")[-1]
        rows.append({"variant": name, "ms": 1e3 * seconds, "ratio_to_all_pairs": seconds / times[f"all pairs {kind}"]})
    return rows, note


def threshold_rows(repeats: int, lengths=(256, 512, 1024, 2048), tokens: int = 4096) -> list:
    from effax.layers.attention import Mask

    rows = []
    for T in lengths:
        q, k, v, w = _inputs(B=tokens // T, T=T, H=4, K=2, P=64)
        fns = {impl: _jax_fns(impl, Mask(), w)[1] for impl in ("all pairs", "xla", "blockwise")}
        times = _timed(fns, (q, k, v), repeats)
        rows += [{"T": T, "B": tokens // T, "impl": impl, "ms": 1e3 * t, "ratio_to_all_pairs": t / times["all pairs"]}
                 for impl, t in times.items()]
    return rows


def mask_rows(lengths: list[int], repeats: int) -> list:
    from effax.layers.attention import BlockSparse, Mask

    masks = {"causal": Mask(), "window 512": Mask(window=512),
             "block-sparse 64 (3 local, 1 global, stride 4)": Mask(block_sparse=BlockSparse(64, 3, 1, 4))}
    rows = []
    for T in lengths:
        q, k, v, w = _inputs(T=T, **LONG)
        fns, memory = {}, {}
        for name, mask in masks.items():
            fns[name] = _jax_fns("blockwise", mask, w)[1]
            memory[name] = _planned_bytes(fns[name], (q, k, v))
        xla = _jax_fns("xla", Mask(), w)[1]
        memory["causal, xla impl"] = _planned_bytes(xla, (q, k, v))
        if T <= XLA_MAX_T:
            fns["causal, xla impl"] = xla
        times = _timed(fns, (q, k, v), repeats)
        for name in memory:
            seconds = times.get(name)
            rows.append({"T": T, "mask": name, "ms": None if seconds is None else 1e3 * seconds,
                         "us_per_token": None if seconds is None else 1e6 * seconds / T,
                         "ratio_to_causal": None if seconds is None else seconds / times["causal"],
                         "planned_mib": memory[name] / 2**20})
        print(f"  T={T} done", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    lengths = [int(t) for t in args.lengths.split(",") if t]
    import jax

    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}"
    print(f"effax bench attention on {device}")
    quick, torch_note = quickstart_rows(args.repeats)
    print(f"\nquickstart shape B16 T256 H4/KV2 P64 fp32 causal ({torch_note})")
    print(f"{'variant':<30} {'ms':>9} {'ratio to all pairs':>19}")
    for r in quick:
        print(f"{r['variant']:<30} {r['ms']:>9.1f} {r['ratio_to_all_pairs']:>18.2f}x")
    threshold = threshold_rows(args.repeats)
    print("\ncausal forward+backward at 4,096 tokens per batch, H4/KV2 P64 fp32 (auto's CPU threshold)")
    print(f"{'T':>6} {'B':>3} {'impl':<12} {'ms':>9} {'ratio to all pairs':>19}")
    for r in threshold:
        print(f"{r['T']:>6} {r['B']:>3} {r['impl']:<12} {r['ms']:>9.1f} {r['ratio_to_all_pairs']:>18.2f}x")
    masks = mask_rows(lengths, args.repeats)
    print(f"\nforward+backward, B1 H4/KV2 P64 fp32, blockwise unless named")
    print(f"{'T':>6} {'mask':<46} {'ms':>10} {'us/token':>9} {'ratio to causal':>16} {'planned MiB':>12}")
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for r in masks:
        print(f"{r['T']:>6} {r['mask']:<46} {fmt(r['ms'], '10.1f')} {fmt(r['us_per_token'], '9.1f')} "
              f"{fmt(r['ratio_to_causal'], '15.2f')}x {r['planned_mib']:>12.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "torch": torch_note, "quickstart": quick, "threshold": threshold, "masks": masks}, f,
                      indent=2)
    return 0
