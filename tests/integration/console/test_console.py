"""The web console in a real browser (Debian's Chromium through Playwright) against the example shop.

A real `rpcmesh up --port 0 --http-port 0` on SQLite runs the shop's services; the pages are the
static files the control plane serves, calling its Connect API. Each test reads what a user sees
(rows, bars, buttons) and checks the mesh's state over gRPC.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from playwright.sync_api import Page, expect
from rpcmesh.v1 import bus_pb2, eventstore_pb2, eventstore_pb2_grpc, registry_pb2, saga_pb2

from tests.integration.console.shop import HTTP_PATTERN, GroupConsumer, Shop, inline_step, publish_json
from tests.support.processes import ManagedProcess, python_env, rpcmesh_command

pytestmark = pytest.mark.slow
expect.set_options(timeout=30_000)

MARKUP = '<img src=x onerror="window.__xss=(window.__xss||0)+1">'


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def dead_letters(shop: Shop, topic: str, group: str) -> list[bus_pb2.DeadLetter]:
    request = bus_pb2.ListDeadLettersRequest(topic=topic, group=group)
    return list(shop.bus.ListDeadLetters(request, timeout=30).dead_letters)


def make_dead_letter(shop: Shop, topic: str, group: str, body: object, error: str) -> GroupConsumer:
    """A message the group's only consumer naks once (max_deliveries 1): dead-lettered with ``error``."""
    consumer = GroupConsumer(shop.bus, topic, group, max_deliveries=1)
    if isinstance(body, bytes):
        shop.bus.Publish(
            bus_pb2.PublishRequest(topic=topic, messages=[bus_pb2.BusMessage(payload=body)]), timeout=30
        )
    else:
        publish_json(shop.bus, topic, body)
    consumer.nak(consumer.next(), error)
    wait_until(lambda: len(dead_letters(shop, topic, group)) == 1, what=f"a dead letter on {topic}")
    return consumer


def events(shop: Shop) -> eventstore_pb2_grpc.EventStoreStub:
    return eventstore_pb2_grpc.EventStoreStub(shop.channel)


def test_services_page_shows_both_users_instances_and_one_disappears_live_when_killed(
    shop: Shop, page: Page
) -> None:
    page.goto(f"{shop.url}/#/services")
    users = page.locator('#services tr[data-service="users"]')
    expect(users.locator("td").nth(1)).to_have_text("2")
    users.get_by_role("link", name="users").click()
    expect(page.locator("#instances tr[data-instance]")).to_have_count(2)
    for instance in ("users-1", "users-2"):
        row = page.locator(f'#instances tr[data-instance="{instance}"]')
        expect(row).to_contain_text("PASSING")
        expect(row).to_contain_text("127.0.0.1:")
    page.evaluate("window.__sameDocument = true")

    shop.instances["users-1"].kill()

    # Its lease (5 s) expires; the Watch stream removes the row without a reload.
    expect(page.locator('#instances tr[data-instance="users-1"]')).to_have_count(0)
    expect(page.locator('#instances tr[data-instance="users-2"]')).to_be_visible()
    expect(page.locator("#removed")).to_contain_text("users-1")
    expect(page.locator("#removed")).to_contain_text("expired")
    assert page.evaluate("window.__sameDocument") is True


