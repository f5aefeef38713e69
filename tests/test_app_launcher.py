"""`circuits app`: binds to loopback unless asked, refuses bad input in one line."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from circuits.app_launcher import APP_MAIN, command, launch
from circuits.cli import app
from circuits.errors import CircuitsError


def test_command_binds_loopback_by_default(tmp_path):
    cmd = command(tmp_path)
    assert "--server.address=127.0.0.1" in cmd and "--server.headless=true" in cmd
    assert cmd[cmd.index("run") + 1] == str(APP_MAIN) and APP_MAIN.exists()
    assert cmd[-2:] == ["--study", str(tmp_path.resolve())]
    assert "--server.address=0.0.0.0" in command(tmp_path, address="0.0.0.0")


def test_command_asks_nothing_beyond_the_machine(tmp_path):
    """No usage statistics; on a wildcard address a named host, so that Streamlit does not ask
    checkip.amazonaws.com for the external address to print (tests/test_app_offline.py checks
    the browser's side)."""
    assert "--browser.gatherUsageStats=false" in command(tmp_path)
    assert not any(a.startswith("--browser.serverAddress") for a in command(tmp_path))
    for wildcard in ("0.0.0.0", "::"):
        assert f"--browser.serverAddress={socket.gethostname()}" in command(tmp_path, address=wildcard)


def test_launch_refuses_bad_input(tmp_path):
    with pytest.raises(CircuitsError, match="no study at"):
        launch(tmp_path / "missing", wait=False)
    with pytest.raises(CircuitsError, match="--port 70000"):
        launch(tmp_path, port=70000, wait=False)


def test_cli_app_missing_study(tmp_path):
    result = CliRunner().invoke(app, ["app", str(tmp_path / "missing")])
    assert result.exit_code != 0
    assert isinstance(result.exception, CircuitsError) and "no study at" in str(result.exception)
