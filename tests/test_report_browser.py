"""The HTML report of a real tiny-model run, rendered by headless Chromium (Debian's package,
driven by Playwright): every plot loads, the sections are there, nothing errs, nothing is
fetched from outside the page."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import skip_or_fail

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SECTIONS = ["Run", "Definitions", "Validation against the reference path",
            "Effect types by layer", "Most logit-dominant neurons", "Most routing-dominant neurons",
            "Most cancelling neurons (self-repair)",
            "Attribution patching: first-order estimates beside the exact effects",
            "Prompts and targets"]


@pytest.fixture(scope="module")
def rendered(tiny_workflow):
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        skip_or_fail(f"Debian's chromium is not installed ({CHROMIUM})")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("the playwright Python package is not installed")
    report = tiny_workflow[0] / "results/report/report.html"
    console, page_errors, requests, failed = [], [], [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
            args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda message: console.append((message.type, message.text)))
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.goto(report.resolve().as_uri(), wait_until="load")
            page.wait_for_function(
                "Array.from(document.images).every(image => image.complete)", timeout=30_000)
            result = {
                "images": page.evaluate("Array.from(document.images).map(image => "
                                        "({width: image.naturalWidth, height: image.naturalHeight,"
                                        " alt: image.alt, src: image.src.slice(0, 22)}))"),
                "h1": page.locator("h1").all_inner_texts(),
                "h2": page.locator("h2").all_inner_texts(),
                "verdict": page.locator("div.pass, div.fail").all_inner_texts(),
                "tables": page.locator("table").count(),
                "title": page.title(),
            }
        finally:
            browser.close()
    return {**result, "console": console, "page_errors": page_errors, "requests": requests,
            "failed": failed}


def test_every_image_loads(rendered):
    images = rendered["images"]
    assert len(images) >= 4
    broken = [image["alt"] for image in images if image["width"] <= 0 or image["height"] <= 0]
    assert not broken, f"images that did not load: {broken}"
    assert all(image["src"] == "data:image/png;base64," for image in images)


def test_expected_sections(rendered):
    assert rendered["title"] == "Direct vs indirect neuron effects"
    assert rendered["h1"] == ["Direct vs indirect effects of 18 MLP neurons over 6 prompts"]
    missing = [section for section in SECTIONS if section not in rendered["h2"]]
    assert not missing, rendered["h2"]
    assert rendered["verdict"] and rendered["verdict"][0].startswith("PASSED")
    assert rendered["tables"] >= 8


def test_no_console_or_page_errors(rendered):
    errors = [text for kind, text in rendered["console"] if kind in ("error", "assert")]
    assert not errors
    assert not rendered["page_errors"]
    assert not rendered["failed"]


def test_self_contained(rendered):
    """The page fetches nothing but itself and its inline data URIs."""
    outside = [url for url in rendered["requests"] if not url.startswith(("file:", "data:"))]
    assert not outside
