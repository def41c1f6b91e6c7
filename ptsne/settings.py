"""Settings declared once: a config field's default, bounds, help text and public name.

Each field of a stage config (``TrainConfig``, ``ModelConfig``, ...) that a user
can set is made with :func:`setting`, which keeps in the field's metadata what
everything else derives from it: the config's own validation (:func:`validate`),
the estimator's parameter name (:func:`public_name`), the command-line options
of ``ptsne train`` (``jobs.settings``) and the flat names of saved configs.

Bounds are checked with the messages of convention 2: the class, the setting, the
allowed range and the value, e.g. ``TrainConfig: batch_size must be an integer >= 2,
got 1``.

A setting's kind comes from its annotation: ``int``, ``float``, ``str``, ``bool``;
``tuple[int, ...]`` (widths, ``ints``); ``float | tuple[float, ...]`` (one number
or several, ``floats``); ``tuple[str, ...]`` (column names, ``names``). ``| None``
in the annotation also allows ``None``, and ``int | str`` with a declared ``auto``
also allows the value ``"auto"`` itself, resolved later by the stage.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

#: The kinds :func:`validate` checks; a field's kind comes from its annotation.
KINDS = ("int", "float", "str", "bool", "ints", "floats", "names")


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: Sequence[str] | None = None,
    name: str | None = None,
    flag: str | None = None,
    dest: str | None = None,
    auto: str | None = None,
    why: str | None = None,
) -> Any:
    """A dataclass field declared with everything derived from it.

    Parameters
    ----------
    default
        The default value (a tuple for a sequence setting).
    help : str
        One line for ``--help`` and the docs.
    ge, gt, lt, le : float, optional
        Bounds: ``>= ge``, ``> gt``, ``< lt``, ``<= le``.
    choices : sequence of str, optional
        The allowed values of a string setting.
    name : str, optional
        The setting's name outside its config (estimator parameter, flat saved
        config, command line) when it differs from the field's, e.g. ``reference_size``
        for ``ReferenceConfig.size``.
    flag : str, optional
        The command-line option when it differs from ``--`` + the name with dashes
        (``--epochs`` for ``n_epochs``).
    dest : str, optional
        The command line's destination (and config-file name) when it differs from the
        option without dashes (``pca_components`` for ``--pca``).
    auto : str, optional
        The estimator and the command line also accept ``"auto"`` here, resolved as this text says.
    why : str, optional
        Appended to the error message of a value out of bounds.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "lt": lt, "le": le, "choices": tuple(choices) if choices else None,
            "name": name, "flag": flag, "dest": dest, "auto": auto, "why": why}
    return dataclasses.field(default=default, metadata={"setting": {k: v for k, v in meta.items() if v is not None}})


def spec(f: dataclasses.Field) -> dict | None:
    """The metadata :func:`setting` gave field ``f``; None for a field that is not a setting."""
    return f.metadata.get("setting")


def settings_of(cls: type) -> Iterator[dataclasses.Field]:
    """The fields of dataclass ``cls`` declared with :func:`setting`, in order."""
    return (f for f in dataclasses.fields(cls) if spec(f) is not None)


def public_name(f: dataclasses.Field) -> str:
    """The setting's name outside its config (see :func:`setting`)."""
    return spec(f).get("name", f.name)


def _members(hint: Any) -> list:
    """The types of a union annotation other than ``None`` (the annotation itself when it is no union)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return [hint]


def kind(cls: type, f: dataclasses.Field) -> str:
    """One of :data:`KINDS`, from the field's annotation (``str`` when it names none of them)."""
    hint = typing.get_type_hints(cls)[f.name]
    members = _members(hint)
    items = [typing.get_args(m)[0] for m in members if typing.get_origin(m) is tuple]
    if hint is bool:
        return "bool"
    if items:
        return {int: "ints", float: "floats"}.get(items[0], "names")
    if int in members and float not in members:
        return "int"
    if float in members:
        return "float"
    return "str"


