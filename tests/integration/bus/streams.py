"""A thin test driver for the raw Subscribe stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from rpcmesh.v1 import bus_pb2, bus_pb2_grpc


class RawSubscriber:
    """Drives one Subscribe stream by hand."""

    def __init__(self, stub: bus_pb2_grpc.BusStub, options: bus_pb2.SubscriptionOptions) -> None:
        self._requests: asyncio.Queue[bus_pb2.SubscribeRequest | None] = asyncio.Queue()
        self._requests.put_nowait(bus_pb2.SubscribeRequest(open=options))
        self.call = stub.Subscribe(self._iterate())
        self._responses: asyncio.Queue[bus_pb2.SubscribeResponse | BaseException] = asyncio.Queue()
        self._pump = asyncio.ensure_future(self._read_all())

    async def _read_all(self) -> None:
        try:
            async for response in self.call:
                self._responses.put_nowait(response)
            self._responses.put_nowait(EOFError("stream ended"))
        except BaseException as exc:
            self._responses.put_nowait(exc)

    async def _next(self) -> bus_pb2.SubscribeResponse:
        item = await self._responses.get()
        if isinstance(item, BaseException):
            self._responses.put_nowait(item)
            raise item
        return item

    async def _iterate(self) -> AsyncIterator[bus_pb2.SubscribeRequest]:
        while True:
            item = await self._requests.get()
            if item is None:
                return
            yield item

    async def opened(self) -> None:
        first = await asyncio.wait_for(self._next(), 10)
        assert first.opened

    async def receive(self, count: int, within: float = 10.0) -> list[bus_pb2.Delivery]:
        got: list[bus_pb2.Delivery] = []
        async with asyncio.timeout(within):
            while len(got) < count:
                response = await self._next()
                got.extend(response.deliveries)
        return got

    async def nothing(self, wait: float = 0.5) -> list[bus_pb2.Delivery]:
        """Deliveries arriving within ``wait`` (expected none)."""
        try:
            async with asyncio.timeout(wait):
                response = await self._next()
                return list(response.deliveries)
        except TimeoutError:
            return []

    @staticmethod
    def refs(deliveries: list[bus_pb2.Delivery]) -> list[bus_pb2.MessageRef]:
        return [bus_pb2.MessageRef(topic=d.message.topic, sequence=d.message.sequence) for d in deliveries]

    def ack(self, deliveries: list[bus_pb2.Delivery]) -> None:
        self._requests.put_nowait(bus_pb2.SubscribeRequest(ack=bus_pb2.Ack(refs=self.refs(deliveries))))

    def nak(self, deliveries: list[bus_pb2.Delivery], delay_ms: int = 0, error: str = "") -> None:
        nak = bus_pb2.Nak(refs=self.refs(deliveries), error=error)
        if delay_ms:
            nak.delay.FromMilliseconds(delay_ms)
        self._requests.put_nowait(bus_pb2.SubscribeRequest(nak=nak))

    def term(self, deliveries: list[bus_pb2.Delivery], reason: str) -> None:
        self._requests.put_nowait(
            bus_pb2.SubscribeRequest(term=bus_pb2.Term(refs=self.refs(deliveries), reason=reason))
        )

    def send(self, request: bus_pb2.SubscribeRequest) -> None:
        self._requests.put_nowait(request)

    async def close(self) -> None:
        self._requests.put_nowait(None)
        self.call.cancel()
        self._pump.cancel()
        with contextlib.suppress(BaseException):
            await self._pump


def options(
    topic: str,
    group: str = "g",
    *,
    earliest: bool = True,
    broadcast: bool = False,
    ack_deadline_ms: int = 0,
    max_deliveries: int = 0,
    backoff_ms: int = 0,
    max_in_flight: int = 0,
) -> bus_pb2.SubscriptionOptions:
    opts = bus_pb2.SubscriptionOptions(
        topic=topic,
        group="" if broadcast else group,
        mode=bus_pb2.DELIVERY_MODE_BROADCAST if broadcast else bus_pb2.DELIVERY_MODE_GROUP,
        max_deliveries=max_deliveries,
        max_in_flight=max_in_flight,
    )
    if earliest:
        opts.start.earliest = True
    else:
        opts.start.new_only = True
    if ack_deadline_ms:
        opts.ack_deadline.FromMilliseconds(ack_deadline_ms)
    if backoff_ms:
        opts.redelivery_backoff.FromMilliseconds(backoff_ms)
    return opts
