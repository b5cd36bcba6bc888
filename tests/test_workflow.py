"""The workflow as a whole: lint and format, the output contract on the tiny model, the shard
plan at the seed's scale (Llama-3.1-8B shape, 8,177 neurons x 100 prompts), which shards rerun
after an edit, and resumption inside a shard killed with SIGKILL."""

from __future__ import annotations

import base64
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from direct_checks import assert_clean_runs_match_direct_computation
from neuron_effects import agreement
from neuron_effects.aggregate import CLASSES, UNDETERMINED, Thresholds
from neuron_effects.inputs import read_neurons, read_prompts
from neuron_effects.plan import make_plan
from workflow_helpers import (
    REPO,
    UNIT,
    copy_run,
    jobs_of,
    move_neuron,
    snakemake,
    snakemake_command,
    write_workdir,
)

CONTRACT_COLUMNS = ["prompt_id", "neuron_id", "layer", "neuron", "activation", "target_id",
                    "target_token", "direct", "indirect", "total", "direct_frozen_norm",
                    "norm_mediated", "direct_ratio", "cancellation", "sign_aligned",
                    "prob_change_direct", "prob_change_total"]
LOGIT_DIFF_COLUMNS = ["direct_logit_diff", "indirect_logit_diff", "total_logit_diff",
                      "direct_frozen_norm_logit_diff", "norm_mediated_logit_diff"]
TOP_K_COLUMNS = [f"top_k_{kind}_{stat}" for kind in ("direct", "indirect", "total")
                 for stat in ("mean", "max", "tokens")]
LABEL_FIELDS = {"effect_type", "direct_ratio", "effect_type_frozen_norm",
                "direct_ratio_frozen_norm", "effect_mediators", "edge_agreement",
                "atp_agreement", "relp_agreement"}
ATP_NEURON_COLUMNS = ["atp_spearman", "atp_sign_agreement", "atp_median_relative_error",
                      "mean_total_atp"]


# --- lint and format ----------------------------------------------------------------------------

def test_snakemake_lint_is_clean(tmp_path, llama_8b_dir):
    workdir = write_workdir(tmp_path / "lint", str(llama_8b_dir))
    result = snakemake(workdir, "--lint", check=False)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Lints for" not in result.stdout
    assert "Congratulations, your workflow is in a good condition!" in result.stdout


def test_snakefmt_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile",
                             "workflow/"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"All \d+ file\(s\) would be left unchanged", result.stderr)


