"""Option helpers of the ``rapidserve`` command: defaults read from ``RAPIDSERVE_*`` variables and checked
like the flags they stand for, value types with messages that say what was expected, and help that shows
every option's default."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BadVariable",
    "HelpFormatter",
    "bad_variable",
    "choice",
    "complete_help",
    "env",
    "env_default",
    "flag",
    "positive",
    "positive_list",
    "size",
    "variable",
]

PREFIX = "RAPIDSERVE_"


def variable(name: str) -> str:
    """The environment variable of option ``--name``: ``grpc-port`` -> ``RAPIDSERVE_GRPC_PORT``."""
    return PREFIX + name.upper().replace("-", "_")


def env(name: str, default: Any = None, *, many: bool = False, separator: str = ",") -> Any:
    """The raw value of the option's variable, else ``default``; ``many`` splits it on ``separator``."""
    value = os.environ.get(variable(name))
    if value is None:
        return default
    return [v.strip() for v in value.split(separator) if v.strip()] if many else value


@dataclass(frozen=True, slots=True)
class BadVariable:
    """A variable whose value does not convert. It stands as the option's default and is reported only
    when the command uses that default: a flag given on the command line replaces it."""

    variable: str
    value: str
    reason: str

    def __str__(self) -> str:  # what --help shows as the default
        return f"{self.variable}={self.value!r}, invalid"

    def message(self) -> str:
        return f"environment variable {self.variable}={self.value!r}: {self.reason}"


_EXPECTED = {int: "expected an integer", float: "expected a number"}


def env_default(name: str, kind: Callable[[str], Any], default: Any) -> Any:
    """The option's default converted by ``kind``: from its variable when set, else ``default``."""
    raw = os.environ.get(variable(name))
    if raw is None:
        return kind(default) if isinstance(default, str) else default
    try:
        return kind(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        reason = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else _EXPECTED.get(kind, str(exc))
        return BadVariable(variable(name), raw, reason)


def bad_variable(args: argparse.Namespace) -> BadVariable | None:
    """The first option whose value is still a bad variable's (the command would have used it)."""
    return next((value for value in vars(args).values() if isinstance(value, BadVariable)), None)


def size(text: str) -> int:
    """Bytes, with suffixes like 512KiB, 256MiB or 1GB."""
    from rapidserve.server.settings import parse_bytes

    try:
        return parse_bytes(str(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


MAX_AUTO_FRONTENDS = 8


def frontends(text: str) -> int:
    """A count of front-end processes, or ``auto``: one per core this process may use, at most 8."""
    value = str(text).strip().lower()
    if value == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(1, min(cores, MAX_AUTO_FRONTENDS))
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes or auto, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {count}")
    return count


def flag(text: str) -> bool:
    """Triton's boolean flag values: ``--grpc-use-ssl`` alone, or ``=true|false|1|0``."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_of(kind: type[int] | type[float], text: str) -> int | float | None:
    try:
        value = kind(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    """A type for one positive integer (``int``) or finite number (``float``)."""
    what = "a positive integer" if kind is int else "a positive number"

    def convert(text: str) -> Any:
        value = _positive_of(kind, text)
        if value is None:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    convert.__name__ = "positive"
    return convert


def positive_list(kind: type[int] | type[float]) -> Callable[[str], list[Any]]:
    """A type for comma-separated positive integers or numbers (``1,8,32``): argparse's usage error names
    the option, where a conversion after parsing would report a bare ``int()`` failure."""
    what = "positive integers" if kind is int else "positive numbers"

    def convert(text: str) -> list[Any]:
        values = [_positive_of(kind, part) for part in text.split(",")]
        if not values or any(value is None for value in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values

    convert.__name__ = "positive_list"
    return convert


def choice(*values: str, upper: bool = False) -> Callable[[str], str]:
    """A type that takes one of ``values`` (case-insensitively when ``upper``): argparse checks
    ``choices`` only on the command line, this checks an environment variable's value too."""

    def convert(text: str) -> str:
        value = text.strip().upper() if upper else text.strip()
        if value not in values:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(values)}, got {text!r}")
        return value

    convert.__name__ = "choice"
    return convert


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already speaks of it or the default
    is nothing (no value, off, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text.lower() or _empty(action.default):
            return text
        return f"{text} (default: %(default)s)"


def _empty(default: Any) -> bool:
    return default is None or default is False or default == "" or default == [] or default is argparse.SUPPRESS


def complete_help(parser: argparse.ArgumentParser) -> None:
    """Give every option of ``parser`` and its subcommands a help line, so that --help lists the default
    of options added without one, and make each subcommand's help show defaults too."""
    for each in _parsers(parser):
        each.formatter_class = HelpFormatter
        for action in each._actions:
            if action.help is None and action.option_strings and not _empty(action.default):
                action.help = "default: %(default)s"


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)
