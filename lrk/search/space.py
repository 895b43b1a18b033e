"""The search space: Hydra's sweep syntax turned into Optuna distributions, and trial params back into overrides.

Supported forms (the values of ``hydra.sweeper.params``, or sweep overrides on the command line):

- ``interval(a, b)``: a float in [a, b]; ``tag(log, interval(a, b))`` samples it on a log scale;
  ``tag(int, interval(a, b))`` samples an integer in [a, b].
- ``range(a, b, step=s)``: a, a+s, ... with b excluded (Python's ``range``); integers or floats;
  ``tag(log, range(a, b))`` samples integers on a log scale (step 1 only).
- ``choice(x, y, ...)`` or ``x,y,...``: a categorical; the choices may be config group options
  (``decomp: choice(svd, tucker)``).
- anything else (``decomp.rank: null``) is a fixed override given to every trial.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lrk.errors import LrkConfigError

FORMS = "interval(a, b), tag(log, interval(a, b)), tag(int, interval(a, b)), range(a, b, step=s), choice(x, y, ...)"
_TAGS = {"IntervalSweep": {"log", "int"}, "RangeSweep": {"log"}, "ChoiceSweep": set()}


def float_text(value: float) -> str:
    """A float as Hydra override text that parses back as a float (``3.0``, not ``3``)."""
    text = format(float(value), ".12g")
    if not any(c in text for c in ".eEn"):  # "n" covers nan/inf
        text += ".0"
    return text


def _value_text(value: Any) -> str:
    """A fixed value from ``hydra.sweeper.params`` (YAML scalar) as override text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return float_text(value)
    return str(value)


@dataclass(frozen=True)
class Param:
    """One searched key: its override key, the Optuna name and distribution, and how to write values."""

    key: str  # as written in the override, e.g. "model.lr" or "+extra.key"
    name: str  # the Optuna parameter name: the key without "+"
    distribution: Any  # optuna.distributions.BaseDistribution
    source: str  # the sweep string it came from, for messages
    choice_texts: tuple[str, ...] | None = None  # override text of each categorical choice
    origin: str = "hydra.sweeper.params"  # where it was given, for messages

    def override(self, value: Any) -> str:
        """``key=value`` for the job; ``value`` is what Optuna sampled."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        if isinstance(self.distribution, CategoricalDistribution):
            assert self.choice_texts is not None
            text = self.choice_texts[self.distribution.to_internal_repr(value)]
        elif isinstance(self.distribution, IntDistribution):
            text = str(int(value))
        else:
            text = float_text(value)
        return f"{self.key}={text}"

    def grid_values(self) -> list[Any]:
        """The finite list of values for the grid sampler (continuous intervals have none)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        dist = self.distribution
        if isinstance(dist, CategoricalDistribution):
            return list(dist.choices)
        if isinstance(dist, IntDistribution) and not dist.log:
            return list(range(dist.low, dist.high + 1, dist.step))
        if isinstance(dist, FloatDistribution) and dist.step is not None:
            count = round((dist.high - dist.low) / dist.step) + 1
            return [round(dist.low + i * dist.step, 12) for i in range(count)]
        raise LrkConfigError(
            f"hydra.sweeper.params.{self.key}={self.source} is continuous, but hydra.sweeper.sampler.name=grid "
            "needs a finite list of values: use choice(...) or range(a, b, step=s)"
        )


@dataclass
class SearchSpace:
    """The searched params (by Optuna name) and the fixed overrides every trial gets."""

    params: dict[str, Param] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    def distributions(self) -> dict[str, Any]:
        return {name: p.distribution for name, p in self.params.items()}

    def overrides(self, values: Mapping[str, Any]) -> list[str]:
        """The overrides of one trial: the fixed ones, then ``key=value`` for every searched key."""
        return [*self.fixed, *(p.override(values[name]) for name, p in self.params.items())]

    def grid(self) -> dict[str, list[Any]]:
        return {name: p.grid_values() for name, p in self.params.items()}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def first_values(self) -> dict[str, Any]:
        """One valid point (the first choice, the low bound): used to compose a config before any trial."""
        from optuna.distributions import CategoricalDistribution

        return {
            name: p.distribution.choices[0]
            if isinstance(p.distribution, CategoricalDistribution)
            else p.distribution.low
            for name, p in self.params.items()
        }


