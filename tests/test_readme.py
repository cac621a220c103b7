"""The README's commands run as written (the quick ones; training, QAT and the benchmark are long by design and
only their argument parsing is checked), from the project root, leaving `git status` as it was."""
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK = ("eval", "calibrate", "diagnose", "export-int8")


def _commands() -> list[list[str]]:
    """The CLI table's commands, optional [parts] dropped."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## The command line", 1)[1].split("##", 1)[0]
    found = []
    for cell in re.findall(r"^\| `([^`]+)`", table, re.M):
        found.append(shlex.split(re.sub(r"\s*\[[^\]]*\]", "", cell)))
    return found


def test_the_readme_lists_every_command():
    names = {words[0] for words in _commands()}
    assert names >= {"eval", "calibrate", "diagnose", "export-int8", "qat", "train", "distill", "bench"}


def _status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout


@pytest.mark.parametrize("words", [w for w in _commands() if w[0] in QUICK], ids=lambda w: w[0])
def test_quick_readme_commands_run_as_written(words, data_dir, monkeypatch, capsys):
    """`python -m sr WORDS` from the project root, run by `sr.cli.main` in this process (what `-m sr` calls)."""
    from sr import cli

    before = _status()
    monkeypatch.chdir(ROOT)
    code = cli.main(list(words))
    assert code == 0, capsys.readouterr().err[-2000:]
    assert _status() == before  # outputs go to runs/, which git ignores


@pytest.mark.parametrize("words", [w for w in _commands() if w[0] not in QUICK], ids=lambda w: w[0])
def test_long_readme_commands_parse(words):
    from sr.cli import build_parser

    args = build_parser().parse_args(words)
    assert callable(args.run)
