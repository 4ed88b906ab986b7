"""Fixtures of the console's browser tests: one shop and one Chromium per module, a fresh page per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.console.shop import CHROMIUM, CHROMIUM_ARGS, Shop, chromium_missing, running_shop
from tests.support.backends import backends_required


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright; skips when absent (fails under RPCMESH_REQUIRE_BACKENDS=1)."""
    if reason := chromium_missing():
        if backends_required():
            pytest.fail(f"{reason} and RPCMESH_REQUIRE_BACKENDS=1")
        pytest.skip(f"{reason} (set RPCMESH_REQUIRE_BACKENDS=1 to fail instead)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shop(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """The example shop on `rpcmesh up --port 0 --http-port 0` (SQLite in a temporary folder)."""
    data_dir: Path = tmp_path_factory.mktemp("console") / "data"
    with running_shop(data_dir) as started:
        yield started


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page in a fresh browser context; fails the test if the console threw an uncaught error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        context.close()
    assert errors == [], f"uncaught errors in the console: {errors}"
