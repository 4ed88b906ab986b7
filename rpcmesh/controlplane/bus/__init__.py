"""The Bus: durable pub/sub with consumer groups, dead letters, request/reply and events.

:class:`BusComponent` serves ``rpcmesh.v1.Bus`` from ``rpcmesh up`` over a
:class:`BusStore`: the embedded SQLite log by default, NATS JetStream with
``--bus nats://...``.

One behavioural suite runs on both backends. Where they differ:

* **Who decides deliveries.** On SQLite the broker does (:mod:`group_state`),
  so a group is served by one ``rpcmesh up`` process. On NATS each group is a
  JetStream durable pull consumer (:mod:`jetstream_group`): JetStream counts
  deliveries, redelivers and keeps the ack floor, and any number of Bus nodes
  on one NATS share a group without double delivery; request/reply works across
  them (:mod:`node_link`).
* **Group policy.** On SQLite each subscription's ack deadline, max deliveries
  and backoff apply to what it receives. On NATS the policy is the consumer's,
  set by the subscription that created the group; later subscriptions' policies
  are ignored (JetStream has one policy per consumer).
* **Redelivery timing.** On NATS an unacknowledged delivery comes back
  ``ack_deadline + backoff(attempt)`` after it was sent (JetStream's backoff
  list, :mod:`consumer_policy`); an ack that arrives in between still counts.
  After the last allowed delivery JetStream delivers once more, and the Bus
  dead-letters it then (``attempts = max_deliveries``).
* **Per-key order** holds within a group on SQLite; on NATS within the members
  attached to one Bus node (JetStream has no per-key order across pullers).
* **Attempt counts across a crash.** SQLite persists them every 50 ms (a crash
  can under-count the deliveries of that window); JetStream keeps its own.
  nats-server before 2.10.14 can count a redelivery backwards when it goes to
  a pull request of a node that was just killed (nats-io/nats-server#5305).
* **Partial batch failures.** SQLite stores a batch in one transaction; on NATS
  a batch whose publish fails midway may be partly stored (retry with the same
  ids: deduplication stores each once).
* **Caps** (:class:`BusCaps`) count what this node knows: on SQLite that is
  everything; with several nodes on one NATS each enforces its own view.
* **Broadcast** subscriptions are served by the node they are attached to on
  both backends (they read the log; nothing is acknowledged durably).
"""

from rpcmesh.controlplane.bus.caps import BusCaps
from rpcmesh.controlplane.bus.component import BusComponent, make_store
from rpcmesh.controlplane.bus.store import BusStore, RetentionPolicy

__all__ = ["BusCaps", "BusComponent", "BusStore", "RetentionPolicy", "make_store"]
