"""`effax bench attention` is wired into the `effax bench` command (the run itself is docs/benchmarks.md's)."""

import pytest

from effax import cli


def test_bench_attention_is_a_bench_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "attention", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--lengths" in out and "scaled_dot_product_attention" in out
