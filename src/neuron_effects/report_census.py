"""The report's census section: distributions by layer, the top neurons per layer and per
prompt, where the profile's neurons stand among all, and the agreement of the estimates with
the exact effects over every neuron of each layer (:mod:`neuron_effects.census`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .census import MAGNITUDES, top_neurons
from .report_html import figure_html, figure_uri, html_table

PER_LAYER = 3  # neurons listed per layer, prompt and magnitude


def _distributions(neurons: pd.DataFrame) -> str:
    """Box plots by layer of every neuron's mean |total|, |direct| and |indirect| (log)."""
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
    layers = sorted(neurons["layer"].unique())
    for axis, name in zip(axes, MAGNITUDES):
        values = [np.clip(neurons.loc[neurons["layer"] == layer, f"mean_abs_{name}"], 1e-9, None)
                  for layer in layers]
        axis.boxplot(values, positions=layers, widths=0.7, showfliers=False)
        axis.set_yscale("log")
        axis.set_title(f"mean |{name}| per neuron")
        axis.set_xlabel("layer")
        axis.tick_params(axis="x", labelsize=6)
    return figure_uri(figure)


def census_section(neurons: pd.DataFrame, per_prompt: pd.DataFrame, layers: pd.DataFrame,
                   table_top: int) -> list[str]:
    """The section's HTML parts (``neurons`` with :func:`neuron_effects.census.census_columns`)."""
    profile = neurons[neurons["in_profile"]]
    standing = profile[["neuron_id", "layer", "mean_abs_total", "rank_in_layer",
                        "percentile_in_layer"]].sort_values("percentile_in_layer",
                                                            ascending=False)
    agreement = [c for c in layers.columns if c.startswith(("atp_", "relp"))]
    return [
        "<h2>Census: every neuron of the chosen layers</h2>",
        f"<p>{len(neurons):,} neurons ({int(neurons['in_profile'].sum()):,} of them in the "
        f"profile) over {per_prompt['prompt_id'].nunique()} prompts: {len(per_prompt):,} exact "
        "(prompt, neuron) rows. Every neuron is summarised in "
        "<code>results/summary/neurons.parquet</code>; the searchable table below keeps the "
        f"profile's neurons and the {table_top} others with the largest mean |total|.</p>",
        figure_html(_distributions(neurons), "Distribution over the neurons of each layer of "
                    "the mean |effect| on the target logit (boxes: quartiles; whiskers: 1.5 IQR; "
                    "log scale)."),
        f"<h3>Top {PER_LAYER} neurons per layer by mean |total|, |direct| and |indirect|</h3>",
        html_table(top_neurons(neurons, "layer", PER_LAYER)),
        f"<h3>Top {PER_LAYER} neurons per prompt by |total|, |direct| and |indirect|</h3>",
        html_table(top_neurons(per_prompt, "prompt_id", PER_LAYER)),
        "<h3>Where the profile's neurons stand among all neurons of their layer</h3>",
        "<p>rank_in_layer: 1 = the largest mean |total| of the layer; percentile_in_layer: "
        "the fraction of the layer's neurons with a smaller one. Median percentile of the "
        f"profile's neurons: {profile['percentile_in_layer'].median():.3g}.</p>"
        if len(profile) else "<p>No profile neurons.</p>",
        html_table(standing) if len(profile) else "",
        *(["<h3>Attribution patching against the exact census, per layer</h3>",
           "<p>Over every neuron of the layer, ranked by mean |estimate| and by mean |total|: "
           "precision@k (the estimate's top k among the exact top k), recall@k (the exact "
           "top k found in the estimate's top 2k), rank Spearman; k = 10, 100 and a tenth of "
           "the layer (<code>atp_tenth</code>).</p>",
           html_table(layers[["layer", *agreement]])] if agreement else []),
    ]
