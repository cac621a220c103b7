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


class Choice(str, Enum):
    """Base of the lab's choice enums: `class Method(Choice, noun="calibration method")` gives `Method.parse`,
    whose error names the bad value and lists the options."""

    def __init_subclass__(cls, noun: str = "choice", **kwargs):
        super().__init_subclass__(**kwargs)
        cls._choice_noun = noun

    @classmethod
    def parse(cls, value):
        """The member for `value` (a member or its value); ValueError listing the options otherwise."""
        return parse_choice(cls, value, cls._choice_noun)
