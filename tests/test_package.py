"""The distribution installs as one package, effax.<folder>, and leaves site-packages clean."""

import os
import pathlib
import subprocess
import sys
import zipfile


def test_wheel_installs_the_effax_namespace(repo, tmp_path):
    # Build the wheel offline with the venv's setuptools, install it into an empty target folder, and
    # import it from outside the checkout, with the venv's packages behind it for the dependencies.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(repo)], check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("effax-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"effax", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True)
    # Only the package (and pip's bin/ for the console script): no top-level models/, train/, cli.py.
    assert {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")} <= {"bin", "effax"}
    assert (site / "effax").is_dir()
    names = {p.name for p in (site / "effax").iterdir()}
    assert {"cli.py", "models", "layers", "kernels", "train", "eval", "experiments"} <= names
    assert "tests" not in names and ".venv" not in names
    code = ("import effax.models.registry, effax.train.config, effax.cli, effax.layers, effax.kernels, effax.eval;"
            "print(effax.models.registry.__file__)")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert pathlib.Path(out.stdout.strip()).is_relative_to(site)


def test_cli_help_explains_itself(repo):
    out = subprocess.run([sys.executable, "-m", "effax.cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "prepare" in out.stdout
    out = subprocess.run([sys.executable, "-m", "effax.cli", "train", "--help"], capture_output=True, text=True, check=True)
    assert "--set" in out.stdout and "resume" in out.stdout.lower()
    out = subprocess.run([sys.executable, "-m", "effax.cli", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_config_error_exits_before_compiling(repo):
    out = subprocess.run([sys.executable, "-m", "effax.cli", "train", "experiments/quickstart.py:smoke", "--set",
                          "model.n_heads=5"], capture_output=True, text=True, cwd=repo)
    assert out.returncode == 2
    assert "model.n_heads=5 does not divide model.d_model=64" in out.stderr


def test_every_package_folder_is_in_pyproject(repo):
    # The editable install finds any folder, but the wheel holds only those listed: an unlisted
    # subpackage (train/sweeps/, eval/fits/, ...) would be missing after `pip install .`.
    import tomllib

    listed = set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tops = [d for d in repo.iterdir() if (d / "__init__.py").is_file() and d.name != "tests"]
    found = {"effax"} | {".".join(("effax", *p.parent.relative_to(repo).parts)) for d in tops for p in d.rglob("__init__.py")}
    assert listed == found
