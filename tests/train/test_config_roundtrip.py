"""Every registered family's config, with a non-default value in every field, survives config.json
(to_json -> from_json) and `--set` as an equal, hashable object: what resume, `effax eval` and sweeps
rely on. A tuple field (a layer pattern, per-head spans) that came back as a list would fail here."""

import dataclasses
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effax.models import registry
from effax.train import config as config_lib

SECTIONS = [f for f in dataclasses.fields(config_lib.Config) if f.name not in ("model", "name")]
TEXT = st.text(alphabet="abcdefghij_0123456789", min_size=1, max_size=8)


def _values(kind, default):
    """A strategy for values of `kind` other than `default` (for an int field, also not 0 or -1: those
    often mean "derive it", which a round trip must still keep)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return st.sampled_from([a for a in args if a != default] or list(args))
    if kind is bool:
        return st.just(not default)
    if kind is int:
        return st.integers(1, 10_000).filter(lambda v: v != default)
    if kind is float:
        return st.floats(1e-6, 1e6, allow_nan=False).filter(lambda v: v != default)
    if kind is str:
        return TEXT.filter(lambda v: v != default)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(_values(args[0], None), min_size=1, max_size=5).map(tuple).filter(lambda v: v != default)
    raise AssertionError(f"no strategy for field type {kind}: extend this test when a new field type appears")


def _instances(cls, keep=("type",)):
    hints = typing.get_type_hints(cls)
    fields = {f.name: _values(hints[f.name], f.default) for f in dataclasses.fields(cls) if f.name not in keep}
    return st.fixed_dictionaries(fields).map(lambda kw: cls(**kw))


def _configs():
    models = st.sampled_from(registry.available()).flatmap(lambda name: _instances(registry.config_class(name)))
    sections = {f.name: _instances(type(f.default), keep=()) for f in SECTIONS}
    return st.fixed_dictionaries({"model": models, **sections}).map(lambda kw: config_lib.Config(**kw, name="x"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs())
def test_every_config_round_trips_through_json(tmp_path_factory, cfg):
    path = str(tmp_path_factory.mktemp("cfg") / "config.json")
    config_lib.to_json(cfg, path)
    back = config_lib.from_json(path)
    assert back == cfg
    assert hash(back) == hash(cfg)
    assert type(back.model) is type(cfg.model)


def _as_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(registry.available()).flatmap(lambda name: _instances(registry.config_class(name))))
def test_every_model_field_can_be_set_from_the_command_line(model):
    base = config_lib.Config(model=registry.config_class(model.type)())
    overrides = [f"model.{f.name}={_as_text(getattr(model, f.name))}" for f in dataclasses.fields(model) if f.name != "type"]
    assert config_lib.apply_overrides(base, overrides).model == model
