"""The HTML report: one self-contained page (CSS inline, plots as inline PNG data URIs)."""

from __future__ import annotations

import html
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .aggregate import CLASSES, UNDETERMINED, estimate_methods  # noqa: E402
from .census import table_neurons  # noqa: E402
from .inputs import PROMPT_FIELDS, PROMPT_TABLE_COLUMNS  # noqa: E402
from .report_attribution import (attribution_section, profile_scores_section,
                                 verified_section)  # noqa: E402
from .report_census import census_section  # noqa: E402
from .report_html import (STYLE, figure_html, figure_uri, html_table, layer_scatter,  # noqa: E402
                          section_id, with_contents)
from .report_routes import edges_section, indirect_routes_section  # noqa: E402
from .report_table import neuron_table_section  # noqa: E402

CLASS_COLOURS = {"routing-dominant": "#4477aa", "mixed": "#ccbb44",
                 "logit-dominant": "#ee6677", UNDETERMINED: "#bbbbbb"}


def _class_bars(layers: pd.DataFrame) -> str:
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for axis, suffix, title in ((axes[0], "", "final norm recomputed (the plan's direct)"),
                                (axes[1], "_frozen_norm", "final-norm scale frozen (DLA)")):
        bottom = np.zeros(len(layers))
        for label in (*CLASSES, UNDETERMINED):
            counts = layers[f"n_{label.replace('-', '_')}{suffix}"].to_numpy()
            axis.bar(layers["layer"], counts, bottom=bottom, color=CLASS_COLOURS[label],
                     label=label, width=0.85)
            bottom += counts
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("layer")
    axes[0].set_ylabel("neurons")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure_uri(figure)


def _ratio_distributions(per_prompt: pd.DataFrame) -> str:
    defined = per_prompt[per_prompt["ratio_defined"]]
    layers = sorted(per_prompt["layer"].unique())
    data = [defined.loc[defined["layer"] == layer, "direct_ratio"].to_numpy() for layer in layers]
    keep = [i for i, values in enumerate(data) if len(values)]
    figure, axis = plt.subplots(figsize=(11, 3.4))
    if keep:
        axis.boxplot([data[i] for i in keep], positions=[layers[i] for i in keep], widths=0.6,
                     showfliers=False)
    axis.axhline(0.3, color="#4477aa", lw=0.8, ls="--")
    axis.axhline(0.7, color="#ee6677", lw=0.8, ls="--")
    axis.set_xlabel("layer")
    axis.set_ylabel("direct ratio |d|/(|d|+|i|)")
    axis.set_ylim(-0.02, 1.02)
    return figure_uri(figure)


def _scatter(per_prompt: pd.DataFrame) -> str:
    return layer_scatter(per_prompt, "direct", "indirect", diagonal=-1.0,
                         line="indirect = −direct (full cancellation)",
                         xlabel="direct effect on target logit",
                         ylabel="indirect effect on target logit", legend="lower left")


def _alignment(layers: pd.DataFrame) -> str:
    figure, axis = plt.subplots(figsize=(11, 3.2))
    axis.plot(layers["layer"], layers["aligned_fraction"], marker="o", ms=3,
              label="sign-aligned fraction (d·i > 0)")
    axis.plot(layers["layer"], layers["mean_cancellation"], marker="s", ms=3,
              label="mean cancellation 1 − |t|/(|d|+|i|)")
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("layer")
    axis.legend(fontsize=8)
    return figure_uri(figure)


# The title of the validation's section (the verdicts at the top link to it).
VALIDATION_TITLE = "Validation against the reference path"


def run_verdicts(validation: dict[str, Any], prompts: pd.DataFrame, n_rows: int) -> str:
    """At the top of the page, each linking to its section: the validation (PASSED, or FAILED
    with its cause), the prompts whose given target the clean model ranks below
    ``targets.max_rank`` (``target_low_rank``), and the rows of the run's table with a NaN or
    infinite value (the validation summary's ``non_finite``); – where the run did not record
    it."""
    section = f"#{section_id(VALIDATION_TITLE)}"
    low_rank = int(prompts["target_low_rank"].sum()) if "target_low_rank" in prompts else None
    non_finite = validation.get("non_finite", {}).get("n_rows")
    items = [
        (validation["passed"], f'<a href="{section}">Validation</a>: ' + (
            "PASSED" if validation["passed"]
            else f"FAILED: {html.escape(validation.get('failure') or '')}")),
        (not low_rank, f"Low-rank targets: {'–' if low_rank is None else low_rank} of "
                       f"{len(prompts)} prompts"
                       + (' (<a href="#low-rank-targets">which</a>)' if low_rank else "")),
        (not non_finite, f'<a href="{section}">Rows with a NaN or infinite value</a>: '
                         f"{'–' if non_finite is None else non_finite} of {n_rows:,}"),
    ]
    return ('<div class="verdicts" id="verdicts"><b>Verdicts</b><ul>' + "".join(
        f'<li class="{"ok" if good else "bad"}">{text}</li>' for good, text in items)
        + "</ul></div>")


