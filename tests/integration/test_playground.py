"""The browser playground at /: headless Chromium (Debian's, driven by Selenium) against a real
server. Answers stream into the DOM in increments and match the API's; Stop aborts the engine
request and frees its KV blocks; model output and the user's text render as text, never as
markup; a server with keys asks for one. Over plain HTTP: the page is open under a strict CSP
while the API stays locked, and --no-ui turns it off."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from prometheus_client import REGISTRY

from server.settings import load_settings
from tests.integration.conftest import API_KEY, MODEL_NAME, RunningServer, serve, serve_process

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path("/tmp/pagedserve-screenshots")
XSS = "<img src=x onerror=alert(1)>"
# the prefill (assistant text the server echoes first, then continues): markup and markdown
PREFILL = f"{XSS} **bold** and `code`\n\n- one\n- two\n\n```html\n<script>alert(2)</script>\n```\n"
PAGE_TIMEOUT_S = 15.0


def _browser_missing() -> str | None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    return ", ".join(missing) or None


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One headless Chromium for the module; skipped where it is not installed, except in CI,
    which installs it (.ci/run)."""
    missing = _browser_missing()
    if missing:
        message = f"no headless browser: missing {missing} (apt-get install chromium " \
                  "chromium-driver; pip install selenium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # explicit paths: Selenium Manager downloads nothing
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: WebDriver, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WebDriver]:
    """The browser, and a screenshot of where the test left it (passed or failed) in tmp_path
    and in /tmp/pagedserve-screenshots/<test>.png."""
    yield browser
    from selenium.common.exceptions import NoAlertPresentException

    with contextlib.suppress(NoAlertPresentException):
        browser.switch_to.alert.dismiss()  # a screenshot cannot be taken under an alert
    shot = tmp_path / "screenshot.png"
    browser.save_screenshot(str(shot))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOTS / f"{request.node.name}.png")


@pytest.fixture(scope="module")
def open_server(long_context_llama_dir: Path) -> Iterator[RunningServer]:
    """No auth; the 4096-position llama, slow enough per token to press Stop mid-answer."""
    with serve(long_context_llama_dir, {"api_keys": ()}, num_blocks=600,
               max_num_seqs=4) as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    with serve(tiny_llama_dir, num_blocks=64, max_num_seqs=4) as running:
        yield running


# ---- helpers ---------------------------------------------------------------------------------

def _open(driver: WebDriver, server: RunningServer) -> None:
    driver.get(f"{server.base_url}/")
    _wait(driver, lambda: MODEL_NAME in _text(driver, "model-info"), "the model card")


def _wait(driver: WebDriver, condition: Callable[[], object], what: str,
          timeout_s: float = PAGE_TIMEOUT_S) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s, poll_frequency=0.02).until(
        lambda _: condition(), message=f"waiting for {what}")


def _el(driver: WebDriver, element_id: str) -> WebElement:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _text(driver: WebDriver, element_id: str) -> str:
    return str(_el(driver, element_id).text)


def _fill(driver: WebDriver, element_id: str, value: str) -> None:
    field = _el(driver, element_id)
    field.clear()
    if value:
        field.send_keys(value)


def _send(driver: WebDriver, text: str) -> None:
    _fill(driver, "prompt", text)
    _el(driver, "send").click()


def _last_answer(driver: WebDriver) -> dict[str, Any]:
    """The last assistant message: its raw text, rendered text, stats, and whether it ended."""
    state: dict[str, Any] = driver.execute_script("""
        const nodes = document.querySelectorAll("#messages .message.assistant");
        const node = nodes[nodes.length - 1];
        if (!node) return null;
        return {source: node.sourceText, rendered: node.querySelector(".content").innerText,
                stats: node.querySelector(".stats").textContent,
                done: node.classList.contains("done")};
    """)
    return state


def _wait_answer_done(driver: WebDriver, timeout_s: float = 60.0) -> dict[str, Any]:
    _wait(driver, lambda: (_last_answer(driver) or {}).get("done"), "the answer to end",
          timeout_s)
    return _last_answer(driver)


