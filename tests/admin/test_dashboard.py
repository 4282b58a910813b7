"""The live dashboard (GET / on the admin listener) in a real browser: Debian's Chromium,
headless, driven by Selenium through Debian's chromedriver (`make browser-deps` installs
both). A dbmux with real psycopg clients (idle, in transactions, pinned for known reasons)
serves the page; what the page shows must match the API and /metrics, and move when the
traffic does. Each test saves a screenshot (its path is printed)."""

from __future__ import annotations

import json
import shutil
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from importlib.resources import files
from pathlib import Path
from typing import Any

import psycopg
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

from dbmux.config import Address, AdminConfig
from dbmux.testing import PostgresCluster
from dbmux.testing.embedded import EmbeddedDbmux, admin_for_every_dbmux, dashboard_admin
from tests.admin.answers import call, get_json
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, RunningProxy, proxy_config

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Besides each test's tmp_path, screenshots land here (CI keeps the folder).
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output"
WAIT = 20.0  # seconds for the page to show something (it refreshes every second)
TOKEN = "dashboard-token-0123456789"

# What the page shows, as its elements' data-* attributes hold it (the visible text is
# checked separately): per proxy card, its stats, pins, endpoints, targets and events.
READ_PAGE = """
const cards = {};
for (const card of document.querySelectorAll("[data-proxy]")) {
  const stats = {}, pins = {}, endpoints = {}, targets = {};
  for (const s of card.querySelectorAll("[data-stat]")) {
    stats[s.dataset.stat] = { value: s.dataset.value, text: s.querySelector(".value").textContent };
  }
  for (const r of card.querySelectorAll("[data-pin-reason]")) {
    pins[r.dataset.pinReason] = {
      now: r.querySelector("[data-col=now]").textContent,
      total: r.querySelector("[data-col=total]").textContent };
  }
  for (const r of card.querySelectorAll("[data-endpoint]")) {
    endpoints[r.dataset.endpoint] = Object.fromEntries(
      [...r.querySelectorAll("[data-col]")].map((c) => [c.dataset.col, c.textContent]));
  }
  for (const r of card.querySelectorAll("[data-target]")) {
    targets[r.dataset.target] = { role: r.dataset.role, health: r.dataset.health,
                                  writer: r.dataset.writer };
  }
  const events = [...card.querySelectorAll("[data-event-kind]")].map((r) => r.dataset.eventKind);
  cards[card.dataset.proxy] = { stats, pins, endpoints, targets, events };
}
return { cards, ticks: Number(document.body.dataset.ticks || 0),
         status: document.getElementById("status").textContent,
         metrics: METRICS };
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium; not a skip when it is missing: CI installs it (make browser-deps)."""
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1600",
    ):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    except (WebDriverException, OSError) as error:
        pytest.fail(
            f"cannot start headless Chromium ({CHROMIUM}) through {CHROMEDRIVER}: {error}\n"
            "Install them with `make browser-deps` (apt-get install chromium chromium-driver).",
            pytrace=False,
        )
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def read_page(browser: WebDriver) -> dict[str, Any]:
    page: dict[str, Any] = browser.execute_script(READ_PAGE)
    return page


