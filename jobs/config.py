"""Settings of a subcommand from a TOML or YAML file (``--config FILE``).

A config file holds the same settings as the command line, named like the
long options with or without the dashes (``vector-col`` or ``vector_col``;
``pca`` or ``pca_components``), either at the top level or under a table named
after the subcommand (``[train]``). Values given on the command line win over
the file; the file wins over the built-in defaults. An option counts as given
when it is on the command line at all, whatever its value: ``--seed 0`` wins
over ``seed = 5`` although 0 is the default. The subcommands' parsers are
:class:`CommandParser` instances, which remember the command line they parsed,
so that :func:`apply_config` can tell a given option from a default
(:func:`given_options`, through argparse's public API). Listing a parser's
options and converting a file's values like the command line's
(:func:`_option_index`, :func:`_coerce`) still read the parser's actions:
argparse has no public way to list them.

jsonargparse, which reads config files for argparse, is not used: its
``--config`` is positional, so options before ``--config`` lose to the file,
while here the command line wins whenever an option is given. Example
``train.toml``::

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
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: Destinations that a config file may not set (the file itself, the callable).
_RESERVED = {"help", "config", "func", "command", "verbose", "quiet"}
#: Namespace attribute where :class:`CommandParser` keeps, per parser ``prog``, the strings it parsed.
COMMAND_LINES = "_command_lines"


class CommandParser(argparse.ArgumentParser):
    """An argument parser that records the command line it parsed on the namespace it returns.

    Used as the ``parser_class`` of the subcommands, so that :func:`apply_config`
    can tell the options given on the command line from those left at their
    defaults. The record is ``namespace._command_lines[parser.prog]``, the list
    of strings this parser parsed (for a subcommand: those after its name).
    """

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        # A nested subcommand's parser has recorded its own part already: keep it.
        lines = dict(getattr(namespace, COMMAND_LINES, None) or {})
        lines[self.prog] = args
        setattr(namespace, COMMAND_LINES, lines)
        return namespace, extras


def given_options(
    parser: argparse.ArgumentParser, argv: Sequence[str], dests: Iterable[str] | None = None
) -> set[str]:
    """Destinations of the options that ``argv`` gives, whatever their values.

    argparse sets an option's default only on a destination that the namespace
    does not hold yet. So ``argv`` is parsed a second time into a namespace that
    holds a sentinel at every destination: those whose value is no longer the
    sentinel were set from the command line (under any of their names,
    abbreviated or as ``--opt=value``). Options that accumulate into their
    destination (``action="count"`` or ``"append"``) are not supported; the
    subcommands have none.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The parser that parsed ``argv``; for a subcommand, its own parser.
    argv : sequence of str
        The strings ``parser`` parsed (for a subcommand: those after its name).
    dests : iterable of str, optional
        Every destination of ``parser``, such as ``vars(args)`` of the namespace
        it returned. By default those of ``argv`` parsed once more.
    """
    argv = list(argv)
    if dests is None:
        dests = vars(parser.parse_known_args(argv)[0])
    unset = object()
    probe = argparse.Namespace(**{dest: unset for dest in dests if dest != COMMAND_LINES})
    parsed, _ = parser.parse_known_args(argv, probe)
    return {dest for dest, value in vars(parsed).items() if value is not unset and dest != COMMAND_LINES}


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
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"config file {str(path)!r}: suffix must be .toml, .yaml, .yml or .json, got {suffix!r}")
    text = path.read_text()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # the parsers' errors carry the line number
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
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    settings: dict[str, Any],
    source: str = "config file",
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """Fill ``args`` from ``settings`` for every option not given on the command line.

    An option given on the command line keeps its value even when that value
    equals the default; the others take the file's value, converted like
    argparse converts the command line's.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The parser that produced ``args`` (for a subcommand: its own parser).
    args : argparse.Namespace
        The parsed command line; updated in place and returned.
    settings : dict
        Settings read by :func:`load_config_file`.
    source : str
        Names the settings' origin in error messages.
    argv : sequence of str, optional
        The strings ``parser`` parsed. By default the command line that a
        :class:`CommandParser` recorded on ``args``.

    Raises
    ------
    ValueError
        A setting that names no option of ``parser``, or a value of the wrong kind.
    TypeError
        ``argv`` not given and ``args`` not parsed by a :class:`CommandParser`.
    """
    index = _option_index(parser)
    unknown = [key for key in settings if key not in index]
    if unknown:
        known = sorted({a.option_strings[-1].lstrip("-") for a in index.values() if a.option_strings})
        raise ValueError(f"{source}: unknown setting {unknown[0]!r}; known settings: {', '.join(known)}")
    if not settings:
        return args
    if argv is None:
        argv = (getattr(args, COMMAND_LINES, None) or {}).get(parser.prog)
        if argv is None:
            raise TypeError(
                f"{source}: cannot tell which options of {parser.prog!r} were given on the command line; "
                f"parse with jobs.config.CommandParser or pass argv"
            )
    given = given_options(parser, argv, vars(args))
    for key, value in settings.items():
        action = index[key]
        if action.dest not in given:
            setattr(args, action.dest, _coerce(action, key, value))
    return args