def precision_banners(validation: dict[str, Any]) -> str:
    """At the top of the page: a red banner when the validation failed (its cause and fix), and
    a warning when the run computed in bfloat16/float16."""
    banners = ""
    if not validation["passed"]:
        banners += (f'<div class="banner" id="validation-failed"><b>Validation FAILED: these '
                    f"results are not trustworthy.</b> "
                    f"{html.escape(validation.get('failure') or '')}</div>")
    if validation.get("dtype_warning"):
        banners += f'<div class="warn">{html.escape(validation["dtype_warning"])}</div>'
    return banners


def low_rank_banner(prompts: pd.DataFrame) -> str:
    """A warning naming the prompts whose given target the clean model ranks below the top
    ``targets.max_rank`` (``target_low_rank``), with rank and probability; empty when none."""
    if "target_low_rank" not in prompts.columns or not prompts["target_low_rank"].any():
        return ""
    flagged = prompts[prompts["target_low_rank"]]
    items = "".join(
        f"<li>{html.escape(str(row.prompt_id))}: target {html.escape(repr(row.target_token))} "
        f"rank {int(row.clean_target_rank):,}, probability {row.clean_target_prob:.2g} (the model "
        f"predicts {html.escape(repr(row.clean_top_token))})</li>"
        for row in flagged.itertuples())
    return (f'<div class="warn" id="low-rank-targets"><b>{len(flagged)} of {len(prompts)} '
            "prompts have a target the model does not predict</b> (clean rank above "
            "targets.max_rank; 1 = its top prediction). Effects on these tokens say little about "
            "the neurons. In chat mode write targets without a leading space, or set "
            f"response_prefix (docs/running.md, Targets).<ul>{items}</ul></div>")


def _validation_figures(validation: dict[str, Any]) -> str:
    """The precision figures of the validation: reference dtype, median relative errors,
    rows off by more than 10 %, precision flags."""
    if "relative_error" not in validation:
        return ""

    def shown(value: Any, percent: bool = False) -> str:
        if value is None:
            return "– (no pair above the floor)"
        return f"{value:.1%}" if percent else f"{value:.3g}"

    relative = validation["relative_error"]
    above = validation.get("pairs_above_floor", {})
    rows = pd.DataFrame([
        ("run dtype / reference dtype",
         f"{validation['dtype']} / {validation['reference_dtype']}"),
        *[(f"median relative error of {name} (pairs with |reference| ≥ "
           f"{validation['relative_error_floor']:g}: {above.get(name, '?')})",
           shown(relative[name])) for name in ("total", "indirect", "direct")],
        ("limit on total and indirect (validation.max_relative_error)",
         f"{validation['max_relative_error']:g}"),
        ("pairs off by more than 10 % on total or indirect", shown(validation["rows_off_10pct"],
                                                                 percent=True)),
        ("precision flags", ", ".join(f"{key}={value}" for key, value
                                      in validation.get("precision_flags", {}).items())),
    ], columns=["measure", "value"])
    note = validation.get("reference_note")
    return html_table(rows) + (f'<p class="warn">{html.escape(note)}</p>' if note else "")


# The figures of the section "Effect types by layer", by name (also their file names, .png, in
# the Snakemake report).
FIGURE_CAPTIONS = {
    "class_bars": "Neurons per class and layer, under both definitions of the direct effect.",
    "ratio_distributions": "Per-prompt direct ratios by layer (boxes: quartiles; dashed: class "
                           "boundaries).",
    "direct_vs_indirect": "Direct vs indirect effect on the target logit, one point per (prompt, "
                          "neuron), coloured by layer (symlog axes).",
    "alignment": "Sign alignment and cancellation by layer.",
}


