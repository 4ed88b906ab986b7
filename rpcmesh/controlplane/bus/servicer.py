"""The ``rpcmesh.v1.Bus`` gRPC servicer: validates requests and calls the broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import grpc.aio

from rpcmesh.controlplane.bus import topics
from rpcmesh.controlplane.bus.broker import Broker
from rpcmesh.controlplane.bus.call_context import call_trace_headers, stamp
from rpcmesh.controlplane.bus.dead_letters import check_selection, choose, purge, replay_copies
from rpcmesh.controlplane.bus.group_runtime import Subscription
from rpcmesh.controlplane.bus.store import AppendResult, TopicStats
from rpcmesh.controlplane.bus.validation import (
    BusLimits,
    check_batch,
    check_group,
    check_message,
    check_refs,
    check_topic,
    retention_from_proto,
    subscription_settings,
)
from rpcmesh.errors import (
    AlreadyExistsError,
    NotFoundError,
    StatusError,
    invalid_argument,
)
from rpcmesh.v1 import bus_pb2, bus_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT = 5.0
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

Context = grpc.aio.ServicerContext[object, object]


def _result(result: AppendResult) -> bus_pb2.PublishResult:
    return bus_pb2.PublishResult(id=result.id, sequence=result.sequence, duplicate=result.duplicate)


def _page_size(field: str, value: int) -> int:
    if value < 0:
        raise invalid_argument(field, "must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class BusServicer(bus_pb2_grpc.BusServicer):
    """Serves the Bus contract over a :class:`Broker`."""

    def __init__(self, broker: Broker, limits: BusLimits | None = None) -> None:
        self.broker = broker
        self.limits = limits or BusLimits()

    # -- topics ----------------------------------------------------------------------

    async def _topic_proto(self, stats: TopicStats) -> bus_pb2.Topic:
        topic = bus_pb2.Topic(
            name=stats.name,
            retention=stats.retention.to_proto(),
            last_sequence=stats.last_sequence,
            first_sequence=stats.first_sequence,
            message_count=stats.message_count,
        )
        dead_counts: dict[str, int] = {}
        for group in stats.groups:
            info = await self.broker.describe_group(stats.name, group)
            if info is None:
                info = bus_pb2.ConsumerGroupInfo(name=group, pending=stats.last_sequence)
            dead = dead_counts.get(group)
            if dead is None:
                dead_stats = await self.broker.store.get_topic(topics.dead_letter_topic(stats.name, group))
                dead = dead_stats.message_count if dead_stats is not None else 0
            info.dead_letters = dead
            topic.groups.append(info)
        return topic

    async def CreateTopic(
        self, request: bus_pb2.CreateTopicRequest, context: Context
    ) -> bus_pb2.CreateTopicResponse:
        """Create a topic, or confirm an identical one."""
        check_topic("name", request.name)
        retention = retention_from_proto("retention", request.retention)
        stats, created = await self.broker.create_topic(request.name, retention)
        if not created and stats.retention != retention:
            raise AlreadyExistsError(f"name: topic {request.name!r} exists with other retention settings")
        return bus_pb2.CreateTopicResponse(topic=await self._topic_proto(stats))

    async def GetTopic(self, request: bus_pb2.GetTopicRequest, context: Context) -> bus_pb2.GetTopicResponse:
        """Describe a topic."""
        check_topic("name", request.name, allow_reserved=True)
        stats = await self.broker.store.get_topic(request.name)
        if stats is None:
            raise NotFoundError(f"name: topic {request.name!r} does not exist")
        return bus_pb2.GetTopicResponse(topic=await self._topic_proto(stats))

    async def ListTopics(
        self, request: bus_pb2.ListTopicsRequest, context: Context
    ) -> bus_pb2.ListTopicsResponse:
        """List topics by name."""
        size = _page_size("page_size", request.page_size)
        page = await self.broker.store.list_topics(request.page_token, size + 1)
        response = bus_pb2.ListTopicsResponse()
        for stats in page[:size]:
            response.topics.append(await self._topic_proto(stats))
        if len(page) > size:
            response.next_page_token = page[size - 1].name
        return response

    async def DeleteTopic(
        self, request: bus_pb2.DeleteTopicRequest, context: Context
    ) -> bus_pb2.DeleteTopicResponse:
        """Delete a topic and its messages."""
        check_topic("name", request.name, allow_reserved=True)
        if not await self.broker.store.delete_topic(request.name):
            raise NotFoundError(f"name: topic {request.name!r} does not exist")
        self.broker.forget_topic(request.name)
        return bus_pb2.DeleteTopicResponse()

    # -- publishing ------------------------------------------------------------------

    async def Publish(self, request: bus_pb2.PublishRequest, context: Context) -> bus_pb2.PublishResponse:
        """Store a batch durably; one result per message."""
        problems = check_batch(request.topic, request.messages, self.limits, partial=request.partial)
        stamp(request.messages, call_trace_headers(context.invocation_metadata()))
        results = await self._publish(request.topic, request.messages, problems)
        return bus_pb2.PublishResponse(results=results)

    async def _publish(
        self, topic: str, messages: Sequence[bus_pb2.BusMessage], problems: dict[int, StatusError]
    ) -> list[bus_pb2.PublishResult]:
        """Store the messages without problems; results in request order."""
        if not problems:
            return [_result(r) for r in await self.broker.publish(topic, messages)]
        valid = [message for index, message in enumerate(messages) if index not in problems]
        stored = iter(await self.broker.publish(topic, valid) if valid else [])
        results = []
        for index, message in enumerate(messages):
            problem = problems.get(index)
            if problem is None:
                results.append(_result(next(stored)))
            else:
                results.append(
                    bus_pb2.PublishResult(id=message.id, code=problem.code.value[0], error=problem.message)
                )
        return results

    async def PublishStream(
        self, request_iterator: AsyncIterator[bus_pb2.PublishStreamRequest], context: Context
    ) -> AsyncIterator[bus_pb2.PublishStreamResponse]:
        """Store streamed batches; answer each once durable, in order.

        Batches are appended concurrently (so they share commits) but answered
        in the order they arrived.
        """
        queue: asyncio.Queue[asyncio.Task[bus_pb2.PublishStreamResponse] | None] = asyncio.Queue(maxsize=64)
        call_headers = call_trace_headers(context.invocation_metadata())

        async def store(
            batch: bus_pb2.PublishStreamRequest, problems: dict[int, StatusError]
        ) -> bus_pb2.PublishStreamResponse:
            results = await self._publish(batch.topic, batch.messages, problems)
            return bus_pb2.PublishStreamResponse(batch_id=batch.batch_id, results=results)

        async def read() -> None:
            try:
                async for batch in request_iterator:
                    problems = check_batch(batch.topic, batch.messages, self.limits, partial=batch.partial)
                    stamp(batch.messages, call_headers)
                    await queue.put(asyncio.ensure_future(store(batch, problems)))
            finally:
                await queue.put(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                task = await queue.get()
                if task is None:
                    break
                yield await task
            await reader
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, StatusError):
                await reader
            while not queue.empty():
                leftover = queue.get_nowait()
                if leftover is not None:
                    with contextlib.suppress(Exception):
                        await leftover

    async def PublishEvent(
        self, request: bus_pb2.PublishEventRequest, context: Context
    ) -> bus_pb2.PublishEventResponse:
        """Broadcast an event on ``events.<event_type>``."""
        problem = topics.topic_problem(request.event_type)
        if problem:
            raise invalid_argument("event_type", problem)
        headers = dict(request.headers)
        headers["rpcmesh-event-type"] = request.event_type
        if request.source:
            headers["rpcmesh-event-source"] = request.source
        message = bus_pb2.BusMessage(
            id=request.id, headers=headers, payload=request.data, content_type=request.content_type
        )
        check_message("event", message, self.limits)
        stamp([message], call_trace_headers(context.invocation_metadata()))
        results = await self.broker.publish(topics.event_topic(request.event_type), [message])
        return bus_pb2.PublishEventResponse(result=_result(results[0]))

    # -- subscribing -----------------------------------------------------------------

    async def Subscribe(
        self, request_iterator: AsyncIterator[bus_pb2.SubscribeRequest], context: Context
    ) -> AsyncIterator[bus_pb2.SubscribeResponse]:
        """Open a subscription, then stream deliveries while taking acks, naks and terms."""
        iterator = request_iterator.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("action") != "open":
            raise invalid_argument("open", "the first request must open the subscription")
        settings = subscription_settings(first.open, self.limits)
        subscription = await self.broker.subscribe(settings)
        failure: list[StatusError] = []
        reader = asyncio.create_task(self._read_actions(iterator, subscription, failure))
        try:
            yield bus_pb2.SubscribeResponse(opened=True)
            while True:
                batch = await subscription.outbox.get()
                if batch is None:
                    break
                yield bus_pb2.SubscribeResponse(deliveries=batch)
            if failure:
                raise failure[0]
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await subscription.close()

    async def _read_actions(
        self,
        iterator: AsyncIterator[bus_pb2.SubscribeRequest],
        subscription: Subscription,
        failure: list[StatusError],
    ) -> None:
        try:
            async for request in iterator:
                action = request.WhichOneof("action")
                if action == "ack":
                    check_refs("ack", request.ack.refs)
                    subscription.ack(request.ack.refs)
                elif action == "nak":
                    check_refs("nak", request.nak.refs)
                    delay_ns = request.nak.delay.ToNanoseconds()
                    if delay_ns < 0:
                        raise invalid_argument("nak.delay", "must not be negative")
                    error = request.nak.error
                    if len(error.encode()) > self.limits.max_error_bytes:
                        raise invalid_argument(
                            "nak.error", f"must be at most {self.limits.max_error_bytes} bytes (UTF-8)"
                        )
                    subscription.nak(request.nak.refs, delay_ns / 1e9 if delay_ns else None, error)
                elif action == "term":
                    check_refs("term", request.term.refs)
                    subscription.term(request.term.refs, request.term.reason)
                elif action == "open":
                    raise invalid_argument("open", "the subscription is already open")
                else:
                    raise invalid_argument("action", "must be one of ack, nak, term")
        except StatusError as exc:
            failure.append(exc)
        except asyncio.CancelledError:
            # The call is ending (or the server shutting down): Subscribe closes the
            # subscription itself. Swallowing the cancel here once kept shutdown waiting.
            raise
        except grpc.aio.AioRpcError:
            pass
        except Exception:
            logger.exception("subscribe stream reader failed")
        await subscription.close()

    # -- request/reply ---------------------------------------------------------------

    async def Request(self, request: bus_pb2.RequestRequest, context: Context) -> bus_pb2.RequestResponse:
        """Publish with reply routing and return the first reply."""
        check_topic("topic", request.topic)
        check_message("message", request.message, self.limits)
        stamp([request.message], call_trace_headers(context.invocation_metadata()))
        timeout_ns = request.timeout.ToNanoseconds()
        if timeout_ns < 0:
            raise invalid_argument("timeout", "must not be negative")
        timeout = timeout_ns / 1e9 if timeout_ns else None
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining) if timeout is not None else remaining
        reply = await self.broker.request(
            request.topic, request.message, timeout if timeout is not None else DEFAULT_REQUEST_TIMEOUT
        )
        return bus_pb2.RequestResponse(reply=reply)

    async def Reply(self, request: bus_pb2.ReplyRequest, context: Context) -> bus_pb2.ReplyResponse:
        """Deliver a reply to a waiting request, or drop it."""
        if not request.reply_to:
            raise invalid_argument("reply_to", "must not be empty")
        if not request.correlation_id:
            raise invalid_argument("correlation_id", "must not be empty")
        check_message("message", request.message, self.limits)
        delivered = await self.broker.reply(request.reply_to, request.correlation_id, request.message)
        return bus_pb2.ReplyResponse(delivered=delivered)

    # -- dead letters ----------------------------------------------------------------

    async def _dead_letter_topic(self, topic: str, group: str) -> str:
        check_topic("topic", topic)
        check_group("group", group)
        stats = await self.broker.store.get_topic(topic)
        if stats is None:
            raise NotFoundError(f"topic: {topic!r} does not exist")
        if group not in stats.groups:
            raise NotFoundError(f"group: {group!r} is not a group of {topic!r}")
        dead_topic = topics.dead_letter_topic(topic, group)
        # Dead letters may have been written through another node: take the store's
        # current figures (last sequence) before reading or selecting them.
        await self.broker.store.get_topic(dead_topic)
        return dead_topic

    async def ListDeadLetters(
        self, request: bus_pb2.ListDeadLettersRequest, context: Context
    ) -> bus_pb2.ListDeadLettersResponse:
        """List dead letters by dead-letter sequence."""
        dead_topic = await self._dead_letter_topic(request.topic, request.group)
        size = _page_size("page_size", request.page_size)
        start = 1
        if request.page_token:
            if not request.page_token.isdigit():
                raise invalid_argument("page_token", "is not a token returned by ListDeadLetters")
            start = int(request.page_token)
        messages: list[bus_pb2.BusMessage] = []
        last = self.broker.store.last_sequence(dead_topic)
        while len(messages) <= size and start <= last:
            # A read may answer fewer than asked (a loaded store): read on to the page's end.
            more, through = await self.broker.store.read(dead_topic, start, size + 1 - len(messages))
            messages += more
            if through < start:
                break
            start = through + 1
        response = bus_pb2.ListDeadLettersResponse()
        for message in messages[:size]:
            letter = bus_pb2.DeadLetter.FromString(message.payload)
            letter.dead_letter_sequence = message.sequence
            response.dead_letters.append(letter)
        if len(messages) > size:
            response.next_page_token = str(messages[size].sequence)
        return response

    async def ReplayDeadLetters(
        self, request: bus_pb2.ReplayDeadLettersRequest, context: Context
    ) -> bus_pb2.ReplayDeadLettersResponse:
        """Replay dead letters into their group only, then remove them from the dead-letter topic."""
        dead_topic = await self._dead_letter_topic(request.topic, request.group)
        has_range = request.HasField("range")
        last = self.broker.store.last_sequence(dead_topic)
        check_selection(request.dead_letter_sequences, has_range, request.range, last)
        chosen = await choose(
            self.broker.store, dead_topic, request.dead_letter_sequences, request.range if has_range else None
        )
        copies = replay_copies(chosen, request.group, dead_topic)
        if copies:
            # Deterministic ids: a retried or concurrent replay of the same dead letter is a
            # duplicate within the deduplication window, so it is delivered once.
            await self.broker.publish(request.topic, copies)
            await self.broker.store.delete_messages(dead_topic, [m.sequence for m in chosen])
        return bus_pb2.ReplayDeadLettersResponse(replayed=len(copies))

    async def PurgeDeadLetters(
        self, request: bus_pb2.PurgeDeadLettersRequest, context: Context
    ) -> bus_pb2.PurgeDeadLettersResponse:
        """Delete dead letters for good, with a reason."""
        dead_topic = await self._dead_letter_topic(request.topic, request.group)
        purged = await purge(self.broker.store, request.topic, request.group, dead_topic, request)
        return bus_pb2.PurgeDeadLettersResponse(purged=purged)
