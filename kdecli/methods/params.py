"""``Param``: one named parameter of a method, its type, default and allowed values.

A leaf module (it imports only the errors): the method base class, the causal decomposition and
the helpers shared by several methods (``kdecli.methods.lsh``) all declare parameters with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kdecli.errors import ParameterError


@dataclass(frozen=True)
class Param:
    """One named parameter of a method: its type, default and allowed values."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None

    def describe_range(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.type is bool:
            return "true or false"
        low = "-inf" if self.low is None else _fmt(self.low)
        high = "inf" if self.high is None else _fmt(self.high)
        kind = {int: "integer", float: "number"}.get(self.type, self.type.__name__)
        return f"{kind} in [{low}, {high}]"

    def coerce(self, method: str, value: Any) -> Any:
        """Convert ``value`` (possibly a string from the command line) and check its range."""
        given = value if isinstance(value, str) else repr(value)
        what = f"{method}: `{self.name}` must be {self._article()}{self.describe_range()}; got {given}."
        try:
            converted = _convert(self.type, value)
        except (TypeError, ValueError):
            raise ParameterError(what) from None
        if self.choices is not None and converted not in self.choices:
            raise ParameterError(what)
        if self.type in (int, float):
            if not math.isfinite(converted):
                raise ParameterError(what)
            if (self.low is not None and converted < self.low) or (
                self.high is not None and converted > self.high
            ):
                raise ParameterError(what)
        return converted

    def _article(self) -> str:
        if self.choices is not None or self.type is bool:
            return ""
        return "an " if self.type is int else "a "  # "an integer", "a number"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "range": self.describe_range(),
            "help": self.help,
        }


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _convert(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return int(str(value).strip())
    if kind is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if kind is str:
        return str(value)
    raise TypeError(f"unsupported parameter type {kind}")
