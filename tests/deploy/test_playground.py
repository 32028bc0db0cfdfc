"""The browser playground in a real headless Chromium against a running stack (tiny model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.conftest import ServedStack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Records every value the progress bars take, as the user would have seen them.
WATCH_PROGRESS = """
window.progressSeen = [];
new MutationObserver(() => {
  for (const bar of document.querySelectorAll('.job progress')) {
    const v = Number(bar.value);
    if (window.progressSeen[window.progressSeen.length - 1] !== v) window.progressSeen.push(v);
  }
}).observe(document.getElementById('gallery'), {subtree: true, attributes: true, childList: true,
                                                characterData: true});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_playground_is_served_at_the_root_without_a_key(served_stack: ServedStack) -> None:
    page = httpx.get(served_stack.base_url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/playground/playground.js">' in page.text
    for asset, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        response = httpx.get(f"{served_stack.base_url}/playground/{asset}", timeout=10)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    assert httpx.get(f"{served_stack.base_url}/playground/..%2Fapp.py", timeout=10).status_code == 404
    assert httpx.get(f"{served_stack.base_url}/playground/index.html.bak", timeout=10).status_code == 404


def test_generate_with_live_progress_see_the_image_then_cancel_another(
    served_stack: ServedStack, page: Any, tmp_path: Path
) -> None:
    page.goto(served_stack.base_url + "/")
    # Auth is on: the page asks for the key before anything else works.
    page.wait_for_selector("#key-form:not([hidden])")
    assert page.inner_text("#server-status") == "API key needed"
    page.fill("#api-key", served_stack.api_key)
    page.click("#save-key")
    page.wait_for_function("document.querySelector('#server-status').classList.contains('ready')")
    assert page.inner_text("#server-status") == "tiny · 1 worker"
    # Adapters come from GET /adapters, each with a weight.
    page.wait_for_selector(".adapter[data-name='urae-2k']")

    page.evaluate(WATCH_PROGRESS)
    page.fill("#prompt", "a lighthouse on a cliff at dusk")
    page.select_option("#preset", "custom")
    page.fill("#width", "128")
    page.fill("#height", "64")
    page.fill("#steps", "6")
    page.fill("#seed", "42")
    page.check(".adapter[data-name='urae-2k'] input[type=checkbox]")
    page.fill(".adapter[data-name='urae-2k'] .weight", "0.5")
    page.click("#submit")

    card = page.locator(".job").first
    page.wait_for_selector(".job[data-status='finished'] .results img", timeout=90_000)
    assert card.locator("img.preview").is_hidden()  # the image replaced the preview
    assert card.locator("progress").evaluate("bar => bar.value") == 100
    seen = page.evaluate("window.progressSeen")
    assert seen[-1] == 100 and any(0 < v < 100 for v in seen), seen
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    card.locator(".results img").evaluate("img => img.decode()")
    assert card.locator(".results img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [128, 64]
    meta = card.locator(".meta").inner_text()
    assert "128×64" in meta and "42" in meta and "urae-2k" in meta
    download = card.locator("a.download")
    assert download.get_attribute("download").endswith("-0.png")
    assert download.inner_text() == "Download 128×64 PNG"
    assert card.locator(".cancel").is_hidden()

    # A long job: cancel it while it denoises; it ends canceled, without an image.
    page.fill("#width", "512")
    page.fill("#height", "512")
    page.fill("#steps", "100")
    page.uncheck(".adapter[data-name='urae-2k'] input[type=checkbox]")
    page.fill("#prompt", "a very slow one")
    page.click("#submit")
    page.wait_for_function(
        "document.querySelectorAll('.job').length === 2 && "
        "document.querySelector('.job').dataset.status === 'started' && "
        "document.querySelector('.job progress').value > 5",
        timeout=60_000,
    )
    long_card = page.locator(".job").first
    # The image forms before our eyes: a live preview (every 4 steps by default), 256 px for 512 px.
    page.wait_for_selector(".job img.preview:not([hidden])", timeout=60_000)
    preview = long_card.locator("img.preview")
    preview.evaluate("img => img.decode()")
    assert preview.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [256, 256]
    assert preview.get_attribute("src").startswith("data:image/jpeg;base64,")
    assert int(preview.get_attribute("data-step")) % 4 == 0
    long_card.locator(".cancel").click()
    page.wait_for_selector(".job[data-status='canceled']", timeout=60_000)
    # The status comes from the event stream; the error text from the job record read right after it.
    page.wait_for_function("document.querySelector('.job .error').textContent.length > 0", timeout=10_000)
    assert long_card.locator(".results img").count() == 0
    assert long_card.locator("progress").evaluate("bar => bar.value") < 100
    assert "canceled" in long_card.locator(".error").inner_text()
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)

    # The gallery survives a reload (the key and the jobs are remembered in this browser).
    page.reload()
    page.wait_for_selector(".job[data-status='finished'] .results img")
    assert page.locator(".job").count() == 2


def test_a_refused_request_shows_the_servers_message(served_stack: ServedStack, page: Any) -> None:
    page.goto(f"{served_stack.base_url}/#key={served_stack.api_key}")
    page.wait_for_function("document.querySelector('#server-status').classList.contains('ready')")
    # The key came in the fragment; the page removed it from the address bar.
    assert "#key=" not in page.url
    page.fill("#prompt", "too many steps")
    page.select_option("#preset", "custom")
    page.fill("#steps", "500")
    page.evaluate("document.getElementById('steps').removeAttribute('max')")
    page.click("#submit")
    page.wait_for_function("document.getElementById('message').textContent.length > 0")
    assert page.inner_text("#message").startswith("steps:")
    assert page.locator(".job").count() == 0


def test_a_wrong_key_is_reported_as_refused_with_where_to_get_the_right_one(
    served_stack: ServedStack, page: Any
) -> None:
    # As after a restart of urae-serve: the browser still holds the key of the previous run.
    page.goto(f"{served_stack.base_url}/#key=the-key-of-the-last-run")
    page.wait_for_selector("#key-form:not([hidden])")
    page.wait_for_function("document.querySelector('#server-status').textContent === 'API key refused'")
    message = page.inner_text("#message")
    assert "refused this API key" in message and "urae-serve prints a new key each time it starts" in message
    assert "needs an API key" not in message
    # The right key then works without a reload.
    page.fill("#api-key", served_stack.api_key)
    page.click("#save-key")
    page.wait_for_function("document.querySelector('#server-status').classList.contains('ready')")
    assert page.is_hidden("#key-form")


def test_the_form_starts_from_settings_quick_on_the_served_workers(served_stack: ServedStack, page: Any) -> None:
    """The stack runs the tiny model on a CPU: a first image in seconds, not 2K at 28 steps."""
    config = httpx.get(f"{served_stack.base_url}/config", timeout=10,
                       headers={"Authorization": f"Bearer {served_stack.api_key}"}).json()
    assert config["devices"] == ["cpu"] and config["model"] == "tiny"
    page.goto(f"{served_stack.base_url}/#key={served_stack.api_key}")
    page.wait_for_function("document.getElementById('preset').value === 'custom'")
    assert page.input_value("#width") == "512" and page.input_value("#height") == "512"
    assert page.input_value("#steps") == "4"
    assert page.is_visible("#width")
    # What the user changes stays changed when the page reconnects.
    page.fill("#steps", "9")
    page.evaluate("connect()")
    page.wait_for_timeout(500)
    assert page.input_value("#steps") == "9"


def test_the_playground_files_ship_with_the_package() -> None:
    # The API image installs the package (not the source tree): every page file must be package data.
    import fnmatch
    import tomllib

    from tests.conftest import REPO_ROOT

    patterns = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    files = [p.relative_to(REPO_ROOT / "service").as_posix() for p in (REPO_ROOT / "service" / "playground").iterdir()]
    assert {"playground/index.html", "playground/playground.js", "playground/playground.css"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
