"""Client helpers for the rpcmesh Bus (asyncio first, sync where it makes sense).

They take any ``grpc.aio.Channel`` to the control plane: a plain channel to its
address, or a mesh channel from :mod:`rpcmesh.client`.
"""

from rpcmesh.bus.events import publish_event
from rpcmesh.bus.payloads import content_type_of, decode, encode
from rpcmesh.bus.publisher import Publisher, PublisherConfig, SyncPublisher, build_message
from rpcmesh.bus.requests import Responder, request, request_sync
from rpcmesh.bus.subscriber import Received, Subscriber, SubscriberConfig, SyncSubscriber, Terminate

__all__ = [
    "Publisher",
    "PublisherConfig",
    "Received",
    "Responder",
    "Subscriber",
    "SubscriberConfig",
    "SyncPublisher",
    "SyncSubscriber",
    "Terminate",
    "build_message",
    "content_type_of",
    "decode",
    "encode",
    "publish_event",
    "request",
    "request_sync",
]
