"""`effax bench kernels`: each Pallas kernel against its XLA reference, timed in one process.

    effax bench kernels [--kernels gmm,linear_attention] [--size auto|gpu|small|tiny] [--repeats 5] [--out FILE.json]

Per kernel and size, forward and forward+backward rows, one per variant: the kernel (`impl`), the XLA
reference (`xla`) and any further baselines of the entry. Columns: median ms of --repeats calls after one
untimed call (compilation), achieved TFLOP/s and GB/s (the entry's FLOPs and bytes formulas over the time),
the fraction of the device's peak FLOP/s and bandwidth (PEAKS, by device kind; "n/a" elsewhere), and
`vs xla` = xla's time / the row's time (> 1: faster than the XLA reference), and `err vs xla`, the
largest deviation of the row's outputs (forward) or gradients (forward+backward) from xla's, relative to
their largest value (a fast wrong kernel shows). Variants are interleaved so that load on a shared machine
spreads over all of them.

On a CPU only the XLA paths are timed: Pallas kernels run there only in interpret mode, which is not a
speed. `--size auto` is `gpu` on a GPU and `small` elsewhere; `tiny` is the test's.

Adding a kernel: one `Kernel` entry in KERNELS (a name, sizes, a builder returning `Built`); see those below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Callable

# Dense bf16 peak FLOP/s and HBM bandwidth (SXM parts), matched by substring of jax's device_kind.
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12)}
CPU_NOTE = ("CPU: only the XLA paths are timed (Pallas kernels run on CPU only in interpret mode, which is "
            "not a speed)")


@dataclasses.dataclass
class Built:
    """What a builder returns for one size: the functions to time (of `args`), and the work they do."""
    impl: Callable  # the kernel (forward; the forward+backward rows differentiate it)
    xla: Callable  # the XLA reference every row's `vs xla` is taken against
    args: tuple  # device arrays
    flops: tuple[float, float]  # useful FLOPs of (forward, forward+backward)
    bytes: tuple[float, float]  # bytes read + written at least once by (forward, forward+backward)
    label: str  # the size, for the table
    impl_name: str = "pallas"
    diff: tuple[int, ...] = (0,)  # the arguments the forward+backward rows differentiate
    others: dict = dataclasses.field(default_factory=dict)  # further baselines: name -> forward function


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    sizes: dict  # size name ("gpu", "small", "tiny") -> keyword arguments of build
    build: Callable[..., Built]


def _normal(rng, shape, dtype, scale=1.0):
    """Random inputs drawn with numpy: eager jax ops would each compile (seconds on a loaded CPU)."""
    import jax.numpy as jnp

    return jnp.asarray(scale * rng.standard_normal(shape, dtype="float32"), dtype)


# --- grouped matmul (kernels/gmm): rows sorted by group, E equal groups ----------------------------------

def build_gmm(M, D, F, E, dtype):
    import jax.numpy as jnp
    import numpy as np

    from effax.kernels.gmm import ops, reference

    rng = np.random.default_rng(0)
    x, w = _normal(rng, (M, D), dtype), _normal(rng, (E, D, F), dtype, D**-0.5)
    sizes = jnp.asarray(np.full((E,), M // E, np.int32))  # equal groups: the padded einsum below does no extra work
    b = jnp.dtype(dtype).itemsize
    return Built(
        impl=lambda x, w: ops.gmm(x, w, sizes, impl="pallas"),
        xla=lambda x, w: ops.gmm(x, w, sizes, impl="xla"),
        others={"ragged_dot": lambda x, w: reference.gmm(x, w, sizes),
                # the same useful work as one batched matmul over [E, M / E, D] (a capacity layout, no padding)
                "padded einsum": lambda x, w: jnp.einsum("ecd,edf->ecf", x.reshape(E, M // E, D), w,
                                                         preferred_element_type=jnp.float32).astype(dtype).reshape(M, F)},
        args=(x, w), diff=(0, 1),
        # forward: 2MDF; backward: dlhs 2MDF + dW 2MDF
        flops=(2 * M * D * F, 6 * M * D * F),
        # forward: read x, w, write out; backward also reads dout, w, x, dout and writes dx, dw
        bytes=(b * (M * D + E * D * F + M * F), b * (3 * M * D + 3 * E * D * F + 3 * M * F)),
        label=f"M{M} D{D} F{F} E{E} {jnp.dtype(dtype).name}",
    )


# --- chunked linear attention / SSD (kernels/linear_attention), K = H heads, chunk 64 --------------------

def build_linear_attention(B, T, H, N, P, dtype):
    import jax.numpy as jnp
    import numpy as np

    from effax.kernels.linear_attention import ops

    rng = np.random.default_rng(0)
    q, k = _normal(rng, (B, T, H, N), dtype, N**-0.5), _normal(rng, (B, T, H, N), dtype, N**-0.5)
    v, g = _normal(rng, (B, T, H, P), dtype), jnp.asarray(-rng.uniform(0.0, 0.5, (B, T, H)), jnp.float32)
    b, Q = jnp.dtype(dtype).itemsize, 64
    inputs = B * T * H * (b * (2 * N + P) + 4)  # q, k, v and the fp32 log decay
    outputs = 4 * B * H * (T * P + N * P)  # y and the final state, fp32
    return Built(
        impl=lambda q, k, v, g: ops.linear_attention(q, k, v, g, chunk_size=Q, impl="pallas"),
        xla=lambda q, k, v, g: ops.linear_attention(q, k, v, g, chunk_size=Q, impl="xla"),
        args=(q, k, v, g), diff=(0, 1, 2, 3),
        # the chunked algorithm's matmuls per head and token: q k^T and A v over a chunk (2Q(N + P)),
        # q S and the state update (4NP); the backward counted as twice the forward
        flops=(2 * B * H * T * (Q * (N + P) + 2 * N * P), 6 * B * H * T * (Q * (N + P) + 2 * N * P)),
        # forward: inputs once, outputs once; backward: inputs again, output cotangents, input gradients
        bytes=(inputs + outputs, 3 * inputs + 2 * outputs),
        label=f"B{B} T{T} H{H} K{N} V{P} {jnp.dtype(dtype).name}",
    )


# --- chunked gated DeltaNet (kernels/delta_rule), chunk 64 ---------------------------------------------

def build_delta_rule(B, T, H, N, P, dtype):
    import jax.numpy as jnp
    import numpy as np

    from effax.kernels.delta_rule import ops
    from effax.layers.delta_rule import chunked_flops

    rng = np.random.default_rng(0)

    def unit(shape, scale=1.0):  # q, k L2-normalised as the GDN layer feeds them (q also scaled by N^-0.5)
        x = rng.standard_normal(shape, dtype="float32")
        return jnp.asarray(scale * x / np.linalg.norm(x, axis=-1, keepdims=True), dtype)

    q, k, v = unit((B, T, H, N), N**-0.5), unit((B, T, H, N)), _normal(rng, (B, T, H, P), dtype)
    beta = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((B, T, H)))), jnp.float32)
    g = jnp.asarray(-rng.uniform(0.0, 0.5, (B, T, H)), jnp.float32)
    b, Q = jnp.dtype(dtype).itemsize, 64
    inputs = B * T * H * (b * (2 * N + P) + 8)  # q, k, v and the fp32 beta and log decay
    outputs = 4 * B * H * (T * P + N * P)  # y and the final state, fp32
    forward = B * T * chunked_flops(Q, T, H=H, N=N, P=P)  # the GDN layer's own count of the chunked form
    return Built(
        impl=lambda q, k, v, beta, g: ops.delta_rule(q, k, v, beta, g, chunk_size=Q, impl="pallas"),
        xla=lambda q, k, v, beta, g: ops.delta_rule(q, k, v, beta, g, chunk_size=Q, impl="xla"),
        args=(q, k, v, beta, g), diff=(0, 1, 2, 3, 4),
        flops=(forward, 3 * forward),  # the backward counted as twice the forward
        bytes=(inputs + outputs, 3 * inputs + 2 * outputs),
        label=f"B{B} T{T} H{H} K{N} V{P} {jnp.dtype(dtype).name}",
    )


# --- block-sparse flash attention (kernels/flash_attention): causal, or a causal window of W keys -------

def build_flash_attention(B, T, H, K, P, dtype, window=None):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from effax.kernels.flash_attention import ops

    rng = np.random.default_rng(0)
    q, k, v = _normal(rng, (B, T, H, P), dtype), _normal(rng, (B, T, K, P), dtype), _normal(rng, (B, T, K, P), dtype)
    if window is None:
        visible = lambda i, j: j <= i  # noqa: E731
        pairs = T * (T + 1) // 2
    else:
        visible = lambda i, j: (j <= i) & (i - j < window)  # noqa: E731
        pairs = int(np.minimum(np.arange(1, T + 1), window).sum())
    b = jnp.dtype(dtype).itemsize
    others = {}
    if jax.default_backend() == "gpu":  # cuDNN's fused attention: the bar for this kernel
        others["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=None if window is None else (window - 1, 0), implementation="cudnn")
    # FLOPs over the visible pairs only (QK^T and PV: 4 P per pair per head); the backward's five matmuls to
    # the forward's two: fwd+bwd = 3.5x the forward (FlashAttention's convention)
    forward = 4 * B * H * P * pairs
    qkv, out = B * T * (H + 2 * K) * P * b, B * T * H * P * b
    return Built(
        impl=lambda q, k, v: ops.flash_attention(q, k, v, visible=visible, impl="pallas"),
        xla=lambda q, k, v: ops.flash_attention(q, k, v, visible=visible, impl="xla"),
        others=others, args=(q, k, v), diff=(0, 1, 2),
        flops=(forward, 3.5 * forward),
        # forward: q, k, v in, out; backward also reads q, k, v, out, its cotangent and writes dq, dk, dv
        bytes=(qkv + out, 3 * qkv + 3 * out),
        label=f"B{B} T{T} H{H} K{K} P{P} {'causal' if window is None else f'window {window}'} {jnp.dtype(dtype).name}",
    )


KERNELS = [
    Kernel("gmm", {"gpu": dict(M=16384, D=2048, F=1408, E=8, dtype="bfloat16"),
                   "small": dict(M=2048, D=256, F=352, E=8, dtype="float32"),
                   "tiny": dict(M=64, D=16, F=16, E=4, dtype="float32")}, build_gmm),
    Kernel("linear_attention", {"gpu": dict(B=1, T=8192, H=16, N=128, P=128, dtype="bfloat16"),
                                "small": dict(B=1, T=1024, H=4, N=64, P=64, dtype="float32"),
                                "tiny": dict(B=1, T=128, H=2, N=16, P=16, dtype="float32")}, build_linear_attention),
    Kernel("delta_rule", {"gpu": dict(B=1, T=8192, H=16, N=128, P=128, dtype="bfloat16"),
                          "small": dict(B=1, T=1024, H=4, N=64, P=64, dtype="float32"),
                          "tiny": dict(B=1, T=128, H=2, N=16, P=16, dtype="float32")}, build_delta_rule),
    Kernel("flash_attention", {"gpu": dict(B=1, T=8192, H=16, K=16, P=128, dtype="bfloat16"),
                               "small": dict(B=1, T=1024, H=4, K=2, P=64, dtype="float32"),
                               "tiny": dict(B=1, T=128, H=2, K=1, P=16, dtype="float32")}, build_flash_attention),
    Kernel("flash_window", {"gpu": dict(B=1, T=8192, H=16, K=16, P=128, dtype="bfloat16", window=512),
                            "small": dict(B=1, T=1024, H=4, K=2, P=64, dtype="float32", window=256),
                            "tiny": dict(B=1, T=128, H=2, K=1, P=16, dtype="float32", window=32)}, build_flash_attention),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effax bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=",".join(k.name for k in KERNELS),
                   help="comma-separated kernels to run (default: all of %(default)s)")
    p.add_argument("--size", default="auto", choices=["auto", "gpu", "small", "tiny"],
                   help="auto: gpu on a GPU, small elsewhere")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant; the median is reported")
    p.add_argument("--out", help="also write the rows as JSON to this file")
    return p


def _forward_backward(fn, args, diff):
    """jit(grad of <fn(args), fixed random cotangents>) with respect to args[diff]."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(1)
    cotangents = [jnp.asarray(rng.standard_normal(s.shape, dtype="float32"))
                  for s in jax.tree.leaves(jax.eval_shape(fn, *args))]

    def loss(*a):
        return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(jax.tree.leaves(fn(*a)), cotangents))

    return jax.jit(jax.grad(loss, argnums=diff))