def test_compensated_order_saga_timeline_shows_steps_executed_then_compensated_in_reverse(
    shop: Shop, page: Page
) -> None:
    saga = shop.place_order(f"order-{uuid.uuid4().hex[:6]}", "u-bob", 12_000, lamp=1)
    assert saga.state == saga_pb2.SAGA_STATE_COMPENSATED, saga

    page.goto(f"{shop.url}/#/sagas")
    page.select_option("#state-filter", "COMPENSATED")
    row = page.locator(f'#sagas tr[data-saga="{saga.saga_id}"]')
    expect(row).to_contain_text("COMPENSATED")
    row.get_by_role("link").click()
    expect(page.locator("#saga-state")).to_contain_text("COMPENSATED")
    expect(page.locator("#saga-error")).to_contain_text("card declined")
    bars = page.locator("#timeline g.bar")
    expect(bars).to_have_count(5)
    drawn = bars.evaluate_all(
        "els => els.map(e => ({step: e.dataset.step, phase: e.dataset.phase,"
        " start: Number(e.dataset.start), failed: e.dataset.failed === 'true',"
        " width: Number(e.querySelector('rect').getAttribute('width'))}))"
    )
    executed = [bar for bar in drawn if bar["phase"] == "execute"]
    compensated = sorted((bar for bar in drawn if bar["phase"] == "compensate"), key=lambda bar: bar["start"])
    assert [bar["step"] for bar in executed] == ["create-order", "reserve-stock", "charge-payment"]
    assert [bar["failed"] for bar in executed] == [False, False, True]
    assert [bar["step"] for bar in compensated] == ["reserve-stock", "create-order"]
    assert all(bar["width"] > 0 for bar in drawn)
    # Compensation starts after the failed step, on the same time axis.
    assert compensated[0]["start"] >= executed[-1]["start"]
    expect(page.locator('#steps tr[data-step="charge-payment"]')).to_contain_text("FAILED")
    expect(page.locator('#steps tr[data-step="reserve-stock"]')).to_contain_text("COMPENSATED")
    expect(page.locator('#steps tr[data-step="reserve-stock"]')).to_contain_text(
        f"{saga.saga_id}/reserve-stock/compensate"
    )


def test_dead_letter_is_replayed_from_the_bus_page_and_consumed(shop: Shop, page: Page) -> None:
    topic, group = "console.replay", "workers"
    body = {"order_id": "order-dl-1", "amount_cents": 4200}
    consumer = make_dead_letter(shop, topic, group, body, "ValueError: boom")
    try:
        page.goto(f"{shop.url}/#/bus")
        page.locator(f'#topics tr[data-topic="{topic}"]').get_by_role("link").click()
        expect(page.locator(f'#groups tr[data-group="{group}"] td.dead-count')).to_have_text("1")
        letter = page.locator(f'tr[data-dead-letter][data-group="{group}"]')
        expect(letter).to_have_count(1)
        expect(letter).to_contain_text("max_deliveries")
        expect(letter.locator("td.last-error")).to_have_text("ValueError: boom")
        expect(letter.locator("pre.payload.json")).to_contain_text('"order_id": "order-dl-1"')

        letter.get_by_role("button", name="Replay").click()

        expect(page.locator("#bus-notice")).to_contain_text("Replayed 1 dead letter(s) to group workers")
        delivery = consumer.next(timeout=30)
        assert json.loads(delivery.message.payload) == body
        assert delivery.message.headers["rpcmesh-replay-group"] == group
        consumer.ack(delivery)

        def consumed() -> bool:
            topic_info = shop.bus.GetTopic(bus_pb2.GetTopicRequest(name=topic), timeout=30).topic
            groups = {g.name: g for g in topic_info.groups}
            return groups[group].pending == 0 and groups[group].dead_letters == 0

        wait_until(consumed, what="the replayed message to be acknowledged")
        page.locator("#refresh").click()
        expect(page.locator(f'#groups tr[data-group="{group}"] td.pending')).to_have_text("0")
        expect(page.locator(f'#groups tr[data-group="{group}"] td.dead-count')).to_have_text("0")
        expect(page.locator("tr[data-dead-letter]")).to_have_count(0)
    finally:
        consumer.close()


