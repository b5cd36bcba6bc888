"""The report's table of every neuron (neuron_effects.report_table): what the page embeds, with
and without the optional columns of the mediation and attribution-patching steps. The page's
behaviour in a browser is tested in test_report_browser.py."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest

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
