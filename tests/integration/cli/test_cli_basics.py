"""The CLI's help, input errors and unreachable-control-plane errors (no server needed)."""

from __future__ import annotations

import socket
import subprocess

import pytest

from rpcmesh.cli.main import build_parser, main
from tests.support.processes import python_env, rpcmesh_command

COMMANDS = [
    ["up"],
    ["services"],
    ["watch"],
    ["health"],
    ["publish"],
    ["subscribe"],
    ["request"],
    ["saga"],
    ["saga", "define"],
    ["saga", "start"],
    ["saga", "status"],
    ["saga", "list"],
    ["saga", "abort"],
    ["saga", "watch"],
    ["saga", "definitions"],
    ["saga", "definitions", "list"],
    ["saga", "definitions", "show"],
    ["saga", "definitions", "register"],
    ["topics"],
    ["topics", "list"],
    ["topics", "create"],
    ["topics", "info"],
    ["topics", "delete"],
    ["dead-letters"],
    ["dead-letters", "list"],
    ["dead-letters", "show"],
    ["dead-letters", "replay"],
    ["gateway"],
    ["certs"],
    ["events"],
    ["events", "append"],
    ["events", "read"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: rpcmesh" in capsys.readouterr().out


def test_parser_knows_every_listed_command() -> None:
    help_text = build_parser().format_help()
    for command in {c[0] for c in COMMANDS}:
        assert command in help_text


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        rpcmesh_command(*args), capture_output=True, text=True, env=python_env(), timeout=60, check=False
    )


def test_unreachable_control_plane_is_one_line_and_exit_1() -> None:
    result = run_cli("services", "--target", f"127.0.0.1:{closed_port()}", "--timeout", "2")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot reach the control plane" in lines[0]


def test_bad_json_is_refused_before_any_call() -> None:
    result = run_cli(
        "events", "append", "orders-1", "order.created", "--data", "{not json", "--target", "x:1"
    )
    assert result.returncode == 2
    assert result.stderr.startswith("rpcmesh events append: data: bad JSON")
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_flag_values_exit_2_with_one_line() -> None:
    result = run_cli("subscribe", "orders", "--from", "yesterday", "--target", "x:1")
    assert result.returncode == 2
    assert "--from" in result.stderr


def test_up_refuses_a_bad_store_url() -> None:
    result = run_cli("up", "--port", "0", "--store", "mysql://x")
    assert result.returncode == 2
    assert "store" in result.stderr
