"""The report's table of every neuron (neuron_effects.report_table): what the page embeds, with
and without the optional columns of the mediation and attribution-patching steps; and the page's
head: the run's verdicts, and a contents list whose every link resolves to a section. The page's
behaviour in a browser is tested in test_report_browser.py."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from neuron_effects import aggregate
from neuron_effects.report import render_report
from neuron_effects.report_html import with_contents
from neuron_effects.report_table import neuron_table_data, neuron_table_section

OPTIONAL = {"top_mediator": ["L2/H1", "L3/N5", None], "indirect_share_attn": [0.5, 0.25, np.nan],
            "atp_spearman": [0.9, -0.1, 0.123456]}


def frames(optional: bool, n_prompts: int = 4):
    rng = np.random.default_rng(0)
    neurons = pd.DataFrame({
        "neuron_id": ["L0/N1", "L1/N7", "L1/N</script>"], "layer": [0, 1, 1],
        "neuron": [1, 7, 9], "classification": ["mixed", "logit-dominant", "undetermined"],
        "classification_frozen_norm": ["routing-dominant", "mixed", "undetermined"],
        "mean_direct_ratio": [0.512345, 0.9, np.nan], "consistency": [1.0, 0.75, np.nan],
        "aligned_fraction": [0.25, 1.0, np.nan], "mean_total": [1.23456e-5, -2.0, 0.0],
        "std_direct_ratio": [0.1, 0.2, np.nan],  # not shown
        **(OPTIONAL if optional else {}),
    })
    prompts = [f"p{i}" for i in range(n_prompts)]
    per_prompt = pd.DataFrame([
        {"prompt_id": p, "neuron_id": n, "direct": rng.normal(), "total": rng.normal(),
         "indirect": 0.0, **({"total_atp": rng.normal()} if optional else {})}
        for n in neurons["neuron_id"] for p in prompts])
    per_prompt["indirect"] = per_prompt["total"] - per_prompt["direct"]
    return neurons, per_prompt.sample(frac=1.0, random_state=1)  # the order must not matter


def decoded(data, name):
    values = np.frombuffer(base64.b64decode(data["series"][name]), dtype="<f4")
    return values.reshape(len(data["rows"]), len(data["prompts"]))


@pytest.mark.parametrize("optional", [False, True])
def test_columns_rows_and_series(optional):
    neurons, per_prompt = frames(optional)
    data = neuron_table_data(neurons, per_prompt)
    keys = [column["key"] for column in data["columns"]]
    base = ["neuron_id", "layer", "classification", "classification_frozen_norm",
            "mean_direct_ratio", "consistency", "aligned_fraction", "mean_total"]
    assert keys == base + (list(OPTIONAL) if optional else [])
    assert data["rows"][0][:8] == ["L0/N1", 0, "mixed", "routing-dominant", 0.5123, 1.0, 0.25,
                                   1.235e-05]  # 4 significant digits
    assert data["rows"][2][4:8] == [None, None, None, 0.0]  # NaN -> null
    if optional:
        assert [row[8:] for row in data["rows"]] == [["L2/H1", 0.5, 0.9], ["L3/N5", 0.25, -0.1],
                                                     [None, None, 0.1235]]
    assert set(data["series"]) == ({"direct", "total", "total_atp"} if optional
                                   else {"direct", "total"})  # indirect is total - direct
    by_pair = per_prompt.set_index(["neuron_id", "prompt_id"])
    for name in data["series"]:
        expected = np.array([[by_pair.loc[(n, p), name] for p in data["prompts"]]
                             for n in neurons["neuron_id"]], dtype="<f4")
        np.testing.assert_array_equal(decoded(data, name), expected)
    json.dumps(data, allow_nan=False)


def test_missing_pairs_are_nan():
    neurons, per_prompt = frames(False)
    data = neuron_table_data(neurons, per_prompt[~((per_prompt["neuron_id"] == "L1/N7")
                                                   & (per_prompt["prompt_id"] == "p2"))])
    matrix = decoded(data, "direct")
    assert np.isnan(matrix[1, data["prompts"].index("p2")])
    assert np.isfinite(matrix).sum() == matrix.size - 1


def test_rows_of_neurons_outside_the_table_are_left_out():
    """A census keeps only some neurons in the table, while the long table has them all: the
    other neurons' rows must not land in any row of the matrix (an index of -1 would write
    them into the last one)."""
    neurons, per_prompt = frames(False)
    others = per_prompt.assign(neuron_id="L5/N0", direct=1e6, total=-1e6)
    data = neuron_table_data(neurons, pd.concat([per_prompt, others]))
    np.testing.assert_array_equal(decoded(data, "direct"),
                                  decoded(neuron_table_data(neurons, per_prompt), "direct"))


def test_section_is_self_contained_and_escaped():
    neurons, per_prompt = frames(True)
    section = neuron_table_section(neurons, per_prompt)
    assert '<input type="search"' in section
    assert "http" not in section  # nothing fetched from outside
    # the data cannot close its script element: only the two real closing tags
    assert section.count("</script>") == 2
    data = re.search(r'id="neuron-table-data">(.*?)</script>', section, re.S).group(1)
    assert json.loads(data)["rows"][2][0] == "L1/N</script>"
    for label in ("top mediator", "indirect share via attention", "AtP Spearman"):
        assert f">{label}</th>" in section


class Anchors(HTMLParser):
    """Every element id, every h2's id and text, the contents list's links and the verdicts'
    text, in page order."""

    def __init__(self):
        super().__init__()
        self.ids, self.h2, self.links, self.verdicts, self.inside = [], [], [], "", []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "h2":
            self.h2.append([attrs.get("id"), ""])
        if attrs.get("id") in ("contents", "verdicts"):
            self.inside.append(attrs["id"])
        if tag == "a" and self.inside == ["contents"]:
            self.links.append(attrs["href"])
        if tag in ("nav", "div") and self.inside and attrs.get("id") not in ("contents",
                                                                              "verdicts"):
            self.inside.append(tag)

    def handle_endtag(self, tag):
        if tag in ("nav", "div") and self.inside:
            self.inside.pop()

    def handle_data(self, data):
        if self.h2 and self.h2[-1][1] is not None and self.lasttag == "h2":
            self.h2[-1][1] += data
        if self.inside == ["verdicts"]:
            self.verdicts += data


def parsed(page: str) -> Anchors:
    anchors = Anchors()
    anchors.feed(page)
    return anchors


def test_contents_link_every_section_once_with_unique_ids():
    body, contents = with_contents("<h2>Run</h2><p>x</p><h2>Top <code>a</code> &amp; b</h2>"
                                   "<h3>Run</h3><h2>Run</h2><h2>run!</h2>")
    anchors = parsed(contents + body)
    assert [identifier for identifier, _ in anchors.h2] == ["run", "top-a-b", "run-2", "run-3"]
    assert anchors.links == ["#run", "#top-a-b", "#run-2", "#run-3"]
    assert "<h3>Run</h3>" in body  # only the sections are listed
    assert ">Top a &amp; b</a>" in contents


@pytest.fixture(scope="module")
def synthetic_page():
    """A small report whose validation failed, with a low-ranked target and non-finite rows."""
    neurons, per_prompt = frames(False)
    rng = np.random.default_rng(2)
    per_prompt = per_prompt.assign(
        layer=per_prompt["neuron_id"].map(dict(zip(neurons["neuron_id"], neurons["layer"]))),
        neuron=0, activation=1.0, direct_frozen_norm=per_prompt["direct"], norm_mediated=0.0,
        sign_aligned=rng.random(len(per_prompt)) > 0.5, ratio_defined=True,
        direct_ratio=rng.random(len(per_prompt)), cancellation=rng.random(len(per_prompt)),
        direct_ratio_frozen_norm=rng.random(len(per_prompt)))
    summaries = aggregate.summarize_neurons(per_prompt, aggregate.Thresholds())
    layers = aggregate.summarize_layers(summaries, per_prompt)
    prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(4)], "prompt": "a prompt",
                            "target_token": " x", "clean_target_rank": [1, 2, 500, 1],
                            "clean_target_prob": 0.1, "clean_top_token": " y",
                            "target_low_rank": [False, False, True, False]})
    validation = {"passed": False, "failure": "2 (prompt, neuron) rows hold a NaN <here>",
                  "n_pairs": 3, "max_abs_diff": None, "tolerance": 1e-4, "dtype": "float32",
                  "device": "cpu", "max_abs_diff_by_metric": {}, "non_finite": {"n_rows": 2}}
    return render_report({"model": "synthetic"}, per_prompt, summaries.assign(frac_active=0.5),
                         layers, prompts, validation, pd.DataFrame(), pd.DataFrame(), 2)


def test_report_opens_with_the_verdicts_and_contents_whose_links_resolve(synthetic_page):
    anchors = parsed(synthetic_page)
    assert anchors.ids.index("verdicts") < anchors.ids.index("contents") < anchors.ids.index(
        anchors.h2[0][0])  # the verdicts, then the contents, then the first section
    assert len(anchors.ids) == len(set(anchors.ids))
    assert [identifier for identifier, _ in anchors.h2] == [link[1:] for link in anchors.links]
    assert all(link[1:] in anchors.ids for link in anchors.links)
    assert len(anchors.h2) >= 8 and all(identifier for identifier, _ in anchors.h2)
    assert "Validation against the reference path" in [text for _, text in anchors.h2]
    verdicts = " ".join(anchors.verdicts.split())
    assert "Validation: FAILED: 2 (prompt, neuron) rows hold a NaN <here>" in verdicts
    assert "Low-rank targets: 1 of 4 prompts (which)" in verdicts
    assert "Rows with a NaN or infinite value: 2 of 12" in verdicts
    links = re.search(r'id="verdicts">(.*?)</div>', synthetic_page, re.S).group(1)
    assert all(f'id="{target}"' in synthetic_page
               for target in re.findall(r'href="#([^"]+)"', links))