def report_figures(per_prompt: pd.DataFrame, layers: pd.DataFrame) -> dict[str, str]:
    """The figures of :data:`FIGURE_CAPTIONS`, as PNG data URIs."""
    return {"class_bars": _class_bars(layers), "ratio_distributions":
            _ratio_distributions(per_prompt), "direct_vs_indirect": _scatter(per_prompt),
            "alignment": _alignment(layers)}


def render_report(
    metadata: dict[str, Any], per_prompt: pd.DataFrame, neurons: pd.DataFrame,
    layers: pd.DataFrame, prompts: pd.DataFrame, validation: dict[str, Any],
    validation_pairs: pd.DataFrame, timings: pd.DataFrame, top_n: int = 12,
    figures: dict[str, str] | None = None,
    mediation_layers: pd.DataFrame | None = None,
    atp_candidates: pd.DataFrame | None = None,
    edges: pd.DataFrame | None = None, edge_min_relative_delta: float = 0.01,
    census_table_top: int = 200, profile_scores: pd.DataFrame | None = None,
    verified: pd.DataFrame | None = None,
) -> str:
    """The report page as one HTML string (``figures``: from :func:`report_figures`, made here
    when not given; ``edges``: results/summary/edges.parquet). A census run (``neurons`` with
    ``in_profile``) adds the census section and keeps in the searchable table the profile's
    neurons and the ``census_table_top`` others with the largest mean |total|. ``verified``:
    the neuron summaries of the verified candidates (atp.verify_candidates)."""
    census = "in_profile" in neurons
    figures = figures or report_figures(per_prompt, layers)
    passed = validation["passed"]
    largest = ("NaN or inf" if validation["max_abs_diff"] is None  # a non-finite value
               else f"{validation['max_abs_diff']:.3g}")
    verdict = (
        f'<div class="{"pass" if passed else "fail"}"><b>{"PASSED" if passed else "FAILED"}</b>: '
        f"{validation['n_pairs']} sampled (prompt, neuron) pairs recomputed with the slow "
        f"reference paths in {html.escape(validation.get('reference_dtype', validation['dtype']))}"
        f"; max |run − reference| over every metric = "
        f"{largest} (tolerance {validation['tolerance']:.3g}, "
        f"{html.escape(validation['dtype'])} on {html.escape(validation['device'])}). "
        f"Rows of the whole table with a NaN or infinite value: "
        f"{validation.get('non_finite', {}).get('n_rows', '–')} of {len(per_prompt)}.</div>"
    )
    per_metric = pd.DataFrame(sorted(validation["max_abs_diff_by_metric"].items()),
                              columns=["metric", "max |run − reference|"])
    neuron_columns = ["neuron_id", "layer", "mean_direct_ratio", "std_direct_ratio",
                      "consistency", "aligned_fraction", "mean_cancellation", "mean_total",
                      "mean_direct_ratio_frozen_norm", "classification_frozen_norm",
                      "frac_active"]
    ranked = neurons[neurons["classification"] != UNDETERMINED]
    logit = ranked.sort_values("mean_direct_ratio", ascending=False).head(top_n)
    routing = ranked.sort_values("mean_direct_ratio").head(top_n)
    cancelling = ranked.sort_values("mean_cancellation", ascending=False).head(top_n)
    counts = neurons["classification"].value_counts()
    undefined = int((~per_prompt["ratio_defined"]).sum())
    prompt_columns = [c for c in ("prompt_id", "prompt", "n_tokens", "target_token",
                                  "target_source", "distractor_token", "clean_top_token",
                                  "clean_top_prob", "clean_target_prob", "clean_target_rank",
                                  "target_low_rank", "warnings")
                      if c in prompts.columns]
    prompt_columns += [c for c in prompts.columns  # the user's own prompt fields
                       if c not in (*PROMPT_FIELDS, *PROMPT_TABLE_COLUMNS)]
    meta_rows = pd.DataFrame(list(metadata.items()), columns=["setting", "value"])
    sections = [
        low_rank_banner(prompts),
        "<h2>Run</h2>", html_table(meta_rows),
        "<p>Neurons by class: " + ", ".join(
            f"{label}: {int(counts.get(label, 0))}" for label in (*CLASSES, UNDETERMINED))
        + f". (prompt, neuron) rows: {len(per_prompt)}, of which {undefined} have |d| + |i| "
        "below the noise floor (direct ratio undefined).</p>",
        "<h3>Time by rule: measured, and the plan's estimate</h3>",
        "<p>Per rule, from each job's benchmark file and log: seconds in all, the fixed part "
        "(start-up and model loading, until the job's own work began) and the work; what the model "
        "jobs <code>computed</code> and <code>reused</code> from the result cache (effect rows; "
        "prompts for clean runs and estimates); beside them "
        "the cost model's estimate made when the run was planned (<code>estimated_*</code>: "
        "src/neuron_effects/cost.py; correct its rates with <code>sharding.rates</code> if they "
        "are far off).</p>",
        html_table(timings) if len(timings) else "<p>–</p>",
        '<h2>Definitions</h2><div class="defs"><p>Treatment: <code>V = s·w<sub>n</sub></code>, '
        "<code>w<sub>n</sub></code> = column n of <code>layers[L].mlp.down_proj.weight</code>, "
        "added to the output of decoder layer L. <b>Total</b> = logits(treated run) − "
        "logits(clean), last position. <b>Direct</b> (the plan's, final norm recomputed) = "
        "<code>lm_head(norm(h<sub>clean</sub> + V)) − logits<sub>clean</sub></code>. "
        "<b>Direct, frozen norm</b> (direct logit attribution) divides by the clean norm scale "
        "instead; <b>norm-mediated</b> = direct − direct_frozen_norm. <b>Indirect</b> = total − "
        "direct. Ratios use the target-token logit: <code>direct_ratio = |d|/(|d|+|i|)</code>, "
        "<code>cancellation = 1 − |t|/(|d|+|i|)</code>. Classes on the mean ratio: "
        f"routing-dominant &lt; {metadata.get('routing_below', 0.3)} ≤ mixed ≤ "
        f"{metadata.get('logit_dominant_above', 0.7)} &lt; logit-dominant. Entropy-type "
        "neurons, which act through the final norm's scale, count as direct under the first "
        "definition and as indirect under the frozen-norm one.</p></div>",
        f"<h2>{VALIDATION_TITLE}</h2>", verdict,
        _validation_figures(validation), html_table(per_metric),
        html_table(validation_pairs[[c for c in ("prompt_id", "neuron_id", "layer", "total",
                                                 "reference_total", "relative_error_total",
                                                 "relative_error_indirect", "max_abs_diff")
                                     if c in validation_pairs]]),
        "<h2>Effect types by layer</h2>",
        *(figure_html(figures[name], caption) for name, caption in FIGURE_CAPTIONS.items()),
        html_table(layers),
        f"<h2>Most logit-dominant neurons</h2>{html_table(logit, neuron_columns)}",
        f"<h2>Most routing-dominant neurons</h2>{html_table(routing, neuron_columns)}",
        f"<h2>Most cancelling neurons (self-repair)</h2>{html_table(cancelling, neuron_columns)}",
        indirect_routes_section(neurons, mediation_layers if mediation_layers is not None
                                else pd.DataFrame(), top_n),
        edges_section(edges, neurons, edge_min_relative_delta, top_n)
        if edges is not None else "",
        *(attribution_section(per_prompt, layers, atp_candidates, top_n,
                              metadata.get("n_layers"))
          if atp_candidates is not None and estimate_methods(per_prompt.columns) else []),
        profile_scores_section(profile_scores) if profile_scores is not None else "",
        verified_section(neurons, verified) if verified is not None and len(verified) else "",
        *(census_section(neurons, per_prompt, layers, census_table_top) if census else []),
        neuron_table_section(table_neurons(neurons, census_table_top), per_prompt,
                             f": the profile's and the {census_table_top:,} other census "
                             "neurons with the largest mean |total|") if census else
        neuron_table_section(neurons, per_prompt),
        f"<h2>Prompts and targets</h2>{html_table(prompts, prompt_columns)}",
    ]
    body, contents = with_contents("".join(sections))
    heading = (f"<h1>Direct vs indirect effects of {len(neurons)} MLP neurons over "
               f"{per_prompt['prompt_id'].nunique()} prompts</h1>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>Direct vs indirect neuron effects</title>"
            f"<style>{STYLE}</style></head><body>{heading}{precision_banners(validation)}"
            f"{run_verdicts(validation, prompts, len(per_prompt))}{contents}{body}</body></html>")
