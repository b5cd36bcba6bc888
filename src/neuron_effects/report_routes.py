"""The report's sections on where the indirect effect goes: the layer-flow heatmaps, the top
mediators of the routing-dominant neurons, the agreement with the profiles' downstream edges, and
the profiles' neuron edges measured exactly."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .aggregate import CLASSES  # noqa: E402
from .report_html import figure_html, figure_uri, html_table  # noqa: E402


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
    return figure_uri(figure)


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
    return figure_uri(figure)


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
        figure_html(_flow_heatmaps(flow, n_layers),
                    "Mean |contribution| of each downstream layer's attention and MLP, by the "
                    "treated neuron's layer."),
        "<h3>Top mediators of the most routing-dominant neurons</h3>",
        html_table(routing, columns) if len(routing) else "<p>No routing-dominant neuron.</p>",
    ]
    if "edge_neuron_overlap" in neurons and neurons["edge_n_neuron_targets"].notna().any():
        with_edges = neurons[neurons["edge_n_neuron_targets"].notna()]
        parts += [
            "<h3>Agreement with the profiles' downstream edges</h3>",
            f"<p>{len(with_edges)} profiles list <code>top_downstream_targets</code>. Neuron "
            "overlap: the share of the profile's top-k neuron targets among the exact top-k "
            "mediator neurons; sign agreement: avg_weight vs mean contribution; logit overlap: "
            "logit targets among the direct effect's most frequent top-k tokens.</p>",
            figure_html(_edge_agreement_histograms(with_edges),
                        "Distribution of edge agreement over neurons."),
        ]
    return "".join(parts)


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
        figure_html(figure_uri(figure), "Left: the fraction of each neuron's listed edges "
                    "that are real. Right: how far each edge moves its target (dashed: the "
                    "threshold)."),
        f"<h4>The {min(top_n, len(worst))} disagreeing edges with the largest |exact_weight| "
        f"(of {len(disagreeing)} whose sign disagrees)</h4>",
        html_table(worst.head(top_n), ["neuron_id", "target_layer", "target_neuron",
                                       "avg_weight", "exact_weight", "delta_activation",
                                       "relative_delta"]),
    ])
