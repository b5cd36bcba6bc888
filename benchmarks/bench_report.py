"""Benchmark of the HTML report at the user's scale: 8,177 neurons x 100 prompts (synthetic).

Builds random per-prompt effects of that size, summarizes them as the workflow does, renders the
full report (figures, top tables, the table of every neuron) and opens it in headless Chromium
(Debian's package, driven by Playwright): file size, time to the load event and until the neuron
table is drawn, time to filter by a neuron id, time to open a neuron's per-prompt values, and the
page width at 1280 px.

Usage: .venv/bin/python benchmarks/bench_report.py [--neurons 8177] [--prompts 100]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from neuron_effects import aggregate
from neuron_effects.report import render_report
from neuron_effects.report_table import neuron_table_section

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]


def synthetic_run(n_neurons: int, n_prompts: int, seed: int = 0) -> pd.DataFrame:
    """Per-prompt rows shaped like per_prompt.parquet's (the columns the report reads)."""
    rng = np.random.default_rng(seed)
    layers = np.sort(rng.integers(0, 32, n_neurons))
    units = rng.choice(14336, n_neurons, replace=False)
    neuron_ids = np.array([f"L{layer}/N{unit}" for layer, unit in zip(layers, units)])
    scale = np.exp(rng.normal(-3, 1.5, n_neurons))[:, None]
    direct = (rng.normal(0, 1, (n_neurons, n_prompts)) * scale).ravel()
    indirect = (rng.normal(0, 1, (n_neurons, n_prompts)) * scale).ravel()
    total = direct + indirect
    frozen = direct * rng.uniform(0.8, 1.2, direct.size)
    magnitude = np.abs(direct) + np.abs(indirect)
    return pd.DataFrame({
        "prompt_id": np.tile([f"q{i:03d}" for i in range(n_prompts)], n_neurons),
        "neuron_id": np.repeat(neuron_ids, n_prompts),
        "layer": np.repeat(layers, n_prompts), "neuron": np.repeat(units, n_prompts),
        "activation": rng.normal(0, 1, direct.size), "direct": direct, "indirect": indirect,
        "total": total, "direct_frozen_norm": frozen, "norm_mediated": direct - frozen,
        "direct_ratio": np.abs(direct) / magnitude, "cancellation": 1 - np.abs(total) / magnitude,
        "sign_aligned": direct * indirect > 0, "ratio_defined": True,
        "direct_ratio_frozen_norm": np.abs(frozen) / (np.abs(frozen) + np.abs(total - frozen)),
    })


def report_page(per_prompt: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The full report page and the neuron summaries it shows."""
    thresholds = aggregate.Thresholds()
    neurons = aggregate.summarize_neurons(per_prompt, thresholds).assign(frac_active=0.5)
    layers = aggregate.summarize_layers(neurons, per_prompt)
    prompts = pd.DataFrame({"prompt_id": pd.unique(per_prompt["prompt_id"]),
                            "prompt": "a synthetic prompt", "n_tokens": 20})
    validation = {"passed": True, "n_pairs": 0, "max_abs_diff": 0.0, "tolerance": 1e-4,
                  "dtype": "float32", "device": "cpu", "max_abs_diff_by_metric": {}}
    page = render_report({"model": "synthetic"}, per_prompt, neurons, layers, prompts,
                         validation, pd.DataFrame(), pd.DataFrame(), 12)
    return page, neurons


def measure_in_chromium(page_path: Path, search: str, matches: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            started = time.perf_counter()
            page.goto(page_path.resolve().as_uri(), wait_until="load", timeout=120_000)
            loaded = time.perf_counter() - started
            page.wait_for_selector("#neuron-table tbody tr.neuron")
            drawn = time.perf_counter() - started
            timing = page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])")
            started = time.perf_counter()
            page.fill("#neuron-search", search)
            page.wait_for_function("document.querySelectorAll('#neuron-table tr.neuron')"
                                   f".length === {matches}")
            filtered = time.perf_counter() - started
            started = time.perf_counter()
            page.click("#neuron-table tr.neuron")
            page.wait_for_selector("#neuron-table tr.neuron-detail svg")
            opened = time.perf_counter() - started
            width = page.evaluate("document.documentElement.scrollWidth")
        finally:
            browser.close()
    navigation = json.loads(timing)
    return {"load_event_s": round(loaded, 3), "table_drawn_s": round(drawn, 3),
            "dom_content_loaded_ms": round(navigation["domContentLoadedEventEnd"]),
            "filter_by_id_s": round(filtered, 3), "open_neuron_s": round(opened, 3),
            "page_width_px_at_1280": width}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--neurons", type=int, default=8177)
    parser.add_argument("--prompts", type=int, default=100)
    arguments = parser.parse_args()
    per_prompt = synthetic_run(arguments.neurons, arguments.prompts)
    started = time.perf_counter()
    page, neurons = report_page(per_prompt)
    render_s = time.perf_counter() - started
    section = neuron_table_section(neurons, per_prompt)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "report.html"
        path.write_text(page, encoding="utf-8")
        search = per_prompt["neuron_id"].iloc[-1]
        matches = int(pd.Series(pd.unique(per_prompt["neuron_id"])).str.contains(
            search, regex=False).sum())
        browser = measure_in_chromium(path, search, matches)
    result = {"neurons": arguments.neurons, "prompts": arguments.prompts,
              "report_bytes": len(page.encode()), "neuron_table_bytes": len(section.encode()),
              "render_s (summaries and page)": round(render_s, 1), **browser}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
