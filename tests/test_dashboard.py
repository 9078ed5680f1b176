"""The dashboard's pages in a real headless Chromium (Debian's chromium and chromium-driver, through selenium),
against real servers and workers.

The session installs the two packages with apt-get when they are missing and the tests run as root. Without
them the tests skip, except under CI=true, where they fail. Each page's screenshot is saved under
test-artifacts/screenshots/ at the project root.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from conftest import ROOT, Cluster, Server, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = ROOT / "test-artifacts" / "screenshots"
#: Longest the session waits for apt-get to install the browser, seconds.
INSTALL_TIMEOUT = 900
WIDTH, HEIGHT = 1360, 900


def _missing_browser() -> str | None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    return f"{' and '.join(missing)} missing (apt-get install chromium chromium-driver)" if missing else None


@pytest.fixture(scope="session")
def chromium() -> None:
    """Debian's chromium and chromium-driver, installed here if missing and root may."""
    if _missing_browser() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
            try:
                subprocess.run(command, env=env, capture_output=True, timeout=INSTALL_TIMEOUT, check=False)
            except subprocess.TimeoutExpired:
                break
    missing = _missing_browser()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing} (CI=true: the dashboard must be tested in a browser)")
        pytest.skip(missing)


@pytest.fixture(scope="session")
def driver(chromium: None) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={WIDTH},{HEIGHT}",
        "--force-device-scale-factor=1", "--lang=en-US", "--disable-extensions", "--no-first-run", "--hide-scrollbars",
    ):  # fmt: skip
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(20)
    yield browser
    browser.quit()


