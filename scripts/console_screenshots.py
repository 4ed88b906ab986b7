"""Screenshots of the web console for the README and docs/console.md.

    .venv/bin/python scripts/console_screenshots.py [--out docs]

Starts the example shop on a real control plane (`rpcmesh up --port 0 --http-port 0`, SQLite
in a temporary folder), places an order that completes and one that is compensated, makes a
dead letter, then opens each console page in Debian's Chromium (headless) and saves
console-overview.png, console-services.png, console-bus.png, console-saga.png and
console-events.png. Every process stops on exit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from playwright.sync_api import Page, sync_playwright  # noqa: E402

from tests.integration.console.shop import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    GroupConsumer,
    Shop,
    chromium_missing,
    publish_json,
    running_shop,
)

AUDIT_TOPIC = "payments.audit"


def make_dead_letters(shop: Shop) -> None:
    """Two messages the auditor group cannot handle: one JSON, one binary."""
    consumer = GroupConsumer(shop.bus, AUDIT_TOPIC, "auditor")
    try:
        publish_json(
            shop.bus, AUDIT_TOPIC, {"order_id": "order-7f3a", "amount_cents": 12000, "currency": "EUR"}
        )
        consumer.nak(consumer.next(), "ValueError: amount_cents over the audit limit")
        from rpcmesh.v1 import bus_pb2

        shop.bus.Publish(
            bus_pb2.PublishRequest(
                topic=AUDIT_TOPIC,
                messages=[
                    bus_pb2.BusMessage(payload=bytes(range(0, 48)), content_type="application/octet-stream")
                ],
            ),
            timeout=30,
        )
        consumer.nak(consumer.next(), "DecodeError: not a shop.v1.Payment")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = shop.bus.ListDeadLetters(
                bus_pb2.ListDeadLettersRequest(topic=AUDIT_TOPIC, group="auditor")
            )
            if len(listed.dead_letters) == 2:
                return
            time.sleep(0.2)
        raise TimeoutError("the dead letters did not appear")
    finally:
        consumer.close()


def shoot(page: Page, url: str, ready: str, path: Path) -> None:
    page.goto(url)
    try:
        page.wait_for_selector(ready, timeout=30_000)
    except Exception:
        print(page.inner_text("main"), file=sys.stderr)
        raise
    page.wait_for_timeout(700)
    page.screenshot(path=str(path), full_page=True)
    print(f"saved {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if reason := chromium_missing():
        raise SystemExit(f"console_screenshots: {reason}")
    with (
        tempfile.TemporaryDirectory(prefix="rpcmesh-console-") as tmp,
        running_shop(Path(tmp) / "data") as shop,
    ):
        shop.place_order("order-1001", "u-alice", 3_000, book=2)
        bob = shop.place_order("order-1002", "u-bob", 12_000, lamp=1)
        shop.place_order("order-1003", "u-alice", 1_500, chair=1)
        make_dead_letters(shop)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1360, "height": 820})
                out = args.out
                shoot(page, f"{shop.url}/#/", "#problems", out / "console-overview.png")
                shoot(page, f"{shop.url}/#/services/users", "#instances", out / "console-services.png")
                shoot(page, f"{shop.url}/#/bus/{AUDIT_TOPIC}", "table.dead-letters", out / "console-bus.png")
                shoot(page, f"{shop.url}/#/sagas/{bob.saga_id}", "#timeline svg", out / "console-saga.png")
                page.goto(f"{shop.url}/#/events")
                page.wait_for_selector("#events-log tbody tr", timeout=30_000)
                shop.place_order("order-1004", "u-alice", 2_000, book=1)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(out / "console-events.png"), full_page=False)
                print(f"saved {out / 'console-events.png'}", flush=True)
            finally:
                browser.close()


if __name__ == "__main__":
    main()