def test_events_page_tails_all_as_orders_are_placed_and_pages_through_a_stream(
    shop: Shop, page: Page
) -> None:
    page.goto(f"{shop.url}/#/events")
    expect(page.locator("#tail-status")).to_contain_text("Live:")
    page.evaluate("window.__sameDocument = true")
    placed = [shop.start_order(f"order-{uuid.uuid4().hex[:6]}", "u-alice", 1_000, book=1) for _ in range(2)]
    for saga_id in placed:
        stream = f"saga-{saga_id}"
        expect(
            page.locator(f'#events-log tr[data-stream="{stream}"][data-type="SagaStarted"]')
        ).to_have_count(1)
        expect(
            page.locator(f'#events-log tr[data-stream="{stream}"][data-type="SagaCompleted"]')
        ).to_have_count(1)
    assert page.evaluate("window.__sameDocument") is True

    stream = f"paging-{uuid.uuid4().hex[:6]}"
    events(shop).AppendToStream(
        eventstore_pb2.AppendToStreamRequest(
            stream=stream,
            expected_state=eventstore_pb2.EXPECTED_STATE_NO_STREAM,
            events=[
                eventstore_pb2.EventData(event_type="Counted", data=json.dumps({"n": n}).encode())
                for n in range(25)
            ],
        ),
        timeout=30,
    )
    page.fill("#open-stream", stream)
    page.get_by_role("button", name="Read stream").click()
    expect(page.locator("#page-info")).to_contain_text("Page 1: revisions 0 to 19")
    expect(page.locator("#stream-events tbody tr")).to_have_count(20)
    page.locator("#next-page").click()
    expect(page.locator("#page-info")).to_contain_text("Page 2: revisions 20 to 24")
    expect(page.locator("#stream-events tbody tr").last).to_contain_text('"n": 24')
    expect(page.locator("#next-page")).to_be_disabled()
    page.locator("#previous-page").click()
    expect(page.locator("#page-info")).to_contain_text("Page 1: revisions 0 to 19")


def test_markup_in_names_payloads_and_errors_renders_as_text(shop: Shop, page: Page) -> None:
    # Service names are DNS labels: markup is refused there before any page could show it.
    with pytest.raises(grpc.RpcError) as refused:
        shop.register_instance(MARKUP, address="127.0.0.1:9")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Version, zone and tags are free text.
    shop.register_instance(
        "xss-probe", instance_id="xss-1", address="127.0.0.1:9", version=MARKUP, zone=MARKUP, tags=[MARKUP]
    )
    consumer = make_dead_letter(shop, "console.xss", "victims", {"note": MARKUP}, MARKUP)
    consumer.close()
    stream = f"xss-{uuid.uuid4().hex[:6]}"
    events(shop).AppendToStream(
        eventstore_pb2.AppendToStreamRequest(
            stream=stream,
            expected_state=eventstore_pb2.EXPECTED_STATE_ANY,
            events=[eventstore_pb2.EventData(event_type="Evil", data=MARKUP.encode())],
        ),
        timeout=30,
    )

    for route, shown in [
        ("#/services/xss-probe", '#instances tr[data-instance="xss-1"]'),
        ("#/bus/console.xss", "tr[data-dead-letter]"),
        (f"#/events/{stream}", "#stream-events tbody tr"),
    ]:
        page.goto(f"{shop.url}/{route}")
        expect(page.locator(shown)).to_contain_text(MARKUP)
        expect(page.locator("img")).to_have_count(0)
        assert page.evaluate("window.__xss") is None, route


