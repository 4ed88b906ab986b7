"""`rpcmesh subscribe` when the control plane goes away: it says so, reconnects, and gives up in time.

The control plane is killed (SIGKILL) or stopped (SIGTERM) at a random moment drawn from a seeded
generator; the seed and the trial's draws are in every assertion message.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

from tests.support.processes import ManagedProcess, python_env, rpcmesh_command, start_control_plane

SEED = 20261204
pytestmark = [pytest.mark.fault, pytest.mark.slow]


def publish(address: str, topic: str, text: str) -> None:
    with grpc.insecure_channel(address) as channel:
        bus_pb2_grpc.BusStub(channel).Publish(
            bus_pb2.PublishRequest(
                topic=topic, messages=[bus_pb2.BusMessage(payload=text.encode(), content_type="text/plain")]
            ),
            timeout=20,
        )


def own_lines(path: Path) -> list[str]:
    """The CLI's stderr lines, without grpc core's own log lines ("E1204 12:00:00.0 ...")."""
    return [line for line in path.read_text().splitlines() if not re.match(r"^[IWE]\d{4} ", line)]


def wait_for_text(path: Path, text: str, about: str, within: float = 30.0) -> None:
    """Wait until the file at path contains text."""
    deadline = time.monotonic() + within
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{about}: no {text!r} within {within}s in {path.read_text()!r}"
        time.sleep(0.05)


def stop(proc: ManagedProcess, how: signal.Signals) -> None:
    """Take the control plane away: SIGKILL at once, or SIGTERM and let it stop in order."""
    if how is signal.SIGKILL:
        proc.kill()
    else:
        proc.proc.send_signal(how)
        try:
            proc.proc.wait(30)
        finally:
            proc.kill()


def start_subscriber(address: str, out: Path, err: Path, give_up_after: str) -> subprocess.Popen[bytes]:
    """`rpcmesh subscribe giveup.t --group g` writing to the files out and err."""
    with out.open("wb") as out_file, err.open("wb") as err_file:
        return subprocess.Popen(
            rpcmesh_command(
                "subscribe",
                "giveup.t",
                "--group",
                "g",
                "--from",
                "earliest",
                "--give-up-after",
                give_up_after,
                "--target",
                address,
            ),
            stdout=out_file,
            stderr=err_file,
            env=python_env(),
        )


def end(subscriber: subprocess.Popen[bytes] | None) -> None:
    if subscriber is not None and subscriber.poll() is None:
        subscriber.kill()
        subscriber.wait()


def test_subscribe_reconnects_after_the_control_plane_comes_back(tmp_path: Path) -> None:
    # A give-up limit far beyond a restart: this test is about coming back, not about the limit.
    rng = random.Random(SEED)
    data, out_path, err_path = tmp_path / "data", tmp_path / "out", tmp_path / "err"
    control, address = start_control_plane(data)
    port = int(address.rsplit(":", 1)[1])
    subscriber: subprocess.Popen[bytes] | None = None
    try:
        publish(address, "giveup.t", "before")
        subscriber = start_subscriber(address, out_path, err_path, "300")
        wait_for_text(out_path, "before", f"seed={SEED}")
        for trial in range(3):
            how = rng.choice([signal.SIGKILL, signal.SIGTERM])
            pause = rng.uniform(0, 0.5)
            about = f"seed={SEED} trial={trial} signal={how.name} pause={pause:.3f}"
            time.sleep(pause)
            stop(control, how)
            # Gone at a random moment; back on the same port with the same data: the message
            # published then arrives, and stderr says what happened.
            wait_for_text(err_path, "retrying in", about)
            assert subscriber.poll() is None, f"{about}: exited {subscriber.returncode} while retrying"
            control, _ = start_control_plane(data, port=port)
            publish(address, "giveup.t", f"after-{trial}")
            wait_for_text(out_path, f"after-{trial}", about)
            errors = own_lines(err_path)
            assert errors.count("rpcmesh subscribe: subscribed again") == trial + 1, f"{about}: {errors}"
            assert all(line.startswith("rpcmesh subscribe: ") for line in errors), f"{about}: {errors}"
            assert subscriber.poll() is None, about
    finally:
        end(subscriber)
        control.kill()


def test_subscribe_gives_up_when_the_control_plane_stays_away(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    for trial in range(2):
        how = rng.choice([signal.SIGKILL, signal.SIGTERM])
        pause = rng.uniform(0, 0.5)
        about = f"seed={SEED + 1} trial={trial} signal={how.name} pause={pause:.3f}"
        out_path, err_path = tmp_path / f"out-{trial}", tmp_path / f"err-{trial}"
        control, address = start_control_plane(tmp_path / f"data-{trial}")
        subscriber: subprocess.Popen[bytes] | None = None
        try:
            publish(address, "giveup.t", "before")
            subscriber = start_subscriber(address, out_path, err_path, "2")
            wait_for_text(out_path, "before", about)
            time.sleep(pause)
            stop(control, how)
            code = subscriber.wait(60)
            errors = own_lines(err_path)
            assert code == 1, f"{about}: exit {code}, stderr {errors}"
            # Retries said so on stderr; the last line names the target and the limit.
            assert errors[0].startswith(f"rpcmesh subscribe: lost the control plane at {address} ("), (
                f"{about}: {errors}"
            )
            assert errors[-1].startswith(
                f"rpcmesh subscribe: gave up: the control plane at {address} has been unreachable for "
            ), f"{about}: {errors}"
            assert "(--give-up-after 2;" in errors[-1], f"{about}: {errors}"
            assert all(line.startswith("rpcmesh subscribe: ") for line in errors), f"{about}: {errors}"
        finally:
            end(subscriber)
            control.kill()


def test_subscribe_to_nothing_gives_up_after_the_limit(tmp_path: Path) -> None:
    # No control plane at all: the limit holds from the first attempt (0 gives up at the first failure).
    control, address = start_control_plane(tmp_path / "data")
    control.kill()
    started = time.monotonic()
    result = subprocess.run(
        rpcmesh_command("subscribe", "t", "--give-up-after", "0", "--target", address),
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("rpcmesh subscribe: gave up: the control plane at"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert time.monotonic() - started < 30
    bad = subprocess.run(
        rpcmesh_command("subscribe", "t", "--give-up-after", "-1", "--target", address),
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "--give-up-after" in bad.stderr
