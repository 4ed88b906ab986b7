"""Helpers for testing services on rpcmesh with real processes: run a child, learn its port, never leak it.

Every process is started in its own process group, so a kill reaches its
children too. :meth:`ManagedProcess.wait_for_line` reads stdout until a line
matches, which is how a caller learns the port a process bound to port 0
(rpcmesh servers print ``listening on HOST:PORT``).

Usage::

    with ManagedProcess(["rpcmesh", "up", "--port", "0", "--data-dir", str(tmp)]) as plane:
        address = plane.wait_for_address()
        ...
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["ADDRESS_PATTERN", "ManagedProcess", "rpcmesh_command"]

ADDRESS_PATTERN = re.compile(r"listening on (\S+:\d+)")
"""What rpcmesh servers print once they serve."""


def rpcmesh_command(*args: str) -> list[str]:
    """Argv that runs the rpcmesh CLI with this interpreter."""
    return [sys.executable, "-m", "rpcmesh", *args]


class ManagedProcess:
    """A child process whose stdout is read line by line in a thread."""

    def __init__(
        self, args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.args = list(args)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else {**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=cwd,
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
        """The child's process id (also its process group id)."""
        return self.proc.pid

    def output(self) -> str:
        """Everything the child printed so far."""
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
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if item is None:
                raise RuntimeError(
                    f"{self.args} exited ({self.proc.wait()}) before printing {regex.pattern!r}:\n"
                    f"{self.output()}"
                )
            match = regex.search(item)
            if match:
                return match

    def wait_for_address(self, timeout: float = 20.0) -> str:
        """The host:port from a 'listening on host:port' line."""
        return self.wait_for_line(ADDRESS_PATTERN, timeout).group(1)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group (SIGSTOP, SIGCONT, ...)."""
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

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
