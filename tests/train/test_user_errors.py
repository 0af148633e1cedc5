"""User-facing errors are one line: bad corpus files through `effax train`, non-finite config numbers,
and the one metrics.jsonl reader on torn and corrupt files."""

import json

import pytest

from effax import cli
from effax.train import metrics as metrics_lib


@pytest.fixture(autouse=True)
def _cwd(repo, monkeypatch):
    monkeypatch.chdir(repo)


@pytest.mark.parametrize("name, content, source, needle", [
    ("bad.jsonl", b'{"text": "fine"}\nnot json at all\n', "jsonl", "bad.jsonl, line 2: not valid JSON"),
    ("latin1.txt", "caf\u00e9".encode("latin-1"), "text", "latin1.txt: not valid UTF-8"),
    ("empty.txt", b"", "text", "empty corpus"),
])
def test_a_bad_data_file_is_one_line_naming_it(tmp_path, capsys, name, content, source, needle):
    path = tmp_path / name
    path.write_bytes(content)
    status = cli.main(["train", "experiments/quickstart.py:smoke", "--workdir", str(tmp_path / "run"), "--quiet",
                       "--set", f"data.source={source}", f"data.path={path}", "logging.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("effax train: data error: ") and needle in err[0], err


@pytest.mark.parametrize("override", ["optimizer.lr=nan", "optimizer.b2=inf", "model.init_std=-inf"])
def test_non_finite_numbers_are_config_errors(capsys, override):
    assert cli.main(["train", "experiments/quickstart.py:smoke", "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a finite number" in err[0] and override.split("=")[0] in err[0], err


def test_metrics_reader_skips_a_torn_last_line_and_names_a_corrupt_one(tmp_path):
    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0}) for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "sp')  # killed mid-write
    assert [r["step"] for r in metrics_lib.read(str(tmp_path))] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n#garbage\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
        metrics_lib.read(str(tmp_path))
