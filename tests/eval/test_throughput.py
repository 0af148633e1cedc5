"""The throughput suite on CPU: positive, finite figures; no MFU or peak memory where none is known."""

import argparse
import math

from flax import nnx

from effax.eval import throughput
from effax.eval.context import EvalContext
from effax.models.dense import Dense, DenseConfig
from effax.train import config as config_lib
from effax.train import mesh as mesh_lib
from effax.train.tokenizer import ByteTokenizer

CFG = DenseConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def test_throughput_suite_on_cpu(tmp_path):
    cfg = config_lib.Config(model=CFG)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    ctx = EvalContext(cfg=cfg, model=Dense(CFG, rngs=nnx.Rngs(0)), tokenizer=ByteTokenizer(), mesh=mesh,
                      rules=mesh_lib.rules(cfg.mesh), step=0, workdir=str(tmp_path))
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    opts = parser.parse_args(["--batch", "8", "--context", "20", "--decode-tokens", "6", "--repeats", "2"])
    out = throughput.run(ctx, opts)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_step", "prefill_flops", "decode_flops"):
        assert math.isfinite(out[key]) and out[key] > 0, key
    assert out["prefill_mfu"] is None and out["decode_mfu"] is None  # no known peak for a CPU
    assert out["peak_bytes"] is None  # the CPU reports no memory statistics
    # 2 layers x 8 rows x 26 slots x 2 kv heads x 8 dims x (k, v) x 4 bytes, + the int32 position each
    # slot holds (the cache's record of valid slots: 2 layers x 8 rows x 26 slots x 4 bytes), + lengths
    assert out["kv_cache_bytes"] == 2 * 8 * 26 * 2 * 8 * 2 * 4 + 2 * 8 * 26 * 4 + 8 * 4


def test_flops_convention():
    B, T, N = 2, 10, 3
    prefill, decode = throughput.flops(CFG, B, T, N)
    fwd = lambda c: 2 * CFG.matmul_params() + 4 * CFG.n_layers * CFG.n_heads * CFG.dim_per_head * c  # noqa: E731
    assert prefill == B * T * fwd(T) - B * (T - 1) * 2 * CFG.d_model * CFG.vocab_size
    assert decode == B * (fwd(11) + fwd(12) + fwd(13))
