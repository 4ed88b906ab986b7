"""`rpcmesh subscribe` when the control plane goes away: it says so, reconnects, and gives up in time.

The control plane is killed (SIGKILL) or stopped (SIGTERM) at a random moment drawn from a seeded
generator; the seed and the trial's draws are in every assertion message.
"""

from __future__ import annotations

import random
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


def test_subscribe_reconnects_and_gives_up_when_the_control_plane_goes_away(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    for trial in range(3):
        data = tmp_path / f"data-{trial}"
        how = rng.choice([signal.SIGKILL, signal.SIGTERM])
        first_pause, second_pause = rng.uniform(0, 0.5), rng.uniform(0, 0.5)
        about = f"seed={SEED} trial={trial} signal={how.name} pauses={first_pause:.3f},{second_pause:.3f}"
        control, address = start_control_plane(data)
        port = int(address.rsplit(":", 1)[1])
        out_path, err_path = tmp_path / f"out-{trial}", tmp_path / f"err-{trial}"
        subscriber: subprocess.Popen[bytes] | None = None
        try:
            publish(address, "giveup.t", "before")
            with out_path.open("wb") as out, err_path.open("wb") as err:
                subscriber = subprocess.Popen(
                    rpcmesh_command(
                        "subscribe",
                        "giveup.t",
                        "--group",
                        "g",
                        "--from",
                        "earliest",
                        "--give-up-after",
                        "2",
                        "--target",
                        address,
                    ),
                    stdout=out,
                    stderr=err,
                    env=python_env(),
                )
            wait_for_text(out_path, "before", about)

            # Gone at a random moment; back on the same port with the same data; the message
            # published then arrives, and stderr says what happened.
            time.sleep(first_pause)
            stop(control, how)
            wait_for_text(err_path, "retrying in", about)
            assert subscriber.poll() is None, f"{about}: exited {subscriber.returncode} while retrying"
            control, _ = start_control_plane(data, port=port)
            publish(address, "giveup.t", f"after-{trial}")
            wait_for_text(out_path, f"after-{trial}", about)
            assert "rpcmesh subscribe: subscribed again" in err_path.read_text(), about

            # Gone for good: it gives up with exit 1 and one last line naming the target.
            time.sleep(second_pause)
            stop(control, how)
            code = subscriber.wait(60)
            errors = err_path.read_text().splitlines()
            assert code == 1, f"{about}: exit {code}, stderr {errors}"
            assert errors[-1].startswith(
                f"rpcmesh subscribe: gave up: the control plane at {address} has been unreachable for "
            ), f"{about}: {errors}"
            assert "(--give-up-after 2;" in errors[-1], f"{about}: {errors}"
            retries = [
                line for line in errors if line.startswith("rpcmesh subscribe: lost the control plane")
            ]
            assert retries, f"{about}: {errors}"
            assert all(line.startswith("rpcmesh subscribe: ") for line in errors), f"{about}: {errors}"
        finally:
            if subscriber is not None and subscriber.poll() is None:
                subscriber.kill()
                subscriber.wait()
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
