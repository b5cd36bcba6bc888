"""The HTML report: one self-contained page (CSS inline, plots as inline PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .aggregate import CLASSES, UNDETERMINED, estimate_methods  # noqa: E402
from .attribution import band_agreement, overall_agreement  # noqa: E402
from .inputs import PROMPT_FIELDS, PROMPT_TABLE_COLUMNS  # noqa: E402
from .report_table import neuron_table_section  # noqa: E402
from .verified import above_profile_median  # noqa: E402

CLASS_COLOURS = {"routing-dominant": "#4477aa", "mixed": "#ccbb44",
                 "logit-dominant": "#ee6677", UNDETERMINED: "#bbbbbb"}

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2.2rem}table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}
td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{background:#e6f4ea;border:1px solid #34a853;padding:.5rem 1rem}
.fail{background:#fce8e6;border:1px solid #ea4335;padding:.5rem 1rem}
.banner{background:#d93025;color:#fff;padding:.7rem 1rem;font-size:1.05rem}
.warn{background:#fef7e0;border:1px solid #f9ab00;padding:.5rem 1rem}
figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}img{max-width:100%}
.defs{background:#f8f8f8;padding:.6rem 1rem;font-size:.9rem}code{font-size:.85rem}
.table-box{max-width:100%;overflow-x:auto}
"""


def _figure_uri(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _format(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return html.escape(", ".join(map(str, value)))
    return html.escape(str(value))


def _table(frame: pd.DataFrame, columns: list[str] | None = None) -> str:
    frame = frame if columns is None else frame[columns]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{_format(v)}</td>' if isinstance(v, (int, float, np.number))
            and not isinstance(v, bool) else f"<td>{_format(v)}</td>" for v in row
        ) + "</tr>" for row in frame.itertuples(index=False)
    )
    return (f'<div class="table-box"><table><thead><tr>{head}</tr></thead><tbody>{body}'
            "</tbody></table></div>")  # a wide table scrolls in its own box, not the page


def _figure(uri: str, caption: str) -> str:
    return (f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


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
    return _figure_uri(figure)


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
    return _figure_uri(figure)


SCATTER_POINTS = 200_000  # points drawn at most in a scatter plot


def _layer_scatter(per_prompt: pd.DataFrame, x: str, y: str, *, diagonal: float, line: str,
                   xlabel: str, ylabel: str, legend: str) -> str:
    """Per-prompt points ``y`` against ``x`` coloured by layer, symlog axes, with the line
    y = ``diagonal`` · x."""
    figure, axis = plt.subplots(figsize=(6.5, 5.2))
    if len(per_prompt) > SCATTER_POINTS:  # a census: a seeded random sample of the rows
        axis.set_title(f"a random {SCATTER_POINTS:,} of the {len(per_prompt):,} rows",
                       fontsize=9)
        per_prompt = per_prompt.sample(SCATTER_POINTS, random_state=0)
    points = axis.scatter(per_prompt[x], per_prompt[y], c=per_prompt["layer"],
                          cmap="viridis", s=6, alpha=0.6, linewidths=0)
    limit = float(np.nanmax(np.abs(per_prompt[[x, y]].to_numpy()))) or 1.0
    axis.plot([-limit, limit], [-diagonal * limit, diagonal * limit], color="#999", lw=0.7,
              ls=":", label=line)
    axis.set_xscale("symlog", linthresh=1e-3)
    axis.set_yscale("symlog", linthresh=1e-3)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8, loc=legend)
    figure.colorbar(points, ax=axis, label="layer")
    return _figure_uri(figure)


def _scatter(per_prompt: pd.DataFrame) -> str:
    return _layer_scatter(per_prompt, "direct", "indirect", diagonal=-1.0,
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
    return _figure_uri(figure)


def _precision_banners(validation: dict[str, Any]) -> str:
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


def _low_rank_banner(prompts: pd.DataFrame) -> str:
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
            f"response_prefix (README, Prompts).<ul>{items}</ul></div>")


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
    return _table(rows) + (f'<p class="warn">{html.escape(note)}</p>' if note else "")


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


