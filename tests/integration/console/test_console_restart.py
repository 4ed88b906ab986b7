"""The console's live views across a control-plane restart: each reopens its stream and carries on.

Services (Registry/Watch), the events tail ($all from EventStore/SubscribeToAll) and a saga's page
(WatchSaga) each hold a server stream. The control plane is stopped under each of them (kill -9 or
SIGTERM, chosen by a seed printed on failure, down for a random moment) and started again on the
same ports and data; what happens after the restart must reach the open page: a new instance, a new
event (and none shown twice), the saga's abort. Before, only the Services page reopened its watch.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect
from rpcmesh.v1 import eventstore_pb2, eventstore_pb2_grpc, saga_pb2

from tests.integration.console.shop import Shop

pytestmark = [pytest.mark.slow, pytest.mark.fault]


@pytest.fixture
def rng() -> Iterator[random.Random]:
    seed = random.SystemRandom().randrange(1, 2**31)
    print(f"restart schedule seed {seed}")
    yield random.Random(seed)


def restart(shop: Shop, rng: random.Random) -> None:
    shop.restart_plane(kill=rng.random() < 0.5, down=rng.uniform(0.0, 1.5))


def append(shop: Shop, stream: str, event_type: str) -> None:
    eventstore_pb2_grpc.EventStoreStub(shop.channel).AppendToStream(
        eventstore_pb2.AppendToStreamRequest(
            stream=stream,
            expected_state=eventstore_pb2.EXPECTED_STATE_ANY,
            events=[eventstore_pb2.EventData(event_type=event_type, data=json.dumps({"n": 1}).encode())],
        ),
        timeout=30,
    )


def test_services_page_watch_reopens_after_a_restart(shop: Shop, page: Page, rng: random.Random) -> None:
    page.goto(f"{shop.url}/#/services")
    expect(page.locator("#watch-status")).to_contain_text("Live:")
    restart(shop, rng)
    shop.register_instance("after-restart", instance_id="after-1", address="127.0.0.1:9")
    expect(page.locator('#services tr[data-service="after-restart"]')).to_have_count(1)
    expect(page.locator("#watch-status")).to_contain_text("Live:")


def test_events_tail_resumes_after_a_restart_without_repeating(
    shop: Shop, page: Page, rng: random.Random
) -> None:
    stream = f"restart-{uuid.uuid4().hex[:6]}"
    page.goto(f"{shop.url}/#/events")
    expect(page.locator("#tail-status")).to_contain_text("Live")
    append(shop, stream, "BeforeRestart")
    expect(page.locator(f'#events-log tr[data-stream="{stream}"][data-type="BeforeRestart"]')).to_have_count(
        1
    )
    restart(shop, rng)
    append(shop, stream, "AfterRestart")
    expect(page.locator(f'#events-log tr[data-stream="{stream}"][data-type="AfterRestart"]')).to_have_count(1)
    expect(page.locator(f'#events-log tr[data-stream="{stream}"]')).to_have_count(2)
    expect(page.locator("#tail-status")).to_contain_text("Live")


def test_saga_page_follows_the_saga_after_a_restart(shop: Shop, page: Page, rng: random.Random) -> None:
    # A step whose service has no instance keeps the saga RUNNING across the restart.
    running = shop.start_stuck_saga("console-restart")
    page.goto(f"{shop.url}/#/sagas/{running}")
    expect(page.locator("#saga-state")).to_contain_text("RUNNING (live)")
    restart(shop, rng)
    shop.sagas.AbortSaga(saga_pb2.AbortSagaRequest(saga_id=running, reason="after a restart"), timeout=30)
    expect(page.locator("#saga-state")).to_contain_text("ABORTED")
    expect(page.locator('#timeline g.bar[data-step="create-order"][data-phase="compensate"]')).to_have_count(
        1
    )
    expect(page.locator('#timeline g.bar[data-step="create-order"][data-phase="execute"]')).to_have_count(1)
