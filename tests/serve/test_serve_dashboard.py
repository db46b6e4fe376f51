"""The dashboard at ``/zerostart/``: its files and keys over HTTP, and the page in a real browser,
headless Chromium (Debian's package) driven by Playwright, against a gateway whose models rest on
four rungs. What the page shows is checked against ``GET /zerostart/status``, and a screenshot is
taken (``ZEROSTART_SCREENSHOT_DIR``, else the test's temporary directory;
``docs/img/dashboard.png`` is one).

The browser tests (marker ``browser``) run with ``make test-browser``, which installs Chromium and
Playwright.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from typing import Any, Iterator

import httpx
import pytest

from zerostart.serve._status import FleetStatus, parse_status
from zerostart.units import format_size

from tests.serve import _ladder
from tests.serve._helpers import Gateway

# Chromium as a test needs it: headless, and nothing that reaches past this machine
_CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_dashboard_is_served_behind_the_keys(tiny_model: str, tmp_path) -> None:
    gw = Gateway({"server": {"api_keys": [_ladder.API_KEY]}, "models": [{"name": "m", "path": tiny_model}]},
                 str(tmp_path), api_key=_ladder.API_KEY)
    try:
        _served_behind_the_keys(gw.url)
    finally:
        gw.stop()


def _served_behind_the_keys(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as anon:
        page = anon.get("/zerostart/")
        # a browser asks for the key itself: HTTP Basic, the key as the password
        assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic ")
        assert anon.get("/zerostart/status").status_code == 401
        assert anon.get("/v1/models").headers["www-authenticate"] == "Bearer"  # API routes ask for a bearer token
        assert anon.get("/zerostart/", auth=("anyone", "wrong")).status_code == 401
        redirect = anon.get("/zerostart", auth=("", _ladder.API_KEY))
        assert redirect.status_code == 308 and redirect.headers["location"].endswith("/zerostart/")
        files = {name: anon.get(f"/zerostart/{name}", auth=("", _ladder.API_KEY))
                 for name in ("", "dashboard.js", "dashboard.css")}
        status = anon.get("/zerostart/status", auth=("me", _ladder.API_KEY))
    assert status.status_code == 200 and parse_status(status.json()).models
    assert {n: (r.status_code, r.headers["content-type"].split(";")[0]) for n, r in files.items()} == {
        "": (200, "text/html"), "dashboard.js": (200, "text/javascript"), "dashboard.css": (200, "text/css")}
    html = files[""].text
    assert 'src="dashboard.js"' in html and 'href="dashboard.css"' in html
    # everything from the package: no address of another origin (but SVG's namespace name), and a
    # policy that would refuse one
    for r in files.values():
        assert set(re.findall(r"https?://[^\s\"')]+", r.text)) <= {"http://www.w3.org/2000/svg"}
        assert "default-src 'none'; script-src 'self'" in r.headers["content-security-policy"]


def test_dashboard_can_be_turned_off(tiny_model: str, tmp_path) -> None:
    gw = Gateway({"server": {"dashboard": False}, "models": [{"name": "m", "path": tiny_model}]}, str(tmp_path))
    try:
        r = gw.http.get("/zerostart/")
        assert r.status_code == 404 and "the dashboard is off on this server" in r.json()["error"]["message"]
        assert gw.http.get("/zerostart/dashboard.js").status_code == 404
        assert gw.status()["models"][0]["rung"] == "zero"  # the status route stays
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def own_fleet(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A ladder of its own: the browser's test sends it requests (the shared one is read-only)."""
    gw = _ladder.start(tiny_model, str(tmp_path_factory.mktemp("ladder-browser")))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need Playwright: `make test-browser` installs it")
    chromium = os.environ.get("ZEROSTART_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        pytest.fail("the browser tests need Chromium: `make test-browser` installs Debian's chromium package")
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        # a fresh profile each run (launch_persistent_context: Chromium's own --user-data-dir)
        context = p.chromium.launch_persistent_context(profile, executable_path=chromium, args=_CHROMIUM_ARGS,
                                                       headless=True, viewport={"width": 1400, "height": 1000},
                                                       http_credentials={"username": "", "password": _ladder.API_KEY})
        yield context
        context.close()


def _polls(page: Any) -> int:
    return int(page.locator("body").get_attribute("data-polls") or 0)


def _wait_for_poll(page: Any, after: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _polls(page) <= after:
        if time.monotonic() > deadline:
            problem = page.locator("#problem").text_content()
            raise AssertionError(f"the page did not redraw within {timeout} s (problem shown: {problem!r})")
        time.sleep(0.05)


def _page_view(page: Any) -> dict[str, Any]:
    """What a person sees: each model's rung (the ladder column its card is in) and memory, and
    each device's hot and parked shares."""
    models = {}
    for column in page.locator(".rung").all():
        rung = column.get_attribute("data-rung")
        for card in column.locator(".model").all():
            models[card.locator(".name").text_content()] = (rung, card.locator(".memory").text_content())
    devices = {d.get_attribute("data-device"): (d.locator(".hot-bytes").text_content(),
                                                d.locator(".parked-bytes").text_content())
               for d in page.locator(".device").all()}
    waterfalls = [(w.get_attribute("data-model"), w.get_attribute("data-rung"),
                   [p.get_attribute("data-phase") for p in w.locator(".phase").all()])
                  for w in page.locator(".coldstart").all()]
    return {"models": models, "devices": devices, "waterfalls": waterfalls}


def _expected(status: FleetStatus) -> dict[str, Any]:
    return {"models": {m.name: (m.rung, format_size(m.memory_bytes)) for m in status.models},
            "devices": {d.device: (format_size(d.hot_bytes), format_size(d.parked_bytes)) for d in status.devices},
            "waterfalls": [(c.model, c.rung, [p.name for p in c.phases]) for c in status.recent_cold_starts[:6]]}


def _agreeing_view(page: Any, gw: Gateway) -> tuple[dict[str, Any], FleetStatus]:
    """The page's view and the status it must agree with: read between two identical statuses
    with a redraw in between, so that a change in the fleet cannot be taken for a disagreement."""
    for _ in range(20):
        before = gw.status()
        _wait_for_poll(page, _polls(page))
        view = _page_view(page)
        after = gw.status()
        if _expected(parse_status(before)) == _expected(parse_status(after)):
            return view, parse_status(after)
    raise AssertionError("the fleet kept changing while the page was read")


@pytest.mark.browser
def test_dashboard_shows_what_the_status_route_says(own_fleet: Gateway, browser: Any, tmp_path) -> None:
    _ladder.settled(own_fleet)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(own_fleet.url + "/zerostart/?interval=0.25")
    _wait_for_poll(page, 0)
    client = own_fleet.openai()
    for _ in range(6):  # traffic for the rates
        client.completions.create(model="assistant", prompt="hi", max_tokens=2)
        time.sleep(0.15)
    view, status = _agreeing_view(page, own_fleet)
    assert view == _expected(status)
    assert {name: rung for name, (rung, _) in view["models"].items()} == _ladder.RUNGS
    # the rates: requests counted since the page opened
    assert float(page.locator("#rate-requests .value").text_content() or "0") > 0
    assert page.locator("#problem").is_hidden() and errors == []
    shots = os.environ.get("ZEROSTART_SCREENSHOT_DIR") or str(tmp_path)
    os.makedirs(shots, exist_ok=True)
    page.screenshot(path=os.path.join(shots, "dashboard.png"), full_page=True)
    assert os.path.getsize(os.path.join(shots, "dashboard.png")) > 10_000

    # live: a request climbs the model at zero; its card moves to the hot column without a reload
    client.completions.create(model="translator", prompt="hi", max_tokens=2)
    deadline = time.monotonic() + 30
    while page.locator('.rung[data-rung="hot"] .model[data-model="translator"]').count() == 0:
        assert time.monotonic() < deadline, "the translator's card did not move to the hot rung"
        time.sleep(0.1)
    view, status = _agreeing_view(page, own_fleet)
    assert view == _expected(status) and view["models"]["translator"][0] == "hot"
    assert view["waterfalls"][0][:2] == ("translator", "source")
    page.close()
