"""Start real processes for tests and make sure none outlives its test.

Every process is started in its own process group, so a kill reaches its
children too. ``ManagedProcess.wait_for_line`` reads stdout until a line
matches, which is how tests learn the port a process bound to port 0.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADDRESS_PATTERN = re.compile(r"listening on (\S+:\d+)")


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child Python processes: unbuffered, examples importable."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "examples")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ManagedProcess:
    """A child process whose stdout is read line by line in a thread."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.args = list(args)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else python_env(),
            cwd=cwd or ROOT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: re.Pattern[str] | str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for an output line matching pattern; fail with the output so far."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        for line in self.lines:
            match = regex.search(line)
            if match:
                return match
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line matching {regex.pattern!r} from {self.args}:\n{self.output()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(
                    f"{self.args} exited ({self.proc.wait()}) before printing {regex.pattern!r}:\n"
                    f"{self.output()}"
                )
            match = regex.search(line)
            if match:
                return match

    def wait_for_address(self, timeout: float = 20.0) -> str:
        """The host:port from a 'listening on host:port' line."""
        return self.wait_for_line(ADDRESS_PATTERN, timeout).group(1)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """Kill -9 the whole process group and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close_pipe()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, and kill -9 if it does not exit in time; returns the exit code."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_pipe()
        return self.proc.returncode

    def _close_pipe(self) -> None:
        self._reader.join(timeout=5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def rpcmesh_command(*args: str) -> list[str]:
    """Argv that runs the rpcmesh CLI from this source tree."""
    return [sys.executable, "-m", "rpcmesh", *args]


def start_control_plane(
    data_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[ManagedProcess, str]:
    """Start `rpcmesh up` on a free port; returns the process and its address."""
    proc = ManagedProcess(
        rpcmesh_command("up", "--port", "0", "--data-dir", str(data_dir), *extra),
        env=python_env(env),
    )
    try:
        address = proc.wait_for_address()
    except BaseException:
        proc.kill()
        raise
    return proc, address


def start_echo(registry: str, instance_id: str, *args: str, name: str = "echo") -> ManagedProcess:
    """Start `examples/echo/server.py` registered as ``name``; waits until it serves."""
    proc = ManagedProcess(
        [
            sys.executable,
            str(ROOT / "examples" / "echo" / "server.py"),
            "--registry",
            registry,
            "--name",
            name,
            "--instance-id",
            instance_id,
            *args,
        ]
    )
    try:
        proc.wait_for_address()
    except BaseException:
        proc.kill()
        raise
    return proc


def start_gateway(registry: str, *args: str) -> tuple[ManagedProcess, str]:
    """Start `rpcmesh gateway` on a free port; returns the process and its address."""
    proc = ManagedProcess(rpcmesh_command("gateway", "--registry", registry, "--port", "0", *args))
    try:
        address = proc.wait_for_address()
    except BaseException:
        proc.kill()
        raise
    return proc, address
