"""The README's commands run as written (the quick ones; training, QAT and the benchmark are long by design and
only their argument parsing is checked), from the project root, leaving `git status` as it was."""
import os
import re
import shlex
import subprocess
import sys
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


def _python() -> str:
    """The interpreter the README names (`.venv/bin/python`, which the set-up commands make); this one where the
    suite runs from another environment."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


@pytest.mark.parametrize("words", [w for w in _commands() if w[0] in QUICK], ids=lambda w: w[0])
def test_quick_readme_commands_run_as_written(words, data_dir):
    """`.venv/bin/python -m sr WORDS` pasted into a shell at the project root: a process of its own, exit status 0,
    outputs under runs/ (which git ignores)."""
    before = _status()
    done = subprocess.run([_python(), "-m", "sr", *words], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert _status() == before


def test_the_readme_says_which_python_runs_the_commands():
    """Every `python -m sr` in the README is the venv's (`.venv/bin/python -m sr`) or follows `activate`, and the
    files its commands name exist (the examples) or are made by them (runs/)."""
    text = (ROOT / "README.md").read_text()
    bare = [m.start() for m in re.finditer(r"(?<!\.venv/bin/)python -m sr", text)]
    assert all("activate" in text[max(0, i - 200):i] for i in bare), [text[i - 80:i + 40] for i in bare]
    for name in re.findall(r"--onnx (\S+\.onnx)", text):
        assert (ROOT / name).is_file(), name
    outs: dict[str, set] = {}
    for command, out in re.findall(r"(export-int8|int8-ready)[^`|]*?--out (runs/[\w-]+)", text):
        outs.setdefault(command, set()).add(out)
    assert outs["export-int8"] and outs["int8-ready"] and not outs["export-int8"] & outs["int8-ready"], outs


@pytest.mark.parametrize("words", [w for w in _commands() if w[0] not in QUICK], ids=lambda w: w[0])
def test_long_readme_commands_parse(words):
    from sr.cli import build_parser

    args = build_parser().parse_args(words)
    assert callable(args.run)
