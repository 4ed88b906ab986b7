"""`rpcmesh up` start-up: one control plane per data folder, and one-line reasons when it cannot start."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.processes import python_env, rpcmesh_command, start_control_plane


def up(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        rpcmesh_command("up", *args),
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == code and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("rpcmesh up: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_a_second_control_plane_on_the_same_folder_exits_and_a_restart_after_kill_9_works(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    first, _ = start_control_plane(data)
    try:
        second = up("--port", "0", "--data-dir", str(data))
        assert_one_line(second, 1, str(data), f"PID {first.pid}")
        first.signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        # The kernel released the lock with the process: no stale-lock cleanup needed.
        again, _ = start_control_plane(data)
        again.kill()
    finally:
        first.kill()


def _port_in_use(tmp_path: Path, holder: socket.socket) -> tuple[list[str], list[str]]:
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    return ["--port", str(port), "--data-dir", str(tmp_path / "data")], [f"127.0.0.1:{port}", "in use"]


def _not_a_folder(tmp_path: Path, _: socket.socket) -> tuple[list[str], list[str]]:
    (tmp_path / "file").write_text("")
    where = tmp_path / "file" / "data"
    return ["--port", "0", "--data-dir", str(where)], [str(where)]


def _damaged(name: str) -> Callable[[Path, socket.socket], tuple[list[str], list[str]]]:
    def make(tmp_path: Path, _: socket.socket) -> tuple[list[str], list[str]]:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / name).write_bytes(b"not a database\n" * 400)
        return ["--port", "0", "--data-dir", str(tmp_path / "data")], [str(tmp_path / "data" / name)]

    return make


def _bad_policy(tmp_path: Path, _: socket.socket) -> tuple[list[str], list[str]]:
    (tmp_path / "secret").write_text("s" * 40)
    (tmp_path / "policy.yaml").write_text("rules: [oops\n")
    return [
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "data"),
        "--insecure",
        "--token-secret-file",
        str(tmp_path / "secret"),
        "--policy",
        str(tmp_path / "policy.yaml"),
    ], [str(tmp_path / "policy.yaml")]


def _mismatched_key(tmp_path: Path, _: socket.socket) -> tuple[list[str], list[str]]:
    made = subprocess.run(
        rpcmesh_command("certs", str(tmp_path / "certs"), "--client", "alice"),
        capture_output=True,
        env=python_env(),
        timeout=60,
        check=True,
    )
    assert made.returncode == 0
    cert, key = tmp_path / "certs" / "server.crt", tmp_path / "certs" / "client-alice.key"
    return [
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "data"),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    ], [str(cert), str(key), "do not match"]


CASES = {
    "port in use": _port_in_use,
    "data folder is a file": _not_a_folder,
    "damaged bus.db": _damaged("bus.db"),
    "damaged events.db": _damaged("events.db"),
    "bad policy file": _bad_policy,
    "certificate and key mismatch": _mismatched_key,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_start_up_problems_are_one_line_naming_the_cause(case: str, tmp_path: Path) -> None:
    with socket.socket() as holder:
        args, needles = CASES[case](tmp_path, holder)
        assert_one_line(up(*args), 1, *needles)


def test_usage_problems_exit_2(tmp_path: Path) -> None:
    result = up("--port", "0", "--data-dir", str(tmp_path), "--tls-cert", str(tmp_path / "x.crt"))
    assert_one_line(result, 2, "--tls-key")


def test_gateway_start_up_problems_are_one_line_too() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            rpcmesh_command("gateway", "--registry", "127.0.0.1:1", "--port", str(port)),
            capture_output=True,
            text=True,
            env=python_env(),
            timeout=60,
            check=False,
        )
    assert result.returncode == 1 and result.stderr == (
        f"rpcmesh gateway: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    ), (result.returncode, result.stderr)
