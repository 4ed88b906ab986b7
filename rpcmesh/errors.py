"""One exception tree for rpcmesh, and the boundary that maps it to and from gRPC status.

Every error rpcmesh raises derives from :class:`RpcMeshError`. Errors that carry
a gRPC status are :class:`StatusError` subclasses chosen by :func:`from_status`,
so callers can ``except NotFoundError`` instead of comparing codes. Servers raise
the same classes from handlers; :class:`StatusErrorInterceptor` turns them into
the precise status, with ``google.rpc`` rich details, at one boundary.

On the client side the mesh channel (aio and sync) raises :class:`RpcStatusError`
subclasses, made by :func:`to_rpc_status_error` at the channel's one boundary:
each is the rpcmesh class for its code (``NotFoundError`` ...) *and* a
``grpc.aio.AioRpcError`` (so a ``grpc.RpcError``), so code written against plain
gRPC keeps working.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, ClassVar, cast

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RpcMeshError",
    "RpcStatusError",
    "StatusError",
    "StatusErrorInterceptor",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "from_rpc_error",
    "from_status",
    "invalid_argument",
    "map_status_errors",
    "rpc_status_error_class",
    "to_rpc_status_error",
]


class RpcMeshError(Exception):
    """Root of every exception rpcmesh raises."""


class StatusError(RpcMeshError):
    """An error with a gRPC status code, message and rich details.

    Attributes:
        code: The gRPC status code.
        message: Human-readable message; for bad input it names the field.
        details: ``google.rpc`` detail messages (BadRequest, ErrorInfo, ...) or
            rpcmesh messages such as ``WrongExpectedVersion``.
    """

    CODE: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, details: Sequence[Message] = ()
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code or self.CODE
        self.message = message
        self.details: tuple[Message, ...] = tuple(details)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def detail(self, kind: type[Message]) -> Message | None:
        """Return the first detail of the given message type, if any."""
        for item in self.details:
            if isinstance(item, kind):
                return item
        return None

    def to_rpc_status(self) -> grpc.Status:
        """Encode as a grpc.Status for ``context.abort_with_status``."""
        packed = []
        for item in self.details:
            any_msg = any_pb2.Any()
            any_msg.Pack(item)
            packed.append(any_msg)
        proto = status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        status: grpc.Status = rpc_status.to_status(proto)
        return status


class InvalidArgumentError(StatusError):
    """Bad input; the message names the field."""

    CODE = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(StatusError):
    """The named resource does not exist (or no longer does)."""

    CODE = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(StatusError):
    """The resource exists already with other settings."""

    CODE = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(StatusError):
    """The caller may not do this (wrong lease token, policy)."""

    CODE = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(StatusError):
    """Missing or invalid credentials."""

    CODE = grpc.StatusCode.UNAUTHENTICATED


class FailedPreconditionError(StatusError):
    """The system is not in the state the call requires (e.g. wrong expected version)."""

    CODE = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(StatusError):
    """A concurrency conflict; retrying the whole operation may succeed."""

    CODE = grpc.StatusCode.ABORTED


class OutOfRangeError(StatusError):
    """A position or revision outside what is retained."""

    CODE = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhaustedError(StatusError):
    """A size, rate or quota limit was hit."""

    CODE = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(StatusError):
    """No endpoint could take the call (transient)."""

    CODE = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(StatusError):
    """The call's deadline passed."""

    CODE = grpc.StatusCode.DEADLINE_EXCEEDED


class UnimplementedError(StatusError):
    """The method is not served."""

    CODE = grpc.StatusCode.UNIMPLEMENTED


class InternalError(StatusError):
    """A server-side invariant broke."""

    CODE = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[StatusError]] = {
    cls.CODE: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        UnauthenticatedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        UnimplementedError,
        InternalError,
    )
}
_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
_DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.BadRequest,
    error_details_pb2.ErrorInfo,
    error_details_pb2.RetryInfo,
    error_details_pb2.ResourceInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.QuotaFailure,
)


def from_status(code: grpc.StatusCode, message: str, details: Sequence[Message] = ()) -> StatusError:
    """Build the StatusError subclass that matches ``code``."""
    cls = _BY_CODE.get(code, StatusError)
    return cls(message, code=code, details=details)


def register_detail_type(kind: type[Message]) -> None:
    """Let :func:`from_rpc_error` unpack another detail message type."""
    global _DETAIL_TYPES
    if kind not in _DETAIL_TYPES:
        _DETAIL_TYPES = (*_DETAIL_TYPES, kind)


def _unpack_details(trailing: Iterable[tuple[str, Any]]) -> list[Message]:
    details: list[Message] = []
    for key, value in trailing:
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for packed in status.details:
            for kind in _DETAIL_TYPES:
                if packed.Is(kind.DESCRIPTOR):
                    item = kind()
                    packed.Unpack(item)
                    details.append(item)
                    break
    return details