def nullable(cls: type, f: dataclasses.Field) -> bool:
    """Whether setting ``f`` of ``cls`` may be ``None`` (its annotation says ``| None``)."""
    hint = typing.get_type_hints(cls)[f.name]
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def takes_auto(cls: type, f: dataclasses.Field) -> bool:
    """Whether the config itself may hold ``"auto"`` for setting ``f`` (declared ``auto``, annotated ``| str``)."""
    return "auto" in spec(f) and kind(cls, f) != "str" and str in _members(typing.get_type_hints(cls)[f.name])


def bounds_text(s: dict) -> str:
    """The allowed range of a numeric setting, as in ``>= 1`` or ``in [0, 1)``."""
    lo = (f"[{s['ge']:g}" if "ge" in s else f"({s['gt']:g}") if ("ge" in s or "gt" in s) else None
    if lo is not None and "lt" in s:
        return f"in {lo}, {s['lt']:g})"
    if lo is not None and "le" in s:
        return f"in {lo}, {s['le']:g}]"
    if "ge" in s:
        return f">= {s['ge']:g}"
    if "gt" in s:
        return f"> {s['gt']:g}"
    if "lt" in s:
        return f"< {s['lt']:g}"
    if "le" in s:
        return f"<= {s['le']:g}"
    return ""


def validate(config: Any) -> None:
    """Check every setting of dataclass instance ``config`` against its declaration.

    Raises
    ------
    ValueError
        A value of the wrong kind or out of its bounds or choices; the message
        names the class, the setting (by its public name, the one users set),
        what is allowed and the value.
    """
    cls = type(config)
    for f in settings_of(cls):
        check_value(cls, f, getattr(config, f.name))


def check_value(cls: type, f: dataclasses.Field, v: Any, where: str | None = None) -> None:
    """Check one value of setting ``f`` of ``cls`` (see :func:`validate`).

    ``where`` names the value in the message (default: ``"CLASS: public_name"``),
    such as the command-line option it came from.
    """
    s = spec(f)
    k = kind(cls, f)
    if (v is None and nullable(cls, f)) or (isinstance(v, str) and v == "auto" and takes_auto(cls, f)):
        return
    where = where or f"{cls.__name__}: {public_name(f)}"
    if "choices" in s:
        if v not in s["choices"]:
            raise ValueError(f"{where} must be one of {s['choices']}, got {v!r}")
        return
    ok, what = _check_kind(k, s, v)
    if ok:
        return
    what = ("'auto' or " if takes_auto(cls, f) else "") + what + (" or None" if nullable(cls, f) else "")
    why = f" ({s['why']})" if "why" in s and k in ("int", "float", "floats") else ""
    raise ValueError(f"{where} must be {what}, got {v!r}{why}")


def _check_kind(k: str, s: dict, v: Any) -> tuple[bool, str]:
    """Whether ``v`` is a value of kind ``k`` within the bounds of declaration ``s``, and what is allowed."""
    bounds = bounds_text(s)
    if k in ("int", "float", "floats"):
        what = ("an integer" if k == "int" else "a finite number") + (f" {bounds}" if bounds else "")
        if k == "floats":
            many = isinstance(v, (list, tuple, np.ndarray))
            values = list(v) if many else [v]
            ok = bool(values) and all(_finite_number(x) and _in_bounds(s, x) for x in values)
            return ok, f"{what} or a non-empty list of them"
        ok = _is_int(v) if k == "int" else _finite_number(v)
        return ok and _in_bounds(s, v), what
    if k == "bool":
        return isinstance(v, (bool, np.bool_)), "true or false"
    if k == "names":
        ok = isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, str) and x for x in v)
        return ok, "a non-empty list of names"
    if k == "str":
        return isinstance(v, str) and bool(v), "a non-empty string"
    return True, ""


def _in_bounds(s: dict, v: Any) -> bool:
    return (("ge" not in s or v >= s["ge"]) and ("gt" not in s or v > s["gt"])
            and ("lt" not in s or v < s["lt"]) and ("le" not in s or v <= s["le"]))


def _is_int(v: Any) -> bool:
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer))


def _finite_number(v: Any) -> bool:
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer, np.floating)) \
        and math.isfinite(v)