def kernel_rows(kernel: Kernel, size: str, repeats: int, on_gpu: bool, peaks) -> list[dict]:
    import jax

    from effax.train.bench_attention import _timed  # median after one untimed call, variants interleaved

    built = kernel.build(**kernel.sizes[size])
    variants = {built.impl_name: built.impl} if on_gpu else {}  # off a GPU the kernel would only be interpreted
    variants.update(xla=built.xla, **built.others)
    rows = []
    for i, phase in enumerate(["forward", "forward+backward"]):
        fns = {name: jax.jit(fn) if i == 0 else _forward_backward(fn, built.args, built.diff)
               for name, fn in variants.items()}
        times = _timed(fns, built.args, repeats)
        errors = _errors({name: fn(*built.args) for name, fn in fns.items()})
        for name, seconds in times.items():
            tflops, gbs = built.flops[i] / seconds / 1e12, built.bytes[i] / seconds / 1e9
            rows.append({"kernel": kernel.name, "size": built.label, "pass": phase, "variant": name,
                         "ms": 1e3 * seconds, "tflops": tflops, "gbs": gbs,
                         "peak_flops_frac": tflops * 1e12 / peaks[0] if peaks else None,
                         "peak_bw_frac": gbs * 1e9 / peaks[1] if peaks else None,
                         "vs_xla": times["xla"] / seconds, "err_vs_xla": errors[name]})
    return rows


