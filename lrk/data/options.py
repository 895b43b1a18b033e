"""Reading and checking the ``data`` config node: one clear :class:`LrkConfigError` per bad value."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lrk.errors import LrkConfigError


def to_plain_dict(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """A resolved plain ``dict`` of the ``data`` node (``${seed}``, ``${paths.data_dir}`` resolved
    against the root config the node belongs to)."""
    if not isinstance(cfg, (DictConfig, Mapping)):
        raise LrkConfigError(
            f"the data config must be a mapping (DictConfig or dict), got {type(cfg).__name__}"
        )
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    try:
        out = OmegaConf.to_container(node, resolve=True)
    except Exception as err:  # an interpolation that points nowhere, e.g. ${paths.data_dir} without paths
        raise LrkConfigError(f"the data config cannot be resolved: {err}") from err
    assert isinstance(out, dict)
    return {str(k): v for k, v in out.items()}


class Options:
    """Typed access to the data config with defaults; every getter names the key in its error."""

    def __init__(self, values: Mapping[str, Any], defaults: Mapping[str, Any], dataset: str) -> None:
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise LrkConfigError(
                f"data.{unknown[0]} is not a known option of dataset '{dataset}'"
                f"{' (also: ' + ', '.join(unknown[1:]) + ')' if len(unknown) > 1 else ''}; "
                f"valid options: {', '.join(sorted(defaults))}"
            )
        self.values = {**defaults, **values}
        self.dataset = dataset

    def raw(self, key: str) -> Any:
        return self.values[key]

    def _bad(self, key: str, why: str) -> LrkConfigError:
        return LrkConfigError(f"data.{key}={self.values[key]!r} is invalid: {why}")

    def integer(self, key: str, *, minimum: int | None = None, optional: bool = False) -> int | None:
        value = self.values[key]
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise self._bad(key, "it must be an integer" + (" or null" if optional else ""))
        if minimum is not None and value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self._bad(key, f"it must be {what}")
        return int(value)

    def req_integer(self, key: str, *, minimum: int | None = None) -> int:
        value = self.integer(key, minimum=minimum)
        assert value is not None
        return value

    def number(self, key: str, *, low: float | None = None, high: float | None = None) -> float:
        value = self.values[key]
        if isinstance(value, bool) or not isinstance(value, Real):
            raise self._bad(key, "it must be a number")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self._bad(key, f"it must be in [{low}, {high}]")
        return float(value)

    def fraction(self, key: str) -> float:
        """A number strictly inside (0, 1)."""
        value = self.values[key]
        if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < 1.0:
            raise self._bad(key, "it must be a fraction strictly between 0 and 1, e.g. 0.15")
        return float(value)

    def flag(self, key: str, *, optional: bool = False) -> bool | None:
        value = self.values[key]
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            raise self._bad(
                key, "it must be true or false" + (" (or null for automatic)" if optional else "")
            )
        return value

    def choice(self, key: str, choices: tuple[str, ...], *, optional: bool = False) -> str | None:
        value = self.values[key]
        if value is None and optional:
            return None
        if value not in choices:
            raise self._bad(key, f"valid values: {', '.join(choices)}")
        return str(value)

    def string(self, key: str, *, optional: bool = False) -> str | None:
        value = self.values[key]
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self._bad(key, "it must be a non-empty string" + (" or null" if optional else ""))
        return value

    def str_list(self, key: str, *, optional: bool = False) -> list[str] | None:
        value = self.values[key]
        if value is None and optional:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise self._bad(key, "it must be a list of non-empty strings")
        return list(value)

    def float_list(self, key: str, length: int) -> list[float] | None:
        """``None`` or a list of ``length`` numbers (or one number, repeated)."""
        value = self.values[key]
        if value is None:
            return None
        if isinstance(value, Real) and not isinstance(value, bool):
            value = [value] * length
        if (
            not isinstance(value, (list, tuple))
            or len(value) != length
            or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value)
        ):
            raise self._bad(key, f"it must be null, a number or a list of {length} numbers (one per channel)")
        return [float(v) for v in value]
