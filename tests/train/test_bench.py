"""`effax bench model` runs the loop's own train step for each variant and reports a ratio table."""

import json
import subprocess
import sys

import pytest
from xla_testing import xla_flags


def test_vary_zips_the_keys_it_is_given_together():
    from effax.train.bench import vary_axis

    assert vary_axis("data.seq_len=32,64") == [["data.seq_len=32"], ["data.seq_len=64"]]
    assert vary_axis("data.seq_len=32,64 train.batch_size=4,2") == [["data.seq_len=32", "train.batch_size=4"],
                                                                     ["data.seq_len=64", "train.batch_size=2"]]
    with pytest.raises(ValueError, match="as many values"):
        vary_axis("data.seq_len=32,64 train.batch_size=4")


def test_interleave_alternates_the_timed_blocks(monkeypatch):
    """--interleave sets every variant up first, then times block 1 of each, block 2 of each, ..."""
    from effax.train import bench

    calls = []

    class Timed:
        def __init__(self, cfg, warmup):
            self.cfg = cfg
            calls.append(("set up", cfg))

        def block(self, steps):
            calls.append(("block", self.cfg))

        def row(self):
            return {"cfg": self.cfg}

    monkeypatch.setattr(bench, "_Timed", Timed)
    assert bench.time_interleaved(["a", "b"], steps=1, repeats=2, warmup=0) == [{"cfg": "a"}, {"cfg": "b"}]
    assert calls == [("set up", "a"), ("set up", "b"), ("block", "a"), ("block", "b"), ("block", "a"), ("block", "b")]


@pytest.mark.slow  # ~20 s: two train steps compiled in a subprocess; by default, the --vary parsing above
def test_bench_model_table(repo, tmp_path):
    out_json = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "effax.cli", "bench", "model", "experiments/quickstart.py:smoke",
                          "--set", "mesh.data=1", "--vary", "data.seq_len=32,64 train.batch_size=4,2", "--steps", "1", "--repeats", "1",
                          "--warmup", "1", "--interleave", "--out", str(out_json)],
                         cwd=repo, capture_output=True, text=True, env={"XLA_FLAGS": xla_flags(1),
                                                                        "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out_json.read_text())["rows"]
    # keys in one --vary vary together (zipped): two rows, not four
    assert [r["variant"] for r in rows] == ["data.seq_len=32 train.batch_size=4", "data.seq_len=64 train.batch_size=2"]
    assert rows[0]["ratio"] == 1.0 and all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in rows)
    assert "data.seq_len=64" in out.stdout and "ratio" in out.stdout


def test_bench_peer_refuses_what_a_llama_cannot_be(repo, monkeypatch, capsys):
    """The peer is transformers' Llama: an MoE config is refused by name, before torch is imported."""
    from effax.train import bench_peer

    monkeypatch.chdir(repo)
    assert bench_peer.main(["experiments/moe/moe.py:smoke-topk"]) == 2
    assert "needs model.type=dense" in capsys.readouterr().err


def test_bench_peer_builds_the_same_shape(repo, monkeypatch):
    """Where transformers is installed (the bench extra): the Llama of the quickstart has effax's parameter count."""
    transformers = pytest.importorskip("transformers")
    from effax.train import bench_peer
    from effax.train import config as config_lib

    monkeypatch.chdir(repo)
    cfg = config_lib.resolve("experiments/quickstart.py", ["model.vocab_size=384"])
    model = transformers.LlamaForCausalLM(bench_peer.llama_config(cfg.model, cfg.data.seq_len))
    assert sum(p.numel() for p in model.parameters()) == cfg.model.param_count()