def test_python_lint_is_clean():
    """ruff with the project's rules (pyproject.toml): no unused imports or names, no undefined
    names, no bugbear findings, in the package, the scripts, the tests and the benchmarks."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All checks passed!" in result.stdout


def test_conda_env_pins_match_requirements():
    """envs/neuron-effects.yaml (for --sdm conda) installs exactly the runtime pins of
    requirements.txt, less Snakemake and its plugin (which run the rules, not inside them)."""
    pins = {line.split("==")[0].lower(): line for line in
            (REPO / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")}
    for runner in ("snakemake", "snakemake-executor-plugin-slurm"):
        assert pins.pop(runner)
    env = yaml.safe_load((REPO / "envs/neuron-effects.yaml").read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert sorted(pip) == sorted([*pins.values(), ".."])


# --- the output contract on the tiny model ------------------------------------------------------

@pytest.fixture(scope="module")
def outputs(tiny_workflow):
    workdir, before = tiny_workflow
    return {
        "workdir": workdir,
        "profiles": json.loads(before["neurons.json"]),
        "prompt_ids": [json.loads(line)["prompt_id"]
                       for line in before["prompts.jsonl"].decode().splitlines()],
        "per_prompt": pd.read_parquet(workdir / "results/effects/per_prompt.parquet"),
        "neurons": pd.read_parquet(workdir / "results/summary/neurons.parquet"),
        "layers": pd.read_parquet(workdir / "results/summary/layers.parquet"),
        "documents": json.loads((workdir / "results/summary/neurons.json").read_text()),
        "labels": json.loads((workdir / "results/labels/neurons.with_effects.json").read_text()),
        "validation": json.loads((workdir / "results/validation/summary.json").read_text()),
        "atp_neurons": pd.read_parquet(workdir / "results/atp/neurons.parquet"),
        "atp_candidates": pd.read_parquet(workdir / "results/atp/candidates.parquet"),
    }


@pytest.mark.slow
def test_all_outputs_exist(outputs):
    workdir = outputs["workdir"]
    for path in ("results/effects/per_prompt.parquet", "results/summary/neurons.parquet",
                 "results/summary/neurons.json", "results/summary/layers.parquet",
                 "results/summary/prompts.parquet", "results/labels/neurons.with_effects.json",
                 "results/validation/summary.json", "results/validation/pairs.parquet",
                 "results/activations/neuron_stats.parquet", "results/report/report.html",
                 "results/effects/mediation.parquet", "results/effects/mediators.parquet",
                 "results/summary/mediation_layers.parquet", "results/summary/edges.parquet",
                 "results/atp/estimates.safetensors", "results/atp/neurons.parquet",
                 "results/atp/candidates.parquet", "results/atp/chunks/c000.safetensors",
                 "results/atp/chunks/c001.safetensors"):
        assert (workdir / path).stat().st_size > 0, path
    shards = sorted(p.name for p in (workdir / "results/effects/shards").glob("*.parquet"))
    assert shards == sorted(f"L{b:02d}-{b + 1:02d}_c00{c}{table}.parquet" for b in (0, 2, 4)
                            for c in (0, 1)
                            for table in ("", ".mediation", ".mediators", ".edges"))
    # each shard's rows are in the row cache, one entry per unit (a 2-layer block x a prompt)
    manifests = list((workdir / "results/cache/effects").glob("*/*.json"))
    assert len(manifests) == 3 * 6


@pytest.mark.slow
def test_own_prompt_fields_reach_the_summary_and_the_report(outputs):
    workdir = outputs["workdir"]
    prompts = pd.read_parquet(workdir / "results/summary/prompts.parquet")
    assert prompts["source"].tolist() == ["demo"] * 6 and prompts["rank"].tolist() == [*range(6)]
    page = (workdir / "results/report/report.html").read_text()
    prompt_table = page[page.index(">Prompts and targets</h2>"):]
    assert "<th>source</th>" in prompt_table and "<th>rank</th>" in prompt_table


@pytest.mark.slow
def test_per_prompt_table_contract(outputs):
    table = outputs["per_prompt"]
    missing = [c for c in CONTRACT_COLUMNS + LOGIT_DIFF_COLUMNS + TOP_K_COLUMNS
               if c not in table.columns]
    assert not missing
    assert list(table.columns[:4]) == ["prompt_id", "neuron_id", "layer", "neuron"]
    # one row per (prompt, neuron): exactly the input's prompts x the input's neurons
    assert not table.duplicated(["prompt_id", "neuron_id"]).any()
    neuron_ids = [p["neuron_id"] for p in outputs["profiles"]["profiles"]]
    assert len(table) == len(outputs["prompt_ids"]) * len(neuron_ids) == 6 * 18
    assert set(zip(table["prompt_id"], table["neuron_id"])) == {
        (p, n) for p in outputs["prompt_ids"] for n in neuron_ids}
    by_id = {p["neuron_id"]: (p["layer"], p["neuron"]) for p in outputs["profiles"]["profiles"]}
    assert [by_id[n] for n in table["neuron_id"]] == list(zip(table["layer"], table["neuron"]))
    # the definitions hold row by row, and the effects are not all zero
    numbers = table[["direct", "indirect", "total", "direct_frozen_norm", "norm_mediated",
                     "activation"]].to_numpy()
    assert np.isfinite(numbers).all()
    np.testing.assert_allclose(table["direct"] + table["indirect"], table["total"], atol=1e-5)
    np.testing.assert_allclose(table["direct"] - table["direct_frozen_norm"],
                               table["norm_mediated"], atol=1e-5)
    defined = table["ratio_defined"]
    assert defined.mean() > 0.9
    ratio = table["direct"].abs() / (table["direct"].abs() + table["indirect"].abs())
    np.testing.assert_allclose(table.loc[defined, "direct_ratio"], ratio[defined], atol=1e-6)
    assert table.loc[defined, "direct_ratio"].between(0, 1).all()
    assert (table["sign_aligned"] == (table["direct"] * table["indirect"] > 0)).all()
    assert table["total"].abs().median() > 1e-3
    assert table["target_token"].str.len().gt(0).all()
    assert table["top_k_total_tokens"].map(len).eq(10).all()  # metrics.top_k


@pytest.mark.slow
def test_neuron_summary_and_json_plan_shape(outputs):
    neurons, documents = outputs["neurons"], outputs["documents"]
    assert len(neurons) == len(documents) == 18
    assert neurons["classification"].isin([*CLASSES, UNDETERMINED]).all()
    assert neurons["classification"].nunique() >= 2  # the tiny model gives several classes
    expected = Thresholds().classify(neurons["mean_direct_ratio"].to_numpy())
    assert (neurons["classification"].to_numpy() == expected).all()
    per_prompt = outputs["per_prompt"]
    for document in documents:
        assert set(document) >= {"neuron_id", "layer", "neuron", "effect_summary",
                                 "sign_alignment", "per_prompt_breakdown"}
        summary, alignment = document["effect_summary"], document["sign_alignment"]
        assert set(summary) >= {"mean_direct_ratio", "std_direct_ratio", "median_direct_ratio",
                                "classification", "consistency"}
        assert set(alignment) == {"aligned_fraction", "interpretation"}
        assert alignment["interpretation"] == ("reinforcing" if alignment["aligned_fraction"]
                                               >= 0.5 else "opposing")
        rows = per_prompt[per_prompt["neuron_id"] == document["neuron_id"]]
        assert [b["prompt_id"] for b in document["per_prompt_breakdown"]] == \
            rows["prompt_id"].tolist()
        assert summary["mean_direct_ratio"] == pytest.approx(
            rows.loc[rows["ratio_defined"], "direct_ratio"].mean(), abs=1e-9)
        assert summary["median_direct_ratio"] == pytest.approx(
            rows.loc[rows["ratio_defined"], "direct_ratio"].median(), abs=1e-9)
        row = neurons.set_index("neuron_id").loc[document["neuron_id"]]
        assert summary["classification"] == row["classification"]
        assert alignment["aligned_fraction"] == pytest.approx(row["aligned_fraction"])


@pytest.mark.slow
def test_mediation_outputs(outputs):
    """The long split, the top-k mediators, the layer flow and the per-neuron columns."""
    workdir, table = outputs["workdir"], outputs["per_prompt"]
    mediation = pd.read_parquet(workdir / "results/effects/mediation.parquet")
    assert list(mediation.columns) == ["prompt_id", "neuron_id", "layer", "component",
                                       "contribution"]
    layers = dict(zip(table["neuron_id"], table["layer"]))
    # per (prompt, neuron): 2 rows per downstream layer and one norm row
    counts = mediation.groupby(["prompt_id", "neuron_id"]).size()
    expected = [2 * (6 - 1 - layers[neuron]) + 1 for _, neuron in counts.index]
    assert counts.tolist() == expected and len(counts) == len(table)
    last = mediation[mediation["neuron_id"].map(layers) == 5]
    assert set(last["component"]) == {"norm"} and (last["layer"] == -1).all()
    # the split sums to total - direct_frozen_norm, and matches the per-prompt columns
    merged = table.set_index(["prompt_id", "neuron_id"])
    sums = mediation.groupby(["prompt_id", "neuron_id"])["contribution"].sum()
    np.testing.assert_allclose(sums, (merged["total"] - merged["direct_frozen_norm"])
                               .loc[sums.index], atol=1e-5)
    parts = table["indirect_attn"] + table["indirect_mlp"] + table["indirect_norm"]
    np.testing.assert_allclose(parts, table["indirect"], atol=1e-5)
    assert table["indirect_mlp"].abs().max() > 1e-3
    schema = pq.read_schema(workdir / "results/effects/mediation.parquet")
    assert str(schema.field("contribution").type) == "float"
    mediators = pd.read_parquet(workdir / "results/effects/mediators.parquet")
    assert list(mediators.columns) == ["prompt_id", "neuron_id", "kind", "rank", "layer",
                                       "index", "contribution"]
    assert set(mediators["kind"]) == {"neuron", "head"}
    assert mediators.groupby(["prompt_id", "neuron_id", "kind"]).size().max() == 10
    assert (mediators["layer"] > mediators["neuron_id"].map(layers)).all()
    flow = pd.read_parquet(workdir / "results/summary/mediation_layers.parquet")
    assert (flow["layer"] > flow["source_layer"]).all() and len(flow) == 2 * 15
    neurons = outputs["neurons"]
    shares = neurons[["indirect_share_attn", "indirect_share_mlp", "indirect_share_norm"]]
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    assert neurons.loc[neurons["layer"] < 5, "top_mediator"].str.match(r"L\d+/[NH]\d+$").all()
    with_edges = neurons[neurons["edge_n_neuron_targets"].notna()]
    assert len(with_edges) == 6 and (with_edges["edge_n_logit_targets"] == 1).all()
    document = outputs["documents"][0]
    assert document["effect_mediators"]["top_mediators"] and "edge_agreement" in document
    labels = outputs["labels"]["profiles"]
    assert labels[0]["edge_agreement"]["edge_n_neuron_targets"] == 2
    assert labels[1]["edge_agreement"] is None and "effect_mediators" in labels[1]


@pytest.mark.slow
def test_layer_summary(outputs):
    layers, neurons = outputs["layers"], outputs["neurons"]
    assert layers["layer"].tolist() == list(range(6))
    assert layers["n_neurons"].tolist() == [3] * 6
    counts = layers[[f"n_{label.replace('-', '_')}" for label in (*CLASSES, UNDETERMINED)]]
    assert (counts.sum(axis=1) == layers["n_neurons"]).all()
    for label in CLASSES:
        expected = neurons[neurons["classification"] == label].groupby("layer").size()
        column = layers.set_index("layer")[f"n_{label.replace('-', '_')}"]
        assert column.to_dict() == {layer: int(expected.get(layer, 0)) for layer in range(6)}


@pytest.mark.slow
def test_enriched_labels_keep_the_input_shape(outputs):
    original, labels = outputs["profiles"], outputs["labels"]
    assert list(labels) == list(original)  # same top-level keys, same order
    assert labels["source"] == original["source"]
    assert len(labels["profiles"]) == len(original["profiles"])
    classes = outputs["neurons"].set_index("neuron_id")
    for before, after in zip(original["profiles"], labels["profiles"]):
        assert set(after) == set(before) | LABEL_FIELDS
        assert {k: v for k, v in after.items() if k not in LABEL_FIELDS} == before
        assert list(after)[:len(before)] == list(before)  # original fields first, in order
        row = classes.loc[before["neuron_id"]]
        assert after["effect_type"] == row["classification"]
        assert after["direct_ratio"] == pytest.approx(row["mean_direct_ratio"])
        assert after["effect_type_frozen_norm"] == row["classification_frozen_norm"]
        assert after["atp_agreement"]["spearman"] == pytest.approx(row["atp_spearman"])


@pytest.mark.slow
def test_attribution_outputs(outputs):
    """Estimates [prompts, layers, intermediate] with the prompt ids; every neuron of the tiny
    model (6 layers x 96) in the all-neuron table; the candidates outside the profile; total_atp
    in the long table equal to the estimate of its prompt and neuron; agreement columns."""
    from safetensors import safe_open

    workdir, per_prompt = outputs["workdir"], outputs["per_prompt"]
    with safe_open(str(workdir / "results/atp/estimates.safetensors"), framework="np") as handle:
        prompt_ids = json.loads(handle.metadata()["prompt_ids"])
        estimates = handle.get_tensor("estimates")
        relp = handle.get_tensor("relp")
        gradient = handle.get_tensor("gradient")
    assert estimates.shape == relp.shape == gradient.shape == (6, 6, 96)
    assert estimates.dtype == relp.dtype == np.float32
    assert prompt_ids == outputs["prompt_ids"]
    assert np.isfinite(estimates).all() and np.abs(estimates).max() > 1e-3
    index = {prompt_id: i for i, prompt_id in enumerate(prompt_ids)}
    expected = estimates[per_prompt["prompt_id"].map(index), per_prompt["layer"],
                         per_prompt["neuron"]]
    np.testing.assert_array_equal(per_prompt["total_atp"].to_numpy(), expected)
    np.testing.assert_array_equal(per_prompt["total_relp"].to_numpy(), relp[
        per_prompt["prompt_id"].map(index), per_prompt["layer"], per_prompt["neuron"]])
    assert np.abs(relp - estimates).max() > 1e-3  # another gradient, another estimate
    np.testing.assert_allclose(per_prompt["indirect_atp"],
                               per_prompt["total_atp"] - per_prompt["direct"], atol=1e-12)
    # add on a tiny random model: the estimate ranks like the exact total (a few rows with
    # large activations are far off: first order only)
    overall = agreement.overall_agreement(per_prompt)
    assert overall["atp_spearman"] > 0.8 and overall["atp_median_relative_error"] < 0.1

    table = outputs["atp_neurons"]
    assert len(table) == 6 * 96 and not table.duplicated(["layer", "neuron"]).any()
    assert table["rank"].tolist() == list(range(1, 6 * 96 + 1))
    assert table["mean_abs_atp"].is_monotonic_decreasing
    assert sorted(table["rank_relp"]) == list(range(1, 6 * 96 + 1))
    assert (table.sort_values("rank_relp")["mean_abs_relp"].is_monotonic_decreasing)
    studied = {(p["layer"], p["neuron"]) for p in outputs["profiles"]["profiles"]}
    assert set(zip(table.loc[table["in_profile"], "layer"],
                   table.loc[table["in_profile"], "neuron"])) == studied
    row = table.set_index(["layer", "neuron"]).loc[(2, 50)]
    assert row["mean_abs_atp"] == pytest.approx(np.abs(estimates[:, 2, 50]).mean(), rel=1e-6)
    assert row["max_abs_atp"] == pytest.approx(np.abs(estimates[:, 2, 50]).max(), rel=1e-6)

    candidates = outputs["atp_candidates"]
    outside = table[~table["in_profile"]]
    listed = {method: set(outside.nsmallest(200, column).index)
              for method, column in (("atp", "rank"), ("relp", "rank_relp"))}
    assert len(candidates) == len(listed["atp"] | listed["relp"])  # atp.candidates of either
    assert not set(zip(candidates["layer"], candidates["neuron"])) & studied
    best = "L{}/N{}".format(*outside.iloc[0][["layer", "neuron"]])
    assert "atp" in candidates.set_index("neuron_id").loc[best, "listed_by"]
    assert candidates[["rank", "rank_relp"]].min(axis=1).iloc[0] == 1

    neurons, layers = outputs["neurons"], outputs["layers"]
    assert set(ATP_NEURON_COLUMNS) <= set(neurons.columns)
    assert neurons["atp_spearman"].between(-1, 1).all()
    assert neurons["atp_sign_agreement"].between(0, 1).all()
    first = neurons.iloc[0]
    rows = per_prompt[per_prompt["neuron_id"] == first["neuron_id"]]
    assert first["mean_total_atp"] == pytest.approx(rows["total_atp"].mean())
    assert first["atp_median_relative_error"] == pytest.approx(
        ((rows["total_atp"] - rows["total"]).abs() / rows["total"].abs()).median())
    assert {"atp_spearman", "atp_sign_agreement", "atp_median_relative_error",
            "atp_precision_at_k"} <= set(layers.columns)
    assert layers["atp_precision_at_k"].between(0, 1).all()
    assert {"relp_spearman", "relp_sign_agreement", "relp_median_relative_error",
            "mean_total_relp"} <= set(neurons.columns)
    assert first["mean_total_relp"] == pytest.approx(rows["total_relp"].mean())
    assert layers["relp_precision_at_k"].between(0, 1).all()
    for document in outputs["documents"]:
        assert set(document["atp_agreement"]) == {"spearman", "sign_agreement",
                                                  "median_relative_error", "mean_total_atp"}
        assert set(document["relp_agreement"]) == {"spearman", "sign_agreement",
                                                   "median_relative_error", "mean_total_relp"}
    report = (workdir / "results/report/report.html").read_text()
    assert "Attribution patching" in report and candidates["neuron_id"].iloc[0] in report
    assert "total_relp" in report


@pytest.mark.slow
def test_edges_measured_exactly(outputs):
    """results/summary/edges.parquet: one row per listed neuron edge of a later layer of the
    model (the last layer's edges point past the model: left out, with a warning naming them);
    exact_weight = mean over prompts of Δa_t x the plain gradient; per neuron the fraction of
    real edges; profiles without edges NaN."""
    from safetensors import safe_open

    workdir = outputs["workdir"]
    edges = pd.read_parquet(workdir / "results/summary/edges.parquet")
    assert list(edges.columns) == ["neuron_id", "target_layer", "target_neuron", "avg_weight",
                                   "delta_activation", "relative_delta", "exact_weight",
                                   "sign_agrees", "n_prompts"]
    assert len(edges) == 10 and (edges["n_prompts"] == 6).all()
    assert set(edges["neuron_id"]) == {f"L{layer}/N{layer}" for layer in range(5)}
    assert (edges["target_layer"] == edges["neuron_id"].str[1].astype(int) + 1).all()
    assert sorted(set(edges["avg_weight"])) == [-0.3, 0.4]
    log = (workdir / "logs/aggregate_block/L04-05.log").read_text()  # the block of layer 5
    assert "edge L5/N5 -> 6_5 left out" in log and "edge L5/N5 -> 6_11 left out" in log
    deltas = pd.concat(pd.read_parquet(path) for path in
                       sorted((workdir / "results/effects/shards").glob("*.edges.parquet")))
    with safe_open(str(workdir / "results/atp/estimates.safetensors"), framework="np") as handle:
        prompt_ids = json.loads(handle.metadata()["prompt_ids"])
        gradient = handle.get_tensor("gradient")
    row = edges.iloc[3]
    rows = deltas[(deltas["neuron_id"] == row["neuron_id"])
                  & (deltas["target_neuron"] == row["target_neuron"])]
    slopes = [gradient[prompt_ids.index(prompt), row["target_layer"], row["target_neuron"]]
              for prompt in rows["prompt_id"]]
    assert row["exact_weight"] == pytest.approx(float(np.mean(rows["delta_activation"] * slopes)))
    assert row["delta_activation"] == pytest.approx(rows["delta_activation"].mean())
    assert row["sign_agrees"] == (np.sign(row["exact_weight"]) == np.sign(row["avg_weight"]))
    neurons = outputs["neurons"].set_index("neuron_id")
    real = (edges["relative_delta"] >= 0.01) & edges["sign_agrees"]
    expected = real.groupby(edges["neuron_id"]).mean()
    np.testing.assert_allclose(neurons.loc[expected.index, "edge_real_fraction"], expected)
    assert neurons.loc["L5/N5", "edge_n_measured"] == 0
    assert math.isnan(neurons.loc["L5/N5", "edge_real_fraction"])
    assert neurons.loc["L0/N7", ["edge_n_measured", "edge_real_fraction"]].isna().all()
    labels = outputs["labels"]["profiles"]
    assert labels[0]["edge_agreement"]["edge_real_fraction"] == pytest.approx(
        expected["L0/N0"])
    report = (workdir / "results/report/report.html").read_text()
    assert "Every profile edge measured exactly" in report


@pytest.mark.slow
def test_attribution_can_be_turned_off(tiny_workflow, tmp_path):
    """atp.enabled: false: no attribution jobs, no *_atp columns, no report section."""
    workdir = copy_run(tiny_workflow[0], tmp_path / "run")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["atp"] = {"enabled": False, "candidates": 200}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    output = snakemake(workdir, "--cores", "2").stdout
    assert not jobs_of(output, "estimate_attribution")
    assert not jobs_of(output, "summarize_attribution")
    assert jobs_of(output, "aggregate_effects") == {""}
    per_prompt = pd.read_parquet(workdir / "results/effects/per_prompt.parquet")
    neurons = pd.read_parquet(workdir / "results/summary/neurons.parquet")
    assert "total_atp" not in per_prompt and "atp_spearman" not in neurons
    assert "total_relp" not in per_prompt and "relp_spearman" not in neurons
    labels = json.loads((workdir / "results/labels/neurons.with_effects.json").read_text())
    assert all("atp_agreement" not in profile for profile in labels["profiles"])
    assert "Attribution patching" not in (workdir / "results/report/report.html").read_text()


@pytest.mark.slow
def test_profile_scores_judged_against_the_exact_means(tiny_workflow, tmp_path):
    """Profile score fields equal to the exact mean total and to its negation (one neuron
    without them): Spearman >= 0.99 and <= -0.99 in profile_scores.parquet and the report; the
    edit reruns no block and no effect job; a non-numeric score stops the parse naming it."""
    workdir = copy_run(tiny_workflow[0], tmp_path / "run")
    means = pd.read_parquet(workdir / "results/summary/neurons.parquet").set_index(
        "neuron_id")["mean_total"]
    document = json.loads((workdir / "neurons.json").read_text())
    for profile in document["profiles"][1:]:
        profile["graph"] = {"attribution": float(means[profile["neuron_id"]])}
        profile["negated"] = -float(means[profile["neuron_id"]])
    (workdir / "neurons.json").write_text(json.dumps(document, indent=1))
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["profile_scores"] = ["graph.attribution", "negated"]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    output = snakemake(workdir, "--cores", "2").stdout
    assert jobs_of(output, "judge_profile_scores") == {""}
    for rule in ("aggregate_block", "compute_effects", "estimate_attribution"):
        assert not jobs_of(output, rule), rule
    table = pd.read_parquet(workdir / "results/summary/profile_scores.parquet").set_index("field")
    assert list(table.index) == ["graph.attribution", "negated"]
    assert (table["n_neurons"] == len(means) - 1).all() and (table["n_missing"] == 1).all()
    assert table.loc["graph.attribution", "spearman"] >= 0.99
    assert table.loc["negated", "spearman"] <= -0.99
    assert table.loc["graph.attribution", "sign_agreement"] == 1.0
    assert table.loc["negated", "sign_agreement"] == 0.0
    assert table["precision_at_tenth"].notna().all() and table["precision_at_100"].isna().all()
    assert "The profile's own scores against the exact effects" in (
        workdir / "results/report/report.html").read_text()
    document["profiles"][2]["negated"] = "high"
    (workdir / "neurons.json").write_text(json.dumps(document, indent=1))
    failed = snakemake(workdir, "-n", check=False)
    assert failed.returncode != 0
    assert f"neuron_id {document['profiles'][2]['neuron_id']!r}" in failed.stdout
    assert "profile score 'negated' must be a finite number" in failed.stdout


def test_verify_candidates_adds_exact_rows_of_the_top_neurons_outside_the_profile(tiny_workflow,
                                                                                  tmp_path):
    """atp.verify_candidates: 10 on a finished run: only the second stage runs; the 10 neurons
    outside the profile with the largest mean |total_atp| get exact rows on every prompt with
    in_profile false (not in the labels); listed in a profile later (the row cache emptied),
    the engine gives them the same numbers."""
    workdir = copy_run(tiny_workflow[0], tmp_path / "run")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["atp"] = {**config["atp"], "verify_candidates": 10}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    output = snakemake(workdir, "--cores", "2").stdout
    assert "compute_candidate_effects" in output and "rows in compute_candidate_effects" in output
    assert not jobs_of(output, "compute_effects") and not jobs_of(output, "aggregate_block")
    assert jobs_of(output, "compute_candidate_effects") == {"c000", "c001"}
    table = pd.read_parquet(workdir / "results/atp/neurons.parquet")
    outside = table[~table["in_profile"]].sort_values(["mean_abs_atp", "layer", "neuron"],
                                                      ascending=[False, True, True])
    top = [f"L{layer}/N{neuron}" for layer, neuron in zip(outside["layer"][:10],
                                                          outside["neuron"][:10])]
    per_prompt = pd.read_parquet(workdir / "results/effects/per_prompt.parquet")
    candidates = per_prompt[~per_prompt["in_profile"]]
    profiles = json.loads((workdir / "neurons.json").read_text())["profiles"]
    assert set(per_prompt.loc[per_prompt["in_profile"], "neuron_id"]) == {
        p["neuron_id"] for p in profiles}
    assert set(candidates["neuron_id"]) == set(top) and len(candidates) == 10 * 6
    assert candidates.groupby("neuron_id")["prompt_id"].nunique().eq(6).all()
    assert np.isfinite(candidates[["direct", "indirect", "total", "total_atp"]]).all().all()
    neurons = pd.read_parquet(workdir / "results/summary/neurons.parquet")
    assert set(neurons.loc[~neurons["in_profile"], "neuron_id"]) == set(top)
    assert neurons["in_profile"].sum() == len(profiles) == 18
    labels = json.loads((workdir / "results/labels/neurons.with_effects.json").read_text())
    assert [p["neuron_id"] for p in labels["profiles"]] == [p["neuron_id"] for p in profiles]
    assert len(json.loads((workdir / "results/summary/neurons.json").read_text())) == 18
    assert "Neurons the profile missed, verified exactly" in (
        workdir / "results/report/report.html").read_text()

    # listed in the profile, computed afresh by the profile's shards: the same numbers
    profiles += [{"neuron_id": neuron_id, "layer": int(neuron_id[1:].split("/")[0]),
                  "neuron": int(neuron_id.split("/N")[1])} for neuron_id in top]
    (workdir / "neurons.json").write_text(json.dumps({"source": "test", "profiles": profiles}))
    shutil.rmtree(workdir / "results/cache/effects")
    snakemake(workdir, "--cores", "2")
    again = pd.read_parquet(workdir / "results/effects/per_prompt.parquet").set_index(
        ["prompt_id", "neuron_id"])
    listed = again.loc[candidates.set_index(["prompt_id", "neuron_id"]).index]
    assert listed["in_profile"].all()
    columns = ["activation", "direct", "indirect", "total", "direct_frozen_norm",
               "prob_change_total", "total_atp"]
    np.testing.assert_allclose(listed[columns].to_numpy(),
                               candidates.set_index(["prompt_id", "neuron_id"])[columns]
                               .to_numpy(), rtol=1e-4, atol=1e-5)  # float32 at the logits' scale
    # the next 10 outside the grown profile are verified now
    later = set(again.loc[~again["in_profile"]].index.get_level_values("neuron_id"))
    assert len(later) == 10 and not later & set(top)


@pytest.mark.slow
def test_validation_passed(outputs):
    validation = outputs["validation"]
    assert validation["passed"] is True
    assert validation["n_pairs"] == 4
    assert validation["dtype"] == "float32" and validation["device"] == "cpu"
    # the tolerance derives from the run's own logits: 64 x float32 eps x max |clean logit|
    assert validation["tolerance_source"].startswith("derived")
    assert validation["tolerance"] == pytest.approx(
        64 * np.finfo(np.float32).eps * validation["logit_scale"]["max"])
    assert 0 <= validation["max_abs_diff"] <= validation["tolerance"]
    assert validation["non_finite_columns"] == []
    # every row of the table was checked for NaN and infinity by the aggregation: none
    assert validation["non_finite"] == {"n_rows": 0, "rows": [], "columns": []}
    assert (outputs["neurons"]["n_non_finite"] == 0).all()
    assert {"top_k_total_tokens", "direct_ratio", "cancellation", "sign_aligned"} <= set(
        validation["max_abs_diff_by_metric"])
    # the reference ran at a higher precision than the run, on the same weights
    assert validation["reference_dtype"] == "float64" and validation["reference_note"] is None
    assert set(validation["relative_error"]) == {"direct", "indirect", "total"}
    assert validation["relative_error"]["total"] < 1e-3
    assert validation["rows_off_10pct"] == 0.0 and validation["max_relative_error"] == 0.05
    assert validation["precision_flags"]["float32_matmul_precision"] == "highest"
    assert validation["failure"] is None and validation["dtype_warning"] is None
    log = (outputs["workdir"] / "logs/validate_sample.log").read_text().splitlines()
    assert "validation PASSED" in log[-1]


@pytest.mark.slow
def test_clean_records_and_activation_stats_match_a_direct_computation(outputs, tiny_model_dir):
    assert_clean_runs_match_direct_computation(outputs["workdir"], tiny_model_dir, 100, 0.1)


@pytest.mark.slow
def test_snakemake_report_renders(tiny_workflow, tmp_path):
    workdir, _ = tiny_workflow
    report = tmp_path / "report.html"
    result = snakemake(workdir, "--report", str(report))
    assert "Report created" in result.stdout
    text = report.read_text()
    assert report.stat().st_size > 100_000
    for name in ("report.html", "per_prompt.parquet", "neurons.json",
                 "neurons.with_effects.json", "summary.json", *FIGURES):
        assert name in text, name


FIGURES = ("class_bars.png", "ratio_distributions.png", "direct_vs_indirect.png",
           "alignment.png")


@pytest.mark.slow
def test_snakemake_report_zip_holds_the_report_and_the_figures_with_captions(tiny_workflow,
                                                                             tmp_path):
    import zipfile

    workdir, _ = tiny_workflow
    archive = tmp_path / "report.zip"
    assert "Report created" in snakemake(workdir, "--report", str(archive)).stdout
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
        index = opened.read("report/report.html").decode()
        files = {Path(name).name: opened.read(name) for name in names
                 if name.startswith("report/data/raw/")}
    assert (files["report.html"] == (workdir / "results/report/report.html").read_bytes())
    for name in FIGURES:
        assert files[name].startswith(b"\x89PNG"), name  # the figure itself
        assert files[name] == (workdir / "results/report/figures" / name).read_bytes()
        caption = (REPO / f"workflow/report/figure_{name[:-4]}.rst").read_text().split("\n")[0]
        assert caption.split("``")[0].strip() in index, name  # its caption


# --- the shard plan at the seed's scale (dry runs and --touch, nothing computed) ----------------

EMPTY_LAYERS = range(8, 12)  # the block L08-11 holds no neuron: no shards for it


@pytest.fixture(scope="module")
def seed_scale(tmp_path_factory, llama_8b_dir):
    """A working directory shaped like the seed's job: config/llama-3.1-8b.yaml on a
    Llama-3.1-8B config, 8,177 neurons, 100 prompts; with explicit sizes (4 layers per shard, 25
    prompts per chunk), whose stale-only reruns the tests below check (the automatic layout of
    the same job: test_seed_scale_auto_plan)."""
    seed = yaml.safe_load((REPO / "config/llama-3.1-8b.yaml").read_text())
    overrides = {key: value for key, value in seed.items()
                 if key not in ("model", "neurons", "prompts")}
    overrides["sharding"] = {**overrides["sharding"], "layers_per_shard": 4,
                             "prompts_per_chunk": 25}
    workdir = write_workdir(tmp_path_factory.mktemp("seed-scale") / "run", str(llama_8b_dir),
                            **overrides)
    rng = random.Random(2026)
    layers = [layer for layer in range(32) if layer not in EMPTY_LAYERS]
    units: set[tuple[int, int]] = set()
    while len(units) < 8177:
        units.add((rng.choice(layers), rng.randrange(14336)))
    profiles = [{"neuron_id": f"L{layer}/N{neuron}", "layer": layer, "neuron": neuron,
                 "label": f"profile {index}", "mean_activation": round(rng.gauss(0, 1), 4)}
                for index, (layer, neuron) in enumerate(sorted(units))]
    (workdir / "neurons.json").write_text(json.dumps({"model": "Llama-3.1-8B",
                                                       "profiles": profiles}))
    (workdir / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt_id": f"q{i:03d}", "prompt": f"Clinical question {i}: the answer is",
                    "target": " yes", "distractor": " no"}) + "\n" for i in range(100)))
    return workdir


def _expected_blocks(workdir: Path) -> list[str]:
    layers = {p["layer"] for p in json.loads((workdir / "neurons.json").read_text())["profiles"]}
    return sorted({f"L{4 * (layer // 4):02d}-{4 * (layer // 4) + 3:02d}" for layer in layers})


def _job_counts(output: str) -> dict[str, int]:
    stats = output[output.index("Job stats:"):]
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^(\w+)\s+(\d+)$", stats.split("\n\n")[0], re.M)}


@pytest.mark.slow
def test_seed_scale_plan(seed_scale):
    result = snakemake(seed_scale, "-n")
    blocks = _expected_blocks(seed_scale)
    chunks = [f"c{i:03d}" for i in range(4)]
    assert len(blocks) == 7  # 8 blocks of 4 layers, one of them empty
    assert jobs_of(result.stdout, "compute_effects") == {f"{b}_{c}" for b in blocks
                                                         for c in chunks}
    assert jobs_of(result.stdout, "cache_clean_runs") == set(chunks)
    assert jobs_of(result.stdout, "estimate_attribution") == set(chunks)
    counts = _job_counts(result.stdout)
    assert counts["compute_effects"] == 28 and counts["cache_clean_runs"] == 4
    assert jobs_of(result.stdout, "aggregate_block") == set(blocks)
    # the 100 verified candidates (atp.verify_candidates): one job per chunk, known at parse
    assert jobs_of(result.stdout, "compute_candidate_effects") == set(chunks)
    assert counts["select_candidates"] == counts["aggregate_candidates"] == 1
    # prepare, clean, shards, attribution per chunk, aggregation per block, 5 summaries + all,
    # the candidates' selection, jobs per chunk and aggregation
    assert counts["total"] == 1 + 4 + 28 + 4 + 7 + 6 + 1 + 4 + 1


@pytest.mark.slow
def test_seed_scale_auto_plan(seed_scale, tmp_path):
    """The real config as shipped (sharding: auto) with the Slurm profile's 32 jobs: the plan
    is printed before anything runs, and it is the few-job plan of the cost model."""
    workdir = tmp_path / "auto"
    shutil.copytree(seed_scale, workdir, symlinks=True)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["sharding"] = {**config["sharding"], "layers_per_shard": "auto",
                          "prompts_per_chunk": "auto"}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = snakemake(workdir, "-n", "--jobs", "32")
    output = result.stdout + result.stderr
    assert "The plan and its estimated cost:" in output
    share = re.search(r"estimated GPU-minutes on h200: ([0-9.]+), of which fixed cost "
                      r"\(start-up and model loading\) (\d+) %", output)
    # the shards keep sharding.max_fixed_share (0.3); the verified candidates' one job adds a
    # model load for 1.2 % of the rows, which the whole run's share includes
    assert share and int(share.group(2)) <= 40, output[-3000:]
    counts = _job_counts(result.stdout)
    model_jobs = sum(counts.get(rule, 0) for rule in (
        "cache_clean_runs", "compute_effects", "estimate_attribution", "validate_sample"))
    assert model_jobs <= 12  # (its prompts are short: one shard is worth its fixed cost)
    assert counts["cache_clean_runs"] == counts["estimate_attribution"] == 1
    assert list((workdir / ".snakemake/plans").glob("*.json"))  # for the jobs' own parse


def _create(workdir: Path, paths) -> None:
    for path in paths:
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).write_bytes(b"")


def _record_metadata(workdir: Path, outputs) -> None:
    """--touch every job so that Snakemake records the metadata (params included) of every
    output. --forceall: an output without metadata is neither rerun nor touched by default, and
    without recorded params a later change of them would go unnoticed."""
    snakemake(workdir, "--touch", "--forceall", "--cores", "1")
    for path in outputs:
        key = base64.b64encode(path.encode()).decode()
        assert (workdir / ".snakemake/metadata" / key).exists(), path
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout


def _pretend_everything_ran(workdir: Path) -> set[str]:
    """Create every planned output (empty) and record its metadata; returns the outputs."""
    plan = snakemake(workdir, "-n").stdout
    outputs = {path.strip() for match in re.finditer(r"^\s+output: (.*)$", plan, re.M)
               for path in match.group(1).split(",")}
    _create(workdir, outputs)
    _record_metadata(workdir, outputs)
    return outputs


def _touch_run(workdir: Path) -> str:
    """What a real run would execute now, without computing: --touch touches what would rerun.
    Outputs of new jobs are created afterwards (--touch only touches existing files)."""
    output = snakemake(workdir, "--touch", "--cores", "1").stdout
    new = [path for line in re.findall(r"Output files not touched because they don't exist: "
                                       r"(.*)$", output, re.M) for path in line.split(", ")]
    if new:
        _create(workdir, new)
        _record_metadata(workdir, new)
    return output


def _one_dry_run_lists(workdir: Path, shards: set[str], chunks: set[str]) -> str:
    """A single dry run after an edit lists exactly the stale shards and clean runs, each with
    its reason (no input-checking job has to run first)."""
    output = snakemake(workdir, "-n").stdout
    assert jobs_of(output, "compute_effects") == shards
    assert jobs_of(output, "cache_clean_runs") == chunks
    reasons = re.findall(r"^rule compute_effects:\n(?:    .*\n)*?    reason: (.*)$", output, re.M)
    assert len(reasons) == len(shards)
    assert all(r.startswith(("Params have changed since last execution", "Missing output files",
                             "Input files updated by another job")) for r in reasons), reasons
    return output


def _append_prompt_runs_the_last_chunk(workdir: Path, prompt_id: str, prompt: str,
                                       blocks: list[str]) -> str:
    """Append a prompt to the prompt file: a dry run, then a run, lists only the last chunk's
    (c004) shards and clean run; the run's output."""
    with (workdir / "prompts.jsonl").open("a") as handle:
        handle.write(json.dumps({"prompt_id": prompt_id, "prompt": prompt}) + "\n")
    _one_dry_run_lists(workdir, {f"{b}_c004" for b in blocks}, {"c004"})
    output = _touch_run(workdir)
    assert jobs_of(output, "compute_effects") == {f"{b}_c004" for b in blocks}
    assert jobs_of(output, "cache_clean_runs") == {"c004"}
    return output


@pytest.mark.slow
def test_seed_scale_edits_rerun_only_the_shards_they_touch(seed_scale):
    # shards write 4 tables each; the aggregation 10 parts per layer block (len(BLOCK_PARTS)),
    # then 11 files (3 of them the mediation outputs, 1 the edges, 1 the non-finite rows); the
    # report 5 (page and 4 figures); attribution patching 4 chunks and 3 summaries; the verified
    # candidates 1 selection, 4 tables per chunk and 9 aggregation parts (all but the edges)
    blocks = _expected_blocks(seed_scale)
    assert len(_pretend_everything_ran(seed_scale)) == \
        2 + 4 + 4 * 28 + 2 + 10 * len(blocks) + 11 + 2 + 5 + 4 + 3 + 1 + 4 * 4 + 9
    heavy = ("cache_clean_runs", "compute_effects", "extract_activations",
             "estimate_attribution")

    # 1. one profile's neuron index changes (layer 13 -> block L12-15): its 4 shards rerun
    path = seed_scale / "neurons.json"
    document = json.loads(path.read_text())
    profile = next(p for p in document["profiles"] if p["layer"] == 13)
    taken = {(p["layer"], p["neuron"]) for p in document["profiles"]}
    new_index = next(n for n in range(profile["neuron"] + 1, 14336) if (13, n) not in taken)
    profile.update(neuron=new_index, neuron_id=f"L13/N{new_index}")
    path.write_text(json.dumps(document))
    stale = {f"L12-15_c00{c}" for c in range(4)}
    _one_dry_run_lists(seed_scale, stale, set())
    output = _touch_run(seed_scale)
    assert jobs_of(output, "compute_effects") == stale
    assert jobs_of(output, "aggregate_block") == {"L12-15"}  # the other blocks' parts are kept
    assert not jobs_of(output, "cache_clean_runs") and not jobs_of(output, "extract_activations")
    assert not jobs_of(output, "estimate_attribution")
    for rule in ("prepare_inputs", "aggregate_effects", "validate_sample", "render_report",
                 "summarize_attribution"):
        assert jobs_of(output, rule) == {""}, rule

    # 2. one prompt appended: 101 prompts open a fifth chunk, c004; only its shards run
    output = _append_prompt_runs_the_last_chunk(seed_scale, "q100", "One more question:", blocks)
    assert jobs_of(output, "estimate_attribution") == {"c004"}
    assert jobs_of(output, "extract_activations") == {""}
    assert (seed_scale / "results/effects/shards/L28-31_c004.parquet").exists()

    # 3. another one: the last chunk c004 (now 2 prompts) changes; c000-c003 stay
    _append_prompt_runs_the_last_chunk(seed_scale, "q101", "And the last one:", blocks)

    # 4. nothing changed: nothing reruns
    assert "Nothing to be done" in snakemake(seed_scale, "-n").stdout
    assert not any(jobs_of(_touch_run(seed_scale), rule) for rule in heavy)


# --- the same on the tiny model, with real runs -------------------------------------------------

def shard_files(*shards: str) -> set[str]:
    """A shard's four files: per-prompt rows, mediation rows, top-k mediators, edge rows."""
    return {f"{shard}{table}.parquet" for shard in shards
            for table in ("", ".mediation", ".mediators", ".edges")}


def saved_units(entries: Path) -> set[str]:
    """The units saved in the row cache ``entries`` (``results/cache/effects``): an entry is
    saved when its manifest (written last) exists; it names the unit that made it."""
    names = set()
    for path in entries.glob("*/*.json"):
        try:
            names.add(json.loads(path.read_text())["made_by"].split(" unit ", 1)[1])
        except (ValueError, KeyError):  # replaced while read
            continue
    return names


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*")}


@pytest.mark.slow
def test_real_reruns_after_edits_touch_only_affected_shards(tiny_workflow, tmp_path):
    workdir = copy_run(tiny_workflow[0], tmp_path / "run")
    shards, clean = workdir / "results/effects/shards", workdir / "results/clean"
    before = pd.read_parquet(workdir / "results/effects/per_prompt.parquet")
    shard_times, clean_times = _mtimes(shards), _mtimes(clean)

    # 1. profile L3/N10 becomes L3/N60: the two shards of block L02-03 rerun, nothing else heavy
    assert move_neuron(workdir, "L3/N10", 60) == "L3/N60"
    dry = _one_dry_run_lists(workdir, {"L02-03_c000", "L02-03_c001"}, set())
    assert dry.count("reason: Params have changed since last execution") == 2
    output = snakemake(workdir, "--cores", "2").stdout
    assert jobs_of(output, "compute_effects") == {"L02-03_c000", "L02-03_c001"}
    assert not jobs_of(output, "cache_clean_runs") and not jobs_of(output, "estimate_attribution")
    assert rows_computed(workdir, output) == (6, 5 * 6)  # the moved neuron on 6 prompts
    after = pd.read_parquet(workdir / "results/effects/per_prompt.parquet")
    assert "L3/N60" in set(after["neuron_id"]) and "L3/N10" not in set(after["neuron_id"])
    assert len(after) == len(before)
    changed = {name for name, t in _mtimes(shards).items() if t != shard_times[name]}
    assert changed == shard_files("L02-03_c000", "L02-03_c001")
    kept = ~before["neuron_id"].eq("L3/N10")
    pd.testing.assert_frame_equal(
        before[kept].reset_index(drop=True),
        after[~after["neuron_id"].eq("L3/N60")].reset_index(drop=True), rtol=0, atol=1e-6)
    labels = json.loads((workdir / "results/labels/neurons.with_effects.json").read_text())
    assert "L3/N60" in {p["neuron_id"] for p in labels["profiles"]}

    # 2. a 7th prompt: chunk c001 (2 -> 3 prompts) reruns with its 3 shards; c000 stays
    shard_times = _mtimes(shards)
    demo = (REPO / "config/demo/prompts.jsonl").read_text().splitlines()
    with (workdir / "prompts.jsonl").open("a") as handle:
        handle.write(demo[6] + "\n")
    _one_dry_run_lists(workdir, {"L00-01_c001", "L02-03_c001", "L04-05_c001"}, {"c001"})
    output = snakemake(workdir, "--cores", "2").stdout
    assert jobs_of(output, "cache_clean_runs") == {"c001"}
    assert jobs_of(output, "compute_effects") == {"L00-01_c001", "L02-03_c001", "L04-05_c001"}
    assert jobs_of(output, "estimate_attribution") == {"c001"}
    assert rows_computed(workdir, output) == (18, 18 * 2)  # the new prompt, every neuron
    for rule in ("cache_clean_runs", "estimate_attribution"):
        assert "prompts computed: 1, reused: 2" in (workdir / f"logs/{rule}/c001.log").read_text()
    assert {name for name, t in _mtimes(shards).items() if t != shard_times[name]} == \
        shard_files("L00-01_c001", "L02-03_c001", "L04-05_c001")
    assert _mtimes(clean)["c000.safetensors"] == clean_times["c000.safetensors"]
    final = pd.read_parquet(workdir / "results/effects/per_prompt.parquet")
    assert final["prompt_id"].nunique() == 7 and len(final) == 7 * 18
    assert not final.duplicated(["prompt_id", "neuron_id"]).any()
    old = after.set_index(["prompt_id", "neuron_id"])
    pd.testing.assert_frame_equal(final.set_index(["prompt_id", "neuron_id"]).loc[old.index],
                                  old, rtol=0, atol=1e-6)
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout

    # 3. back to the original inputs: the shards, clean runs and estimates rerun and compute
    # nothing, and the long table is the first run's
    for name in ("neurons.json", "prompts.jsonl"):
        shutil.copy(tiny_workflow[0] / name, workdir / name)
    output = snakemake(workdir, "--cores", "2").stdout
    assert jobs_of(output, "compute_effects") == {"L02-03_c000", "L00-01_c001", "L02-03_c001",
                                                  "L04-05_c001"}
    assert rows_computed(workdir, output) == (0, 6 * 4 + 3 * 6 * 2)
    for rule in ("cache_clean_runs", "estimate_attribution"):
        assert "prompts computed: 0, reused: 2" in (workdir / f"logs/{rule}/c001.log").read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(workdir / "results/effects/per_prompt.parquet"),
                                  before)


