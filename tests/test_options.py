"""sr.options: one CLI option per config field, its flag, type and default taken from the field."""
import argparse
from dataclasses import dataclass, field
from enum import Enum

import pytest

from sr.options import add_config_options, config_values


class _Colour(str, Enum):
    RED = "red"


@dataclass
class _Config:
    name: str
    count: int = 3
    rate: float | None = None
    folders: list[str] = field(default_factory=lambda: ["a", "b"])
    extra: dict = field(default_factory=dict)
    colour: _Colour | str = _Colour.RED
    quiet: bool = False
    centred: bool = True


HELP = {"count": "how many", "rate": "how fast", "folders": "where", "extra": "more", "colour": "which",
        "quiet": "say less", "centred": "keep it as it is"}


def _parser(**options) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_options(parser, _Config, HELP, skip=("name",), **options)
    return parser


def test_each_field_becomes_an_option_of_its_type_and_default():
    args = _parser().parse_args([])
    assert config_values(args, _Config, skip=("name",)) == {
        "count": 3, "rate": None, "folders": ["a", "b"], "extra": {}, "colour": "red", "quiet": False,
        "centred": True}
    args = _parser().parse_args(["--count", "5", "--rate", "0.5", "--folders", "x", "--extra", '{"k": 1}',
                                 "--colour", "red", "--quiet", "--no-centred"])
    assert (args.count, args.rate, args.folders, args.extra, args.quiet, args.centred) == (5, 0.5, ["x"], {"k": 1},
                                                                                           True, False)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--count", "many"])


def test_the_help_shows_each_default_and_unset_options_stay_none():
    text = _parser().format_help()
    assert "how many (default: 3)" in text and "where (default: a b)" in text and "how fast (default: none)" in text
    args = _parser(unset={"count": "the command's"}).parse_args([])
    assert args.count is None and "how many (default: the command's)" in _parser(
        unset={"count": "the command's"}).format_help()


def test_flags_and_destinations_can_be_renamed_and_fields_required():
    parser = _parser(flags={"count": ("--number", "-n")}, dests={"count": "number"}, required=("rate",))
    args = parser.parse_args(["-n", "2", "--rate", "1"])
    assert args.number == 2 and config_values(args, _Config, skip=("name",), dests={"count": "number"})["count"] == 2
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --rate is required


def test_a_field_without_help_is_refused():
    with pytest.raises(KeyError, match="quiet"):
        add_config_options(argparse.ArgumentParser(), _Config, {k: v for k, v in HELP.items() if k != "quiet"},
                           skip=("name",))
