"""Command-line options derived from the settings' declarations (:mod:`ptsne.settings`).

Each setting of a config declared with :func:`ptsne.settings.setting` becomes one
option: ``--`` + its public name with dashes (or its declared ``flag``, such as
``--epochs``), its type, choices and default from the field, its help text from the
declaration. The option's destination is the option without dashes (or the declared
``dest``, such as ``pca_components`` for ``--pca``), so the config file
(:mod:`jobs.config`) takes the same names; :func:`settings_from_args` reads the
values back under the settings' public names, :func:`check_options` checks them
against their declarations in messages that name the option, and
:func:`config_from_args` builds the dataclass of a command's own settings.

By kind: one number or several (``floats``) takes one or more values
(``--perplexity 10 30``); column names (``names``) are one comma-separated string
on the command line (``--feature-cols a,b``), split by :func:`settings_from_args`;
a setting that may be ``None`` defaults to it, and its help says what that means.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection

from ptsne.settings import check_value, kind, public_name, settings_of, spec


def option(f: dataclasses.Field) -> str:
    """The command-line option of setting ``f``."""
    return spec(f).get("flag") or "--" + public_name(f).replace("_", "-")


def dest(f: dataclasses.Field) -> str:
    """The argparse destination of setting ``f`` (``epochs`` for ``--epochs``)."""
    return spec(f).get("dest") or option(f)[2:].replace("-", "_")


def comma_ints(value: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers, such as ``512,512,512``."""
    try:
        widths = tuple(int(v) for v in str(value).replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 512,512,512, got {value!r}")
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"expected positive comma-separated widths, got {value!r}")
    return widths


def comma_names(value: str | None) -> tuple[str, ...] | None:
    """Column names from a comma-separated string such as ``a,b,c`` (None for none given)."""
    return tuple(c.strip() for c in value.split(",") if c.strip()) if value else None


def _or_auto(convert):
    def parse(value: str):
        if str(value).strip().lower() == "auto":
            return "auto"
        try:
            return convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None

    parse.__name__ = f"{convert.__name__}_or_auto"
    return parse


_CONVERT = {"int": int, "float": float, "floats": float, "ints": comma_ints, "str": None, "names": None}


def _shown(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def add_setting_arguments(group, cls: type, skip: Collection[str] = ()) -> None:
    """Add an option for each setting of dataclass ``cls`` to ``group``, except those named in ``skip``."""
    for f in settings_of(cls):
        if public_name(f) in skip:
            continue
        s, k = spec(f), kind(cls, f)
        default = "auto" if "auto" in s else f.default
        text = s["help"] + (f"; 'auto': {s['auto']}" if "auto" in s else "")
        shown = "" if default is None else f" (default: {_shown(default)})"
        kwargs = {"dest": dest(f), "default": default, "help": (text + shown).replace("%", "%%")}  # argparse formats help with %
        if k == "bool":
            kwargs["action"] = "store_true"
        elif "choices" in s:
            kwargs["choices"] = s["choices"]
        elif k == "floats":
            kwargs.update(type=float, nargs="+", default=list(default) if isinstance(default, tuple) else [default])
        elif _CONVERT[k] is not None:
            kwargs["type"] = _or_auto(_CONVERT[k]) if "auto" in s else _CONVERT[k]
        group.add_argument(option(f), **kwargs)


def settings_from_args(args: argparse.Namespace, *classes: type) -> dict:
    """The values of the settings of ``classes`` in ``args``, by their public names.

    Column names (kind ``names``) given as one comma-separated string are split
    into a tuple; the other values are returned as parsed.
    """
    values = {}
    for cls in classes:
        for f in settings_of(cls):
            value = getattr(args, dest(f))
            if kind(cls, f) == "names" and (value is None or isinstance(value, str)):
                value = comma_names(value)
            values[public_name(f)] = value
    return values


def check_options(args: argparse.Namespace, *classes: type) -> None:
    """Check the option of each setting of ``classes`` in ``args`` against its declaration.

    ``"auto"`` passes where the setting accepts it.

    Raises
    ------
    ValueError
        A value of the wrong kind or out of its bounds or choices; the message names
        the option, what is allowed and the value (``--workers must be an integer >= 1, got 0``).
    """
    for cls in classes:
        for f in settings_of(cls):
            value = getattr(args, dest(f))
            if value == "auto" and "auto" in spec(f):
                continue
            check_value(cls, f, value, where=option(f))


def config_from_args(args: argparse.Namespace, cls: type):
    """An instance of dataclass ``cls`` holding the values of its settings' options in ``args``.

    For a class whose fields are all settings (its other fields keep their defaults).
    """
    return cls(**{f.name: getattr(args, dest(f)) for f in settings_of(cls)})
