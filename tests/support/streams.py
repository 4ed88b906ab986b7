"""Client-streaming calls in tests, read to their status without racing the server's refusal.

grpc.aio reports INTERNAL ("Failed execute_batch") instead of the server's status when a
request write or the half-close reaches the call just as the server ends it (the core refuses the
batch and ``_write`` records that as the call's status). A server that refuses a call when it
arrives (authentication) or right after its first message (authorization of a stream's open)
therefore looks flaky to a client that writes from an iterator. :func:`stream_status` writes
only what the server reads before it can refuse, never half-closes, and reads to the end.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc
import grpc.aio


class StreamMethod(Protocol):
    """A stub's stream-request method, called in the reader/writer style."""

    def __call__(self, *, timeout: float) -> Any: ...


async def stream_status(
    method: StreamMethod, first: object | None = None, *, deadline: float = 10.0
) -> grpc.StatusCode:
    """The status a stream-request call ends with.

    Pass ``first`` when the server refuses only after reading it (it has then been sent in full);
    leave it out when the refusal comes at admission, before any message is read.
    """
    call = method(timeout=deadline)
    try:
        if first is not None:
            await call.write(first)
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        call.cancel()
    code = await call.code()
    assert isinstance(code, grpc.StatusCode)
    return code