def png_bytes(uri: str) -> bytes:
    """The PNG inside a data URI made by :func:`_figure_uri`."""
    return base64.b64decode(uri.split(",", 1)[1])


def _flow_heatmaps(flow: pd.DataFrame, n_layers: int) -> str:
    """Source layer x mediator layer, mean |contribution| of attention and of MLP."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    largest = float(flow["mean_abs_contribution"].max()) if len(flow) else 1.0
    for axis, component in zip(axes, ("attn", "mlp")):
        grid = np.full((n_layers, n_layers), np.nan)
        part = flow[flow["component"] == component]
        grid[part["source_layer"].astype(int), part["layer"].astype(int)] = \
            part["mean_abs_contribution"]
        image = axis.imshow(grid, origin="lower", cmap="magma_r", vmin=0, vmax=largest or 1.0,
                            aspect="auto")
        axis.set_title(f"downstream {'attention' if component == 'attn' else 'MLP'}",
                       fontsize=10)
        axis.set_xlabel("mediator layer")
    axes[0].set_ylabel("source layer (treated neuron)")
    figure.colorbar(image, ax=axes, label="mean |contribution| to the target logit")
    return _figure_uri(figure)


def _edge_agreement_histograms(neurons: pd.DataFrame) -> str:
    columns = [c for c in ("edge_neuron_overlap", "edge_sign_agreement", "edge_logit_overlap")
               if c in neurons]
    figure, axes = plt.subplots(1, len(columns), figsize=(11, 3.0), sharey=True)
    for axis, column in zip(np.atleast_1d(axes), columns):
        values = neurons[column].dropna().to_numpy(dtype=float)
        axis.hist(values, bins=np.linspace(0, 1, 11), color="#4477aa")
        axis.set_title(f"{column} (n = {len(values)})", fontsize=9)
        axis.set_xlim(0, 1)
    np.atleast_1d(axes)[0].set_ylabel("neurons")
    return _figure_uri(figure)


def indirect_routes_section(neurons: pd.DataFrame, flow: pd.DataFrame, top_n: int) -> str:
    """The section "Where the indirect effect goes": the layer-flow heatmaps, the top
    mediators of the most routing-dominant neurons, and the agreement with the profiles'
    downstream edges."""
    if "top_mediator" not in neurons or not len(flow):
        return ("<h2>Where the indirect effect goes</h2><p>The mediation split is off "
                "(<code>mediators.enabled: false</code>).</p>")
    n_layers = int(max(flow["layer"].max(), neurons["layer"].max())) + 1
    routing = neurons[neurons["classification"] == CLASSES[0]].sort_values(
        "mean_direct_ratio").head(top_n)
    columns = ["neuron_id", "mean_direct_ratio", "mean_indirect", "indirect_share_attn",
               "indirect_share_mlp", "indirect_share_norm", "top_mediators"]
    parts = [
        "<h2>Where the indirect effect goes</h2>",
        "<p>The indirect effect splits exactly over the downstream layers: each layer's change "
        "of attention and MLP output at the last position, read out along "
        "<code>u = g ⊙ W<sub>U</sub>[target]</code> with the clean norm scale, plus a final-norm "
        "term; each MLP layer splits further over its neurons and each attention layer over its "
        "heads. Shares: Σ|part| / Σ(|attn| + |mlp| + |norm|) over prompts. Mediators: mean "
        "contribution over prompts (0 where outside the top k) and the fraction of prompts in "
        "the top k.</p>",
        _figure(_flow_heatmaps(flow, n_layers),
                "Mean |contribution| of each downstream layer's attention and MLP, by the "
                "treated neuron's layer."),
        "<h3>Top mediators of the most routing-dominant neurons</h3>",
        _table(routing, columns) if len(routing) else "<p>No routing-dominant neuron.</p>",
    ]
    if "edge_neuron_overlap" in neurons and neurons["edge_n_neuron_targets"].notna().any():
        with_edges = neurons[neurons["edge_n_neuron_targets"].notna()]
        parts += [
            "<h3>Agreement with the profiles' downstream edges</h3>",
            f"<p>{len(with_edges)} profiles list <code>top_downstream_targets</code>. Neuron "
            "overlap: the share of the profile's top-k neuron targets among the exact top-k "
            "mediator neurons; sign agreement: avg_weight vs mean contribution; logit overlap: "
            "logit targets among the direct effect's most frequent top-k tokens.</p>",
            _figure(_edge_agreement_histograms(with_edges),
                    "Distribution of edge agreement over neurons."),
        ]
    return "".join(parts)


def _estimate_scatter(per_prompt: pd.DataFrame, method: str) -> str:
    return _layer_scatter(per_prompt, "total", f"total_{method}", diagonal=1.0,
                          line="estimate = exact", xlabel="exact total effect on target logit",
                          ylabel=f"first-order estimate (total_{method})", legend="upper left")


AGREEMENT_PANELS = (("spearman", "Spearman(estimate, exact)"), ("sign_agreement", "sign agreement"),
                    ("median_relative_error", "median relative error"),
                    ("precision_at_k", "precision@k (k = a tenth of the layer's neurons)"))


def _estimates_by_layer(layers: pd.DataFrame, methods: list[str]) -> str:
    """One panel per agreement measure, one line per method, by layer."""
    figure, axes = plt.subplots(1, len(AGREEMENT_PANELS), figsize=(13, 3.2), sharex=True)
    for axis, (measure, title) in zip(axes, AGREEMENT_PANELS):
        for method, marker in zip(methods, "osd^v<>p*h"):
            axis.plot(layers["layer"], layers[f"{method}_{measure}"], marker=marker, ms=3,
                      label=method)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("layer")
    axes[0].legend(fontsize=8)
    return _figure_uri(figure)


def attribution_section(per_prompt: pd.DataFrame, layers: pd.DataFrame,
                        candidates: pd.DataFrame, top_n: int,
                        n_layers: int | None = None) -> list[str]:
    """First-order estimates (AtP, RelP, other RelP rule sets, relp_unmasked) beside the exact
    effects: overall agreement of each method, by band of layers (thirds of ``n_layers``,
    default the last studied layer + 1), their agreement by layer in one figure, one scatter of
    estimate against exact per method, and the candidates outside the profile."""
    methods = estimate_methods(per_prompt.columns)
    overall = {method: overall_agreement(per_prompt, method=method) for method in methods}
    summary = pd.DataFrame([{"method": method, **{key.removeprefix(f"{method}_"): value
                                                  for key, value in values.items()}}
                            for method, values in overall.items()])
    n_layers = int(per_prompt["layer"].max()) + 1 if n_layers is None else n_layers
    bands = band_agreement(per_prompt, n_layers, methods)
    candidate_columns = [c for c in ("neuron_id", "layer", "neuron", "listed_by", "rank",
                                     "mean_abs_atp", "rank_relp", "mean_abs_relp")
                         if c in candidates]
    per_layer = ["layer", "n_neurons", *(f"{method}_{measure}" for method in methods
                                         for measure, _ in AGREEMENT_PANELS)]
    unmasked = (
        " <b><code>relp_unmasked</code></b> is what the attribution graphs' code as released "
        "computes, NOT the model's behaviour: the same rules on a forward pass whose attention "
        "has no causal mask (every position attends to the later ones too; that code's own "
        "attention function gets no mask from transformers), activations and gradients both "
        "from that pass. Its distance from the exact effects is the distance of the graphs' "
        "own scores from what the neurons do.") if "relp_unmasked" in methods else ""
    return [
        "<h2>Attribution patching and RelP: first-order estimates beside the exact effects</h2>",
        '<div class="defs"><p>For every prompt, one backward pass gives the gradient '
        "<code>g<sub>L</sub></code> of the target logit with respect to the output of every "
        "decoder layer at the last position (every position with <code>positions: all</code>, "
        "summed over positions with each position's own V); the estimate of every neuron of "
        "the model is <code>total_atp = g<sub>L</sub> · V = s · (g<sub>L</sub> · "
        "w<sub>n</sub>)</code>, and <code>indirect_atp = total_atp − direct</code>. "
        "<b>RelP</b> (<code>total_relp</code>, the score behind attribution graphs) is the same "
        "formula with the gradient of a second backward pass over the same forward that follows "
        "the rules the graphs' public code applies: every RMSNorm's 1/rms constant (LN-rule), "
        "SiLU's sigmoid constant (identity rule), half the gradient through the gated product "
        "(half-rule); gradients flow through queries and keys. <code>relp_&lt;rules&gt;</code> "
        "applies the rules named (<code>frozen_attention</code>: no gradient through queries "
        "and keys)." + unmasked + " Below, on the studied neurons, against the exact total: "
        "rank correlation, sign agreement, median relative error |estimate − total| / |total|, "
        "and precision@k of the ranking by mean |estimate| against the ranking by mean "
        "|total|. A good screen is not a substitute: the largest effects carry the largest "
        "errors.</p></div>",
        _table(summary),
        f"<h3>By band of layers (thirds of the model's {n_layers} layers): Spearman and sign "
        "agreement with the exact total over the band's (prompt, neuron) rows</h3>",
        _table(bands),
        _figure(_estimates_by_layer(layers, methods),
                "Agreement of each estimate with the exact total, by layer."),
        *(_figure(_estimate_scatter(per_prompt, method),
                  f"{method}: first-order estimate vs exact total effect on the target logit, "
                  "one point per (prompt, neuron), coloured by layer (symlog axes)."
                  + (" What the graph code as released computes (no causal mask), not the "
                     "model's behaviour." if method == "relp_unmasked" else ""))
          for method in methods),
        _table(layers, [c for c in per_layer if c in layers]),
        f"<h3>Candidates: the {min(top_n, len(candidates))} neurons outside the profile with "
        f"the largest mean |estimate| (of {len(candidates)} in results/atp/candidates.parquet, "
        f"the top {top_n} of any method)</h3>", _table(candidates.head(top_n), candidate_columns),
    ]


def verified_section(neurons: pd.DataFrame, verified: pd.DataFrame) -> str:
    """The verified candidates whose exact mean |total| exceeds the profile's median."""
    above = above_profile_median(neurons, verified)
    return ("<h2>Neurons the profile missed, verified exactly</h2><p>The "
            f"{len(verified)} neurons outside the profile with the largest mean |total_atp| "
            "(atp.verify_candidates) were computed exactly, like the profile's (rows with "
            "<code>in_profile</code> false in per_prompt.parquet and neurons.parquet). "
            f"{len(above)} of them have a mean |total| above the profile's median "
            f"({neurons['mean_abs_total'].median():.4g}):</p>" + _table(above, [
                c for c in ("neuron_id", "layer", "neuron", "mean_abs_total", "mean_total",
                            "mean_total_atp", "mean_direct_ratio", "classification")
                if c in above]))


