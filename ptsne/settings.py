"""Settings declared once: a config field's default, bounds, help text and public name.

Each field of a stage config (``TrainConfig``, ``ModelConfig``, ...) that a user
can set is made with :func:`setting`, which keeps in the field's metadata what
everything else derives from it: the config's own validation (:func:`validate`),
the estimator's parameter name (:func:`public_name`), the command-line options
of ``ptsne train`` (``jobs.settings``) and the flat names of saved configs.

Bounds are checked with the messages of convention 2: the class, the setting, the
allowed range and the value, e.g. ``TrainConfig: batch_size must be an integer >= 2,
got 1``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

#: The kinds :func:`validate` checks; a field's kind comes from its annotation.
KINDS = ("int", "float", "str", "bool", "ints")


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    choices: Sequence[str] | None = None,
    name: str | None = None,
    flag: str | None = None,
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
    ge, gt, lt : float, optional
        Bounds: ``>= ge``, ``> gt``, ``< lt``.
    choices : sequence of str, optional
        The allowed values of a string setting.
    name : str, optional
        The setting's name outside its config (estimator parameter, flat saved
        config, command line) when it differs from the field's, e.g. ``reference_size``
        for ``ReferenceConfig.size``.
    flag : str, optional
        The command-line option when it differs from ``--`` + the name with dashes
        (``--epochs`` for ``n_epochs``).
    auto : str, optional
        The estimator and the command line also accept ``"auto"`` here, resolved as this text says.
    why : str, optional
        Appended to the error message of a value out of bounds.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "lt": lt, "choices": tuple(choices) if choices else None,
            "name": name, "flag": flag, "auto": auto, "why": why}
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


def kind(cls: type, f: dataclasses.Field) -> str:
    """One of :data:`KINDS`, from the field's annotation (``str`` when it names none of them)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is bool:
        return "bool"
    if typing.get_origin(hint) is tuple:
        return "ints"
    if hint is int or int in args and float not in args and str not in args:
        return "int"
    if hint is float or float in args:
        return "float"
    return "str"


def bounds_text(s: dict) -> str:
    """The allowed range of a numeric setting, as in ``>= 1`` or ``in [0, 1)``."""
    lo = (f"[{s['ge']:g}" if "ge" in s else f"({s['gt']:g}") if ("ge" in s or "gt" in s) else None
    if lo is not None and "lt" in s:
        return f"in {lo}, {s['lt']:g})"
    if "ge" in s:
        return f">= {s['ge']:g}"
    if "gt" in s:
        return f"> {s['gt']:g}"
    if "lt" in s:
        return f"< {s['lt']:g}"
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
    where = where or f"{cls.__name__}: {public_name(f)}"
    if "choices" in s:
        if v not in s["choices"]:
            raise ValueError(f"{where} must be one of {s['choices']}, got {v!r}")
        return
    if k in ("int", "float"):
        bounds = bounds_text(s)
        what = ("an integer" if k == "int" else "a finite number") + (f" {bounds}" if bounds else "")
        ok = _is_int(v) if k == "int" else _finite_number(v)
        if ok:
            ok = (("ge" not in s or v >= s["ge"]) and ("gt" not in s or v > s["gt"])
                  and ("lt" not in s or v < s["lt"]))
        if not ok:
            why = f" ({s['why']})" if "why" in s else ""
            raise ValueError(f"{where} must be {what}, got {v!r}{why}")
    elif k == "bool" and not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{where} must be true or false, got {v!r}")


def _is_int(v: Any) -> bool:
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer))


def _finite_number(v: Any) -> bool:
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer, np.floating)) \
        and math.isfinite(v)