class _AttackerPage(BaseHTTPRequestHandler):
    """Serves one page, from another origin, that tries to append to the control plane's EventStore."""

    target = ""

    def do_GET(self) -> None:
        action = f"{self.target}/rpcmesh.v1.EventStore/AppendToStream"
        forged = json.dumps(
            {
                "stream": "csrf-probe",
                "expectedState": "EXPECTED_STATE_ANY",
                "events": [{"eventType": "Forged"}],
            }
        )
        html = f"""<!doctype html><html><body>
<form id="f" method="post" enctype="text/plain" action="{action}" target="sink">
<input type="hidden" name='{{"stream":"csrf-probe","x":"' value='"}}'></form>
<iframe name="sink"></iframe>
<script>
(async () => {{
  const body = {json.dumps(forged)};
  const out = {{}};
  try {{
    const r = await fetch("{action}",
      {{method: "POST", headers: {{"Content-Type": "application/json"}}, body}});
    out.cors = r.status;
  }} catch (e) {{ out.cors = "blocked"; }}
  try {{
    await fetch("{action}",
      {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}});
    out.noCors = "sent";
  }} catch (e) {{ out.noCors = "blocked"; }}
  document.getElementById("f").submit();
  window.__done = out;
}})();
</script></body></html>"""
        data = html.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def attacker(shop: Shop) -> Iterator[str]:
    """An HTTP server on another port (so another origin) serving :class:`_AttackerPage`."""
    handler = type("Handler", (_AttackerPage,), {"target": shop.url})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_cross_origin_post_from_another_page_is_refused(shop: Shop, page: Page, attacker: str) -> None:
    answers: list[tuple[str, int]] = []
    page.on(
        "response",
        lambda r: answers.append((r.request.method, r.status)) if "AppendToStream" in r.url else None,
    )
    page.goto(f"{attacker}/")
    page.wait_for_function("window.__done !== undefined")
    done = page.evaluate("window.__done")
    # A JSON POST needs a CORS preflight the control plane does not grant: the browser never sends it.
    assert done["cors"] == "blocked", done
    # The no-cors fetch and the form do reach the server, which refuses them (cross origin, not Connect).
    deadline = time.monotonic() + 30
    while len([a for a in answers if a[0] == "POST"]) < 2:
        assert time.monotonic() < deadline, f"both forged POSTs were not answered: {answers}"
        page.wait_for_timeout(100)  # lets Playwright deliver the response events (time.sleep would not)
    assert all(status == 403 or 400 <= status < 500 for _, status in answers), answers
    probe = events(shop).ReadStream(eventstore_pb2.ReadStreamRequest(stream="csrf-probe"), timeout=30)
    assert probe.current_revision == -1 and not probe.events

    # The same request from the console's own origin is served: the refusal was the origin's.
    page.goto(f"{shop.url}/#/events")
    status = page.evaluate(
        """async () => (await fetch("/rpcmesh.v1.EventStore/AppendToStream", {method: "POST",
             headers: {"Content-Type": "application/json"},
             body: JSON.stringify({stream: "csrf-control", expectedState: "EXPECTED_STATE_ANY",
                                   events: [{eventType: "Allowed"}]})})).status"""
    )
    assert status == 200
    control = events(shop).ReadStream(eventstore_pb2.ReadStreamRequest(stream="csrf-control"), timeout=30)
    assert [e.event_type for e in control.events] == ["Allowed"]


