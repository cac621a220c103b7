"""One way to turn user input into an Enum member, with an error that lists the options."""
from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


def parse_choice(choices: type[E], value, noun: str) -> E:
    """`choices(value)`, accepting a member or its value.

    Args:
        choices: the Enum class.
        value: a member or a member's value (e.g. "entropy").
        noun: what the choice is called in the message ("calibration method").

    Returns:
        the member.

    Raises:
        ValueError: `value` is not one of the options; the message names it and lists them.
    """
    try:
        return choices(value)
    except ValueError:
        options = ", ".join(str(choice.value) for choice in choices)
        raise ValueError(f"unknown {noun} {value!r}; choose one of: {options}") from None
