"""`rpcmesh saga …`: start, inspect, list, abort and watch sagas; retry or resolve a stuck compensation."""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml
from google.protobuf import duration_pb2, json_format

from rpcmesh.cli.common import CliError, add_target_arguments, pages, payload_bytes, target_of
from rpcmesh.cli.output import print_json, print_table
from rpcmesh.saga.states import SETTLED_STATES
from rpcmesh.v1 import saga_pb2, saga_pb2_grpc

# The coordinator's longest wait (GetSagaRequest.wait / StartSagaRequest.wait).
MAX_WAIT_SECONDS = 3600.0

TERMINAL_STATES = SETTLED_STATES


def state_name(state: int) -> str:
    """SAGA_STATE_COMPLETED -> COMPLETED."""
    return saga_pb2.SagaState.Name(state).removeprefix("SAGA_STATE_")  # type: ignore[arg-type]


def step_state_name(state: int) -> str:
    """STEP_STATE_SUCCEEDED -> SUCCEEDED."""
    return saga_pb2.StepState.Name(state).removeprefix("STEP_STATE_")  # type: ignore[arg-type]


def register(commands: Any) -> None:
    """Add `rpcmesh saga` and its subcommands to the CLI."""
    saga = commands.add_parser("saga", help="start and follow sagas", description="Work with sagas.")
    sub = saga.add_subparsers(dest="saga_command", required=True, metavar="SUBCOMMAND")

    define = sub.add_parser(
        "define",
        help="register a saga definition (same as `definitions register`)",
        description="Register a definition from a YAML or JSON file.",
    )
    _add_register_arguments(define)

    definitions = sub.add_parser(
        "definitions",
        help="list, show and register saga definitions",
        description="Work with saga definitions.",
    )
    definition_commands = definitions.add_subparsers(
        dest="definitions_command", required=True, metavar="SUBCOMMAND"
    )
    listing = definition_commands.add_parser(
        "list",
        help="list definitions",
        description="List registered definitions (the latest version of each).",
    )
    listing.add_argument("--json", action="store_true", help="print the ListDefinitionsResponse as JSON")
    add_target_arguments(listing)
    listing.set_defaults(func=run_definitions_list)
    show = definition_commands.add_parser(
        "show", help="show a definition", description="Show a definition and its steps."
    )
    show.add_argument("name")
    show.add_argument("--version", type=int, default=0, help="definition version (default: latest)")
    show.add_argument("--json", action="store_true", help="print the GetDefinitionResponse as JSON")
    add_target_arguments(show)
    show.set_defaults(func=run_definitions_show)
    register_definition = definition_commands.add_parser(
        "register",
        help="register a definition from a file",
        description="Register a SagaDefinition from a YAML or JSON file in protobuf's JSON mapping "
        "(field names as in saga.proto, durations as '5s'); prints its name and assigned version.",
    )
    _add_register_arguments(register_definition)

    start = sub.add_parser("start", help="start a saga", description="Start a saga; prints its id and state.")
    start.add_argument("definition", nargs="?", help="registered definition name")
    start.add_argument("--definition-file", help="an inline SagaDefinition as protobuf JSON")
    start.add_argument("--version", type=int, default=0, help="definition version (default: latest)")
    start.add_argument("--input", dest="data", help="saga input (bytes of the text)")
    start.add_argument("--input-file", dest="data_file", help="saga input from a file ('-' for stdin)")
    start.add_argument("--key", default="", help="idempotency key: the same key returns the same saga")
    start.add_argument("--json", action="store_true", help="print the StartSagaResponse as JSON")
    _add_wait_argument(start)
    add_target_arguments(start)
    start.set_defaults(func=run_start)

    status = sub.add_parser("status", help="show one saga", description="Show a saga and its steps.")
    status.add_argument("saga_id")
    status.add_argument("--json", action="store_true", help="print the GetSagaResponse as JSON")
    _add_wait_argument(status)
    add_target_arguments(status)
    status.set_defaults(func=run_status)

    listing = sub.add_parser("list", help="list sagas", description="List sagas, newest first.")
    listing.add_argument("--state", action="append", help="filter by state, e.g. COMPENSATED (repeatable)")
    listing.add_argument("--definition", default="", help="filter by definition name")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default %(default)s)")
    listing.add_argument("--json", action="store_true", help="print the ListSagasResponse as JSON")
    add_target_arguments(listing)
    listing.set_defaults(func=run_list)

    abort = sub.add_parser("abort", help="abort a saga", description="Abort a saga and compensate its steps.")
    abort.add_argument("saga_id")
    abort.add_argument("--reason", default="aborted from the CLI")
    abort.add_argument("--json", action="store_true", help="print the AbortSagaResponse as JSON")
    add_target_arguments(abort)
    abort.set_defaults(func=run_abort)

    retry = sub.add_parser(
        "retry-compensation",
        help="compensate a FAILED_COMPENSATION saga again",
        description="Take a FAILED_COMPENSATION saga back to COMPENSATING from the step whose compensation "
        "failed, with a fresh attempt budget (after the participant was fixed). Recorded with your "
        "identity and the reason.",
    )
    retry.add_argument("saga_id")
    retry.add_argument("--reason", default="", help="why (recorded with the saga)")
    retry.add_argument("--json", action="store_true", help="print the RetryCompensationResponse as JSON")
    retry.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then wait at most this long for the saga to end; the exit status is then 0 only if it "
        "ended COMPENSATED (or ABORTED)",
    )
    add_target_arguments(retry)
    retry.set_defaults(func=run_retry_compensation)

    resolve = sub.add_parser(
        "resolve",
        help="close a FAILED_COMPENSATION saga by hand",
        description="Mark a FAILED_COMPENSATION saga RESOLVED_MANUALLY (terminal; no participant is "
        "called). Recorded with your identity and the reason.",
    )
    resolve.add_argument("saga_id")
    resolve.add_argument("--reason", required=True, help="why the saga may be closed (required)")
    resolve.add_argument("--json", action="store_true", help="print the ResolveSagaResponse as JSON")
    add_target_arguments(resolve)
    resolve.set_defaults(func=run_resolve)

    watch = sub.add_parser(
        "watch", help="follow a saga", description="Print each transition until the saga ends."
    )
    watch.add_argument("saga_id")
    watch.add_argument("--json", action="store_true", help="one WatchSagaResponse per transition and line")
    add_target_arguments(watch)
    watch.set_defaults(func=run_watch)


