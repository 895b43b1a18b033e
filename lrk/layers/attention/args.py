"""Argument checks of the attention modules' constructors: ``ValueError`` for an argument a module cannot run with.

A module is built without config. Its config checks (``LrkConfigError`` naming ``decomp.<key>``, the valid range in
config terms, defaults, the limits that need the model) belong to the method that builds it
(``lrk.decomp.attention.*``) and run once, before anything trains. What stays here are the preconditions of the
module itself, so that a module built by hand with an impossible argument fails when it is built, with the
argument's name, instead of silently doing something else at its first forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lrk.checks import is_fraction, is_int, is_number


def _fail(who: str, name: str, value: Any, valid: str, why: str = "") -> ValueError:
    return ValueError(
        f"{who}: {name}={value!r} is invalid: it must be {valid}" + (f" ({why})" if why else "")
    )


def choice(who: str, name: str, value: Any, options: Sequence[Any]) -> None:
    """``value`` is one of ``options``."""
    if value not in options:
        raise _fail(who, name, value, "one of " + ", ".join(map(str, options)))


def integer(
    who: str,
    name: str,
    value: Any,
    low: int,
    high: int | None = None,
    optional: bool = False,
    why: str = "",
) -> None:
    """``value`` is an integer in [low, high] (``high`` None: no upper bound); None allowed when ``optional``;
    ``why`` says where the bound comes from."""
    if value is None and optional:
        return
    if not (is_int(value) and value >= low and (high is None or value <= high)):
        valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise _fail(who, name, value, valid, why)


def fraction(who: str, name: str, value: Any) -> None:
    """``value`` is None or a number in (0, 1]."""
    if value is not None and not is_fraction(value):
        raise _fail(who, name, value, "a number in (0, 1]")


def positive(who: str, name: str, value: Any) -> None:
    """``value`` is a finite number > 0."""
    if not (is_number(value) and value > 0):
        raise _fail(who, name, value, "a positive number")


def flag(who: str, name: str, value: Any) -> None:
    """``value`` is True or False."""
    if not isinstance(value, bool):
        raise _fail(who, name, value, "True or False")


def at_most_one(who: str, **named: Any) -> None:
    """At most one of the keyword arguments is not None (the rank rules: a fixed rank, a ratio or an energy)."""
    given = {k: v for k, v in named.items() if v is not None}
    if len(given) > 1:
        shown = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"{who}: {shown} is invalid: give at most one of {', '.join(named)}")
