"""Config resolution: defaults ← experiment file ← overrides, and errors that name the key."""

import dataclasses
import json

import pytest

from effax.train import config as config_lib
from effax.train.config import ConfigError

QUICKSTART = "experiments/quickstart.py"


@pytest.fixture(autouse=True)
def _cwd(repo, monkeypatch):
    monkeypatch.chdir(repo)


def test_resolve_layers_overrides_on_the_experiment():
    cfg = config_lib.resolve(QUICKSTART + ":smoke", ["train.steps=7", "model.d_model=96", "optimizer.lr=1e-3",
                                                     "data.shuffle=false", "mesh.fsdp=2"])
    assert (cfg.train.steps, cfg.model.d_model, cfg.optimizer.lr, cfg.data.shuffle, cfg.mesh.fsdp) == (7, 96, 1e-3, False, 2)
    assert cfg.model.n_layers == 2  # from the smoke variant, untouched
    assert cfg.name == QUICKSTART + ":smoke"
    full = config_lib.resolve(QUICKSTART)
    assert full.model.d_model != cfg.model.d_model


@pytest.mark.parametrize("override, needle", [
    ("model.d_modle=3", "model.d_modle"),  # a typo names the key and lists the valid ones
    ("modle.d_model=3", "valid sections"),
    ("train.steps=ten", "train.steps"),
    ("train.steps=1.5", "whole number"),
    ("data.source=parquet", "['sotu', 'text', 'jsonl', 'arrayrecord', 'mqar']"),
    ("data.shuffle=maybe", "boolean"),
    ("model.type=transformer9000", "valid: ['dense'"),
    ("train.steps", "key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        config_lib.resolve(QUICKSTART + ":smoke", [override])
    assert needle in str(e.value)


@pytest.mark.parametrize("overrides, needle", [
    (["model.n_heads=5"], "model.n_heads=5 does not divide model.d_model=64"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 does not divide model.n_heads=4"),
    (["train.batch_size=10", "train.microbatches=3"], "train.batch_size=10 is not divisible by train.microbatches=3"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "at most one -1"),
    (["data.source=text"], "data.path"),
    (["train.steps=0"], "train.steps must be positive"),
    (["eval.batch_size=-8"], "eval.batch_size must be >= 0"),
    (["train.sample_top_p=0"], "train.sample_top_p in (0, 1]"),
    (["train.sample_temperature=-1"], "train.sample_temperature must be >= 0"),
])
def test_inconsistent_values_fail(overrides, needle):
    with pytest.raises(ConfigError) as e:
        config_lib.resolve(QUICKSTART + ":smoke", overrides)
    assert needle in str(e.value)


def test_missing_file_and_variant():
    with pytest.raises(ConfigError, match="not found"):
        config_lib.resolve("experiments/nope.py")
    with pytest.raises(ConfigError, match="valid: smoke"):
        config_lib.resolve(QUICKSTART + ":huge")


def test_mesh_errors_name_the_devices():
    from effax.train import mesh as mesh_lib

    ok = config_lib.MeshConfig(data=2, fsdp=-1)
    assert mesh_lib.mesh_shape(ok, 8) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    with pytest.raises(ConfigError, match="do not divide the 8 devices"):
        mesh_lib.mesh_shape(config_lib.MeshConfig(data=-1, tensor=3), 8)
    with pytest.raises(ConfigError, match="uses 4 devices but 8 are available"):
        mesh_lib.mesh_shape(config_lib.MeshConfig(data=2, fsdp=2), 8)


def test_batch_must_divide_data_axes():
    import jax

    from effax.train import mesh as mesh_lib

    cfg = config_lib.resolve(QUICKSTART + ":smoke", ["train.batch_size=12", "mesh.data=8"])
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:8])
    with pytest.raises(ConfigError, match="not divisible by the data axes mesh.data × mesh.fsdp = 8"):
        mesh_lib.check_divisibility(cfg, mesh)
    cfg = config_lib.resolve(QUICKSTART + ":smoke", ["train.batch_size=16", "eval.batch_size=12", "mesh.data=8"])
    with pytest.raises(ConfigError, match="eval.batch_size=12 is not divisible by the data axes"):
        mesh_lib.check_divisibility(cfg, mesh)


def test_model_type_switch_keeps_shared_fields():
    cfg = config_lib.resolve(QUICKSTART + ":smoke", ["model.d_model=128", "model.type=dense"])
    assert cfg.model.d_model == 128  # model.type is applied first, whatever its position


def test_json_round_trip(tmp_path):
    cfg = config_lib.resolve(QUICKSTART + ":smoke", ["train.seed=3"])
    path = tmp_path / "config.json"
    config_lib.to_json(cfg, str(path))
    assert config_lib.from_json(str(path)) == cfg
    assert json.loads(path.read_text())["train"]["seed"] == 3
    assert dataclasses.is_dataclass(config_lib.from_json(str(path)).model)
