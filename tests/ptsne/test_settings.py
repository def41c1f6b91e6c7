"""Settings declared once: validation by the declarations, names unique across the stage configs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ptsne import settings
from ptsne.model import ModelConfig
from ptsne.reference import ReferenceConfig
from ptsne.settings import setting, validate
from ptsne.train import TrainConfig

CONFIGS = (TrainConfig, ModelConfig, ReferenceConfig)


@dataclass(frozen=True)
class Toy:
    count: int = setting(3, "a count", ge=1)
    share: float = setting(0.5, "a share", ge=0, lt=1)
    rate: float = setting(1.0, "a rate", gt=0, why="it divides")
    mode: str = setting("a", "a mode", choices=("a", "b"))
    flag: bool = setting(False, "a switch")
    size: int = setting(0, "a size", ge=0, name="toy_size")

    def __post_init__(self):
        validate(self)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(count=0), "Toy: count must be an integer >= 1, got 0"),
        (dict(count=True), "Toy: count must be an integer >= 1, got True"),
        (dict(count=2.0), "Toy: count must be an integer >= 1, got 2.0"),
        (dict(share=1.0), r"Toy: share must be a finite number in \[0, 1\), got 1.0"),
        (dict(rate=0), r"Toy: rate must be a finite number > 0, got 0 \(it divides\)"),
        (dict(rate=float("inf")), r"Toy: rate must be a finite number > 0, got inf \(it divides\)"),
        (dict(mode="c"), r"Toy: mode must be one of \('a', 'b'\), got 'c'"),
        (dict(flag=1), "Toy: flag must be true or false, got 1"),
        (dict(size=-1), "Toy: toy_size must be an integer >= 0, got -1"),  # the public name
    ],
)
def test_validate_names_class_setting_bounds_and_value(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        Toy(**kwargs)


def test_defaults_are_valid():
    Toy()
    for cls in CONFIGS:
        cls()


def test_every_setting_has_help_and_a_unique_public_name():
    names = [settings.public_name(f) for cls in CONFIGS for f in settings.settings_of(cls)]
    assert len(names) == len(set(names)), names
    for cls in CONFIGS:
        for f in settings.settings_of(cls):
            assert settings.spec(f)["help"], (cls.__name__, f.name)


def test_kinds_from_annotations():
    kinds = {f.name: settings.kind(ModelConfig, f) for f in settings.settings_of(ModelConfig)}
    assert kinds == {"n_components": "int", "hidden_layers": "ints", "activation": "str", "layer_norm": "bool"}
    assert settings.kind(TrainConfig, next(f for f in settings.settings_of(TrainConfig) if f.name == "dof")) == "float"


@dataclass(frozen=True)
class Kinds:
    limit: int | None = setting(None, "a limit or none", ge=1)
    width: int | str = setting("auto", "a width", ge=1, auto="from the data")
    scales: float | tuple[float, ...] = setting(30.0, "one scale or several", gt=1)
    columns: tuple[str, ...] | None = setting(None, "column names")
    column: str | None = setting("x", "a column name")
    share: float = setting(0.5, "a share", gt=0, le=1)

    def __post_init__(self):
        validate(self)


def test_kinds_of_optional_auto_several_and_names():
    kinds = {f.name: settings.kind(Kinds, f) for f in settings.settings_of(Kinds)}
    assert kinds == {"limit": "int", "width": "int", "scales": "floats", "columns": "names", "column": "str",
                     "share": "float"}
    nullable = {f.name for f in settings.settings_of(Kinds) if settings.nullable(Kinds, f)}
    assert nullable == {"limit", "columns", "column"}
    assert [f.name for f in settings.settings_of(Kinds) if settings.takes_auto(Kinds, f)] == ["width"]


def test_valid_values_of_the_other_kinds():
    Kinds()
    Kinds(limit=3, width=5, scales=(10, 20.5), columns=("a", "b"), column=None, share=1.0)
    Kinds(scales=[5.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(limit=0), "Kinds: limit must be an integer >= 1 or None, got 0"),
        (dict(limit="3"), "Kinds: limit must be an integer >= 1 or None, got '3'"),
        (dict(width=0), "Kinds: width must be 'auto' or an integer >= 1, got 0"),
        (dict(width="many"), "Kinds: width must be 'auto' or an integer >= 1, got 'many'"),
        (dict(scales=1.0), "Kinds: scales must be a finite number > 1 or a non-empty list of them, got 1.0"),
        (dict(scales=()), r"Kinds: scales must be a finite number > 1 or a non-empty list of them, got \(\)"),
        (dict(scales=(10, True)),
         r"Kinds: scales must be a finite number > 1 or a non-empty list of them, got \(10, True\)"),
        (dict(columns=("a", "")), r"Kinds: columns must be a non-empty list of names or None, got \('a', ''\)"),
        (dict(column=""), "Kinds: column must be a non-empty string or None, got ''"),
        (dict(share=0), r"Kinds: share must be a finite number in \(0, 1\], got 0"),
        (dict(share=1.01), r"Kinds: share must be a finite number in \(0, 1\], got 1.01"),
    ],
)
def test_messages_of_the_other_kinds(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        Kinds(**kwargs)


def test_the_knn_config_is_declared():
    from ptsne.knn import KNNConfig

    assert [f.name for f in settings.settings_of(KNNConfig)] == [
        "n_neighbors", "method", "target_recall", "device", "n_threads", "seed"]
    assert all(settings.spec(f)["help"] for f in settings.settings_of(KNNConfig))
    KNNConfig()