def edges_section(edges: pd.DataFrame, neurons: pd.DataFrame, min_relative_delta: float,
                  top_n: int) -> str:
    """The profiles' neuron edges measured exactly: the distribution of the fraction of each
    neuron's edges that are real, the edges' relative activation changes, and the edges that
    disagree most (wrong sign, largest |exact_weight|)."""
    if not len(edges):
        return ""
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.0))
    fractions = neurons["edge_real_fraction"].dropna().to_numpy(dtype=float)
    axes[0].hist(fractions, bins=np.linspace(0, 1, 11), color="#4477aa")
    axes[0].set_title(f"edge_real_fraction per neuron (n = {len(fractions)})", fontsize=9)
    axes[0].set_ylabel("neurons")
    relative = edges["relative_delta"].dropna().to_numpy(dtype=float)
    axes[1].hist(np.log10(np.clip(relative, 1e-8, None)), bins=30, color="#228833")
    axes[1].axvline(math.log10(min_relative_delta), color="#ee6677", ls="--", lw=0.8)
    axes[1].set_title(f"log10 mean |Δa_t| / |a_t| per edge (n = {len(relative)})", fontsize=9)
    disagreeing = edges[edges["sign_agrees"].eq(False).fillna(False)]
    worst = disagreeing.assign(_size=-disagreeing["exact_weight"].abs()).sort_values("_size")
    return "".join([
        "<h3>Every profile edge measured exactly</h3>",
        f"<p>{len(edges)} neuron edges of {edges['neuron_id'].nunique()} profiles "
        "(<code>results/summary/edges.parquet</code>). For an edge s → t, the replay that "
        "computes s's total effect also gives the exact change <code>Δa<sub>t</sub></code> of "
        "t's activation at the last position; <code>exact_weight</code> = mean over prompts of "
        "<code>Δa<sub>t</sub> · ∂logit<sub>target</sub>/∂a<sub>t</sub></code> (plain gradient). "
        f"An edge is real when mean |Δa<sub>t</sub>| / |a<sub>t</sub>| ≥ {min_relative_delta:g} "
        "and exact_weight has the sign of the profile's avg_weight. <b>Limits:</b> the graph's "
        "edges count direct paths only (s's write read by t), with the graph's own metric; "
        "Δa<sub>t</sub> counts every path from s to t, and the weight here is on the target "
        "logit. A disagreement says the listed edge does not describe what s's treatment does "
        "to t on these prompts, not that the graph computed it wrongly.</p>",
        _figure(_figure_uri(figure), "Left: the fraction of each neuron's listed edges that "
                "are real. Right: how far each edge moves its target (dashed: the threshold)."),
        f"<h4>The {min(top_n, len(worst))} disagreeing edges with the largest |exact_weight| "
        f"(of {len(disagreeing)} whose sign disagrees)</h4>",
        _table(worst.head(top_n), ["neuron_id", "target_layer", "target_neuron", "avg_weight",
                                   "exact_weight", "delta_activation", "relative_delta"]),
    ])


