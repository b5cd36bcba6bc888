"""The HTML report of a real tiny-model run, rendered by headless Chromium (Debian's package,
driven by Playwright): every plot loads, the sections are there, nothing errs, nothing is
fetched from outside the page, it opens with the run's verdicts and a contents list whose links
all resolve, the page fits 1280 px, and the table of every neuron filters,
sorts and opens a neuron's per-prompt values (also with the optional mediation and AtP columns,
on a synthetic table)."""

from __future__ import annotations

import re
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
            "Attribution patching and RelP: first-order estimates beside the exact effects",
            "All neurons", "Prompts and targets"]
ROWS = "#neuron-table tr.neuron"


def _playwright():
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        skip_or_fail(f"Debian's chromium is not installed ({CHROMIUM})")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("the playwright Python package is not installed")
    return sync_playwright


@pytest.fixture(scope="module")
def rendered(tiny_workflow):
    sync_playwright = _playwright()
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
                "verdicts": page.locator("#verdicts").inner_text(),
                "h2_ids": page.evaluate("Array.from(document.querySelectorAll('h2'))"
                                        ".map(h => h.id)"),
                "contents": page.evaluate(  # each link, and whether its target exists
                    "Array.from(document.querySelectorAll('#contents a')).map(a => "
                    "[a.getAttribute('href'), !!document.getElementById("
                    "a.getAttribute('href').slice(1))])"),
                "order": page.evaluate(  # the body's elements, in order
                    "Array.from(document.body.children).map(e => e.tagName + '#' + e.id)"),
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


def test_opens_with_the_verdicts_and_contents_linking_every_section(rendered):
    order = rendered["order"]
    first_section = next(i for i, element in enumerate(order) if element.startswith("H2#"))
    assert order.index("DIV#verdicts") < order.index("NAV#contents") < first_section
    assert [href for href, _ in rendered["contents"]] == [f"#{i}" for i in rendered["h2_ids"]]
    assert all(resolves for _, resolves in rendered["contents"]), rendered["contents"]
    verdicts = rendered["verdicts"]
    assert "Validation: PASSED" in verdicts
    assert re.search(r"Low-rank targets: \d+ of 6 prompts", verdicts), verdicts
    assert re.search(r"Rows with a NaN or infinite value: 0 of [\d,]+", verdicts), verdicts


def test_no_console_or_page_errors(rendered):
    errors = [text for kind, text in rendered["console"] if kind in ("error", "assert")]
    assert not errors
    assert not rendered["page_errors"]
    assert not rendered["failed"]


def test_self_contained(rendered):
    """The page fetches nothing but itself and its inline data URIs."""
    outside = [url for url in rendered["requests"] if not url.startswith(("file:", "data:"))]
    assert not outside


