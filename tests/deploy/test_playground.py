"""The browser playground in a real headless Chromium against a running stack (tiny model)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.deploy.conftest import ServedStack, serve_stack

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
# Records what the newest card (the first in the gallery) shows while it is not the card given.
WATCH_NEWEST_CARD = """
(skip) => {
  window.newestSeen = {progress: [], preview: false};
  new MutationObserver(() => {
    const card = document.querySelector('#gallery .job');
    if (!card || card.dataset.jobId === skip) return;
    const v = Number(card.querySelector('progress').value);
    const seen = window.newestSeen;
    if (seen.progress[seen.progress.length - 1] !== v) seen.progress.push(v);
    if (!card.querySelector('img.preview').hidden) seen.preview = true;
  }).observe(document.getElementById('gallery'), {subtree: true, attributes: true, childList: true,
                                                  characterData: true});
}
"""
# What the shipped mini model draws (urae.mini): its captions.
MINI_PROMPT = "two red circles and a blue square in a row on a striped background"


@pytest.fixture(scope="module")
def one_tier_mini_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedStack]:
    """The shipped mini model (128 px at 1K, 256 px at 2K: quick on a CPU), serving the quality tier only."""
    with serve_stack(tmp_path_factory, ["--finetune-workers", "0", "--model", "mini"],
                     env={"URAE_TIERS": "quality"}) as served:
        yield served


def get_config(stack: ServedStack) -> dict[str, Any]:
    return httpx.get(f"{stack.base_url}/config", headers={"Authorization": f"Bearer {stack.api_key}"},
                     timeout=10).json()


def get_job(stack: ServedStack, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{stack.base_url}/jobs/{job_id}", headers={"Authorization": f"Bearer {stack.api_key}"},
                     timeout=10).json()


def card_meta(card: Any) -> dict[str, str]:
    return dict(zip(card.locator(".meta dt").all_inner_texts(), card.locator(".meta dd").all_inner_texts(),
                    strict=True))


def open_with_mini_prompt(page: Any, stack: ServedStack) -> None:
    """The playground signed in through its link, the form filled from /config (mini: its 1K), and a
    caption mini draws typed in."""
    page.goto(f"{stack.base_url}/#key={stack.api_key}")
    page.wait_for_function("document.getElementById('preset').value === '1k'")
    page.fill("#prompt", MINI_PROMPT)


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


def test_a_seed_past_2_53_is_shown_and_reused_exactly_and_timings_carry_their_units(
    served_stack: ServedStack, page: Any
) -> None:
    seed = "9130118860406938186"  # a JavaScript number would be 9130118860406939000: another image
    page.goto(f"{served_stack.base_url}/#key={served_stack.api_key}")
    page.wait_for_function("document.querySelector('#server-status').classList.contains('ready')")
    page.select_option("#preset", "custom")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "2")
    page.fill("#prompt", "a seed past two to the 53")
    page.fill("#seed", seed)
    page.click("#submit")
    page.wait_for_selector(".job[data-status='finished'] .results img", timeout=90_000)
    first = page.locator(".job").first
    meta = dict(zip(first.locator(".meta dt").all_inner_texts(), first.locator(".meta dd").all_inner_texts(),
                    strict=True))
    assert meta["seed"].split()[0] == seed, meta

    # Units only where they belong: seconds for stages, a time of day, bytes humanized, flags as they are.
    timings = dict(entry.split(" ", 1) for entry in meta["time"].split(", "))
    assert {"denoise", "denoise_started_at", "prompt_cache_hit", "peak_rss_delta_bytes"} <= set(timings), timings
    for key, text in timings.items():
        if key.endswith("_at"):
            assert ":" in text and not text.endswith(" s"), (key, text)
        elif key.endswith("_bytes"):
            number, unit = text.split(" ")
            assert unit in ("bytes", "KiB", "MiB", "GiB") and abs(float(number)) < 1024, (key, text)
        elif key.endswith("_hit"):
            assert text in ("0", "1"), (key, text)
        else:
            assert text.endswith(" s") and float(text[:-2]) >= 0, (key, text)

    # Reuse it from the card: the same seed goes back, and the same image comes out.
    page.fill("#seed", "")
    first.locator(".reuse-seed").click()
    assert page.input_value("#seed") == seed
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('.job[data-status=\"finished\"] .results img').length === 2",
                           timeout=90_000)
    second = page.locator(".job").first
    second_meta = dict(zip(second.locator(".meta dt").all_inner_texts(), second.locator(".meta dd").all_inner_texts(),
                           strict=True))
    assert second_meta["seed"].split()[0] == seed
    headers = {"Authorization": f"Bearer {served_stack.api_key}"}
    pixels = []
    for card in (first, second):
        job_id = card.get_attribute("data-job-id")
        png = httpx.get(f"{served_stack.base_url}/jobs/{job_id}/images/0", headers=headers, timeout=30).content
        pixels.append(Image.open(io.BytesIO(png)).convert("RGB").tobytes())
    assert max(abs(a - b) for a, b in zip(*pixels, strict=True)) <= 1


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


def test_the_tier_selector_offers_exactly_the_served_tiers_and_the_job_runs_on_the_chosen_one(
    served_stack: ServedStack, page: Any
) -> None:
    config = get_config(served_stack)
    # The CPU worker serves quality and turbo (fast needs fp8): a real choice to offer.
    assert len(config["tiers"]) > 1 and "quality" in config["tiers"], config
    page.goto(f"{served_stack.base_url}/#key={served_stack.api_key}")
    page.wait_for_function("document.getElementById('preset').value === 'custom'")  # /config was read
    assert page.locator("#tier option").evaluate_all("options => options.map(o => o.value)") == config["tiers"]
    assert page.input_value("#tier") == "quality" and page.is_enabled("#tier")
    assert page.is_hidden("#tier-note")

    other = next(tier for tier in config["tiers"] if tier != "quality")
    page.select_option("#tier", other)
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "2")
    page.fill("#prompt", f"drawn on the {other} tier")
    page.click("#submit")
    page.wait_for_selector(".job[data-status='finished'] .results img", timeout=90_000)
    card = page.locator(".job").first
    assert get_job(served_stack, card.get_attribute("data-job-id"))["result"]["tier"] == other
    assert card_meta(card)["tier"] == other


def test_with_one_tier_served_the_tier_selector_is_disabled_and_says_why(
    one_tier_mini_stack: ServedStack, page: Any
) -> None:
    assert get_config(one_tier_mini_stack)["tiers"] == ["quality"]
    page.goto(f"{one_tier_mini_stack.base_url}/#key={one_tier_mini_stack.api_key}")
    page.wait_for_function("document.getElementById('preset').value === '1k'")  # mini's suggestion: /config read
    assert page.locator("#tier option").evaluate_all("options => options.map(o => o.value)") == ["quality"]
    assert page.is_disabled("#tier")
    assert page.inner_text("#tier-note") == "the live workers serve only the quality tier"


def test_refine_is_offered_only_at_the_presets_larger_than_the_image(one_tier_mini_stack: ServedStack, page: Any) -> None:
    stack = one_tier_mini_stack
    open_with_mini_prompt(page, stack)
    page.fill("#steps", "2")
    offered = {}
    for count, preset in enumerate(("1k", "2k", "4k"), start=1):
        page.select_option("#preset", preset)
        page.click("#submit")
        page.wait_for_function(f"document.querySelectorAll('.job[data-status=\"finished\"] .results img').length === {count}",
                               timeout=90_000)
        offered[preset] = page.locator(".job").first.locator(".refine button").all_inner_texts()
    assert offered == {"1k": ["Refine at 2K", "Refine at 4K"], "2k": ["Refine at 4K"], "4k": []}


def test_refine_at_2k_makes_the_same_picture_at_the_2k_size_in_a_card_of_its_own(
    one_tier_mini_stack: ServedStack, page: Any
) -> None:
    stack = one_tier_mini_stack
    open_with_mini_prompt(page, stack)
    page.fill("#seed", "7")
    page.click("#submit")
    page.wait_for_selector(".job[data-status='finished'] .results img", timeout=90_000)
    draft = page.locator(".job").first
    draft_id = draft.get_attribute("data-job-id")
    assert draft.locator(".refine button").all_inner_texts() == ["Refine at 2K", "Refine at 4K"]

    page.evaluate(WATCH_NEWEST_CARD, draft_id)
    draft.locator(".refine button[data-preset='2k']").click()
    page.wait_for_function("document.querySelectorAll('.job').length === 2")
    refined = page.locator(".job").first
    refined_id = refined.get_attribute("data-job-id")
    assert refined_id != draft_id
    page.wait_for_selector(f".job[data-job-id='{refined_id}'][data-status='finished'] .results img",
                           timeout=120_000)

    # The job: the draft's prompt and seed at mini's 2K size.
    result = get_job(stack, refined_id)["result"]
    assert (result["seed_str"], result["preset"], result["width"], result["height"]) == ("7", "2k-mini", 256, 256)
    png = httpx.get(f"{stack.base_url}/jobs/{refined_id}/images/0", timeout=30,
                    headers={"Authorization": f"Bearer {stack.api_key}"}).content
    assert Image.open(io.BytesIO(png)).text["prompt"] == MINI_PROMPT
    # The card: live progress and previews, then the image, as for a generation.
    seen = page.evaluate("window.newestSeen")
    assert seen["preview"], seen
    assert seen["progress"][-1] == 100 and any(0 < v < 100 for v in seen["progress"]), seen
    assert seen["progress"] == sorted(seen["progress"]), seen
    assert refined.locator("img.preview").is_hidden()
    refined.locator(".results img").evaluate("img => img.decode()")
    assert refined.locator(".results img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [256, 256]
    assert card_meta(refined)["seed"].split()[0] == "7"
    assert refined.locator(".prompt-text").inner_text() == MINI_PROMPT
    # A 2K image is offered 4K only: a refine must make it larger.
    assert refined.locator(".refine button").all_inner_texts() == ["Refine at 4K"]


def test_a_refused_refine_shows_the_servers_message_on_its_card(one_tier_mini_stack: ServedStack, page: Any) -> None:
    stack = one_tier_mini_stack
    open_with_mini_prompt(page, stack)
    page.fill("#steps", "2")
    page.click("#submit")
    page.wait_for_selector(".job[data-status='finished'] .results img", timeout=90_000)
    # As when the workers serving a tier went away after the page read /config: the server refuses it.
    page.evaluate("""() => {
      const tier = document.getElementById('tier');
      tier.add(new Option('turbo', 'turbo'));
      tier.value = 'turbo';
    }""")
    page.locator(".job .refine button[data-preset='2k']").click()
    page.wait_for_function("document.querySelector('.job .error').textContent.length > 0")
    assert "no live worker serves the turbo tier" in page.locator(".job .error").inner_text()
    assert page.locator(".job").count() == 1
    assert page.is_enabled(".job .refine button[data-preset='2k']")


def test_an_uploaded_image_is_the_start_of_the_generation_at_the_chosen_strength(
    one_tier_mini_stack: ServedStack, page: Any
) -> None:
    stack = one_tier_mini_stack
    open_with_mini_prompt(page, stack)
    page.fill("#steps", "4")
    assert page.is_disabled("#strength")  # no image: no strength
    # A type the server does not take is refused in the page, with the accepted ones named.
    page.set_input_files("#input-image", files=[{"name": "a.gif", "mimeType": "image/gif",
                                                 "buffer": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"}])
    page.wait_for_function("document.getElementById('input-note').textContent.includes('not accepted')")
    assert "(image/jpeg, image/png, image/webp)" in page.inner_text("#input-note")  # GET /config's list
    assert page.is_disabled("#strength") and page.locator("#input-preview").is_hidden()

    source = io.BytesIO()
    Image.new("RGB", (160, 96), (40, 85, 225)).save(source, "PNG")
    page.set_input_files("#input-image", files=[{"name": "start.png", "mimeType": "image/png",
                                                 "buffer": source.getvalue()}])
    page.wait_for_selector("#input-preview:not([hidden])")
    assert page.is_enabled("#strength") and "start.png" in page.inner_text("#input-note")
    page.fill("#strength", "0.5")
    page.click("#submit")
    page.wait_for_selector(".job[data-status='finished'] .results img", timeout=90_000)
    job_id = page.locator(".job").first.get_attribute("data-job-id")
    result = get_job(stack, job_id)["result"]
    # Half of the 4 steps are skipped: the image, fitted to 128 px, is where they start.
    assert (result["strength"], result["steps_run"], result["width"]) == (0.5, 2, 128), result
    assert result["input_image"]["upload"] is True
    assert (result["input_image"]["width"], result["input_image"]["height"]) == (160, 96)

    # Removed: the next request is text to image again.
    page.click("#clear-image")
    assert page.is_disabled("#strength") and page.locator("#input-preview").is_hidden()
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('.job[data-status=\"finished\"] .results img').length === 2",
                           timeout=90_000)
    second = get_job(stack, page.locator(".job").first.get_attribute("data-job-id"))["result"]
    assert second["strength"] is None and "input_image" not in second, second


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