def rows_computed(workdir: Path, output: str) -> tuple[int, int]:
    """Rows computed and reused in all, by the compute_effects jobs of a run (``output``)."""
    counts = [re.search(r"rows computed: (\d+), reused: (\d+)",
                        (workdir / f"logs/compute_effects/{shard}.log").read_text())
              for shard in jobs_of(output, "compute_effects")]
    return sum(int(c.group(1)) for c in counts), sum(int(c.group(2)) for c in counts)


# --- resumption inside a shard killed with SIGKILL ----------------------------------------------

SHARD = "L00-05_c000"


@pytest.mark.slow
def test_killed_shard_resumes_without_recomputing_done_units(tmp_path, tiny_model_dir):
    """One shard of 30 neurons x 12 prompts in 360 units (one neuron each): kill the whole
    Snakemake process group with SIGKILL once some units are saved, rerun, and check that
    exactly the missing units are computed and that the result equals an uninterrupted run."""
    import torch

    from neuron_effects.effects import EffectSettings
    from neuron_effects.model import ModelSpec
    from neuron_effects.jobs.shard import compute_shard

    workdir = write_workdir(tmp_path / "run", str(tiny_model_dir), n_prompts=12,
                            neurons_per_layer=5, device="cpu",
                            sharding={"layers_per_shard": 6, "prompts_per_chunk": 12},
                            compute={"neurons_per_block": 1})
    target = f"results/effects/shards/{SHARD}.parquet"
    snakemake(workdir, "--cores", "2", "results/clean/c000.safetensors")
    command = snakemake_command(workdir, "--cores", "2", target)
    with (tmp_path / "killed.out").open("w") as log:
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    entries = workdir / "results/cache/effects"
    deadline = time.monotonic() + 300
    try:
        while len(saved_units(entries)) < 25:
            assert process.poll() is None, "the shard finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    time.sleep(1.0)  # nothing may still be writing: the group is dead
    done = saved_units(entries)
    time.sleep(1.0)
    assert saved_units(entries) == done
    all_units = {f"n{b:03d}_p{p:05d}" for b in range(30) for p in range(12)}
    assert 25 <= len(done) < len(all_units) and set(done) <= all_units
    assert not (workdir / target).exists()
    killed_log = (workdir / f"logs/compute_effects/{SHARD}.log").read_text()
    assert "0 already done (resuming)" in killed_log

    snakemake(workdir, "--unlock")
    snakemake(workdir, "--cores", "2", "--rerun-incomplete", target)
    log = (workdir / f"logs/compute_effects/{SHARD}.log").read_text()
    assert f"30 neurons x 12 prompts in 360 units; {len(done)} already done (resuming)" in log
    assert f"rows computed: {360 - len(done)}, reused: {len(done)}" in log
    recomputed = UNIT.findall(log)
    assert len(recomputed) == len(set(recomputed))
    assert set(recomputed) == all_units - set(done)  # exactly the missing units, none twice

    # the result equals an uninterrupted run of the same shard
    resumed = pd.read_parquet(workdir / target)
    assert len(resumed) == 360 and not resumed.duplicated(["prompt_id", "neuron_id"]).any()
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    plan = make_plan(read_neurons(workdir / "neurons.json"), read_prompts(workdir / "prompts.jsonl"),
                     6, 12)
    torch.set_num_threads(2)
    reference_path = tmp_path / "reference.parquet"
    compute_shard(ModelSpec(str(tiny_model_dir), device="cpu"),
                  str(workdir / "results/clean/c000.safetensors"), plan.shard(SHARD).neuron_table,
                  EffectSettings(treatment=config["treatment"], positions=config["positions"],
                                 full_vocab=True, top_k=10, noise_floor=1e-4, vocab_rows=64),
                  str(reference_path), str(tmp_path / "cache"), neurons_per_block=1)
    reference = pd.read_parquet(reference_path)
    assert list(resumed.columns) == list(reference.columns)
    assert resumed[["prompt_id", "neuron_id"]].equals(reference[["prompt_id", "neuron_id"]])
    numeric = [c for c in reference.columns if pd.api.types.is_numeric_dtype(reference[c])
               and not pd.api.types.is_bool_dtype(reference[c])]
    assert "direct" in numeric and "total" in numeric
    np.testing.assert_allclose(resumed[numeric].to_numpy(float), reference[numeric].to_numpy(float),
                               rtol=0, atol=1e-6)
    others = [c for c in reference.columns if c not in numeric]
    for column in others:
        assert resumed[column].map(repr).equals(reference[column].map(repr)), column


