"""Every command's --help is plain text: argparse prints descriptions verbatim, so no reStructuredText markup."""

from __future__ import annotations

import pathlib
import runpy
import sys

import pytest

from fused_lagrangian_apps import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "examples").glob("*.py"))


def help_text(run, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["examples", "--help"], ["info", "--help"],
                                  ["bench", "--help"]],
                         ids=" ".join)
def test_command_help_is_plain_text(argv, capsys):
    text = help_text(lambda: cli.main(argv), capsys)
    assert text.startswith("usage: fused-lagrangian") and "`" not in text, text


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_example_script_help_is_plain_text(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    text = help_text(lambda: runpy.run_path(str(script), run_name="__main__"), capsys)
    assert text.startswith("usage:") and "`" not in text, text
