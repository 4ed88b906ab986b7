"""The operator verbs (topics, dead letters, saga definitions) and the one --json envelope.

The commands run in this process through :func:`rpcmesh.cli.main.main` (an interpreter start per call
would cost seconds on a busy machine) against a real `rpcmesh up` subprocess; the CLI as a process is
covered by test_cli_commands.py and test_cli_subscribe_giveup.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

from rpcmesh.cli.main import main
from tests.integration.bus.streams import RawSubscriber, options
from tests.support.processes import ManagedProcess


def run(capsys: pytest.CaptureFixture[str], address: str, *args: str) -> tuple[int, str, str]:
    """Run one rpcmesh command in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--target", address, "--timeout", "20"])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def one_json(out: str) -> dict[str, object]:
    (line,) = out.splitlines()
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


async def settled(stub: bus_pb2_grpc.BusStub, topic: str, within: float = 30.0) -> None:
    """Wait until the Bus has applied the ack and the term (they travel on the stream, unanswered)."""
    async with asyncio.timeout(within):
        while True:
            response = await stub.GetTopic(bus_pb2.GetTopicRequest(name=topic))
            (group,) = response.topic.groups
            if group.ack_floor == 2 and group.dead_letters == 1:
                return
            await asyncio.sleep(0.05)


async def test_topic_and_dead_letter_commands(
    control_plane: tuple[ManagedProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = control_plane
    code, out, err = run(capsys, address, "topics", "create", "ops.orders", "--max-messages", "100")
    assert code == 0, err
    assert out == "ops.orders\t100 messages\n"
    code, out, err = run(capsys, address, "topics", "create", "ops.orders", "--max-messages", "100", "--json")
    assert code == 0, err
    retention = one_json(out)["topic"]["retention"]  # type: ignore[index]
    assert retention["max_messages"] == "100" and retention["max_bytes"] == "0"  # zero values kept
    code, _, err = run(capsys, address, "topics", "create", "ops.orders", "--max-messages", "5")
    assert code == 1 and err.startswith("rpcmesh topics create: ALREADY_EXISTS"), err
    code, _, err = run(capsys, address, "topics", "create", "ops.x", "--max-age", "soon")
    assert code == 2 and "--max-age" in err

    # A group takes three messages: acks the first, terminates the second, holds the third.
    async with grpc.aio.insecure_channel(address) as channel:
        stub = bus_pb2_grpc.BusStub(channel)
        payloads = [b'{"n": 1}', b'{"n": 2}', b"plain three"]
        await stub.Publish(
            bus_pb2.PublishRequest(
                topic="ops.orders",
                messages=[
                    bus_pb2.BusMessage(
                        payload=p, content_type="text/plain" if p.startswith(b"plain") else "application/json"
                    )
                    for p in payloads
                ],
            )
        )
        subscriber = RawSubscriber(stub, options("ops.orders", "workers"))
        try:
            await subscriber.opened()
            first, second, _third = await subscriber.receive(3)
            subscriber.ack([first])
            subscriber.term([second], "poison")
            await settled(stub, "ops.orders")

            code, out, err = run(capsys, address, "topics", "info", "ops.orders")
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].startswith("topic ops.orders  messages 3  sequences 1..3"), out
            # group, pending, in_flight, ack_floor, dead_letters
            assert lines[1:] == ["workers\t1\t1\t2\t1"], out
            code, out, err = run(capsys, address, "topics", "info", "ops.orders", "--json")
            assert code == 0, err
            (group,) = one_json(out)["topic"]["groups"]  # type: ignore[index]
            assert group == {
                "name": "workers",
                "pending": "1",
                "in_flight": "1",
                "ack_floor": "2",
                "dead_letters": "1",
            }
        finally:
            await subscriber.close()

    code, out, err = run(capsys, address, "topics", "list")
    assert code == 0, err
    assert "ops.orders\t3\t1\t3\t1\t100 messages" in out.splitlines(), out
    code, out, _ = run(capsys, address, "topics", "list", "--json")
    listed = one_json(out)
    assert [t["name"] for t in listed["topics"]] == ["$dlq.ops.orders.workers", "ops.orders"]  # type: ignore[union-attr,index]
    assert listed["next_page_token"] == ""

    code, out, err = run(capsys, address, "dead-letters", "list", "ops.orders", "workers")
    assert code == 0, err
    (row,) = [line.split("\t") for line in out.splitlines()]
    dead_sequence = row[0]
    assert row[1:4] == ["ops.orders#2", "1", "poison"], out
    code, out, _ = run(capsys, address, "dead-letters", "list", "ops.orders", "workers", "--json")
    (letter,) = one_json(out)["dead_letters"]  # type: ignore[misc]
    assert letter["message"]["payload"] == {"n": 2}  # application/json: embedded, not base64
    code, out, err = run(capsys, address, "dead-letters", "show", "ops.orders", "workers", dead_sequence)
    assert code == 0, err
    assert "reason: poison" in out and out.splitlines()[-1] == '{"n": 2}', out
    code, out, _ = run(
        capsys, address, "dead-letters", "show", "ops.orders", "workers", dead_sequence, "--json"
    )
    assert one_json(out)["reason"] == "poison"
    code, _, err = run(capsys, address, "dead-letters", "show", "ops.orders", "workers", "999")
    assert code == 1 and "no dead letter 999" in err
    code, _, err = run(capsys, address, "dead-letters", "replay", "ops.orders", "workers")
    assert code == 2 and "--all" in err
    code, out, err = run(capsys, address, "dead-letters", "replay", "ops.orders", "workers", dead_sequence)
    assert out == "ops.orders\tworkers\treplayed 1\n", err
    code, out, err = run(
        capsys, address, "dead-letters", "replay", "ops.orders", "workers", "--all", "--json"
    )
    assert code == 0, err
    assert one_json(out) == {"replayed": 0}  # zero kept: nothing left to replay

    code, _, err = run(capsys, address, "topics", "delete", "ops.orders")
    assert code == 2 and "--yes" in err
    code, out, err = run(capsys, address, "topics", "delete", "ops.orders", "--yes", "--json")
    assert code == 0 and one_json(out) == {}, err
    code, _, err = run(capsys, address, "topics", "info", "ops.orders")
    assert code == 1 and "NOT_FOUND" in err


DEFINITION_YAML = """\
name: ops-demo
steps:
  - name: reserve
    service: nobody-home
    method: /shop.v1.Inventory/ReserveStock
    compensation_method: /shop.v1.Inventory/ReleaseStock
    timeout: 2s
    retry:
      max_attempts: 1
"""


def test_saga_definition_commands(
    control_plane: tuple[ManagedProcess, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, address = control_plane
    as_yaml = tmp_path / "demo.yaml"
    as_yaml.write_text(DEFINITION_YAML)
    code, out, err = run(capsys, address, "saga", "definitions", "register", str(as_yaml))
    assert code == 0, err
    assert out == "ops-demo\tv1\n"
    as_json = tmp_path / "demo.json"
    as_json.write_text(
        json.dumps(
            {
                "name": "ops-demo",
                "steps": [{"name": "only", "service": "s", "method": "/a.B/C", "no_compensation": True}],
            }
        )
    )
    code, out, err = run(capsys, address, "saga", "definitions", "register", str(as_json), "--json")
    assert code == 0, err
    assert one_json(out)["definition"]["version"] == 2  # type: ignore[index]

    code, out, err = run(capsys, address, "saga", "definitions", "list")
    assert code == 0, err
    assert out.splitlines() == ["ops-demo\t2\tonly"], out  # the latest version of each
    code, out, _ = run(capsys, address, "saga", "definitions", "list", "--json")
    assert [d["version"] for d in one_json(out)["definitions"]] == [2]  # type: ignore[union-attr,index]

    code, out, err = run(capsys, address, "saga", "definitions", "show", "ops-demo", "--version", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "definition ops-demo v1"
    assert lines[1].split("\t") == [
        "reserve",
        "nobody-home",
        "/shop.v1.Inventory/ReserveStock",
        "/shop.v1.Inventory/ReleaseStock",
        "2s",
        "1",
    ]
    code, out, _ = run(capsys, address, "saga", "definitions", "show", "ops-demo", "--json")
    definition = one_json(out)["definition"]
    assert definition["version"] == 2 and definition["steps"][0]["name"] == "only"  # type: ignore[index]
    code, _, err = run(capsys, address, "saga", "definitions", "show", "no-such-thing")
    assert code == 1 and "NOT_FOUND" in err

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    code, _, err = run(capsys, address, "saga", "definitions", "register", str(broken))
    assert code == 2 and "bad YAML" in err and len(err.splitlines()) == 1
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text("name: x\nsteps:\n  - nme: 1\n")
    code, _, err = run(capsys, address, "saga", "define", str(misspelt))
    assert code == 2 and "misspelt.yaml" in err

    # One envelope: start and status both print the response message, the saga under "saga".
    code, out, err = run(capsys, address, "saga", "start", "ops-demo", "--version", "1", "--json")
    assert code == 0, err
    started = one_json(out)
    assert started["created"] is True
    saga_id = started["saga"]["saga_id"]  # type: ignore[index]
    code, out, _ = run(capsys, address, "saga", "status", saga_id, "--json")
    assert one_json(out)["saga"]["saga_id"] == saga_id  # type: ignore[index]
    code, out, _ = run(capsys, address, "saga", "abort", saga_id, "--json")
    assert one_json(out)["saga"]["saga_id"] == saga_id  # type: ignore[index]
    code, out, _ = run(capsys, address, "saga", "list", "--json")
    assert [s["saga_id"] for s in one_json(out)["sagas"]] == [saga_id]  # type: ignore[union-attr,index]


def test_json_keeps_zero_values(
    control_plane: tuple[ManagedProcess, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = control_plane
    code, out, err = run(
        capsys, address, "events", "append", "cart-0", "item.added", "--data", "{}", "--json"
    )
    assert code == 0, err
    assert one_json(out) == {"current_revision": "0", "position": "1", "appended": 1}
    code, out, _ = run(capsys, address, "events", "read", "cart-0", "--json")
    (event,) = one_json(out)["events"]  # type: ignore[misc]
    assert event["stream_revision"] == "0" and event["data"] == {} and event["metadata"] == {}
    code, out, _ = run(capsys, address, "publish", "ops.zero", "--data", "[]", "--json")
    (result,) = one_json(out)["results"]  # type: ignore[misc]
    assert result["sequence"] == "1" and result["duplicate"] is False and result["code"] == 0
    code, out, _ = run(capsys, address, "health", "--json")
    assert one_json(out) == {"status": "SERVING"}
    code, out, _ = run(capsys, address, "services", "--json")
    services = one_json(out)
    assert services["services"] == [] and services["next_page_token"] == "", services


def test_json_payloads_are_embedded_only_when_they_are_json() -> None:
    from rpcmesh.v1 import eventstore_pb2

    from rpcmesh.cli.output import message_to_dict

    response = bus_pb2.SubscribeResponse(
        deliveries=[
            bus_pb2.Delivery(
                message=bus_pb2.BusMessage(payload=b'{"a": [1]}', content_type="application/json")
            ),
            bus_pb2.Delivery(
                message=bus_pb2.BusMessage(
                    payload=b'"x"', content_type="application/cloudevents+json; charset=utf-8"
                )
            ),
            bus_pb2.Delivery(message=bus_pb2.BusMessage(payload=b"{oops", content_type="application/json")),
            bus_pb2.Delivery(message=bus_pb2.BusMessage(payload=b"{}", content_type="text/plain")),
        ]
    )
    payloads = [d["message"]["payload"] for d in message_to_dict(response)["deliveries"]]
    assert payloads == [{"a": [1]}, "x", "e29vcHM=", "e30="]
    event = message_to_dict(eventstore_pb2.RecordedEvent(content_type="application/json"))
    # Zero values kept; an empty JSON payload stays as protobuf prints empty bytes.
    assert event["stream_revision"] == "0" and event["data"] == "" and event["metadata"] == {}