@pytest.fixture
def token_plane(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`rpcmesh up` with bearer tokens on (plaintext, development mode); yields its URL and an admin token."""
    run(rpcmesh_command("certs", str(tmp_path / "certs"), "--token-secret"))
    (tmp_path / "policy.yaml").write_text("admins: [ops]\n", encoding="utf-8")
    secret = str(tmp_path / "certs" / "token.secret")
    plane = ManagedProcess(
        rpcmesh_command(
            "up",
            *("--port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "data")),
            *("--token-secret-file", secret, "--insecure", "--policy", str(tmp_path / "policy.yaml")),
        )
    )
    try:
        url = plane.wait_for_line(HTTP_PATTERN, timeout=60).group(1)
        token = run(rpcmesh_command("token", "ops", "--secret-file", secret, "--ttl", "600")).strip()
        yield url, token
    finally:
        plane.kill()


def run(args: list[str]) -> str:
    return subprocess.run(
        args, env=python_env(), capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_with_tokens_on_the_console_asks_once_for_a_token_and_keeps_it_in_the_tab(
    token_plane: tuple[str, str], page: Page
) -> None:
    url, token = token_plane
    page.goto(f"{url}/#/services")
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    page.fill("#token-input", token)
    page.get_by_role("button", name="Use token").click()
    expect(page.locator("main")).to_contain_text("Live: 0 instances")
    assert page.evaluate("sessionStorage.getItem('rpcmesh.console.token')") == token
    # The overview's calls and a reload use the kept token: no second question.
    page.goto(f"{url}/#/")
    page.reload()
    expect(page.locator(".cards")).to_contain_text("token")
    expect(page.locator("#problems")).to_be_visible()
    expect(dialog).to_be_hidden()


def test_saga_page_follows_a_running_saga_live_and_its_actions_abort_and_resolve(
    shop: Shop, page: Page
) -> None:
    # A step whose service has no instance keeps the saga RUNNING (unsent attempts are retried).
    running = shop.start_stuck_saga("console-abort")
    page.goto(f"{shop.url}/#/sagas/{running}")
    expect(page.locator("#saga-state")).to_contain_text("RUNNING (live)")
    expect(page.locator('#timeline g.bar[data-step="call-ghost"] rect.running')).to_have_count(1)
    page.fill("#action-reason", "stuck on a missing service")
    page.locator("#abort").click()
    expect(page.locator("#saga-state")).to_contain_text("ABORTED")
    expect(page.locator('#timeline g.bar[data-step="create-order"][data-phase="compensate"]')).to_have_count(
        1
    )
    assert (
        shop.sagas.GetSaga(saga_pb2.GetSagaRequest(saga_id=running)).saga.state == saga_pb2.SAGA_STATE_ABORTED
    )

    # A compensation that cannot succeed (no such method) leaves the saga FAILED_COMPENSATION.
    stuck = shop.start_failing_compensation("console-stuck")
    wait_until(
        lambda: (
            shop.sagas.GetSaga(saga_pb2.GetSagaRequest(saga_id=stuck)).saga.state
            == saga_pb2.SAGA_STATE_FAILED_COMPENSATION
        ),
        what="the saga to fail its compensation",
    )
    page.goto(f"{shop.url}/#/")
    expect(page.locator("#problems")).to_contain_text(stuck)
    page.locator("#problems").get_by_role("link", name=stuck).click()
    expect(page.locator("#saga-state")).to_contain_text("FAILED_COMPENSATION")
    expect(
        page.locator('#timeline g.bar[data-step="create-order"][data-phase="compensate"]')
    ).to_have_attribute("data-failed", "true")
    expect(page.locator("#retry-compensation")).to_be_visible()
    page.locator("#resolve").click()
    expect(page.locator("#saga-notice")).to_contain_text("A reason is required")
    page.fill("#action-reason", "order cancelled by hand")
    page.locator("#resolve").click()
    expect(page.locator("#saga-state")).to_contain_text("RESOLVED_MANUALLY")
    expect(page.locator("main")).to_contain_text("order cancelled by hand")


def test_dead_letter_purge_asks_for_a_reason_then_removes_it(shop: Shop, page: Page) -> None:
    topic, group = "console.purge", "workers"
    consumer = make_dead_letter(shop, topic, group, {"order_id": "order-dl-2"}, "KeyError: sku")
    try:
        page.goto(f"{shop.url}/#/bus/{topic}")
        letter = page.locator(f'tr[data-dead-letter][data-group="{group}"]')
        expect(letter).to_have_count(1)
        letter.get_by_role("button", name="Purge").click()
        expect(page.locator("#bus-notice")).to_contain_text("A reason is required to purge dead letters")
        assert len(dead_letters(shop, topic, group)) == 1  # refused before any call: nothing changed
        page.locator(f'section[data-dead-letters="{group}"] input.purge-reason').fill(
            "poison message, ticket 42"
        )
        letter.get_by_role("button", name="Purge").click()
        expect(page.locator("#bus-notice")).to_contain_text("Purged 1 dead letter(s) of group workers")
        assert dead_letters(shop, topic, group) == []
        expect(page.locator("tr[data-dead-letter]")).to_have_count(0)
        with pytest.raises(queue.Empty):  # a purged dead letter is not delivered again
            consumer.next(timeout=1.0)
    finally:
        consumer.close()


def test_a_compensation_retried_by_the_operator_that_succeeds_is_no_longer_shown_failed(
    shop: Shop, page: Page
) -> None:
    def address(service: str) -> str:
        resolved = shop.registry.Resolve(registry_pb2.ResolveRequest(service=service), timeout=30)
        return resolved.instances[0].address

    def saga() -> saga_pb2.Saga:
        return shop.sagas.GetSaga(saga_pb2.GetSagaRequest(saga_id=saga_id), timeout=30).saga

    # "refunds" is first the payments server: Charge works there, CancelOrder is UNIMPLEMENTED.
    lease = shop.register_instance("refunds", instance_id="refunds-1", address=address("payments"))
    saga_id = shop.start_inline(
        "console-retry",
        [
            inline_step(
                "charge", "refunds", "/shop.v1.Payments/Charge", "/shop.v1.Orders/CancelOrder", max_attempts=1
            ),
            inline_step("call-ghost", "ghost", "/ghost.v1.Ghost/Call"),
        ],
        "u-alice",
        1_000,
    )
    wait_until(
        lambda: any(s.name == "charge" and s.state == saga_pb2.STEP_STATE_SUCCEEDED for s in saga().steps),
        what="the charge step to succeed",
    )
    shop.sagas.AbortSaga(saga_pb2.AbortSagaRequest(saga_id=saga_id, reason="stuck"), timeout=30)
    wait_until(
        lambda: saga().state == saga_pb2.SAGA_STATE_FAILED_COMPENSATION, what="the compensation to fail"
    )
    page.goto(f"{shop.url}/#/sagas/{saga_id}")
    bar = page.locator('#timeline g.bar[data-step="charge"][data-phase="compensate"]')
    expect(bar).to_have_attribute("data-failed", "true")

    # The operator points "refunds" at the orders server and retries from the page.
    shop.registry.Deregister(
        registry_pb2.DeregisterRequest(
            service="refunds", instance_id="refunds-1", lease_token=lease.lease_token
        ),
        timeout=30,
    )
    shop.register_instance("refunds", instance_id="refunds-2", address=address("orders"))
    # An aborted saga whose compensations all succeed ends ABORTED.
    terminal = (saga_pb2.SAGA_STATE_ABORTED, saga_pb2.SAGA_STATE_FAILED_COMPENSATION)
    for retries in range(1, 6):  # the coordinator may not have seen the new instance yet: then it fails again
        expect(page.locator("#retry-compensation")).to_be_visible()
        page.fill("#action-reason", "refunds moved to the orders server")
        page.locator("#retry-compensation").click()

        def ended(asked: int = retries) -> bool:
            now = saga()
            done = sum("retry" in action.kind.lower() for action in now.operator_actions)
            return done == asked and now.state in terminal

        wait_until(ended, what="the retried compensation to end")
        if saga().state == saga_pb2.SAGA_STATE_ABORTED:
            break
    expect(page.locator("#saga-state")).to_contain_text("ABORTED")
    expect(bar).to_have_attribute("data-failed", "false")


def test_overview_reads_every_page_of_unsettled_sagas_so_an_old_failed_one_shows(
    shop: Shop, page: Page
) -> None:
    # The oldest unsettled saga fails its compensation; then more sagas start than one page holds
    # (the overview once read a single page of 200, newest first, and lost the failed one).
    failed = shop.start_failing_compensation("console-old-failure")
    wait_until(
        lambda: (
            shop.sagas.GetSaga(saga_pb2.GetSagaRequest(saga_id=failed), timeout=30).saga.state
            == saga_pb2.SAGA_STATE_FAILED_COMPENSATION
        ),
        what="the saga to fail its compensation",
    )
    parked = [shop.start_parked_saga("console-many") for _ in range(1_010)]  # > the overview's page of 1000
    try:
        page.goto(f"{shop.url}/#/")
        expect(page.locator("#problems")).to_contain_text(failed)
        # Every in-flight saga counted (other tests' sagas may be settling meanwhile: at least these).
        count = page.locator(".card", has_text="Unsettled sagas").locator(".value")
        wait_until(
            lambda: (text := count.inner_text()).isdigit() and int(text) >= len(parked) + 1,
            what="the overview to count every unsettled saga",
        )
        expect(page.locator("#sagas-truncated")).to_have_count(0)
    finally:
        for saga_id in parked:
            shop.sagas.AbortSaga(saga_pb2.AbortSagaRequest(saga_id=saga_id, reason="test over"), timeout=30)
        shop.sagas.ResolveSaga(saga_pb2.ResolveSagaRequest(saga_id=failed, reason="test over"), timeout=30)
