"""`rpcmesh subscribe --group G --count N` hands its last acks to the Bus before it leaves."""

from __future__ import annotations

import random

import grpc
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

from tests.integration.cli.test_cli_commands import cli
from tests.support.processes import ManagedProcess

SEED = 4242


def test_count_keeps_the_acks_of_every_message_it_printed(control_plane: tuple[ManagedProcess, str]) -> None:
    _, address = control_plane
    rng = random.Random(SEED)
    for trial in range(3):
        topic = f"acks.t{trial}"
        total = rng.randint(3, 12)
        first = rng.randint(1, total - 1)
        about = f"seed={SEED} trial={trial} total={total} first={first}"
        with grpc.insecure_channel(address) as channel:
            messages = [bus_pb2.BusMessage(payload=str(n).encode()) for n in range(1, total + 1)]
            bus_pb2_grpc.BusStub(channel).Publish(bus_pb2.PublishRequest(topic=topic, messages=messages))
        taken = cli(address, "subscribe", topic, "--group", "g", "--from", "earliest", "--count", str(first))
        assert taken.returncode == 0, f"{about}: {taken.stderr}"
        assert [line.split("\t")[1] for line in taken.stdout.splitlines()] == [
            str(n) for n in range(1, first + 1)
        ], about
        rest = cli(
            address, "subscribe", topic, "--group", "g", "--count", str(total - first), "--timeout", "20"
        )
        assert rest.returncode == 0, f"{about}: {rest.stderr}"
        # Every message the first one printed was acked: none of them comes again.
        assert [line.split("\t")[1] for line in rest.stdout.splitlines()] == [
            str(n) for n in range(first + 1, total + 1)
        ], about
