"""The rpcmesh.v1.SagaCoordinator gRPC servicer over a SagaEngine."""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc.aio

from rpcmesh.controlplane.eventstore.model import (
    clamp_page_size,
    decode_page_token,
    encode_page_token,
)
from rpcmesh.controlplane.saga.definition import validate_definition
from rpcmesh.controlplane.saga.engine import SagaEngine
from rpcmesh.controlplane.saga.machine import SagaView, transition_kind
from rpcmesh.controlplane.saga.operator import MAX_REASON, resolve_saga, retry_compensation
from rpcmesh.controlplane.saga.records import view_to_proto
from rpcmesh.controlplane.saga.tracing import start_context
from rpcmesh.errors import invalid_argument
from rpcmesh.security.guard import ANONYMOUS, authorize, current_identity, may
from rpcmesh.security.policy import Access, Action
from rpcmesh.telemetry import get_telemetry
from rpcmesh.v1 import saga_pb2 as pb
from rpcmesh.v1 import saga_pb2_grpc as pb_grpc

MAX_IDEMPOTENCY_KEY = 256
MAX_LABELS = 64
MAX_LABEL_BYTES = 256
MAX_WAIT_SECONDS = 3600
# A GetSaga long poll answers this long before the caller's deadline, so the answer arrives in time.
DEADLINE_MARGIN_SECONDS = 0.05


def _page_size(field: str, value: int) -> int:
    if value < 0:
        raise invalid_argument(field, "must be between 0 and 1000")
    return clamp_page_size(value)


def _encode_saga_token(scope: str, last: SagaView) -> str:
    """An opaque ListSagas token: the filters, and the place in the order of the last saga returned.

    The next page starts strictly after that saga in the list's order (``started_at`` descending,
    then ``saga_id``) rather than at an offset, so sagas that start, finish or are aborted between
    pages cause no saga that still matches the filters to be skipped or listed twice.
    """
    body = {"k": "sagas", "s": scope, "t": last.started_at, "i": last.saga_id}
    raw = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_saga_token(token: str, scope: str) -> tuple[float, str]:
    """The ``(started_at, saga_id)`` a token resumes after; INVALID_ARGUMENT naming ``page_token``."""
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, binascii.Error, RecursionError) as exc:
        raise invalid_argument("page_token", "malformed page token") from exc
    if not isinstance(body, dict) or body.get("k") != "sagas":
        raise invalid_argument("page_token", "not a token returned by ListSagas")
    if body.get("s") != scope:
        raise invalid_argument("page_token", "the token belongs to a listing with other filters")
    started_at, saga_id = body.get("t"), body.get("i")
    if (
        not isinstance(started_at, (int, float))
        or isinstance(started_at, bool)
        or not math.isfinite(started_at)
        or not isinstance(saga_id, str)
    ):
        raise invalid_argument("page_token", "malformed page token")
    return float(started_at), saga_id


def _timestamp_seconds(ts: Any) -> float:
    return float(ts.seconds + ts.nanos / 1e9)


# google.protobuf.Timestamp's valid range: 0001-01-01 to 9999-12-31, nanos in [0, 1e9).
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def _check_timestamp(field: str, ts: Any) -> None:
    if not 0 <= ts.nanos < 1_000_000_000:
        raise invalid_argument(f"{field}.nanos", "must be in [0, 999999999]")
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS:
        raise invalid_argument(f"{field}.seconds", "outside the Timestamp range 0001-01-01 to 9999-12-31")


def _wait_seconds(wait: Any, context: grpc.aio.ServicerContext[Any, Any]) -> float:
    """GetSagaRequest.wait in seconds, validated, ending before the caller's deadline."""
    if wait.seconds < 0 or not 0 <= wait.nanos < 1_000_000_000:
        raise invalid_argument("wait", "must be a non-negative duration")
    seconds = float(wait.seconds + wait.nanos / 1e9)
    if seconds > MAX_WAIT_SECONDS:
        raise invalid_argument("wait", f"at most {MAX_WAIT_SECONDS} seconds")
    remaining = context.time_remaining()
    if remaining is not None:
        # Answer with the saga as it is just before the caller's deadline rather than let it expire.
        seconds = min(seconds, max(0.0, remaining - DEADLINE_MARGIN_SECONDS))
    return seconds


def _authorize_calls(definition: pb.SagaDefinition) -> None:
    """No confused deputy: the coordinator calls only what the defining identity may have it call."""
    targets: dict[str, None] = {}
    for step in definition.steps:
        for method in (step.method, step.compensation_method):
            if method:  # "/package.Service/Method": the policy names the method by its last part
                targets[f"{step.service}/{method.rsplit('/', 1)[-1]}"] = None
    authorize(*(Access(Action.CALL, target) for target in targets))


