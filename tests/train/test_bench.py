"""`effax bench model` runs the loop's own train step for each variant and reports a ratio table."""

import json
import subprocess
import sys
from xla_testing import xla_flags


def test_bench_model_table(repo, tmp_path):
    out_json = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "effax.cli", "bench", "model", "experiments/quickstart.py:smoke",
                          "--set", "mesh.data=1", "--vary", "data.seq_len=32,64", "--steps", "1", "--repeats", "1",
                          "--warmup", "1", "--out", str(out_json)],
                         cwd=repo, capture_output=True, text=True, env={"XLA_FLAGS": xla_flags(1),
                                                                        "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["data.seq_len=32", "data.seq_len=64"]
    assert rows[0]["ratio"] == 1.0 and all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in rows)
    assert "data.seq_len=64" in out.stdout and "ratio" in out.stdout