def from_rpc_error(error: grpc.RpcError) -> StatusError:
    """Map a grpc.RpcError (sync or aio) to a StatusError, unpacking rich details.

    The result is a plain StatusError, whose ``.code`` is the ``grpc.StatusCode`` member itself (callers
    compare it with ``is``), also for an :class:`RpcStatusError` the mesh channel raised.
    """
    if isinstance(error, RpcStatusError):
        return from_status(cast(Any, error).code(), error.message, tuple(error.details))
    call = cast(Any, error)  # both grpc.Call and grpc.aio.AioRpcError have these methods
    code: grpc.StatusCode = call.code()
    message: str = call.details() or ""
    details = _unpack_details(call.trailing_metadata() or ())
    mapped = from_status(code, message, details)
    return mapped


class _CallableStatusCode:
    """A status code that can also be called, like ``grpc.RpcError.code()``.

    It compares, hashes and reads (``.name``, ``.value``) like the ``grpc.StatusCode`` it stands for.
    """

    __slots__ = ("_code",)

    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def __call__(self) -> grpc.StatusCode:
        return self._code

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _CallableStatusCode):
            return self._code is other._code
        if isinstance(other, grpc.StatusCode):
            return self._code is other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._code)

    @property
    def name(self) -> str:
        """The code's name, e.g. ``"NOT_FOUND"``."""
        return self._code.name

    @property
    def value(self) -> tuple[int, str]:
        """The code's value, as ``grpc.StatusCode.value``: ``(5, "not found")``."""
        return self._code.value

    def __repr__(self) -> str:
        return repr(self._code)

    def __str__(self) -> str:
        return str(self._code)


class _CallableDetails(tuple[Message, ...]):
    """The rich detail messages (a tuple) that, called like ``grpc.RpcError.details()``, give the message."""

    _message: str

    def __new__(cls, details: Sequence[Message], message: str) -> _CallableDetails:
        made = super().__new__(cls, details)
        made._message = message
        return made

    def __call__(self) -> str:
        return self._message


class RpcStatusError(StatusError, grpc.aio.AioRpcError):  # type: ignore[misc]  # see the docstring
    """A failed call as the mesh channel raises it: a StatusError that is also a ``grpc.aio.AioRpcError``.

    ``except NotFoundError``, ``except grpc.RpcError`` and ``except grpc.aio.AioRpcError`` all catch
    it: each status code has its own subclass deriving from the rpcmesh class for the code (see
    :func:`rpc_status_error_class`), and codes without one (CANCELLED, UNKNOWN, DATA_LOSS) use this class.

    Names that StatusError and grpc both define serve both, so neither kind of caller notices:

    * ``code`` is the status code (``err.code == grpc.StatusCode.NOT_FOUND``, ``err.code.name``) and,
      called, returns the ``grpc.StatusCode`` itself, as grpc's ``err.code()`` does. It is a stand-in,
      not the enum member: compare it with ``==``, not ``is``.
    * ``details`` is the tuple of ``google.rpc`` detail messages and, called, returns the status
      message string, as grpc's ``err.details()`` does (``err.message`` is the same string).
    * ``initial_metadata()``, ``trailing_metadata()`` (with ``grpc-status-details-bin``, so
      :func:`grpc_status.rpc_status.from_call`-style decoding still works) and
      ``debug_error_string()`` are grpc's.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        details: Sequence[Message] = (),
        initial_metadata: grpc.aio.Metadata | None = None,
        trailing_metadata: grpc.aio.Metadata | None = None,
        debug_error_string: str | None = None,
    ) -> None:
        grpc.aio.AioRpcError.__init__(
            self,
            code,
            initial_metadata if initial_metadata is not None else grpc.aio.Metadata(),
            trailing_metadata if trailing_metadata is not None else grpc.aio.Metadata(),
            details=message,
            debug_error_string=debug_error_string,
        )
        self.args = (message,)
        self.code = cast(grpc.StatusCode, _CallableStatusCode(code))
        self.message = message
        self.details = _CallableDetails(details, message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (
                self.code(),  # type: ignore[operator]
                self.message,
                tuple(self.details),
                self.initial_metadata(),
                self.trailing_metadata(),
                self.debug_error_string(),
            ),
        )

    def __str__(self) -> str:
        return StatusError.__str__(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


def _rpc_subclass(base: type[StatusError]) -> type[RpcStatusError]:
    name = base.__name__.removesuffix("Error") + "RpcError"
    made = type(name, (base, RpcStatusError), {"__module__": __name__, "__doc__": f"{base.__doc__}"})
    globals()[name] = made  # importable by name, so the errors pickle
    return cast(type[RpcStatusError], made)


_RPC_BY_CODE: dict[grpc.StatusCode, type[RpcStatusError]] = {
    code: _rpc_subclass(cls) for code, cls in _BY_CODE.items()
}


def rpc_status_error_class(code: grpc.StatusCode) -> type[RpcStatusError]:
    """The RpcStatusError subclass for ``code`` (``NotFoundRpcError`` derives from NotFoundError ...)."""
    return _RPC_BY_CODE.get(code, RpcStatusError)


def _aio_metadata(metadata: Any) -> grpc.aio.Metadata | None:
    if metadata is None or isinstance(metadata, grpc.aio.Metadata):
        return metadata
    return grpc.aio.Metadata(*((key, value) for key, value in metadata))


def _read(error: grpc.RpcError, which: str) -> Any:
    method = getattr(error, which, None)
    if not callable(method):
        return None
    try:
        return method()
    except Exception:  # e.g. an error raised by an interceptor before any call carries no metadata
        return None


def to_rpc_status_error(error: grpc.RpcError) -> RpcStatusError:
    """``error`` (a failed sync or aio call) as the RpcStatusError subclass for its code.

    Code, message, metadata and debug string are kept and the ``google.rpc`` rich details unpacked.
    An RpcStatusError is returned as it is.
    """
    if isinstance(error, RpcStatusError):
        return error
    code = _read(error, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = _read(error, "details")
    if not isinstance(message, str):
        message = "" if code is not grpc.StatusCode.UNKNOWN else str(error)
    trailing = _aio_metadata(_read(error, "trailing_metadata"))
    return rpc_status_error_class(code)(
        code,
        message,
        _unpack_details(trailing or ()),
        _aio_metadata(_read(error, "initial_metadata")),
        trailing,
        _read(error, "debug_error_string"),
    )


def invalid_argument(field: str, description: str) -> InvalidArgumentError:
    """An INVALID_ARGUMENT error naming ``field``, with a google.rpc.BadRequest detail."""
    bad_request = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]
    )
    return InvalidArgumentError(f"{field}: {description}", details=[bad_request])


def status_code_name(value: int) -> str:
    """Name of a google.rpc.Code value, e.g. ``5`` -> ``"NOT_FOUND"``."""
    return str(code_pb2.Code.Name(value)) if value in code_pb2.Code.values() else str(value)


def code_from_value(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode for a numeric google.rpc.Code value."""
    return _CODE_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


