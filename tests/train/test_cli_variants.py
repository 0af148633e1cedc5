"""`effax train CONFIG --variants`: each experiment file's VARIANTS table, one line per variant, and a check
that every file in experiments/ has a table naming exactly the variants its get_config accepts."""

import ast
import pathlib

import pytest

from effax import cli
from effax.train.cli import experiment_variants
from effax.train.config import ConfigError, load_experiment

REPO = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.py") if p.name != "__init__.py")


def test_variants_lists_each_config_with_its_description(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may be written: no runs/ folder appears
    path = str(REPO / "experiments/quickstart.py")
    assert cli.main(["train", path, "--variants"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [path, path + ":smoke"]
    assert "make demo" in lines[0] and "the tests run it" in lines[1]
    assert list(tmp_path.iterdir()) == []


def test_variants_ignores_the_chosen_variant(capsys):
    path = str(REPO / "experiments/mqar.py")
    assert cli.main(["train", path, "--variants"]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["train", path + ":seq128", "--variants"]) == 0
    assert capsys.readouterr().out == plain
    assert [line.split()[0] for line in plain.splitlines()] == [path, *(f"{path}:{v}" for v in ("seq128", "seq256", "smoke"))]


@pytest.mark.parametrize("body, needle", [
    ("", "has no VARIANTS table"),
    ("VARIANTS = {'long': (128, 8)}", "VARIANTS must be a non-empty dict"),
    ("VARIANTS = {}", "VARIANTS must be a non-empty dict"),
    ("VARIANTS = {None: 'two\\nlines'}", "one-line description"),
])
def test_a_missing_or_malformed_table_is_named_not_a_crash(tmp_path, capsys, body, needle):
    exp = tmp_path / "exp.py"
    exp.write_text(f"def get_config(variant=None):\n    return None\n\n{body}\n")
    assert cli.main(["train", str(exp), "--variants"]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(exp) in err and "Traceback" not in err


def test_a_missing_file_is_named(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "nope.py"), "--variants"]) == 2
    assert "experiment file not found" in capsys.readouterr().err


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_experiment_lists_exactly_the_variants_it_accepts(path):
    table = experiment_variants(str(path))
    assert None in table, "the default variant (None) needs a line too"
    module, _ = load_experiment(str(path))
    for variant in table:
        module.get_config(variant)  # every listed variant exists
    # and no other: get_config refuses every other string of the file (a variant's name is one of them)
    strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    for name in [*(strings - set(table)), "no-such-variant"]:
        with pytest.raises(ConfigError, match="unknown variant") as err:
            module.get_config(name)
    # and its error lists the table's variants as the valid ones
    assert set(str(err.value).rsplit("valid: ", 1)[1].split(", ")) == set(table) - {None}