def wait_for_page(
    browser: WebDriver, condition: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The page once `condition` holds for what it shows, checked as it refreshes."""
    page: dict[str, Any] = {}

    def holds(driver: WebDriver) -> bool:
        nonlocal page
        page = read_page(driver)
        return condition(page)

    try:
        WebDriverWait(browser, WAIT, poll_frequency=0.1).until(holds)
    except WebDriverException:
        shown = json.dumps(page, indent=1)[:3000]
        raise AssertionError(f"after {WAIT} s the page does not show {what}:\n{shown}") from None
    return page


def screenshot(browser: WebDriver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    browser.save_screenshot(str(path))
    SCREENSHOTS.mkdir(exist_ok=True)
    shutil.copy(path, SCREENSHOTS / path.name)
    print(f"dashboard screenshot: {path} (and {SCREENSHOTS / path.name})")
    return path


def prometheus(admin: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The series of one metric in /metrics, by their labels."""
    found = {}
    for line in call(f"{admin}/metrics").body.decode().splitlines():
        head, _, value = line.rpartition(" ")
        metric, _, labels = head.partition("{")
        if metric == name:
            pairs = [p.split("=", 1) for p in labels.rstrip("}").split(",") if p]
            found[tuple((k, v.strip('"')) for k, v in pairs)] = float(value)
    return found


def api_state(admin: str, proxy: str = "test") -> dict[str, Any]:
    clients = get_json(f"{admin}/api/proxies/{proxy}/clients")["Clients"]
    servers = get_json(f"{admin}/api/proxies/{proxy}/servers")["Servers"]
    return {
        "clients": len(clients),
        "database": len(servers),
        "pinned": Counter(c["PinReason"] for c in clients if c["PinReason"]),
        "active": sum(c["State"] == "active" for c in clients),
        "waiting": sum(c["State"] == "waiting" for c in clients),
    }


def assert_page_matches_api_and_metrics(page: dict[str, Any], admin: str) -> None:
    """What the page shows now against what the API and /metrics answer now (the traffic
    is standing still while this runs)."""
    card = page["cards"]["test"]
    stats, state = card["stats"], api_state(admin)
    assert int(stats["clients"]["value"]) == state["clients"]
    assert stats["clients"]["text"] == str(state["clients"])
    assert int(stats["database"]["value"]) == state["database"]
    assert stats["database"]["text"] == str(state["database"])
    assert stats["ratio"]["text"] == f"{state['clients'] / state['database']:.1f} : 1"
    assert int(stats["queued"]["value"]) == state["waiting"] == 0
    assert int(stats["pinned"]["value"]) == sum(state["pinned"].values())
    assert {r: int(p["now"]) for r, p in card["pins"].items() if int(p["now"])} == dict(
        state["pinned"]
    )
    open_clients = prometheus(admin, "dbmux_client_connections")  # (summed over endpoints)
    assert sum(v for k, v in open_clients.items() if ("proxy", "test") in k) == state["clients"]
    pins_total = prometheus(admin, page["metrics"]["pins"])
    assert pins_total, "the page's name for the pins counter is not in /metrics"
    by_reason: Counter[str] = Counter()
    for labels, value in pins_total.items():
        by_reason[dict(labels)["reason"]] += int(value)
    assert {r: p["total"] for r, p in card["pins"].items()} == {
        r: str(n) for r, n in by_reason.items()
    }
    endpoint = card["endpoints"]["test"]
    assert int(endpoint["clients"]) == state["clients"]
    assert int(endpoint["active"]) == state["active"]


@pytest.fixture
def admin(proxy: RunningProxy) -> str:
    return proxy.embedded.admin_url


def test_the_page_shows_the_traffic_as_the_api_and_metrics_count_it_and_follows_it(
    browser: WebDriver, proxy: RunningProxy, admin: str, tmp_path: Path
) -> None:
    with ExitStack() as stack:

        def connect(autocommit: bool = True) -> psycopg.Connection:
            return stack.enter_context(psycopg.connect(proxy.url(), autocommit=autocommit))

        idle = [connect() for _ in range(3)]
        for conn in idle:
            conn.execute("SELECT 1")
        listening = [connect() for _ in range(2)]
        for conn in listening:
            conn.execute("LISTEN news")
        busy = connect(autocommit=False)
        busy.execute("SELECT 1")  # a transaction left open: it holds a server connection

        browser.get(f"{admin}/")
        page = wait_for_page(
            browser,
            lambda p: (
                "test" in p["cards"]
                and p["cards"]["test"]["stats"]["clients"]["value"] == "6"
                and p["cards"]["test"]["stats"]["pinned"]["value"] == "2"
            ),
            "6 clients, 2 of them pinned",
        )
        assert page["status"].startswith("live"), page["status"]
        assert_page_matches_api_and_metrics(page, admin)
        card = page["cards"]["test"]
        assert card["pins"]["listen"]["now"] == "2"
        assert card["stats"]["database"]["value"] == "3"  # two pinned, one in a transaction
        (target,) = card["targets"].values()
        assert (target["role"], target["health"], target["writer"]) == (
            "READ_WRITE",
            "AVAILABLE",
            "true",
        )
        events = get_json(f"{admin}/api/proxies/test/events")["Events"]
        assert [e["Kind"] for e in events][-8:][::-1] == card["events"]
        assert "writer" in card["events"]
        screenshot(browser, tmp_path, "dashboard")

        # The traffic changes: two idle clients leave, another is pinned by a temporary
        # table, two more transactions start.
        for conn in idle[:2]:
            conn.close()
        idle[2].execute("CREATE TEMP TABLE scratch (n int)")
        more = [connect(autocommit=False) for _ in range(2)]
        for conn in more:
            conn.execute("SELECT 1")
        page = wait_for_page(
            browser,
            lambda p: (
                p["cards"]["test"]["stats"]["pinned"]["value"] == "3"
                and p["cards"]["test"]["stats"]["clients"]["value"] == "6"
                and p["cards"]["test"]["endpoints"]["test"]["active"] == "3"
            ),
            "6 clients again, 3 pinned (listen and temporary_object), 3 in transactions",
        )
        assert_page_matches_api_and_metrics(page, admin)
        card = page["cards"]["test"]
        assert (card["pins"]["listen"]["now"], card["pins"]["temporary_object"]["now"]) == (
            "2",
            "1",
        )
        assert card["stats"]["database"]["value"] == "6"
        screenshot(browser, tmp_path, "dashboard-moved")


def test_the_page_keeps_refreshing(browser: WebDriver, admin: str) -> None:
    browser.get(f"{admin}/")
    first = wait_for_page(browser, lambda p: p["ticks"] >= 1, "a first refresh")["ticks"]
    wait_for_page(browser, lambda p: p["ticks"] >= first + 2, "two more refreshes")


def test_the_page_is_one_self_contained_file_that_may_run_only_its_own_script(admin):
    answer = call(f"{admin}/")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = answer.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    page = answer.body.decode()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page


@pytest.fixture
def guarded(pg: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A dbmux whose admin API wants a bearer token."""
    monkeypatch.setenv("DBMUX_TEST_DASHBOARD_TOKEN", TOKEN)
    config = proxy_config(pg, tmp_path, {}, [])
    config["admin"] = {"listen": "127.0.0.1:0", "token": "env:DBMUX_TEST_DASHBOARD_TOKEN"}
    with EmbeddedDbmux(config) as dbmux:
        yield dbmux.admin_url


def test_the_page_itself_needs_no_token_and_holds_no_data_but_forgeries_are_refused(guarded):
    page = call(f"{guarded}/")
    assert page.status == 200
    assert page.body == files("dbmux.admin").joinpath("dashboard.html").read_bytes()  # static
    assert call(f"{guarded}/api/proxies").status == 401
    assert call(f"{guarded}/", Origin="http://evil.example").status == 403
    assert call(f"{guarded}/nothing").status == 401  # who has no token learns nothing


def test_with_a_token_the_page_takes_it_from_its_fragment_and_drops_it_from_the_address(
    browser: WebDriver, guarded: str, tmp_path: Path
) -> None:
    browser.get(f"{guarded}/")
    page = wait_for_page(browser, lambda p: "401" in p["status"], "that the token is missing")
    assert "#token=" in page["status"]
    assert not page["cards"]
    browser.get(f"{guarded}/#token={TOKEN}")
    browser.refresh()  # (a fragment change alone does not reload the page)
    page = wait_for_page(browser, lambda p: "test" in p["cards"], "the proxy")
    assert page["status"].startswith("live")
    assert TOKEN not in browser.current_url
    screenshot(browser, tmp_path, "dashboard-token")


def test_twenty_proxies_fit_on_the_page(
    browser: WebDriver, pg: PostgresCluster, tmp_path: Path
) -> None:
    one = proxy_config(pg, tmp_path, {"max_connections_percent": 2}, [])["proxies"][0]
    names = [f"app-{i:02d}" for i in range(20)]
    config = {"proxies": [{**one, "name": name} for name in names]}
    with EmbeddedDbmux(config) as dbmux:
        host, port = dbmux.address("app-07")
        url = f"postgresql://{APP_USER}:{APP_PASSWORD}@{host}:{port}/{APP_DB}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("LISTEN news")
            browser.get(f"{dbmux.admin_url}/")
            page = wait_for_page(
                browser,
                lambda p: (
                    len(p["cards"]) == 20
                    and p["cards"]["app-07"]["stats"]["pinned"]["value"] == "1"
                ),
                "20 proxies, one client pinned on app-07",
            )
            assert sorted(page["cards"]) == names
            assert all(page["cards"][n]["stats"]["clients"]["value"] == "0" for n in names[:7])
            rows = browser.find_elements("css selector", "[data-overview]")
            assert [r.get_attribute("data-overview") for r in rows] == names
            screenshot(browser, tmp_path, "dashboard-20")


# /metrics as metrics.py will render it with a borrow latency histogram (Prometheus style:
# cumulative buckets, _sum, _count), labelled with a second proxy the page must leave out.
HISTOGRAM = """\
# TYPE dbmux_database_connections_borrow_latency_seconds histogram
{rows}
dbmux_database_connections_borrow_latency_seconds_bucket{{proxy="other",le="+Inf"}} 999
dbmux_database_connections_borrow_latency_seconds_sum{{proxy="other"}} 99
dbmux_database_connections_borrow_latency_seconds_count{{proxy="other"}} 999
"""


def histogram_text(buckets: dict[str, int], total: float) -> str:
    name = "dbmux_database_connections_borrow_latency_seconds"
    rows = [f'{name}_bucket{{proxy="test",le="{le}"}} {n}' for le, n in buckets.items()]
    rows += [
        f'{name}_sum{{proxy="test"}} {total}',
        f'{name}_count{{proxy="test"}} {buckets["+Inf"]}',
    ]
    return HISTOGRAM.format(rows="\n".join(rows))


def test_borrow_latency_is_the_mean_and_95th_percentile_of_the_histogram_between_scrapes(
    browser: WebDriver, admin: str
) -> None:
    """The page's own functions, in the browser, on a histogram metrics.py does not have yet:
    100 borrows between two scrapes, 90 within 1 ms and 10 within 25 ms, 0.2 s in all."""
    browser.get(f"{admin}/")
    before = histogram_text({"0.001": 5, "0.025": 5, "+Inf": 5}, 0.5)
    after = histogram_text({"0.001": 95, "0.025": 105, "+Inf": 105}, 0.7)
    found = browser.execute_script(
        """
        const [before, after] = [...arguments].map((text) =>
          histogram(parseMetrics(text), "borrowLatency", "test"));
        const shown = latencyOver(before, after);
        return { n: shown.n, mean: shown.mean, p95: shown.p95, text: seconds(shown.mean),
                 absent: histogram(parseMetrics(""), "borrowLatency", "test") };
        """,
        before,
        after,
    )
    assert found["n"] == 100
    assert found["mean"] == pytest.approx(0.002)
    assert found["p95"] == 0.025
    assert found["text"] == "2 ms"
    assert found["absent"] is None


def test_the_demos_dbmuxes_one_after_another_serve_the_dashboard_at_one_address(pg, tmp_path):
    chosen = dashboard_admin()
    assert chosen.listen.host == "127.0.0.1" and chosen.listen.port > 0
    with socket.socket() as sock:  # (a port of the test's own, not 9187: a demo may run)
        sock.bind(("127.0.0.1", 0))
        admin = AdminConfig(listen=Address(host="127.0.0.1", port=sock.getsockname()[1]))
    urls = []
    with admin_for_every_dbmux(admin):
        for _ in range(2):
            with EmbeddedDbmux(proxy_config(pg, tmp_path, {}, [])) as dbmux:
                assert call(f"{dbmux.admin_url}/").status == 200
                urls.append(dbmux.admin_url)
    assert urls == [f"http://{admin.listen}"] * 2
    with EmbeddedDbmux(proxy_config(pg, tmp_path, {}, [])) as dbmux:
        assert dbmux.admin_url != urls[0]  # outside, a free port again
