"""Parsing user-facing enum values: a member, its name in any case, or its integer value."""

from __future__ import annotations

import enum
from typing import TypeVar

__all__ = ["parse_enum"]

E = TypeVar("E", bound=enum.Enum)


def parse_enum(cls: type[E], value: object, what: str) -> E:
    """The member of ``cls`` that ``value`` names.

    Raises:
        ValueError: naming ``what``, the bad value and every accepted name.
    """
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls[value.strip().upper()]
        except KeyError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):  # True is no level
        for member in cls:
            if member.value == value:
                return member
    accepted = ", ".join(m.name for m in cls)
    raise ValueError(f"unknown {what} {value!r}; accepted values: {accepted}")