Handler = Callable[..., Any]


class StatusErrorInterceptor(grpc.aio.ServerInterceptor):
    """Server boundary: a StatusError raised by a handler becomes its precise status.

    Handlers raise ``invalid_argument("instance.address", "...")`` and the like;
    this interceptor aborts the call with that code, message and rich details,
    for all four RPC shapes. Anything else propagates unchanged (grpc answers
    UNKNOWN). The wrapper of each handler is built once and reused.

    The control plane needs no interceptor for this: its security guard
    (:func:`rpcmesh.security.guard.guard_server`) maps StatusErrors in the same
    wrapper that does the checks.
    """

    _MAX_CACHED = 4096

    def __init__(self) -> None:
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the method's handler so StatusErrors abort with their status."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        cached = self._wrapped.get(id(handler))
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = map_status_errors(handler)
        # Handlers that an earlier interceptor rebuilds per call are not cached (the cache holds them alive).
        if len(self._wrapped) < self._MAX_CACHED:
            self._wrapped[id(handler)] = (handler, wrapped)
        return wrapped


def map_status_errors(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` (any RPC shape) with StatusErrors it raises turned into their precise status."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
    )


async def _abort_with_status_of(error: StatusError, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Abort with ``error``'s status, unless it is a dependency's failure (an RpcStatusError).

    A mesh call's error that escapes a handler is not passed on blindly (a dependency's UNAVAILABLE
    would make this server's callers retry): it propagates like any unexpected exception (UNKNOWN),
    as it did before mesh errors were StatusErrors. To pass it on, raise ``from_rpc_error(exc)``.
    """
    if isinstance(error, RpcStatusError):
        raise error
    await context.abort_with_status(error.to_rpc_status())


def _wrap_unary(behavior: Handler) -> Handler:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except StatusError as exc:
            await _abort_with_status_of(exc, context)

    return wrapped


def _wrap_stream(behavior: Handler) -> Handler:
    if not inspect.isasyncgenfunction(behavior):

        async def wrapped_coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            try:
                await behavior(request, context)
            except StatusError as exc:
                await _abort_with_status_of(exc, context)

        return wrapped_coroutine

    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except StatusError as exc:
            await _abort_with_status_of(exc, context)

    return wrapped
