"""PurgeDeadLetters is authorized per topic and group exactly like ListDeadLetters/ReplayDeadLetters."""

from __future__ import annotations

from rpcmesh.v1 import bus_pb2

from rpcmesh.security.methods import accesses_for


def test_purge_asks_for_the_same_accesses_as_list_and_replay() -> None:
    for topic, group in (("payments.charged", "ledger"), ("t", "")):
        listed = accesses_for(
            "/rpcmesh.v1.Bus/ListDeadLetters", bus_pb2.ListDeadLettersRequest(topic=topic, group=group)
        )
        replay = accesses_for(
            "/rpcmesh.v1.Bus/ReplayDeadLetters", bus_pb2.ReplayDeadLettersRequest(topic=topic, group=group)
        )
        purge = accesses_for(
            "/rpcmesh.v1.Bus/PurgeDeadLetters",
            bus_pb2.PurgeDeadLettersRequest(topic=topic, group=group, all=True, reason="r"),
        )
        assert purge == listed == replay
