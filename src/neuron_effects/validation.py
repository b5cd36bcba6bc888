"""Checking a sample of fast-path results against the slow reference paths.

For each sampled (prompt, neuron) row of the fast path's table, the same treatment ``V`` (the
row's recorded scale times ``w_n``) is run through :mod:`neuron_effects.reference`: a hooked full
forward for the total effect, the frozen-downstream forward for the direct effect, and the same
with the final-norm scale frozen. The metrics of the reference effect vectors are computed with
the clean logits of the unmodified model, and every numeric metric is compared.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .clean import CleanRun
from .metrics import effect_metrics
from .model import LlamaFamily
from .reference import reference_clean_logits, reference_direct, reference_total
from .treatments import treatment_scales

COMPARED = ("direct", "indirect", "total", "direct_frozen_norm", "norm_mediated",
            "direct_logit_diff", "indirect_logit_diff", "total_logit_diff",
            "direct_frozen_norm_logit_diff", "norm_mediated_logit_diff",
            "prob_change_direct", "prob_change_indirect", "prob_change_total",
            "top_k_direct_mean", "top_k_direct_max", "top_k_indirect_mean",
            "top_k_indirect_max", "top_k_total_mean", "top_k_total_max")


def sample_pairs(per_prompt: pd.DataFrame, n_pairs: int, seed: int) -> pd.DataFrame:
    """``n_pairs`` seeded random rows spread evenly over the layers present (first, last and
    evenly spaced ones in between; several rows per layer when there are more pairs)."""
    rng = np.random.default_rng(seed)
    layers = np.array(sorted(per_prompt["layer"].unique()))
    n_pairs = min(n_pairs, len(per_prompt))
    picks = layers[np.round(np.linspace(0, len(layers) - 1, n_pairs)).astype(int)]
    chosen: list[int] = []
    for layer in layers:
        wanted = int((picks == layer).sum())
        candidates = per_prompt.index[per_prompt["layer"] == layer].to_numpy()
        chosen.extend(rng.choice(candidates, size=min(wanted, len(candidates)), replace=False))
    return per_prompt.loc[chosen]


@torch.inference_mode()
def compare_with_reference(
    model: LlamaFamily, clean: CleanRun, row: pd.Series, treatment: str, positions: str,
    full_vocab: bool, top_k: int, noise_floor: float,
) -> dict[str, float]:
    """Absolute differences, metric by metric, between one fast-path row and the reference."""
    layer, neuron, scale = int(row["layer"]), int(row["neuron"]), float(row["scale"])
    direction = model.output_directions(torch.tensor([layer]), torch.tensor([neuron]))[0]
    vector = scale * direction
    if positions == "last":
        total_vector = vector
    else:  # every position gets its own scale from its own activation
        per_position = clean.full_activations[layer][:, neuron]
        mean = torch.tensor(scale + float(row["activation"]))  # mean_ablate: s = mean - a
        scales = treatment_scales(per_position, treatment, mean)
        total_vector = scales[:, None] * direction[None, :].to(scales.device)
    total = reference_total(model, clean.input_ids, layer, total_vector)[None]
    direct = reference_direct(model, clean, layer, vector)[None]
    frozen = reference_direct(model, clean, layer, vector, freeze_norm=True)[None]
    target = int(row["target_id"])
    distractor = None if pd.isna(row["distractor_id"]) else int(row["distractor_id"])
    keep = [target] + ([distractor] if distractor is not None else [])
    frozen = frozen[:, keep]
    if full_vocab:
        columns = (target, distractor)
    else:
        total, direct = total[:, keep], direct[:, keep]
        columns = (0, 1 if distractor is not None else None)
    clean_logits = reference_clean_logits(model, clean.input_ids)
    clean_logits = clean_logits if full_vocab else clean_logits[keep]
    reference = effect_metrics(direct, frozen, total, clean_logits, columns[0], columns[1],
                               full_vocab, top_k, noise_floor)
    differences = {}
    for name in COMPARED:
        expected, got = float(reference[name][0]), float(row[name])
        if np.isnan(expected) and np.isnan(got):
            continue
        differences[name] = abs(expected - got)
    return differences