def _num_aborted() -> float:
    value = REGISTRY.get_sample_value("pagedserve_request_failure_total",
                                      {"model_name": MODEL_NAME, "reason": "abort"})
    return value or 0.0


def _api_answer(server: RunningServer, messages: list[dict[str, str]], max_tokens: int) -> str:
    response = server.http().post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": messages, "temperature": 0, "top_p": 1,
        "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


# ---- in the browser --------------------------------------------------------------------------

def test_answers_stream_in_increments_and_keep_the_conversation(
        page: WebDriver, open_server: RunningServer) -> None:
    _open(page, open_server)
    assert "context 4096 tokens" in _text(page, "model-info")
    _fill(page, "temperature", "0")
    _fill(page, "max-tokens", "48")
    _send(page, "Tell me a story")
    lengths: list[int] = []
    deadline = time.monotonic() + 60
    while not (state := _last_answer(page) or {}).get("done"):
        assert time.monotonic() < deadline, "the answer did not end"
        if state.get("source") and (not lengths or len(state["source"]) != lengths[-1]):
            lengths.append(len(state["source"]))
        time.sleep(0.005)
    assert len(lengths) >= 3, f"text arrived in {len(lengths)} increments: {lengths}"
    assert lengths == sorted(lengths)
    first = _last_answer(page)
    assert first["stats"].startswith("TTFT ") and " tok/s · " in first["stats"], first["stats"]
    # greedy: the page's streamed text is what the API answers to the same conversation
    conversation = [{"role": "user", "content": "Tell me a story"}]
    assert first["source"] == _api_answer(open_server, conversation, 48)

    _send(page, "And then?")  # the second turn carries the first
    second = _wait_answer_done(page)
    conversation += [{"role": "assistant", "content": first["source"]},
                     {"role": "user", "content": "And then?"}]
    assert second["source"] == _api_answer(open_server, conversation, 48)
    open_server.wait_idle()


def test_stop_aborts_the_request_and_frees_its_blocks(
        page: WebDriver, open_server: RunningServer) -> None:
    _open(page, open_server)
    _fill(page, "temperature", "0")
    _fill(page, "max-tokens", "")  # the rest of the context: ~4000 tokens, far longer than this
    aborted_before = _num_aborted()
    _send(page, "Write a long essay")
    _wait(page, lambda: len((_last_answer(page) or {}).get("source") or "") > 20,
          "the answer to start")
    assert not open_server.is_idle()
    _el(page, "stop").click()
    stopped = _wait_answer_done(page, timeout_s=5)
    assert stopped["stats"].endswith("stopped"), stopped["stats"]
    open_server.wait_idle(timeout_s=2.0)  # the server saw the disconnect: every block free
    assert _num_aborted() - aborted_before == 1
    assert _el(page, "send").is_enabled() and not _el(page, "stop").is_enabled()


def test_model_output_and_user_text_render_as_text(
        page: WebDriver, open_server: RunningServer) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    _open(page, open_server)
    page.execute_cdp_cmd("Browser.grantPermissions", {  # for the Copy button's clipboard
        "origin": open_server.base_url,
        "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    _fill(page, "max-tokens", "4")
    _el(page, "prefill").send_keys(PREFILL)  # echoed, then continued: it streams like any answer
    _send(page, XSS)
    answer = _wait_answer_done(page)
    assert answer["source"].startswith(PREFILL)
    assert answer["rendered"].startswith(f"{XSS} bold and code")
    with pytest.raises(NoAlertPresentException):
        page.switch_to.alert  # noqa: B018 - the property raises when no alert is open
    messages = page.find_element(By.ID, "messages")
    assert messages.find_elements(By.CSS_SELECTOR, "img, script, iframe, object") == []
    user = messages.find_element(By.CSS_SELECTOR, ".message.user .content")
    assert user.text == XSS
    # the markdown subset became elements, the markup inside it stayed text
    assistant = messages.find_elements(By.CSS_SELECTOR, ".message.assistant .content")[-1]
    assert assistant.find_element(By.TAG_NAME, "strong").text == "bold"
    assert [li.text for li in assistant.find_elements(By.TAG_NAME, "li")] == ["one", "two"]
    assert assistant.find_element(By.CSS_SELECTOR, "pre code").text == \
        "<script>alert(2)</script>"
    # Copy puts the message's raw text on the clipboard
    messages.find_elements(By.CSS_SELECTOR, ".message.assistant header .copy")[-1].click()
    copied = page.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], (e) => arguments[0]('error ' + e))")
    assert copied == answer["source"]
    open_server.wait_idle()