def parse_search_space(params: Mapping[str, Any] | None, arguments: Iterable[str] = ()) -> SearchSpace:
    """Build the search space from ``hydra.sweeper.params`` and the command-line overrides.

    Sweep overrides on the command line (``model.lr=interval(1e-4,1e-2)``) join the searched params; plain
    ones (``data=synthetic``) become fixed overrides. The command line wins over ``params`` for the same key.
    Raises :class:`LrkConfigError` naming the key and the valid forms when a sweep string does not parse.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    entries: dict[str, tuple[Any, str]] = {}  # name -> (Override, where it came from)
    for key, value in (params or {}).items():
        text = value if isinstance(value, str) else _value_text(value)
        if isinstance(value, Mapping | list | tuple):
            raise LrkConfigError(
                f"hydra.sweeper.params.{key} is a {type(value).__name__}: give a sweep string, one of {FORMS}"
            )
        override = _parse_one(parser, f"{key}={text}", f"hydra.sweeper.params.{key}={text}")
        entries[_name(override)] = (override, f"hydra.sweeper.params.{key}")
    for argument in arguments:
        override = _parse_one(parser, argument, argument)
        entries[_name(override)] = (override, argument)

    space = SearchSpace()
    for name, (override, where) in entries.items():
        if override.is_sweep_override():
            space.params[name] = _param(override, name, where)
        else:
            space.fixed.append(
                override.input_line or f"{override.get_key_element()}={override.get_value_string()}"
            )
    return space


def _parse_one(parser: Any, text: str, where: str) -> Any:
    from hydra.errors import HydraException

    try:
        return parser.parse_override(text)
    except HydraException as exc:
        reason = str(exc).splitlines()[0]
        raise LrkConfigError(f"{where} does not parse ({reason}): use one of {FORMS}") from None


def _name(override: Any) -> str:
    return override.get_key_element().lstrip("+~")


def _param(override: Any, name: str, where: str) -> Param:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    source = (override.input_line or "").partition("=")[2].strip() or str(sweep)
    kind = type(sweep).__name__
    key = override.get_key_element()
    if kind not in _TAGS:
        raise LrkConfigError(f"{where}: {source} is not a search space lrk understands: use one of {FORMS}")
    bad_tags = set(sweep.tags) - _TAGS[kind]
    if bad_tags:
        valid = ", ".join(sorted(_TAGS[kind])) or "none"
        raise LrkConfigError(
            f"{where}: tag {', '.join(sorted(bad_tags))} does not apply to {kind}; valid tags: {valid}"
        )
    log_scale = "log" in sweep.tags

    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if not low < high:
            raise LrkConfigError(
                f"{where}: interval({low}, {high}) is empty: its low bound must be below its high bound"
            )
        if log_scale and low <= 0:
            raise LrkConfigError(f"{where}: a log-scale interval needs a positive low bound, got {low}")
        if "int" in sweep.tags:
            if low != int(low) or high != int(high):
                raise LrkConfigError(f"{where}: tag(int, interval({low}, {high})) needs integer bounds")
            return Param(key, name, IntDistribution(int(low), int(high), log=log_scale), source, origin=where)
        return Param(
            key, name, FloatDistribution(float(low), float(high), log=log_scale), source, origin=where
        )

    if isinstance(sweep, RangeSweep):
        if sweep.shuffle:
            raise LrkConfigError(f"{where}: shuffle() has no meaning for Optuna's samplers; remove it")
        if sweep.step == 0:
            raise LrkConfigError(f"{where}: range step=0 is invalid: it must be non-zero")
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
            values: list[Any] = list(range(sweep.start, sweep.stop, sweep.step))
        else:  # count the points exactly: Hydra's own float range lets 0.7 + 3 x 0.1 slip below 1.0
            count = max(0, math.ceil(round((sweep.stop - sweep.start) / sweep.step, 9)))
            values = [round(sweep.start + i * sweep.step, 12) for i in range(count)]
        if not values:
            raise LrkConfigError(
                f"{where}: {source} is empty (range(a, b, step=s) excludes b, like Python's range): "
                "give a < b for a positive step"
            )
        step = abs(sweep.step)
        if all(isinstance(v, int) for v in values):
            if log_scale and step != 1:
                raise LrkConfigError(
                    f"{where}: tag(log, range(...)) needs step=1 (Optuna samples log-scale integers densely)"
                )
            if log_scale and min(values) <= 0:
                raise LrkConfigError(f"{where}: a log-scale range needs positive values, got {min(values)}")
            return Param(
                key,
                name,
                IntDistribution(min(values), max(values), log=log_scale, step=step),
                source,
                origin=where,
            )
        if log_scale:
            raise LrkConfigError(
                f"{where}: tag(log, ...) on a float range is invalid: use tag(log, interval(a, b))"
            )
        low = float(min(values))
        high = round(low + (len(values) - 1) * float(step), 12)
        return Param(key, name, FloatDistribution(low, high, step=float(step)), source, origin=where)

    assert isinstance(sweep, ChoiceSweep)
    if sweep.shuffle:
        raise LrkConfigError(f"{where}: shuffle() has no meaning for Optuna's samplers; remove it")
    values = list(override.sweep_iterator())
    texts = tuple(override.sweep_string_iterator())
    scalar = all(isinstance(v, str | int | float | bool) for v in values)
    return Param(key, name, CategoricalDistribution(values if scalar else list(texts)), source, texts, where)
