"""Every CLI command against a real control plane, with its error paths."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
from google.protobuf import duration_pb2, json_format
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc, saga_pb2

from rpcmesh.cli.output import render_table
from tests.support.processes import ManagedProcess, python_env, rpcmesh_command


def cli(address: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        rpcmesh_command(*args, "--target", address),
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
        input=stdin,
        check=False,
    )


def register(address: str, service: str, instance_id: str) -> None:
    with grpc.insecure_channel(address) as channel:
        registry_pb2_grpc.RegistryStub(channel).Register(
            registry_pb2.RegisterRequest(
                instance=registry_pb2.Instance(
                    service=service, instance_id=instance_id, address="127.0.0.1:9", tags=["blue"]
                ),
                ttl=duration_pb2.Duration(seconds=60),
            ),
            timeout=10,
        )


def test_tables_are_aligned_on_a_terminal_and_tab_separated_when_piped() -> None:
    rows = [["orders", 2, 1], ["payments-service", 10, 10]]
    assert render_table(["service", "instances", "passing"], rows, tty=False) == (
        "orders\t2\t1\npayments-service\t10\t10\n"
    )
    tty = render_table(["service", "instances", "passing"], rows, tty=True).splitlines()
    assert tty[0].split() == ["SERVICE", "INSTANCES", "PASSING"]
    assert tty[1].index("2") == tty[0].index("INSTANCES")


def test_registry_commands(control_plane: tuple[ManagedProcess, str]) -> None:
    _, address = control_plane
    register(address, "orders", "orders-1")
    register(address, "orders", "orders-2")

    services = cli(address, "services")
    assert services.returncode == 0, services.stderr
    assert "orders\t2\t2" in services.stdout.splitlines()

    as_json = json.loads(cli(address, "services", "--json").stdout)
    assert {"name": "orders", "instance_count": 2, "passing_count": 2} in as_json["services"]

    instances = cli(address, "services", "orders")
    assert sorted(line.split("\t")[1] for line in instances.stdout.splitlines()) == ["orders-1", "orders-2"]

    watch = cli(address, "watch", "orders", "--count", "2")
    assert watch.returncode == 0
    assert [line.split("\t")[1] for line in watch.stdout.splitlines()] == ["SNAPSHOT", "SNAPSHOT"]

    health = cli(address, "health")
    assert health.returncode == 0 and health.stdout.strip().endswith("SERVING")
    assert cli(address, "health", "orders").returncode == 0
    missing = cli(address, "health", "nobody")
    assert missing.returncode == 1 and "no passing instance" in missing.stderr

    bad = cli(address, "services", "Not_A_Name")
    assert bad.returncode == 1
    assert bad.stderr.startswith("rpcmesh services: INVALID_ARGUMENT: service")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_bus_commands(control_plane: tuple[ManagedProcess, str]) -> None:
    _, address = control_plane
    first = cli(address, "publish", "cli.orders", "--data", '{"n": 1}', "-H", "x-correlation-id=c-1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.split("\t")[:2] == ["cli.orders", "1"]
    assert cli(address, "publish", "cli.orders", "--data-file", "-", stdin='{"n": 2}').returncode == 0

    received = cli(address, "subscribe", "cli.orders", "--group", "g", "--from", "earliest", "--count", "2")
    assert received.returncode == 0, received.stderr
    assert received.stdout.splitlines() == ['cli.orders\t1\t{"n": 1}', 'cli.orders\t2\t{"n": 2}']

    as_json = cli(address, "subscribe", "cli.orders", "--from", "1", "--count", "1", "--json")
    delivery = json.loads(as_json.stdout)
    assert delivery["message"]["headers"] == {"x-correlation-id": "c-1"} and delivery["attempt"] == 1
    assert delivery["message"]["payload"] == {"n": 1}  # application/json: embedded, not base64

    bad_json = cli(address, "publish", "cli.orders", "--data", "{oops")
    assert bad_json.returncode == 2 and "bad JSON" in bad_json.stderr

    bad_topic = cli(address, "publish", "bad topic!", "--data", "{}")
    assert bad_topic.returncode == 1 and "INVALID_ARGUMENT" in bad_topic.stderr

    nobody = cli(address, "request", "cli.nobody-listens", "--data", "{}", "--timeout", "3")
    assert nobody.returncode == 1
    assert nobody.stderr == "rpcmesh request: no responders on topic 'cli.nobody-listens'\n"


def test_event_commands(control_plane: tuple[ManagedProcess, str]) -> None:
    _, address = control_plane
    first = cli(
        address,
        "events",
        "append",
        "cart-1",
        "item.added",
        "--data",
        '{"sku": "book"}',
        "--expect",
        "no-stream",
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("cart-1\trevision 0")
    second = cli(
        address, "events", "append", "cart-1", "item.added", "--data", "{}", "--expected-revision", "0"
    )
    assert second.returncode == 0 and "revision 1" in second.stdout

    conflict = cli(
        address, "events", "append", "cart-1", "item.added", "--data", "{}", "--expected-revision", "0"
    )
    assert conflict.returncode == 1 and "FAILED_PRECONDITION" in conflict.stderr

    read = cli(address, "events", "read", "cart-1")
    rows = [line.split("\t") for line in read.stdout.splitlines()]
    assert [row[2] for row in rows] == ["0", "1"] and rows[0][3] == "item.added"
    backwards = cli(address, "events", "read", "cart-1", "--backwards", "--limit", "1")
    assert [line.split("\t")[2] for line in backwards.stdout.splitlines()] == ["1"]
    everything = cli(address, "events", "read", "--all", "--prefix", "cart-", "--json")
    (document,) = everything.stdout.splitlines()
    events = json.loads(document)["events"]
    assert [e["stream"] for e in events] == ["cart-1", "cart-1"]
    # Zero values are kept: the first event is at stream_revision 0 (int64: a string in JSON).
    assert [e["stream_revision"] for e in events] == ["0", "1"]
    assert events[0]["data"] == {"sku": "book"}

    neither = cli(address, "events", "read")
    assert neither.returncode == 2


def test_saga_commands(control_plane: tuple[ManagedProcess, str], tmp_path: Path) -> None:
    _, address = control_plane
    # A one-step saga whose participant is not registered.
    definition = saga_pb2.SagaDefinition(
        name="cli-demo",
        steps=[
            saga_pb2.SagaStep(
                name="reserve",
                service="nobody-home",
                method="/shop.v1.Inventory/ReserveStock",
                compensation_method="/shop.v1.Inventory/ReleaseStock",
                timeout=duration_pb2.Duration(seconds=1),
                retry=saga_pb2.RetryPolicy(max_attempts=1),
            )
        ],
    )
    path = tmp_path / "definition.json"
    path.write_text(json_format.MessageToJson(definition))
    defined = cli(address, "saga", "define", str(path))
    assert defined.returncode == 0, defined.stderr
    assert defined.stdout.strip() == "cli-demo\tv1"

    started = cli(address, "saga", "start", "cli-demo", "--key", "k-1")
    assert started.returncode == 0, started.stderr
    saga_id, _ = started.stdout.strip().split("\t", 1)
    again = cli(address, "saga", "start", "cli-demo", "--key", "k-1")
    assert again.stdout.split("\t")[0] == saga_id and again.stdout.strip().endswith("existing")

    # The participant is not registered, so the step keeps waiting for it until the saga is aborted:
    # a wait that runs out answers with the saga as it is, and a status other than 0.
    running = cli(address, "saga", "status", saga_id, "--wait", "0.3", "--json")
    assert running.returncode == 1, running.stderr
    assert json.loads(running.stdout)["saga"]["state"] == "SAGA_STATE_RUNNING"
    assert cli(address, "saga", "status", saga_id, "--wait", "-1").returncode == 2
    aborted = cli(address, "saga", "abort", saga_id, "--reason", "changed my mind")
    assert aborted.returncode == 0, aborted.stderr
    ended = cli(address, "saga", "status", saga_id, "--wait", "30", "--json")
    assert ended.returncode == 1 and json.loads(ended.stdout)["saga"]["state"] == "SAGA_STATE_ABORTED"
    restarted = cli(address, "saga", "start", "cli-demo", "--key", "k-1", "--wait", "30")
    assert restarted.returncode == 1 and restarted.stdout.split("\t")[1] == "ABORTED"
    watched = cli(address, "saga", "watch", saga_id)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.strip().splitlines()[-1].split("\t")[1] == "ABORTED"

    status = cli(address, "saga", "status", saga_id, "--json")
    assert json.loads(status.stdout)["saga"]["saga_id"] == saga_id
    listed = cli(address, "saga", "list", "--definition", "cli-demo")
    assert saga_id in listed.stdout

    unknown = cli(address, "saga", "status", "no-such-saga")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("rpcmesh saga status: NOT_FOUND")
    assert cli(address, "saga", "abort", "no-such-saga").returncode == 1
    assert cli(address, "saga", "list", "--state", "sideways").returncode == 2

    bad_definition = tmp_path / "bad.json"
    bad_definition.write_text('{"name": "x", "steps": [{"nme": 1}]}')
    refused = cli(address, "saga", "define", str(bad_definition))
    assert refused.returncode == 2 and "bad.json" in refused.stderr