def test_a_cluster_jobs_parse_finds_the_layout_of_the_run_that_submitted_it(tmp_path,
                                                                            tiny_model_dir):
    """sharding: auto under --jobs 4 (cheap jobs: 4 layer blocks). A cluster job's own parse
    (--mode remote, which does not know the job limit) plans the same shards from the layout
    its run saved and named in the jobs' environment, and prints no plan. A later run with
    --jobs 1 (one block) saves its own layout beside it: a job still queued from the first run
    plans the first run's shards. Without its layout a job stops, saying why."""
    workdir = write_workdir(tmp_path / "run", str(tiny_model_dir), device="cpu",
                            sharding={"layers_per_shard": "auto", "prompts_per_chunk": "auto",
                                      "rates": {"startup_s": 0.0, "read_bytes_per_s": 1e15}})

    def layout_of(output: str) -> str:
        return re.search(r"shard layout ([0-9a-f]{16}) \(sharding: auto\)", output).group(1)

    submitted = snakemake(workdir, "-n", "--jobs", "4").stdout
    shards = jobs_of(submitted, "compute_effects")
    assert len(shards) == 4
    layout = {"NEURON_EFFECTS_LAYOUT": layout_of(submitted)}
    target = f"results/effects/shards/{sorted(shards)[-1]}.parquet"
    remote = snakemake(workdir, "--mode", "remote", "-n", target, env=layout)
    assert jobs_of(remote.stdout, "compute_effects") == {sorted(shards)[-1]}
    assert "The plan and its estimated cost" not in remote.stdout + remote.stderr
    later = snakemake(workdir, "-n", "--jobs", "1").stdout
    assert len(jobs_of(later, "compute_effects")) == 1 and layout_of(later) != layout[
        "NEURON_EFFECTS_LAYOUT"]
    queued = snakemake(workdir, "--mode", "remote", "-n", target, env=layout)
    assert jobs_of(queued.stdout, "compute_effects") == {sorted(shards)[-1]}
    unnamed = snakemake(workdir, "--mode", "remote", "-n", target, check=False,
                        env={"NEURON_EFFECTS_LAYOUT": ""})
    assert unnamed.returncode != 0
    shutil.rmtree(workdir / ".snakemake/plans")
    missing = snakemake(workdir, "--mode", "remote", "-n", target, check=False, env=layout)
    assert missing.returncode != 0
    for output in (unnamed.stdout, missing.stdout):
        assert "shard layout chosen by the run that submitted this job is missing" in output
