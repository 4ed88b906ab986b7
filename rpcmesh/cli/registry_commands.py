"""`rpcmesh services`, `rpcmesh watch` and `rpcmesh health`: the Registry and health from the command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from rpcmesh.cli.common import add_target_arguments, pages, target_of
from rpcmesh.cli.output import print_json, print_table
from rpcmesh.v1 import registry_pb2, registry_pb2_grpc

HEALTH_NAMES = {
    registry_pb2.HEALTH_STATE_PASSING: "passing",
    registry_pb2.HEALTH_STATE_CRITICAL: "critical",
    registry_pb2.HEALTH_STATE_UNSPECIFIED: "unknown",
}
EVENT_NAMES = {
    registry_pb2.WATCH_EVENT_TYPE_PUT: "PUT",
    registry_pb2.WATCH_EVENT_TYPE_DELETE: "DELETE",
    registry_pb2.WATCH_EVENT_TYPE_HEALTH: "HEALTH",
}


def register(commands: Any) -> None:
    """Add the registry commands to the CLI."""
    services = commands.add_parser(
        "services",
        help="list services, or the instances of one service",
        description="List registered services with instance counts; with SERVICE, list its instances.",
    )
    services.add_argument("service", nargs="?", help="show the instances of this service")
    services.add_argument(
        "--json", action="store_true", help="print the ListServicesResponse (with SERVICE: ResolveResponse)"
    )
    services.add_argument("--all", action="store_true", help="with SERVICE: include critical instances")
    add_target_arguments(services)
    services.set_defaults(func=run_services)

    watch = commands.add_parser(
        "watch",
        help="stream registry changes",
        description="Print a snapshot of the instances, then every change as it happens (Ctrl-C to stop).",
    )
    watch.add_argument("service", nargs="?", default="", help="watch one service (default: all)")
    watch.add_argument(
        "--after-revision", type=int, default=0, help="resume after this revision, no snapshot"
    )
    watch.add_argument("--count", type=int, default=0, help="stop after this many events (default: never)")
    watch.add_argument("--json", action="store_true", help="one WatchResponse per line, as it arrives")
    add_target_arguments(watch)
    watch.set_defaults(func=run_watch)

    health = commands.add_parser(
        "health",
        help="health of the control plane, or of a service's instances",
        description="Without SERVICE: grpc.health.v1 status of the control plane. With SERVICE: the health "
        "the Registry holds for each instance. Exits 1 when nothing is serving.",
    )
    health.add_argument("service", nargs="?", help="a registered service name")
    health.add_argument(
        "--json", action="store_true", help="print the HealthCheckResponse (with SERVICE: ResolveResponse)"
    )
    add_target_arguments(health)
    health.set_defaults(func=run_health)


def _instance_row(instance: registry_pb2.Instance) -> list[object]:
    return [
        instance.service,
        instance.instance_id,
        instance.address,
        HEALTH_NAMES.get(instance.health, "unknown"),
        instance.version or "-",
        instance.zone or "-",
        ",".join(instance.tags) or "-",
    ]


INSTANCE_HEADERS = ["service", "instance", "address", "health", "version", "zone", "tags"]


def run_services(args: argparse.Namespace) -> int:
    """Run `rpcmesh services [SERVICE]`."""
    target = target_of(args)
    with target.channel() as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        if args.service:
            response = stub.Resolve(
                registry_pb2.ResolveRequest(service=args.service, include_unhealthy=args.all),
                timeout=target.timeout,
            )
            if args.json:
                print_json(response)
            else:
                print_table(INSTANCE_HEADERS, [_instance_row(i) for i in response.instances])
            return 0
        merged = registry_pb2.ListServicesResponse()
        for page in pages(
            lambda token: stub.ListServices(
                registry_pb2.ListServicesRequest(page_size=500, page_token=token), timeout=target.timeout
            )
        ):
            merged.services.extend(page.services)
    if args.json:
        print_json(merged)
    else:
        print_table(
            ["service", "instances", "passing"],
            [[s.name, s.instance_count, s.passing_count] for s in merged.services],
        )
    return 0


def run_watch(args: argparse.Namespace) -> int:
    """Run `rpcmesh watch [SERVICE]`."""
    target = target_of(args)
    seen = 0
    with target.channel() as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        request = registry_pb2.WatchRequest(service=args.service, after_revision=args.after_revision)
        for response in stub.Watch(request):
            if args.json:
                if args.count:
                    # --count counts events: a response that crosses it is cut at the last one.
                    del response.events[max(args.count - seen, 0) :]
                print_json(response)
            for event in response.events:
                if not args.json:
                    kind = "SNAPSHOT" if response.snapshot else EVENT_NAMES.get(event.type, "?")
                    instance = event.instance
                    print(
                        f"{event.revision}\t{kind}\t{instance.service}\t{instance.instance_id}\t"
                        f"{instance.address}\t{HEALTH_NAMES.get(instance.health, 'unknown')}"
                        + (f"\t{event.reason}" if event.reason else ""),
                        flush=True,
                    )
                seen += 1
                if args.count and seen >= args.count:
                    return 0
    return 0


def run_health(args: argparse.Namespace) -> int:
    """Run `rpcmesh health [SERVICE]`."""
    target = target_of(args)
    with target.channel() as channel:
        if args.service:
            stub = registry_pb2_grpc.RegistryStub(channel)
            response = stub.Resolve(
                registry_pb2.ResolveRequest(service=args.service, include_unhealthy=True),
                timeout=target.timeout,
            )
            passing = [i for i in response.instances if i.health == registry_pb2.HEALTH_STATE_PASSING]
            if args.json:
                print_json(response)
            else:
                print_table(INSTANCE_HEADERS, [_instance_row(i) for i in response.instances])
            if not passing:
                print(f"rpcmesh health: no passing instance of {args.service!r}", file=sys.stderr)
                return 1
            return 0
        health = health_pb2_grpc.HealthStub(channel)
        check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=target.timeout)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(check.status)
        if args.json:
            print_json(check)
        else:
            print(f"{target.address}\t{status}")
        return 0 if check.status == health_pb2.HealthCheckResponse.SERVING else 1
