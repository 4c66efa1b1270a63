"""The `dsv4` command line: help works everywhere, and every subcommand runs a function that exists."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dsv4.services import cli

pytestmark = pytest.mark.unit


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("serve", "gateway", "prefill", "decode", "operator", "make-checkpoint"):
        assert name in out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_subcommand_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    assert cli.COMMANDS[name].help in capsys.readouterr().out


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_names_a_function_that_exists(name: str) -> None:
    module, _, func = cli.COMMANDS[name].target.partition(":")
    done = subprocess.run([sys.executable, "-c", f"import {module} as m; assert callable(m.{func})"],
                          capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_implemented_command_runs_its_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "decode", cli.Command("decode", lambda p: None, "os.path:isabs"))
    # os.path.isabs(Namespace) raises TypeError: proves the target was imported and called with the parsed args.
    with pytest.raises(TypeError):
        cli.main(["decode"])


def test_installed_script_prints_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dsv4.services.cli", "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "make-checkpoint" in done.stdout


def test_bad_argument_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["make-checkpoint", "--preset", "huge", "out"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