def test_keyed_server_asks_for_the_key(page: WebDriver, keyed_server: RunningServer) -> None:
    page.get(f"{keyed_server.base_url}/")
    page.execute_script("sessionStorage.clear()")
    page.refresh()
    _wait(page, lambda: _el(page, "key-form").is_displayed(), "the API key field")
    assert _text(page, "model-info") == "API key needed"
    assert not _el(page, "send").is_enabled() and not _el(page, "key-error").is_displayed()

    _fill(page, "api-key", "sk-wrong")
    _el(page, "key-submit").click()
    _wait(page, lambda: _el(page, "key-error").is_displayed(), "the 401 message")
    assert _text(page, "key-error").startswith("401: Invalid or missing API key")
    assert page.execute_script("return sessionStorage.length") == 0

    _fill(page, "api-key", API_KEY)
    _el(page, "key-submit").click()
    _wait(page, lambda: MODEL_NAME in _text(page, "model-info"), "the model card")
    assert not _el(page, "key-error").is_displayed()
    assert page.execute_script("return sessionStorage.getItem('pagedserve.apiKey')") == API_KEY
    _fill(page, "max-tokens", "100000")  # more than the context holds: the server's 400
    _send(page, "hi")
    _wait(page, lambda: _el(page, "error").is_displayed(), "the error message")
    assert _text(page, "error").startswith("400: "), _text(page, "error")
    assert _el(page, "prompt").get_attribute("value") == "hi"  # the message comes back
    assert page.execute_script("return document.querySelectorAll('.message').length") == 0
    _fill(page, "max-tokens", "4")
    _send(page, "hi")  # the chat request carries the key too
    answer = _wait_answer_done(page)
    assert answer["stats"].endswith(("length", "stop")), answer["stats"]
    keyed_server.wait_idle()


# ---- over plain HTTP -------------------------------------------------------------------------

def test_page_is_open_under_a_strict_csp_while_the_api_stays_locked(
        keyed_server: RunningServer) -> None:
    base_url = keyed_server.base_url
    page = httpx.get(f"{base_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self';" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for path, content_type in (("/static/playground.js", "text/javascript"),
                               ("/static/playground.css", "text/css")):
        asset = httpx.get(f"{base_url}{path}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(content_type)
        assert path in page.text
    assert httpx.head(f"{base_url}/").status_code == 200
    # everything else still needs the key
    assert httpx.get(f"{base_url}/v1/models").status_code == 401
    assert httpx.get(f"{base_url}/static/other.js").status_code == 401
    assert httpx.get(f"{base_url}/index.html").status_code == 401


def test_no_ui_flag_turns_the_page_off(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with serve_process(tiny_llama_dir, tmp_path / "serve.log", "--num-blocks", "32",
                       "--no-ui") as running:
        for headers in ({}, {"Authorization": f"Bearer {API_KEY}"}):
            assert httpx.get(f"{running.base_url}/", headers=headers).status_code == 404
            assert httpx.get(f"{running.base_url}/static/playground.js",
                             headers=headers).status_code == 404
        assert httpx.get(f"{running.base_url}/v1/models", headers={
            "Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert load_settings({}, None, {"PAGEDSERVE_UI": "false"}).ui is False
    assert load_settings({}, None, {}).ui is True
