"""The profile's own per-neuron scores (``profile_scores``: e.g. the attribution graph's node
attribution) judged against the exact effects.

Per field, over the profile neurons that give it (``n_neurons``; ``n_missing`` do not), with
``m`` the neuron's exact mean total over the prompts and ``|m|`` its mean |total|:

* ``spearman``: Spearman(field, m); ``spearman_abs``: Spearman(|field|, mean |total|);
* ``sign_agreement``: the fraction of the neurons with ``m != 0`` where sign(field) = sign(m);
* ``precision_at_10``, ``precision_at_100``: the fraction of the top k by |field| that are in
  the top k by mean |total| (:func:`neuron_effects.agreement.precision_at_k`); NaN unless
  more than k neurons give the field (over all of them it is 1 whatever the field);
  ``precision_at_tenth``: the same with k = a tenth of the neurons (at least 1).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd

from .agreement import precision_at_k, spearman

COLUMNS = ("field", "n_neurons", "n_missing", "spearman", "spearman_abs", "sign_agreement",
           "precision_at_10", "precision_at_100", "precision_at_tenth")


def judge_field(field: str, scores: Mapping[str, float], neurons: pd.DataFrame) -> dict:
    """One row of the table (see the module docstring) for ``scores`` (neuron id -> value) of
    the profile neurons, from ``neurons`` (``neuron_id``, ``mean_total``, ``mean_abs_total``;
    the profile's neurons, one row each)."""
    exact = neurons.set_index("neuron_id")[["mean_total", "mean_abs_total"]]
    given = exact.index.intersection(pd.Index(list(scores), dtype=object))
    value = pd.Series([scores[neuron_id] for neuron_id in given], index=given, dtype=float)
    exact = exact.loc[given]
    nonzero = exact["mean_total"].to_numpy() != 0
    signs = np.sign(value.to_numpy()[nonzero]) == np.sign(exact["mean_total"].to_numpy()[nonzero])
    row = {"field": field, "n_neurons": len(given), "n_missing": len(neurons) - len(given),
           "spearman": spearman(value, exact["mean_total"]),
           "spearman_abs": spearman(value.abs(), exact["mean_abs_total"]),
           "sign_agreement": float(signs.mean()) if nonzero.any() else math.nan}
    tenth = max(1, math.ceil(len(given) / 10))
    for name, k in (("precision_at_10", 10), ("precision_at_100", 100),
                    ("precision_at_tenth", tenth)):
        row[name] = (precision_at_k(value.abs(), exact["mean_abs_total"], k)
                     if len(given) > k else math.nan)
    return row


def judge_profile_scores(scores: Mapping[str, Mapping[str, float]],
                         neurons: pd.DataFrame) -> pd.DataFrame:
    """The table of :data:`COLUMNS`, one row per field of ``scores`` (field -> neuron id ->
    value, :func:`neuron_effects.inputs.read_profile_scores`), in their order."""
    return pd.DataFrame([judge_field(field, values, neurons) for field, values in scores.items()],
                        columns=list(COLUMNS))