def profile_scores_section(table: pd.DataFrame) -> str:
    """The profile's own scores judged against the exact effects
    (results/summary/profile_scores.parquet, :mod:`neuron_effects.profile_scores`)."""
    return "".join([
        "<h2>The profile's own scores against the exact effects</h2>",
        "<p>Per score field of the profile (<code>profile_scores</code>), over the profile "
        "neurons that give it: Spearman with the neuron's exact mean total over the prompts "
        "(<code>spearman_abs</code>: |field| with the mean |total|), the fraction of neurons "
        "whose sign agrees with the mean total's, and precision@k of the top k by |field| "
        "among the top k by mean |total| (k = 10, 100 and a tenth of the neurons; – unless "
        "more than k neurons give the field). The exact effects are the ground truth: a score "
        "far from them ranks the neurons differently from what they do.</p>",
        _table(table)])


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
    from .census import table_neurons
    from .report_census import census_section

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
        f"<h1>Direct vs indirect effects of {len(neurons)} MLP neurons over "
        f"{per_prompt['prompt_id'].nunique()} prompts</h1>",
        _precision_banners(validation), _low_rank_banner(prompts),
        "<h2>Run</h2>", _table(meta_rows),
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
        _table(timings) if len(timings) else "<p>–</p>",
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
        "<h2>Validation against the reference path</h2>", verdict,
        _validation_figures(validation), _table(per_metric),
        _table(validation_pairs[[c for c in ("prompt_id", "neuron_id", "layer", "total",
                                              "reference_total", "relative_error_total",
                                              "relative_error_indirect", "max_abs_diff")
                                 if c in validation_pairs]]),
        "<h2>Effect types by layer</h2>",
        *(_figure(figures[name], caption) for name, caption in FIGURE_CAPTIONS.items()),
        _table(layers),
        f"<h2>Most logit-dominant neurons</h2>{_table(logit, neuron_columns)}",
        f"<h2>Most routing-dominant neurons</h2>{_table(routing, neuron_columns)}",
        f"<h2>Most cancelling neurons (self-repair)</h2>{_table(cancelling, neuron_columns)}",
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
        f"<h2>Prompts and targets</h2>{_table(prompts, prompt_columns)}",
    ]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>Direct vs indirect neuron effects</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