@pytest.fixture(scope="module")
def browser():
    with _playwright()() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
            args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _open(browser, path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.wait_for_selector(ROWS)
    return page, errors


def _cells(page, row: int = 0) -> list[str]:
    return page.locator(ROWS).nth(row).locator("td").all_inner_texts()


def test_page_fits_1280_px(browser, tiny_workflow):
    """Wide tables scroll in their own box; the page itself does not scroll sideways."""
    page, errors = _open(browser, tiny_workflow[0] / "results/report/report.html")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    assert page.evaluate("Array.from(document.querySelectorAll('table')).every(t => "
                         "t.closest('.table-box, .neuron-box, .values'))")
    assert not errors
    page.close()


def test_neuron_table_search_sort_and_per_prompt_values(browser, tiny_workflow):
    page, errors = _open(browser, tiny_workflow[0] / "results/report/report.html")
    headers = page.locator("#neuron-table th").all_inner_texts()
    assert headers == ["neuron", "layer", "class", "class (frozen norm)", "mean direct ratio",
                       "consistency", "sign alignment", "mean total", "top mediator",
                       "indirect share via attention", "AtP Spearman", "RelP Spearman",
                       "real edges"]
    assert page.locator(ROWS).count() == 18  # every neuron
    page.fill("#neuron-search", "L3/N10")
    assert page.locator(ROWS).count() == 1 and _cells(page)[0] == "L3/N10"
    page.fill("#neuron-search", "L3/N1")  # L3/N10 and L3/N17
    assert sorted(page.locator(f"{ROWS} td:first-child").all_inner_texts()) == ["L3/N10",
                                                                                 "L3/N17"]
    page.fill("#neuron-search", "nothing like this")
    assert page.locator(ROWS).count() == 0
    page.fill("#neuron-search", "")
    assert page.locator(ROWS).count() == 18
    layer = page.locator("#neuron-table th", has_text="layer")
    layer.click()
    layer.click()  # descending
    assert _cells(page)[1] == "5" and layer.get_attribute("aria-sort") == "descending"
    page.fill("#neuron-search", "L3/N10")
    page.locator(ROWS).first.click()
    detail = page.locator("#neuron-table tr.neuron-detail")
    # direct, indirect, total and the AtP and RelP estimates of the total x 6 prompts
    assert detail.locator("svg circle").count() == 5 * 6
    values = detail.locator("tbody tr")
    assert values.count() == 6
    assert detail.locator("th").all_inner_texts() == ["prompt", "direct", "indirect", "total",
                                                      "total_atp", "total_relp"]
    cells = values.first.locator("td").all_inner_texts()
    direct, indirect, total = (float(v) for v in cells[1:4])
    assert abs(direct + indirect - total) <= 1e-3 * max(abs(total), abs(direct), 1e-6)
    page.locator(ROWS).first.click()  # closes again
    assert page.locator("#neuron-table tr.neuron-detail").count() == 0
    assert not errors
    page.close()


def test_neuron_table_with_optional_columns_and_many_neurons(browser, tmp_path):
    """A synthetic table of 1,000 neurons with the mediation and AtP columns: they are shown,
    the rows are drawn a page at a time, and the detail has the AtP series."""
    import numpy as np
    import pandas as pd

    from neuron_effects.report_table import PAGE_ROWS, neuron_table_section

    rng = np.random.default_rng(0)
    ids = [f"L{i % 32}/N{i}" for i in range(1000)]
    neurons = pd.DataFrame({
        "neuron_id": ids, "layer": [i % 32 for i in range(1000)],
        "classification": "mixed", "classification_frozen_norm": "mixed",
        "mean_direct_ratio": rng.uniform(0, 1, 1000), "consistency": 1.0,
        "aligned_fraction": 0.5, "mean_total": rng.normal(0, 1, 1000),
        "top_mediator": [f"L{i % 32 + 1}/H{i % 8}" for i in range(1000)],
        "indirect_share_attn": 0.5, "atp_spearman": rng.uniform(-1, 1, 1000)})
    per_prompt = pd.DataFrame({"neuron_id": np.repeat(ids, 7),
                               "prompt_id": np.tile([f"q{i}" for i in range(7)], 1000),
                               "direct": rng.normal(0, 1, 7000), "total": rng.normal(0, 1, 7000),
                               "total_atp": rng.normal(0, 1, 7000)})
    path = tmp_path / "table.html"
    path.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                    f"{neuron_table_section(neurons, per_prompt)}</body></html>")
    page, errors = _open(browser, path)
    assert page.locator("#neuron-table th").all_inner_texts()[-3:] == [
        "top mediator", "indirect share via attention", "AtP Spearman"]
    assert page.locator(ROWS).count() == PAGE_ROWS
    page.click("#neuron-more")
    assert page.locator(ROWS).count() == 2 * PAGE_ROWS
    page.fill("#neuron-search", "L5/H")  # by the top-mediator column
    assert page.locator(ROWS).count() == sum("L5/H" in m for m in neurons["top_mediator"])
    page.fill("#neuron-search", "L7/N999")
    assert page.locator(ROWS).count() == 1
    page.locator(ROWS).first.click()
    detail = page.locator("#neuron-table tr.neuron-detail")
    assert detail.locator("th").all_inner_texts() == ["prompt", "direct", "indirect", "total",
                                                      "total_atp"]
    assert detail.locator("svg circle").count() == 4 * 7
    assert not errors
    page.close()
