"""Name -> method class.  Refuses duplicates and unknown names loudly, suggesting the closest name."""

from __future__ import annotations

from typing import Any, TypeVar

from kdecli.errors import unknown_name
from kdecli.methods.base import AttentionMethod

_REGISTRY: dict[str, type[AttentionMethod]] = {}

M = TypeVar("M", bound=type[AttentionMethod])


def register(cls: M) -> M:
    """Class decorator: add a method under ``cls.name``; a second class with that name is an error."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(
            f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name]})"
        )
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method_class(name: str) -> type[AttentionMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        hint = "Run `kdecli methods` for the list: " + ", ".join(_REGISTRY) + "."
        raise unknown_name("method", name, _REGISTRY, hint) from None


def method_of_role(role: str) -> type[AttentionMethod]:
    """The first registered method declaring ``role`` (the ``reference``, the ``baseline``)."""
    for cls in _REGISTRY.values():
        if cls.role == role:
            return cls
    raise LookupError(f"no registered method has the role {role!r}")


def make_method(name: str, budget: int | None = None, **params: Any) -> AttentionMethod:
    """Build a registered method from its name, a budget and named parameters."""
    return get_method_class(name)(budget, **params)
