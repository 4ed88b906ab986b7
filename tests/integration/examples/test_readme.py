"""The README's quick start runs as written.

The test reads the quick start from README.md and runs its commands one by one, in a scratch
directory that looks like the repository root (``.venv`` and ``examples`` are links to the real
ones), in an environment without the test run's ``PYTHONPATH`` or virtualenv, so a command that
only works from inside the test run fails here. What it changes, and only this:

* ``--port 50051`` becomes ``--port 0`` and every later ``50051`` the port the control plane
  took, so the test never needs a fixed port; ``RPCMESH_TARGET`` points the CLI's default
  (127.0.0.1:50051) there too;
* ``make`` lines are checked with ``make -n`` (the virtualenv is the one the tests run in, and
  ``make demo`` has a test of its own in test_examples.py).

Commands ending in ``&`` run in the background until the test ends; a foreground command's
``# prints: ...`` comment is its expected output, compared word by word.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import ROOT, ManagedProcess

README = ROOT / "README.md"
DOCUMENTED_PORT = "50051"


@dataclass(frozen=True)
class Command:
    """One quick-start shell line."""

    env: dict[str, str]
    argv: list[str]
    background: bool
    prints: str | None

    @classmethod
    def parse(cls, line: str) -> Command:
        code, _, comment = line.partition("  #")
        words = shlex.split(code)
        env: dict[str, str] = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        background = bool(words) and words[-1] == "&"
        if background:
            words.pop()
        comment = comment.strip().lstrip("#").strip()
        prints = comment.removeprefix("prints:").strip() if comment.startswith("prints:") else None
        return cls(env, words, background, prints)


def quick_start() -> tuple[list[Command], str]:
    """The quick start's shell commands, in order, and its Python snippet."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    section = section[: section.index("\n## ", 1)]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(snippets) == 1, "the quick start has one Python snippet"
    shell = re.sub(r"```.*?```", "", section, flags=re.S)
    commands = [
        Command.parse(line[4:])
        for line in shell.splitlines()
        if line.startswith("    ") and not line.startswith("     ") and line.strip()
    ]
    return commands, snippets[0]


def clean_env() -> dict[str, str]:
    """The caller's environment, minus what the test run itself relies on."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"  # this process reads their output as it comes; it changes nothing else
    return env


def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("the quick start uses .venv (make setup); this checkout has none")
    commands, snippet = quick_start()
    programs = [shlex.join(c.argv[:2]) for c in commands]
    assert ".venv/bin/rpcmesh up" in programs and ".venv/bin/rpcmesh services" in programs, programs
    for name in ("examples", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    background: list[ManagedProcess] = []
    ran: list[str] = []
    port: str | None = None
    try:
        for command in commands:
            if command.argv[0] == "make":
                dry = subprocess.run(
                    ["make", "-n", *command.argv[1:]], cwd=ROOT, capture_output=True, text=True, check=False
                )
                assert dry.returncode == 0, f"{command.argv}: {dry.stderr}"
                continue
            argv = list(command.argv)
            if port is None and "--port" in argv and argv[argv.index("--port") + 1] == DOCUMENTED_PORT:
                argv[argv.index("--port") + 1] = "0"
            elif port is not None:
                argv = [word.replace(DOCUMENTED_PORT, port) for word in argv]
            env = {**clean_env(), **command.env}
            if port is not None:
                env["RPCMESH_TARGET"] = f"127.0.0.1:{port}"
            if command.background:
                process = ManagedProcess(argv, env=env, cwd=tmp_path)
                background.append(process)
                address = process.wait_for_address()
                port = port or address.rsplit(":", 1)[1]
                continue
            assert port is not None, "the control plane starts before the commands that use it"
            (tmp_path / "hello.py").write_text(snippet.replace(DOCUMENTED_PORT, port))
            run_until_it_prints(argv, env, tmp_path, command.prints)
            ran.append(shlex.join(argv))
    finally:
        for process in reversed(background):
            process.kill()
    assert any("hello.py" in line for line in ran), f"no quick-start command runs the snippet: {ran}"
    assert "`hello.py`" in README.read_text(), "the quick start says where the snippet goes"


def run_until_it_prints(argv: list[str], env: dict[str, str], cwd: Path, prints: str | None) -> None:
    """Run ``argv``; it must succeed and print ``prints`` (word by word) within a few seconds.

    A few tries, because the instance the background command registered may take a moment to
    pass its health check; the command itself is the same every time.
    """
    deadline = time.monotonic() + 15
    while True:
        result = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=30, check=False
        )
        ok = result.returncode == 0 and (prints is None or result.stdout.split() == prints.split())
        if ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{shlex.join(argv)} exited {result.returncode}, printed {result.stdout!r}"
                f" (expected {prints!r}); stderr: {result.stderr[-2000:]}"
            )
        time.sleep(0.3)
