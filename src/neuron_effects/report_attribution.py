"""The report's sections on the first-order estimates (AtP, RelP) beside the exact effects, the
neurons outside the profile verified exactly, and the profile's own scores."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .aggregate import estimate_methods  # noqa: E402
from .agreement import band_agreement, overall_agreement  # noqa: E402
from .report_html import figure_html, figure_uri, html_table, layer_scatter  # noqa: E402
from .verified import above_profile_median  # noqa: E402


def _estimate_scatter(per_prompt: pd.DataFrame, method: str) -> str:
    return layer_scatter(per_prompt, "total", f"total_{method}", diagonal=1.0,
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
    return figure_uri(figure)


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
        html_table(summary),
        f"<h3>By band of layers (thirds of the model's {n_layers} layers): Spearman and sign "
        "agreement with the exact total over the band's (prompt, neuron) rows</h3>",
        html_table(bands),
        figure_html(_estimates_by_layer(layers, methods),
                    "Agreement of each estimate with the exact total, by layer."),
        *(figure_html(_estimate_scatter(per_prompt, method),
                      f"{method}: first-order estimate vs exact total effect on the target logit, "
                      "one point per (prompt, neuron), coloured by layer (symlog axes)."
                      + (" What the graph code as released computes (no causal mask), not the "
                         "model's behaviour." if method == "relp_unmasked" else ""))
          for method in methods),
        html_table(layers, [c for c in per_layer if c in layers]),
        f"<h3>Candidates: the {min(top_n, len(candidates))} neurons outside the profile with "
        f"the largest mean |estimate| (of {len(candidates)} in results/atp/candidates.parquet, "
        f"the top {top_n} of any method)</h3>",
        html_table(candidates.head(top_n), candidate_columns),
    ]


def verified_section(neurons: pd.DataFrame, verified: pd.DataFrame) -> str:
    """The verified candidates whose exact mean |total| exceeds the profile's median."""
    above = above_profile_median(neurons, verified)
    return ("<h2>Neurons the profile missed, verified exactly</h2><p>The "
            f"{len(verified)} neurons outside the profile with the largest mean |total_atp| "
            "(atp.verify_candidates) were computed exactly, like the profile's (rows with "
            "<code>in_profile</code> false in per_prompt.parquet and neurons.parquet). "
            f"{len(above)} of them have a mean |total| above the profile's median "
            f"({neurons['mean_abs_total'].median():.4g}):</p>" + html_table(above, [
                c for c in ("neuron_id", "layer", "neuron", "mean_abs_total", "mean_total",
                            "mean_total_atp", "mean_direct_ratio", "classification")
                if c in above]))


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
        html_table(table)])
