"""How a group's delivery policy maps onto a JetStream durable consumer (pure).

A Bus group on NATS is a durable pull consumer with explicit acks; JetStream
then counts deliveries, redelivers what is not acknowledged in time and keeps
the ack floor. The mapping:

* ``ack_wait`` / ``backoff``: the Bus redelivers an unacknowledged message
  ``redelivery_delay(attempt)`` after its ack deadline passed. JetStream has no
  separate "deadline then backoff"; its ``backoff`` list is the time from each
  delivery to the next one. So ``backoff[i] = ack_deadline + redelivery_delay(i + 1)``
  (one entry per attempt, the last one repeats), and ``ack_wait`` is the first
  entry. A late ack that arrives between the deadline and the redelivery is
  therefore still accepted on NATS (on SQLite it is too, while the message
  waits for its redelivery).
* ``max_deliver`` is ``max_deliveries + 1``: JetStream stops redelivering after
  ``max_deliver`` deliveries and only emits an advisory, which a Bus node might
  miss. With one spare delivery the Bus sees the message come back once more,
  recognises it as over-delivered (:func:`over_delivered`) and dead-letters it
  itself with ``attempts = max_deliveries``, then terminates it in JetStream.
  Unlimited deliveries (0) map to -1.
"""

from __future__ import annotations

from dataclasses import dataclass

from rpcmesh.controlplane.bus.group_state import DeliveryPolicy
from rpcmesh.controlplane.bus.redelivery import redelivery_delay

MAX_BACKOFF_STEPS = 16
"""Longest backoff list sent to JetStream; the last step repeats after it."""


@dataclass(frozen=True, kw_only=True)
class ConsumerSettings:
    """The JetStream consumer fields that carry a :class:`DeliveryPolicy`."""

    ack_wait: float
    """Seconds until the first redelivery."""
    max_deliver: int
    """JetStream's delivery limit (-1: unlimited)."""
    backoff: tuple[float, ...] = ()
    """Seconds from each delivery to the next one; empty: ``ack_wait`` every time."""

    def __post_init__(self) -> None:
        if self.ack_wait <= 0:
            raise ValueError(f"ack_wait: must be > 0, got {self.ack_wait}")
        if self.max_deliver == 0 or self.max_deliver < -1:
            raise ValueError(f"max_deliver: must be -1 or >= 1, got {self.max_deliver}")
        if self.backoff and self.max_deliver != -1 and len(self.backoff) >= self.max_deliver:
            raise ValueError("backoff: JetStream needs fewer steps than max_deliver")


def consumer_settings(policy: DeliveryPolicy) -> ConsumerSettings:
    """The consumer settings that give ``policy``'s redelivery schedule (see module docstring)."""
    max_deliver = policy.max_deliveries + 1 if policy.max_deliveries > 0 else -1
    if policy.redelivery_backoff <= 0:
        return ConsumerSettings(ack_wait=policy.ack_deadline, max_deliver=max_deliver)
    steps = MAX_BACKOFF_STEPS if max_deliver == -1 else min(MAX_BACKOFF_STEPS, max_deliver - 1)
    backoff = tuple(
        policy.ack_deadline + redelivery_delay(attempt, policy.redelivery_backoff)
        for attempt in range(1, steps + 1)
    )
    return ConsumerSettings(ack_wait=backoff[0], max_deliver=max_deliver, backoff=backoff)


def over_delivered(num_delivered: int, max_deliveries: int) -> bool:
    """True when JetStream delivered a message more often than the group allows (dead-letter it)."""
    return max_deliveries > 0 and num_delivered > max_deliveries
