"""The Bus store on NATS JetStream (placeholder until the backend lands)."""

from __future__ import annotations


class NatsBusStore:
    """Not implemented yet."""

    def __init__(self, url: str) -> None:
        raise NotImplementedError("the NATS JetStream bus store is not implemented yet")