def _add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="SagaDefinition as YAML or JSON (protobuf JSON mapping)")
    parser.add_argument("--json", action="store_true", help="print the RegisterDefinitionResponse as JSON")
    add_target_arguments(parser)
    parser.set_defaults(func=run_define)


def _add_wait_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="answer once the saga has ended, waiting at most this long; "
        "the exit status is then 0 only if it COMPLETED",
    )


def _wait_of(args: argparse.Namespace) -> duration_pb2.Duration | None:
    """The request's wait, or None without --wait; the call's deadline grows by as much."""
    if args.wait < 0 or args.wait > MAX_WAIT_SECONDS:
        raise CliError(f"--wait: between 0 and {MAX_WAIT_SECONDS:.0f} seconds")
    if not args.wait:
        return None
    wait = duration_pb2.Duration()
    wait.FromNanoseconds(int(args.wait * 1e9))
    return wait


def _exit_status(saga: saga_pb2.Saga, waited: bool) -> int:
    """With --wait, 0 only for a COMPLETED saga (a script can branch on the outcome)."""
    return 0 if not waited or saga.state == saga_pb2.SAGA_STATE_COMPLETED else 1


def _read_definition(path: str) -> saga_pb2.SagaDefinition:
    """A SagaDefinition from a JSON or YAML file (JSON is YAML, but its errors read better as JSON)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from exc
    value: object
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"{path}: bad JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CliError(f"{path}: bad YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(value, dict):
        raise CliError(f"{path}: expected a SagaDefinition object, got {type(value).__name__}")
    try:
        return json_format.ParseDict(value, saga_pb2.SagaDefinition())
    except json_format.ParseError as exc:
        raise CliError(f"{path}: {exc}") from exc


def _print_saga(saga: saga_pb2.Saga) -> None:
    print(f"saga {saga.saga_id}  {saga.definition_name} v{saga.definition_version}  {state_name(saga.state)}")
    if saga.error:
        print(f"error: {saga.error}")
    print_table(
        ["step", "state", "attempts", "compensations", "error"],
        [
            [s.name, step_state_name(s.state), s.attempts, s.compensation_attempts, s.error or "-"]
            for s in saga.steps
        ],
    )
    for action in saga.operator_actions:
        step = f" step {action.step}" if action.step else ""
        who = action.identity or "(unauthenticated)"
        print(f"{action.time.ToJsonString()}  {action.kind}{step} by {who}: {action.reason or '-'}")


def run_define(args: argparse.Namespace) -> int:
    """Run `rpcmesh saga define FILE`."""
    target = target_of(args)
    definition = _read_definition(args.file)
    with target.channel() as channel:
        response = saga_pb2_grpc.SagaCoordinatorStub(channel).RegisterDefinition(
            saga_pb2.RegisterDefinitionRequest(definition=definition), timeout=target.timeout
        )
    if args.json:
        print_json(response)
    else:
        print(f"{response.definition.name}\tv{response.definition.version}")
    return 0


def run_definitions_list(args: argparse.Namespace) -> int:
    """Run `rpcmesh saga definitions list`."""
    target = target_of(args)
    merged = saga_pb2.ListDefinitionsResponse()
    with target.channel() as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        for page in pages(
            lambda token: stub.ListDefinitions(
                saga_pb2.ListDefinitionsRequest(page_size=500, page_token=token), timeout=target.timeout
            )
        ):
            merged.definitions.extend(page.definitions)
    if args.json:
        print_json(merged)
    else:
        print_table(
            ["definition", "version", "steps"],
            [[d.name, d.version, " > ".join(step.name for step in d.steps)] for d in merged.definitions],
        )
    return 0


def run_definitions_show(args: argparse.Namespace) -> int:
    """Run `rpcmesh saga definitions show NAME`."""
    target = target_of(args)
    with target.channel() as channel:
        response = saga_pb2_grpc.SagaCoordinatorStub(channel).GetDefinition(
            saga_pb2.GetDefinitionRequest(name=args.name, version=args.version), timeout=target.timeout
        )
    if args.json:
        print_json(response)
        return 0
    definition = response.definition
    print(f"definition {definition.name} v{definition.version}")
    print_table(
        ["step", "service", "method", "compensation", "timeout", "attempts"],
        [
            [
                step.name,
                step.service,
                step.method,
                step.compensation_method or "-",
                step.timeout.ToJsonString() if step.HasField("timeout") else "-",
                step.retry.max_attempts or "-",
            ]
            for step in definition.steps
        ],
    )
    return 0


def run_start(args: argparse.Namespace) -> int:
    """Run `rpcmesh saga start NAME`."""
    target = target_of(args)
    if bool(args.definition) == bool(args.definition_file):
        raise CliError("give a definition name or --definition-file (one of them)")
    request = saga_pb2.StartSagaRequest(
        definition_version=args.version,
        input=payload_bytes(args.data, args.data_file, json_expected=False, what="input"),
        idempotency_key=args.key,
    )
    if args.definition_file:
        request.definition.CopyFrom(_read_definition(args.definition_file))
    else:
        request.definition_name = args.definition
    wait = _wait_of(args)
    if wait is not None:
        request.wait.CopyFrom(wait)
    with target.channel() as channel:
        response = saga_pb2_grpc.SagaCoordinatorStub(channel).StartSaga(
            request, timeout=target.timeout + args.wait
        )
    if args.json:
        print_json(response)
    else:
        print(
            f"{response.saga.saga_id}\t{state_name(response.saga.state)}"
            + ("" if response.created else "\texisting")
        )
    return _exit_status(response.saga, wait is not None)


def run_status(args: argparse.Namespace) -> int:
    """Run `rpcmesh saga status ID`."""
    target = target_of(args)
    request = saga_pb2.GetSagaRequest(saga_id=args.saga_id)
    wait = _wait_of(args)
    if wait is not None:
        request.wait.CopyFrom(wait)
    with target.channel() as channel:
        response = saga_pb2_grpc.SagaCoordinatorStub(channel).GetSaga(
            request, timeout=target.timeout + args.wait
        )
    if args.json:
        print_json(response)
    else:
        _print_saga(response.saga)
    return _exit_status(response.saga, wait is not None)


def run_list(args: argparse.Namespace) -> int:
    """Run `rpcmesh saga list`."""
    target = target_of(args)
    states = []
    for name in args.state or []:
        try:
            states.append(saga_pb2.SagaState.Value(f"SAGA_STATE_{name.upper()}"))
        except ValueError as exc:
            raise CliError(f"--state: unknown state {name!r}") from exc
    merged = saga_pb2.ListSagasResponse()
    sagas = merged.sagas
    token = ""
    with target.channel() as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        while len(sagas) < args.limit:
            page = stub.ListSagas(
                saga_pb2.ListSagasRequest(
                    states=states,
                    definition_name=args.definition,
                    page_size=min(args.limit - len(sagas), 500),
                    page_token=token,
                ),
                timeout=target.timeout,
            )
            sagas.extend(page.sagas)
            token = page.next_page_token
            if not token:
                break
    if args.json:
        print_json(merged)
    else:
        print_table(
            ["saga", "definition", "state", "started"],
            [
                [
                    s.saga_id,
                    f"{s.definition_name} v{s.definition_version}",
                    state_name(s.state),
                    s.started_at.ToJsonString(),
                ]
                for s in sagas
            ],
        )
    return 0


def run_abort(args: argparse.Namespace) -> int:
    """Run `rpcmesh saga abort ID`."""
    target = target_of(args)
    with target.channel() as channel:
        response = saga_pb2_grpc.SagaCoordinatorStub(channel).AbortSaga(
            saga_pb2.AbortSagaRequest(saga_id=args.saga_id, reason=args.reason), timeout=target.timeout
        )
    if args.json:
        print_json(response)
    else:
        print(f"{response.saga.saga_id}\t{state_name(response.saga.state)}")
    return 0


def run_retry_compensation(args: argparse.Namespace) -> int:
    """Run `rpcmesh saga retry-compensation ID`; with --wait, exit 0 only once it is COMPENSATED/ABORTED."""
    target = target_of(args)
    wait = _wait_of(args)
    with target.channel() as channel:
        stub = saga_pb2_grpc.SagaCoordinatorStub(channel)
        response = stub.RetryCompensation(
            saga_pb2.RetryCompensationRequest(saga_id=args.saga_id, reason=args.reason),
            timeout=target.timeout,
        )
        saga = response.saga
        if wait is not None:
            saga = stub.GetSaga(
                saga_pb2.GetSagaRequest(saga_id=args.saga_id, wait=wait), timeout=target.timeout + args.wait
            ).saga
    if args.json:
        print_json(response if wait is None else saga_pb2.GetSagaResponse(saga=saga))
    else:
        print(f"{saga.saga_id}\t{state_name(saga.state)}")
    if wait is None:
        return 0
    return 0 if saga.state in (saga_pb2.SAGA_STATE_COMPENSATED, saga_pb2.SAGA_STATE_ABORTED) else 1


def run_resolve(args: argparse.Namespace) -> int:
    """Run `rpcmesh saga resolve ID --reason TEXT`."""
    if not args.reason.strip():
        raise CliError("--reason: required: say why the saga may be closed")
    target = target_of(args)
    with target.channel() as channel:
        response = saga_pb2_grpc.SagaCoordinatorStub(channel).ResolveSaga(
            saga_pb2.ResolveSagaRequest(saga_id=args.saga_id, reason=args.reason), timeout=target.timeout
        )
    if args.json:
        print_json(response)
    else:
        print(f"{response.saga.saga_id}\t{state_name(response.saga.state)}")
    return 0


def run_watch(args: argparse.Namespace) -> int:
    """Run `rpcmesh saga watch ID`."""
    target = target_of(args)
    with target.channel() as channel:
        for response in saga_pb2_grpc.SagaCoordinatorStub(channel).WatchSaga(
            saga_pb2.WatchSagaRequest(saga_id=args.saga_id)
        ):
            transition = response.transition
            if args.json:
                print_json(response)
            else:
                print(
                    f"{transition.time.ToJsonString()}\t{state_name(transition.state)}\t{transition.kind}"
                    f"\t{transition.step or '-'}" + (f"\t{transition.detail}" if transition.detail else ""),
                    flush=True,
                )
            if response.saga.state in TERMINAL_STATES:
                break
    return 0
