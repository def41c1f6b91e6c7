"""Settings of a subcommand from a TOML or YAML file (``--config FILE``).

A config file holds the same settings as the command line, named like the
long options with or without the dashes (``vector-col`` or ``vector_col``;
``pca`` or ``pca_components``), either at the top level or under a table named
after the subcommand (``[train]``). Values given on the command line win over
the file; the file wins over the built-in defaults. Example ``train.toml``::

    [train]
    input = "data/train"
    vector-col = "vector"
    label-col = "label"
    perplexity = [30]
    epochs = 40
    workers = 2
    experiment = "digits"
    register = "ptsne-digits"
    alias = "champion"
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

#: Destinations that a config file may not set (the file itself, the callable).
_RESERVED = {"help", "config", "func", "command", "verbose", "quiet"}


def load_config_file(path: str | os.PathLike, section: str | None = None) -> dict[str, Any]:
    """Read a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file into a flat dict of settings.

    Parameters
    ----------
    path : path
        The file; its suffix picks the format.
    section : str, optional
        When the file has a table of this name, its settings are used (top-level
        scalar settings are merged under it).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Unknown suffix, unparsable content, or not a table of settings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    text = path.read_text()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {str(path)!r}: suffix must be .toml, .yaml, .yml or .json, got {suffix!r}")
    except ValueError:
        raise
    except Exception as exc:  # tomllib / yaml parse errors carry the line number
        raise ValueError(f"config file {str(path)!r} could not be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table of settings, got {type(data).__name__}")
    if section is not None and isinstance(data.get(section), dict):
        inner = dict(data[section])
        top = {k: v for k, v in data.items() if k != section and not isinstance(v, dict)}
        data = {**top, **inner}
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"config file {str(path)!r}: nested tables {nested} are not settings of {section or 'this command'}")
    return data


def _option_index(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every name a setting may go by (dest, long options with and without dashes) -> action."""
    index: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in _RESERVED or action.dest == argparse.SUPPRESS:
            continue
        names = {action.dest}
        for opt in action.option_strings:
            if opt.startswith("--"):
                names.add(opt[2:])
                names.add(opt[2:].replace("-", "_"))
        for name in names:
            index[name] = action
    return index


def _coerce(action: argparse.Action, key: str, value: Any) -> Any:
    """Convert a value from the file like argparse would convert it from the command line."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"config setting {key!r} must be true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    convert = action.type or (lambda v: v)
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many:
        values = value if isinstance(value, (list, tuple)) else [value]
        out = [convert(str(v)) if isinstance(v, str) or action.type is not None else v for v in values]
    else:
        if isinstance(value, (list, tuple)):
            if action.type is not None:
                # A list for a comma-separated option (e.g. hidden-layers = [512, 512]).
                value = ",".join(str(v) for v in value)
            else:
                raise ValueError(f"config setting {key!r} takes one value, got a list {value!r}")
        try:
            out = convert(value if isinstance(value, str) else str(value)) if action.type is not None else value
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"config setting {key!r}: invalid value {value!r} ({exc})") from None
        out = [out]
    if action.choices is not None:
        bad = [v for v in out if v not in action.choices]
        if bad:
            raise ValueError(f"config setting {key!r} must be one of {sorted(action.choices)}, got {bad[0]!r}")
    return out if many else out[0]


def apply_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace, settings: dict[str, Any], source: str = "config file"
) -> argparse.Namespace:
    """Fill ``args`` from ``settings`` where the command line left the default.

    Raises
    ------
    ValueError
        A setting that names no option of ``parser``, or a value of the wrong kind.
    """
    index = _option_index(parser)
    for key, value in settings.items():
        action = index.get(key)
        if action is None:
            known = sorted({a.option_strings[-1].lstrip("-") for a in index.values() if a.option_strings})
            raise ValueError(f"{source}: unknown setting {key!r}; known settings: {', '.join(known)}")
        if getattr(args, action.dest, None) != action.default:
            continue  # given on the command line
        setattr(args, action.dest, _coerce(action, key, value))
    return args