def _errors(outputs: dict) -> dict:
    """Each variant's largest deviation from xla's outputs (or gradients), relative to their largest value:
    a timing of a wrong result shows as such (bf16: ~1e-2 is rounding)."""
    import jax
    import numpy as np

    want = [np.asarray(x, np.float32) for x in jax.tree.leaves(outputs["xla"])]
    errors = {}
    for name, out in outputs.items():
        got = [np.asarray(x, np.float32) for x in jax.tree.leaves(out)]
        errors[name] = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
                           for a, b in zip(got, want))
    return errors


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    wanted = [k for k in args.kernels.split(",") if k]
    known = {k.name: k for k in KERNELS}
    unknown = [k for k in wanted if k not in known]
    if unknown:
        print(f"effax bench kernels: unknown kernels {unknown}; choose from {list(known)}", file=sys.stderr)
        return 2
    import jax

    on_gpu = jax.default_backend() == "gpu"
    size = args.size if args.size != "auto" else ("gpu" if on_gpu else "small")
    kind = jax.devices()[0].device_kind
    peaks = next((v for k, v in PEAKS.items() if k.lower() in kind.lower()), None)
    device = f"{kind}, jax {jax.__version__}"
    print(f"effax bench kernels on {device}, size {size}")
    if not on_gpu:
        print(CPU_NOTE)
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    num = lambda x: f"{x:.1f}" if x >= 10 else f"{x:.3g}"  # noqa: E731  (GPU: hundreds; CPU: fractions)
    print(f"{'kernel':<17} {'size':<30} {'pass':<17} {'variant':<14} {'ms':>10} {'TFLOP/s':>9} {'GB/s':>8} "
          f"{'%peak FLOP':>10} {'%peak BW':>9} {'vs xla':>7} {'err vs xla':>10}")
    rows = []
    for name in wanted:
        for r in kernel_rows(known[name], size, args.repeats, on_gpu, peaks):
            rows.append(r)
            print(f"{r['kernel']:<17} {r['size']:<30} {r['pass']:<17} {r['variant']:<14} {r['ms']:>10.3f} "
                  f"{num(r['tflops']):>9} {num(r['gbs']):>8} {pct(r['peak_flops_frac']):>10} {pct(r['peak_bw_frac']):>9} "
                  f"{r['vs_xla']:>6.2f}x {r['err_vs_xla']:>10.1e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "size": size, "xla_paths_only": not on_gpu, "rows": rows}, f, indent=2)
    return 0
