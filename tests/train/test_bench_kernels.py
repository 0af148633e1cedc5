"""`effax bench kernels` at its tiny size on CPU: the entries build and time their XLA paths (the Pallas
kernels are not timed off a GPU, and the table says so), the rows carry the columns, the filter and the
JSON file work. The default test runs the gmm entry (its compiles take ~3 s); every entry runs under
`make test-slow` (the linear-attention reference's gradient alone compiles for ~5 s), and so do the rows
of a GPU run, with the Pallas kernels interpreted."""

import json

import pytest

from effax import cli
from effax.train import bench_kernels


def _run(tmp_path, capsys, kernels):
    out_json = tmp_path / "kernels.json"
    assert cli.main(["bench", "kernels", "--kernels", ",".join(kernels), "--size", "tiny", "--repeats", "1",
                     "--out", str(out_json)]) == 0
    stdout = capsys.readouterr().out
    assert bench_kernels.CPU_NOTE in stdout and "vs xla" in stdout
    result = json.loads(out_json.read_text())
    assert result["xla_paths_only"] and result["size"] == "tiny"
    rows = result["rows"]
    assert {r["kernel"] for r in rows} == set(kernels)
    for kernel in kernels:  # forward and forward+backward rows of each, xla's ratio 1
        mine = [r for r in rows if r["kernel"] == kernel]
        assert {r["pass"] for r in mine} == {"forward", "forward+backward"}
        assert all(r["variant"] != "pallas" for r in mine)
        assert all(r["vs_xla"] == 1.0 for r in mine if r["variant"] == "xla")
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["gbs"] > 0 and r["peak_flops_frac"] is None for r in rows)
    assert all(r["err_vs_xla"] < 1e-5 for r in rows)  # fp32: every baseline computes the same thing
    return rows


def test_bench_kernels_gmm_tiny_on_cpu(tmp_path, capsys):
    rows = _run(tmp_path, capsys, ["gmm"])
    assert {r["variant"] for r in rows} == {"xla", "ragged_dot", "padded einsum"}


@pytest.mark.slow
def test_bench_kernels_every_entry_tiny_on_cpu(tmp_path, capsys):
    _run(tmp_path, capsys, [k.name for k in bench_kernels.KERNELS])


def test_bench_kernels_filter(capsys):
    assert bench_kernels.main(["--kernels", "nope"]) == 2
    assert "unknown kernels ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "kernels", "--size", "huge"])


@pytest.mark.slow
def test_gpu_rows_on_cpu():
    """The rows a GPU run prints, here with the Pallas kernels interpreted: each entry's kernel agrees with its
    XLA reference (fp32), and the peak columns fill in from the device table."""
    for kernel in bench_kernels.KERNELS:
        rows = bench_kernels.kernel_rows(kernel, "tiny", 1, on_gpu=True, peaks=bench_kernels.PEAKS["H200"])
        pallas = [r for r in rows if r["variant"] == "pallas"]
        assert len(pallas) == 2 and all(r["err_vs_xla"] < 1e-5 and r["peak_flops_frac"] > 0 for r in pallas), kernel.name
