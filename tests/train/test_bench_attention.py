"""`effax bench attention` is wired into the `effax bench` command (the run itself is docs/benchmarks.md's)."""

import pytest

from effax import cli


def test_bench_attention_is_a_bench_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "attention", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--lengths" in out and "scaled_dot_product_attention" in out


def test_span_einsums_only_row_is_the_spans_products_without_softmax():
    """The floor row of the quickstart table: each query block's logits over its span's keys (T 128, blocks of
    64: keys < 64 for the first block, all 128 for the second) times v, with no mask or softmax."""
    import jax
    import numpy as np

    from effax.layers.attention import Mask
    from effax.train.bench_attention import _spans_einsums_only

    q, k, v = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate([(1, 128, 4, 8), (1, 128, 2, 8),
                                                                                         (1, 128, 2, 8)]))
    out = np.asarray(_spans_einsums_only(q, k, v, Mask()))
    kh, vh = np.repeat(np.asarray(k), 2, axis=2), np.repeat(np.asarray(v), 2, axis=2)  # query head h reads kv head h // 2
    for lo, hi, keys in ((0, 64, 64), (64, 128, 128)):
        logits = np.einsum("thd,shd->hts", np.asarray(q)[0, lo:hi], kh[0, :keys])
        np.testing.assert_allclose(out[0, lo:hi], np.einsum("hts,shd->thd", logits, vh[0, :keys]), rtol=1e-5, atol=1e-4)


def test_mask_table_runs_at_a_small_length():
    """The mask table's rows at T 128 (one row, blocks of 64): each variant timed once, with XLA's planned memory
    for its compiled program (the jitted functions carry the loop's compiler options)."""
    from effax.train.bench_attention import mask_rows

    rows = mask_rows([128], repeats=1)
    assert [r["mask"] for r in rows][-1] == "causal, xla impl" and len(rows) == 4
    assert all(r["ms"] > 0 and r["planned_mib"] > 0 for r in rows)
