"""The command line both pipelines share: a parser whose errors are one line, value types that
name what they expect, help that shows every default, and run-time usage errors.

A bad invocation ends with exit status 2 and one line on stderr, e.g.
``handpose_rhd.py: error: argument --epochs: expected a positive integer, got -1``, with no traceback:
argparse's own errors (wrong type, unknown choice) and :class:`UsageError`, raised when a value turns
out wrong only once it is used (a data folder of the wrong layout, a checkpoint of another run).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

__all__ = ["Parser", "UsageError", "default_cache_dir", "exit_with", "fraction", "non_negative_float",
           "non_negative_int", "positive_float", "positive_int", "show_defaults"]


class UsageError(Exception):
    """A command-line value found wrong at run time. str(): ``"<option>: <message>"``."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option


def exit_with(message: str, prog: str | None = None) -> NoReturn:
    """Print ``<prog>: error: <message>`` as one line on stderr and exit with status 2 (argparse's)."""
    prog = prog or os.path.basename(sys.argv[0]) or "python"
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{prog}: error: {line}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block: ``--help`` shows it) and the module docstring
    kept as written."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        exit_with(f"{message} (see --help)", self.prog)


def _number(kind: Callable[[str], float], text: str, what: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(int, text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text, "a positive number")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(float, text, "a number >= 0")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(float, text, "a fraction in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return value


def default_cache_dir() -> Path:
    """Where built-in data is generated: ``$XDG_CACHE_HOME/gpoe_fusion``, else ``~/.cache/gpoe_fusion``
    (the XDG base-directory convention), outside the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpoe_fusion"


def _format(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(map(_format, value))
    return str(value)


def show_defaults(parser: argparse.ArgumentParser, presets: Mapping[str, Mapping[str, object]],
                  preset_notes: Mapping[str, str] | None = None) -> None:
    """Append its default to the help of every option that does not state one already.

    Options left unset (None) are filled from the preset: their help lists each preset's value (or
    ``preset_notes[dest]`` where a preset's value needs words). Flags show ``off``.
    """
    notes = preset_notes or {}
    for action in parser._actions:
        if (action.help is None or action.help == argparse.SUPPRESS or "default:" in action.help
                or action.default == argparse.SUPPRESS):
            continue
        if action.dest in notes:
            default = notes[action.dest]
        elif action.default is None and any(action.dest in p for p in presets.values()):
            default = ", ".join(f"{name} {_format(p[action.dest])}" for name, p in presets.items())
        elif isinstance(action, argparse._StoreTrueAction):
            default = "off"
        else:
            default = _format(action.default)
        action.help = f"{action.help} (default: {default})".replace("%", "%%")