class Page:
    """The browser, with bounded waits on what the page shows (read in one script: no stale elements)."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    def open(self, url: str) -> None:
        self.driver.get(url)
        # Lost if the page reloads: checks that updates come without one.
        self.driver.execute_script("window.martinetTestMark = 1")

    @property
    def path(self) -> str:
        parts = urlsplit(self.driver.current_url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def texts(self, selector: str) -> list[str]:
        script = "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent.trim())"
        return self.driver.execute_script(script, selector)

    def text(self, selector: str) -> str:
        found = self.texts(selector)
        return found[0] if found else ""

    def wait_text(self, selector: str, expected: str | re.Pattern, what: str = "") -> str:
        def shown() -> str | None:
            text = self.text(selector)
            ok = expected.search(text) if isinstance(expected, re.Pattern) else text == expected
            return text if ok else None

        return wait_until(shown, what=what or f"{selector} to show {expected!r} (shows {self.text(selector)!r})")

    def click(self, selector: str) -> None:
        """Click the first element matching ``selector`` once it is there and enabled (pages redraw as they poll)."""

        def clicked() -> bool:
            try:
                elements = [e for e in self.driver.find_elements(By.CSS_SELECTOR, selector) if e.is_enabled()]
                if elements:
                    elements[0].click()
                    return True
            except WebDriverException:
                pass  # redrawn between finding and clicking: find it again
            return False

        wait_until(clicked, what=f"{selector} to be clickable")

    def type(self, selector: str, text: str) -> None:
        element = self.driver.find_element(By.CSS_SELECTOR, selector)
        element.clear()
        element.send_keys(text)

    def accept_confirm(self) -> str:
        def alert() -> Any:
            try:
                return self.driver.switch_to.alert
            except NoAlertPresentException:
                return None

        dialog = wait_until(alert, what="the confirmation dialog")
        message = dialog.text
        dialog.accept()
        return message

    def visible(self, selector: str) -> bool:
        return any(e.is_displayed() for e in self.driver.find_elements(By.CSS_SELECTOR, selector))

    def not_reloaded(self) -> bool:
        return self.driver.execute_script("return window.martinetTestMark === 1")

    def shot(self, name: str) -> Path:
        """Save the whole page as test-artifacts/screenshots/NAME.png."""
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        height, frame = self.driver.execute_script(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
        )
        self.driver.set_window_size(WIDTH, max(HEIGHT, height + frame))
        try:
            self.driver.save_screenshot(str(path))
        finally:
            self.driver.set_window_size(WIDTH, HEIGHT)
        return path


@pytest.fixture
def page(driver: webdriver.Chrome) -> Iterator[Page]:
    """The browser with no cookie (every test's servers are on 127.0.0.1, whose cookies they would share)."""
    driver.delete_all_cookies()
    yield Page(driver)
    driver.get("about:blank")  # stops the last page's polling before its server goes


def row_ids(page: Page) -> list[int]:
    return [int(value) for value in page.driver.execute_script(
        "return [...document.querySelectorAll('tr[data-task]')].map(e => e.dataset.task)"
    )]  # fmt: skip


def wait_rows(page: Page, expected: list[int], what: str) -> None:
    wait_until(lambda: row_ids(page) == expected, what=f"{what}: rows {expected} (shows {row_ids(page)})")


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> tuple:
    """One HTTP request, redirects not followed: (status, headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body, headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def final(cluster: Cluster, ids: list[int]) -> None:
    for task_id in ids:
        assert cluster.client.wait(task_id, timeout=20)["status"] in ("succeeded", "failed", "cancelled")


def test_pages_and_assets_over_http(sqlite_cluster: Cluster):
    """What the browser is sent: every page path gets the app, whose assets are cached by their content hash."""
    url = sqlite_cluster.server.http_url
    for path in ("/", "/tasks", "/tasks/7", "/recurring", "/workers"):
        status, headers, body = request(url + path)
        assert (status, headers["Content-Type"]) == (200, "text/html; charset=utf-8"), path
        assert headers["Cache-Control"] == "no-cache", "the page names the assets' hashes: always revalidated"
    assert request(url + "/", headers={"If-None-Match": headers["ETag"]})[0] == 304
    kinds = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
    for asset in sorted(set(re.findall(r'"(/static/[^"]+\?v=\w+)"', body.decode()))):
        status, headers, _ = request(url + asset)
        assert status == 200 and headers["Cache-Control"] == "public, max-age=31536000, immutable", asset
        assert headers["Content-Type"] == kinds[re.search(r"\.\w+(?=\?)", asset).group()]
        assert request(url + asset, headers={"If-None-Match": headers["ETag"]})[0] == 304
        assert request(url + asset.split("?")[0])[1]["Cache-Control"] == "no-cache", "an old or no hash: revalidate"
    assert request(url + "/static/nothing.js")[0] == 404
    status, _, body = request(url + "/api/v1/whoami")
    assert (status, json.loads(body)) == (200, {"role": "admin", "open": True})
    assert request(url + "/login")[1]["Location"] == "/", "no token: no login"


def test_overview_shows_the_counts(cluster: Cluster, page: Page):
    worker = cluster.start_worker("--concurrency", "3")
    client = cluster.client
    done = [client.execute({"name": "echo", "username": "ana"}, {"n": n}) for n in range(3)]
    broken = [client.execute({"name": "explode"}, {"message": f"bad input {n}"}) for n in range(2)]
    client.schedule("in 1 hour", {"name": "echo", "description": "later"})
    final(cluster, done + broken)

    page.open(cluster.server.http_url + "/")
    expected = {"waiting": "0", "scheduled": "1", "queued": "0", "running": "0", "succeeded": "3", "failed": "2",
                "cancelled": "0"}  # fmt: skip
    for status, count in expected.items():
        page.wait_text(f"[data-count={status}] .count", count, f"the overview's {status} count to be {count}")
    assert page.text("[data-metric=hour] .count") == "5"
    assert page.text("[data-metric=slots] .count") == "0 / 3"
    wait_until(lambda: page.texts("svg.chart rect.s-succeeded"), what="the chart's bar of this minute")
    assert f":{worker.pid}" in page.text("tr[data-worker] .cell-main")
    assert page.texts("tbody tr td a.cell-main") == ["echo", "explode"], "the task names of the last hour"
    page.shot(f"overview-{cluster.server.db_url.split(':')[0]}")

    page.click("[data-count=failed]")  # a card is a link to the filtered list
    wait_rows(page, sorted(broken, reverse=True), "the failed tasks")
    assert page.path == "/tasks?status=failed" and page.not_reloaded()


def test_progress_bar_moves_live(sqlite_cluster: Cluster, page: Page):
    sqlite_cluster.start_worker()
    task_id = sqlite_cluster.client.execute({"name": "steps"}, {"steps": 8, "seconds": 0.4})
    page.open(f"{sqlite_cluster.server.http_url}/tasks/{task_id}")

    percent = lambda: int(page.text("[data-role=progress]").rstrip("%") or 0)  # noqa: E731
    first = wait_until(lambda: percent() if 0 < percent() < 100 else None, what="the progress bar to start moving")
    assert re.fullmatch(r"step \d", page.text("[data-role=progress-message]"))
    page.shot("task-running")
    wait_until(lambda: first < percent() < 100, what=f"the progress bar to move on from {first}%")
    page.wait_text(".title-line .badge", "succeeded", "the task to succeed")
    assert percent() == 100 and page.text("[data-role=progress-message]") == "step 8"
    assert json.loads(page.text("[data-role=result]")) == {"done": 8}
    assert page.not_reloaded()


def test_cancel_from_the_task_page_stops_it(sqlite_cluster: Cluster, page: Page):
    sqlite_cluster.start_worker("--concurrency", "1")
    client = sqlite_cluster.client
    task_id = client.execute({"name": "nap", "description": "a long nap"}, {"seconds": 60})
    wait_until(lambda: client.status(task_id)["status"] == "running", what="the nap to run")
    page.open(f"{sqlite_cluster.server.http_url}/tasks/{task_id}")
    page.wait_text(".title-line .badge", "running")

    page.click("[data-action=cancel]")
    page.wait_text(".title-line .badge", "cancelled", "the page to show the task cancelled")
    assert client.status(task_id)["status"] == "cancelled"
    wait_until(lambda: client.workers()[0]["busy"] == 0, what="the worker's slot to be free again")
    assert page.texts("[data-action=retry]") == ["Retry"] and not page.texts("[data-action=cancel]")
    assert f"Task #{task_id} cancelled." in page.texts(".toast .msg")
    page.shot("task-cancelled")


def test_failed_task_page_shows_every_attempt_and_retries(sqlite_cluster: Cluster, page: Page):
    worker = sqlite_cluster.start_worker()
    client = sqlite_cluster.client
    task_id = client.execute({"name": "explode"}, {"message": "bad input"}, retries=1, retry_delay=0.1)
    assert client.wait(task_id, timeout=20)["status"] == "failed"
    page.open(f"{sqlite_cluster.server.http_url}/tasks/{task_id}")
    page.wait_text("[data-role=error]", "ValueError: bad input")
    assert 'raise ValueError(data.get("message", "boom"))' in page.text("[data-role=traceback]")
    attempts = "tr[data-attempt]"
    assert page.texts(f"{attempts} .badge") == ["failed", "failed"], "newest first"
    worker_id = client.workers()[0]["id"]
    assert page.texts(f"{attempts} td.mono") == [worker_id, worker_id]
    assert "—" not in page.texts(f"{attempts} time"), "each failed attempt's start and end"
    assert len(page.texts(f"{attempts} time")) == 4
    page.shot("task-failed")

    page.click("[data-action=retry]")
    wait_until(lambda: len(page.texts(attempts)) == 3, what="the third attempt on the page")
    assert client.wait(task_id, timeout=20)["attempts"] == 3
    page.wait_text(".title-line .badge", "failed")
    assert worker.running() and page.not_reloaded()


def test_filters_narrow_the_list(sqlite_cluster: Cluster, page: Page):
    sqlite_cluster.start_worker()
    client = sqlite_cluster.client
    invoices = [client.execute({"name": "echo", "username": "ana", "description": f"invoice {n}"}) for n in range(3)]
    photos = [client.execute({"name": "explode", "username": "bo", "description": "resize photo"}) for _ in range(2)]
    final(sqlite_cluster, invoices + photos)
    later = client.schedule("in 1 hour", {"name": "echo", "username": "bo", "description": "weekly invoice"})
    page.open(sqlite_cluster.server.http_url + "/tasks")
    wait_rows(page, sorted([*invoices, *photos, later], reverse=True), "every task, newest first")
    page.shot("tasks")

    page.click("[data-filter=failed]")
    wait_rows(page, sorted(photos, reverse=True), "the failed ones")
    assert page.path == "/tasks?status=failed"
    page.click("[data-filter=all]")
    page.type("input[name=name]", "echo")
    wait_rows(page, sorted([*invoices, later], reverse=True), "the echo tasks")
    page.type("input[name=username]", "bo")
    wait_rows(page, [later], "bo's echo task")
    assert page.path == "/tasks?name=echo&username=bo", "the filters are in the address, to share or reload"
    page.type("input[name=name]", "nothing-named-so")
    page.wait_text(".panel-empty", "No task matches these filters.")
    assert page.not_reloaded()


def _search_supported(url: str) -> bool:
    status, _, body = request(url + "/api/v1/tasks?" + urlencode({"search": "no description holds this"}))
    return status == 200 and not json.loads(body)["tasks"]


def test_search_narrows_the_list(sqlite_cluster: Cluster, page: Page):
    client = sqlite_cluster.client
    invoices = [client.execute({"name": "echo", "description": f"invoice {n} for ACME"}) for n in range(2)]
    client.execute({"name": "echo", "description": "resize photo"})
    if not _search_supported(sqlite_cluster.server.http_url):
        pytest.skip("GET /api/v1/tasks ignores ?search= (branch wt-api adds it)")
    page.open(sqlite_cluster.server.http_url + "/tasks")
    page.type("input[name=search]", "ACME")
    wait_rows(page, sorted(invoices, reverse=True), "the tasks whose description holds ACME")
    assert page.path == "/tasks?search=ACME"


def test_pages_through_the_list(sqlite_cluster: Cluster, page: Page):
    ids = sqlite_cluster.client.execute_many([({"name": "nap"}, None) for _ in range(55)])  # no worker: all queued
    newest_first = sorted(ids, reverse=True)
    page.open(sqlite_cluster.server.http_url + "/tasks?status=queued")
    wait_rows(page, newest_first[:50], "the first page")
    page.click("[data-page=older]")
    wait_rows(page, newest_first[50:], "the second page")
    assert page.path == f"/tasks?status=queued&before={newest_first[49]}"
    assert page.driver.find_element(By.CSS_SELECTOR, "[data-page=older]").is_enabled() is False
    page.click("[data-page=newer]")
    wait_rows(page, newest_first[:50], "the first page again")

    page.click("a[data-nav=overview]")  # with no worker, the oldest queued task is waiting: the queue's lag
    page.wait_text("[data-count=queued] .count", "55")
    page.wait_text("[data-metric=lag] .count", re.compile(r"^\d+(\.\d)? m?s$"))
    assert page.text("[data-metric=slots] .note") == "no worker connected"


def _bulk_supported(url: str) -> bool:
    body = json.dumps({"action": "retry", "name": "no task is named so"}).encode()
    status, _, _ = request(url + "/api/v1/tasks/bulk", "POST", body, {"Content-Type": "application/json"})
    return status == 200


def test_bulk_retry_and_cancel_of_the_filtered_list(sqlite_cluster: Cluster, page: Page):
    if not _bulk_supported(sqlite_cluster.server.http_url):
        pytest.skip("POST /api/v1/tasks/bulk is not there yet (branch wt-api adds it)")
    sqlite_cluster.start_worker()
    client = sqlite_cluster.client
    broken = [client.execute({"name": "explode"}) for _ in range(3)]
    fine = client.execute({"name": "echo"})
    final(sqlite_cluster, [*broken, fine])
    page.open(sqlite_cluster.server.http_url + "/tasks?status=failed")
    wait_rows(page, sorted(broken, reverse=True), "the failed tasks")

    page.click("[data-bulk=retry]")
    assert "with status failed" in page.accept_confirm()
    page.wait_text(".toast .msg", "Retried 3 tasks.")
    wait_until(lambda: all(client.status(t)["attempts"] == 2 for t in broken), what="every failed task to run again")
    assert client.status(fine)["attempts"] == 1, "the filter kept the succeeded task out"

    later = [client.schedule("in 1 hour", {"name": "nap"}) for _ in range(2)]
    page.click("[data-filter=scheduled]")
    wait_rows(page, sorted(later, reverse=True), "the scheduled tasks")
    page.click("[data-bulk=cancel]")
    page.accept_confirm()
    page.wait_text(".toast .msg", re.compile("Cancelled 2 tasks"))
    assert [client.status(t)["status"] for t in later] == ["cancelled", "cancelled"]


def test_recurring_run_now_and_revoke(sqlite_cluster: Cluster, page: Page):
    sqlite_cluster.start_worker()
    client = sqlite_cluster.client
    rid = client.every("1 hour", {"name": "echo", "description": "hourly report"}, {"report": "sales"})
    cron = client.every("0 9 * * mon-fri", {"name": "echo"}, tz="Europe/Paris")
    page.open(sqlite_cluster.server.http_url + "/recurring")
    row = f"tr[data-recurring='{rid}']"
    page.wait_text(f"{row} td:nth-child(3)", "1 hour")
    assert page.texts(f"tr[data-recurring='{cron}'] td:nth-child(3) .cell-sub") == ["Europe/Paris"]
    assert page.text(f"{row} .badge") == "active"
    page.shot("recurring")

    page.click(f"{row} [data-action=run]")
    message = page.wait_text(".toast .msg", re.compile(r"Started task #\d+"))
    task_id = int(re.search(r"#(\d+)", message).group(1))
    assert client.wait(task_id, timeout=20)["result"]["args"] == {"report": "sales"}

    page.click(f"{row} [data-action=revoke]")
    assert "will not run again" in page.accept_confirm()
    page.wait_text(f"{row} .badge", "revoked")
    assert [r["enabled"] for r in client.recurring() if r["id"] == rid] == [False]
    assert not page.texts(f"{row} [data-action=revoke]")


def test_a_paused_name_is_marked_on_the_tasks_and_recurring_pages(sqlite_cluster: Cluster, page: Page):
    client = sqlite_cluster.client
    client.pause("echo")
    held = client.execute({"name": "echo"})
    rid = client.every("1 hour", {"name": "echo", "run_at": "in 1 hour"})
    page.open(sqlite_cluster.server.http_url + "/tasks")
    page.wait_text(f"tr[data-task='{held}'] [data-paused]", "paused: not dispatched until resumed")
    page.open(sqlite_cluster.server.http_url + "/recurring")
    page.wait_text(f"tr[data-recurring='{rid}'] [data-paused]", "paused: its runs wait queued")
    client.resume("echo")
    wait_until(lambda: not page.texts(f"tr[data-recurring='{rid}'] [data-paused]"), what="the mark to go")
    assert page.not_reloaded()


def test_workers_page_and_errors_of_the_api(sqlite_cluster: Cluster, page: Page):
    worker = sqlite_cluster.start_worker("--concurrency", "2")
    page.open(sqlite_cluster.server.http_url + "/workers")
    page.wait_text("tr[data-worker] .cell-main", re.compile(rf":{worker.pid}$"))
    assert page.text("tr[data-worker] .pct") == "0/2"
    assert "steps" in page.texts("tr[data-worker] .tag")
    page.shot("workers")

    page.open(sqlite_cluster.server.http_url + "/tasks/999999")  # the API's own message, in the page
    page.wait_text(".notice", re.compile(r"^no task with id 999999"))


def test_pages_ask_for_the_token(tmp_path: Path, page: Page):
    admin, reader = "admin-token-for-the-test", "read-token-for-the-test"
    server = Server(f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "server.log", "--http-token", admin,
                    "--http-read-token", reader, http=True)  # fmt: skip
    try:
        server.start().wait_ready()
        with server.client() as client:
            task_id = client.schedule("in 1 hour", {"name": "echo", "description": "for later"})
        url = server.http_url
        status, headers, _ = request(url + "/")
        assert (status, headers["Location"]) == (303, "/login?next=/")
        status, _, body = request(url + "/login", "POST", b"token=wrong&next=/", _FORM)
        assert status == 401 and b"not valid" in body
        evil = urlencode({"token": admin, "next": "//evil.example"}).encode()
        status, headers, _ = request(url + "/login", "POST", evil, _FORM)
        assert (status, headers["Location"]) == (303, "/"), "never sent to another site"

        page.open(f"{url}/tasks/{task_id}")
        assert page.path == f"/login?next=/tasks/{task_id}"
        page.shot("login")
        _log_in(page, "wrong")
        page.wait_text(".login-error", re.compile("not valid"))
        _log_in(page, admin)
        page.wait_text(".title-line .badge", "scheduled")
        assert page.path == f"/tasks/{task_id}", "back where the login began"
        page.wait_text("[data-action=cancel]", "Cancel")
        assert not page.visible("#role") and page.visible("#logout")

        page.click("#logout")
        wait_until(lambda: page.path.startswith("/login"), what="the login form after logging out")
        _log_in(page, reader)
        page.wait_text("[data-count=scheduled] .count", "1", "the overview, read-only")
        page.open(f"{url}/tasks/{task_id}")
        page.wait_text(".title-line .badge", "scheduled")
        page.wait_text("#role", "read-only")
        assert page.visible("#role")
        assert not page.texts("[data-action]"), "the read token sees no action"
        refused = page.driver.execute_async_script(
            "fetch(arguments[0], {method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{}'})"
            ".then(r => arguments[1](r.status))",
            f"/api/v1/tasks/{task_id}/cancel",
        )
        assert refused == 403
        page.click("a[data-nav=tasks]")
        wait_rows(page, [task_id], "the task list")
        assert not page.texts("[data-bulk]")
        page.shot("tasks-read-only")
        with server.client() as client:
            rid = client.every("1 hour", {"name": "echo"})
        page.click("a[data-nav=recurring]")
        page.wait_text(f"tr[data-recurring='{rid}'] .badge", "active")
        assert not page.texts("[data-action]"), "nor run now nor revoke"
    finally:
        if server.running():
            server.terminate()


_FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _log_in(page: Page, token: str) -> None:
    ready = "return document.readyState === 'complete' && !!document.getElementById('token')"
    wait_until(lambda: page.driver.execute_script(ready), what="the login form")  # not the page it replaces
    page.type("#token", token)
    page.driver.find_element(By.CSS_SELECTOR, ".login-card button[type=submit]").click()