def _starter() -> str:
    identity = current_identity.get()
    return "" if identity is None or identity is ANONYMOUS else identity.name


def _may_see(view: SagaView) -> bool:
    return may(Access(Action.SAGA, view.definition.name))


def _authorize_saga(view: SagaView) -> None:
    """Per object: the caller may act on this saga only if its policy covers the saga's definition."""
    authorize(Access(Action.SAGA, view.definition.name))


class SagaCoordinatorServicer(pb_grpc.SagaCoordinatorServicer):
    """Serves rpcmesh.v1.SagaCoordinator."""

    def __init__(self, engine: SagaEngine | None = None) -> None:
        self.engine: SagaEngine | None = engine
        # Several nodes on one store: tells the driving node a follower recorded something.
        self.nudge: Callable[[], Awaitable[None]] | None = None

    def _engine(self) -> SagaEngine:
        assert self.engine is not None, "the SagaCoordinator component was not started"
        return self.engine

    async def RegisterDefinition(
        self, request: pb.RegisterDefinitionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterDefinitionResponse:
        """Store a definition as its next version."""
        if not request.HasField("definition"):
            raise invalid_argument("definition", "required")
        _authorize_calls(request.definition)
        stored = await self._engine().definitions.register(request.definition)
        return pb.RegisterDefinitionResponse(definition=stored)

    async def GetDefinition(
        self, request: pb.GetDefinitionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetDefinitionResponse:
        """One version of a definition (0: latest)."""
        if not request.name:
            raise invalid_argument("name", "required")
        if request.version < 0:
            raise invalid_argument("version", "must be >= 0")
        await self._engine().definitions.sync(request.name, request.version)
        return pb.GetDefinitionResponse(
            definition=self._engine().definitions.get(request.name, request.version)
        )

    async def ListDefinitions(
        self, request: pb.ListDefinitionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListDefinitionsResponse:
        """Latest versions by name, paginated."""
        limit = _page_size("page_size", request.page_size)
        definitions = self._engine().definitions.latest()
        start = 0
        if request.page_token:
            try:
                start = decode_page_token(request.page_token, "defs", "")
            except ValueError as exc:
                raise invalid_argument("page_token", str(exc)) from exc
        page = definitions[start : start + limit]
        token = encode_page_token("defs", "", start + limit) if start + limit < len(definitions) else ""
        return pb.ListDefinitionsResponse(definitions=page, next_page_token=token)

    async def StartSaga(
        self, request: pb.StartSagaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StartSagaResponse:
        """Start (or, for a known idempotency key, return) a saga; with ``wait``, answer once it ended."""
        engine = self._engine()
        which = request.WhichOneof("definition_ref")
        if which == "definition":
            validate_definition(request.definition)
            _authorize_calls(request.definition)
            definition = request.definition
        elif which == "definition_name":
            if request.definition_version < 0:
                raise invalid_argument("definition_version", "must be >= 0")
            await engine.definitions.sync(request.definition_name, request.definition_version)
            definition = engine.definitions.get(
                request.definition_name, request.definition_version, "definition_name"
            )
        else:
            raise invalid_argument("definition_name", "set definition_name or an inline definition")
        wait = _wait_seconds(request.wait, context) if request.HasField("wait") else 0.0
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise invalid_argument("idempotency_key", f"at most {MAX_IDEMPOTENCY_KEY} characters")
        if len(request.labels) > MAX_LABELS:
            raise invalid_argument("labels", f"at most {MAX_LABELS} labels")
        for key, value in request.labels.items():
            if not key or len(key) + len(value) > MAX_LABEL_BYTES:
                raise invalid_argument(
                    f"labels[{key}]", f"key required; key and value at most {MAX_LABEL_BYTES}"
                )
        metadata = {
            key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
        }
        trace_context, correlation = start_context(metadata, engine.telemetry or get_telemetry())
        view, created = await engine.start_saga(
            definition,
            request.input,
            idempotency_key=request.idempotency_key,
            labels=dict(request.labels),
            trace_context=trace_context,
            correlation_id=correlation,
            started_by=_starter(),
        )
        if created and self.nudge is not None:
            await self.nudge()  # before waiting: the driving node (if another) starts it now
        view = await engine.wait_finished(view.saga_id, wait)
        return pb.StartSagaResponse(saga=view_to_proto(view), created=created)

    async def GetSaga(
        self, request: pb.GetSagaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetSagaResponse:
        """One saga; with ``wait``, once it has ended or the wait is over (long poll)."""
        if not request.saga_id:
            raise invalid_argument("saga_id", "required")
        wait = _wait_seconds(request.wait, context) if request.HasField("wait") else 0.0
        engine = self._engine()
        _authorize_saga(await engine.fetch_saga(request.saga_id))
        view = await engine.wait_finished(request.saga_id, wait)
        return pb.GetSagaResponse(saga=view_to_proto(view))

    async def ListSagas(
        self, request: pb.ListSagasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSagasResponse:
        """Sagas matching the filters, newest first, paginated."""
        limit = _page_size("page_size", request.page_size)
        for index, state in enumerate(request.states):
            if state not in pb.SagaState.values() or state == pb.SAGA_STATE_UNSPECIFIED:
                raise invalid_argument(f"states[{index}]", "unknown saga state")
        for name in ("started_after", "started_before"):
            _check_timestamp(name, getattr(request, name))
        scope = json.dumps(
            [
                sorted(request.states),
                request.definition_name,
                request.started_after.ToNanoseconds(),
                request.started_before.ToNanoseconds(),
            ]
        )
        after = _decode_saga_token(request.page_token, scope) if request.page_token else None
        states = set(request.states)
        lower = _timestamp_seconds(request.started_after) if request.HasField("started_after") else None
        upper = _timestamp_seconds(request.started_before) if request.HasField("started_before") else None

        def keep(view: SagaView) -> bool:
            return (
                (not states or view.state in states)
                and (not request.definition_name or view.definition.name == request.definition_name)
                and (lower is None or view.started_at >= lower)
                and (upper is None or view.started_at < upper)
            )

        # Keyset paging: resume strictly after the last saga of the previous page in the list's
        # order, whatever started, finished or was aborted since (an offset would skip or repeat).
        matching = [view for view in self._engine().list_sagas(after) if keep(view) and _may_see(view)]
        page = matching[:limit]
        token = _encode_saga_token(scope, page[-1]) if len(matching) > limit else ""
        return pb.ListSagasResponse(sagas=[view_to_proto(v) for v in page], next_page_token=token)

    async def WatchSaga(
        self, request: pb.WatchSagaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchSagaResponse]:
        """Every transition from the start, then live ones, until the saga ends."""
        if not request.saga_id:
            raise invalid_argument("saga_id", "required")
        _authorize_saga(await self._engine().fetch_saga(request.saga_id))
        async for event, view in self._engine().watch(request.saga_id):
            transition = pb.SagaTransition(
                kind=transition_kind(event.kind),
                step=str(event.data.get("step", "")),
                state=view.state,  # type: ignore[arg-type]
                detail=str(event.data.get("error") or event.data.get("reason") or ""),
            )
            transition.time.FromNanoseconds(int(event.time * 1e9))
            yield pb.WatchSagaResponse(transition=transition, saga=view_to_proto(view))

    async def AbortSaga(
        self, request: pb.AbortSagaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AbortSagaResponse:
        """Stop a running saga; its completed steps are compensated."""
        if not request.saga_id:
            raise invalid_argument("saga_id", "required")
        engine = self._engine()
        _authorize_saga(await engine.fetch_saga(request.saga_id))
        view = await engine.abort_saga(request.saga_id, request.reason or "aborted by request")
        if self.nudge is not None:
            await self.nudge()
        return pb.AbortSagaResponse(saga=view_to_proto(view))

    async def RetryCompensation(
        self, request: pb.RetryCompensationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RetryCompensationResponse:
        """Compensate a FAILED_COMPENSATION saga again from the failed step (fresh attempt budget)."""
        if not request.saga_id:
            raise invalid_argument("saga_id", "required")
        if len(request.reason) > MAX_REASON:
            raise invalid_argument("reason", f"at most {MAX_REASON} characters")
        engine = self._engine()
        _authorize_saga(await engine.fetch_saga(request.saga_id))
        view = await retry_compensation(
            engine, request.saga_id, reason=request.reason or "retried by request", by=_starter()
        )
        if self.nudge is not None:
            await self.nudge()
        return pb.RetryCompensationResponse(saga=view_to_proto(view))

    async def ResolveSaga(
        self, request: pb.ResolveSagaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ResolveSagaResponse:
        """Close a FAILED_COMPENSATION saga by hand (RESOLVED_MANUALLY), with the reason recorded."""
        if not request.saga_id:
            raise invalid_argument("saga_id", "required")
        if not request.reason.strip():
            raise invalid_argument("reason", "required: say why the saga may be closed")
        if len(request.reason) > MAX_REASON:
            raise invalid_argument("reason", f"at most {MAX_REASON} characters")
        engine = self._engine()
        _authorize_saga(await engine.fetch_saga(request.saga_id))
        view = await resolve_saga(engine, request.saga_id, reason=request.reason, by=_starter())
        if self.nudge is not None:
            await self.nudge()
        return pb.ResolveSagaResponse(saga=view_to_proto(view))
