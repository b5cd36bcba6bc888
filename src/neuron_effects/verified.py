"""The neurons the graph missed, verified exactly (``atp.verify_candidates: N``).

Attribution patching estimates every neuron of the model; the ``N`` neurons outside the profile
with the largest mean |total_atp| over prompts (:func:`select`) get exact effect rows on every
prompt, by the same engine, settings and row cache as the profile's neurons (a candidate that
later enters the profile reuses its rows). They join ``per_prompt.parquet`` and
``neurons.parquet`` with ``in_profile`` false, never the enriched profile file; the report lists
those whose exact mean |total| exceeds the profile's median (:func:`above_profile_median`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import pandas as pd

from .agreement import candidates
from .inputs import InputError, Neuron

CANDIDATE_COLUMNS = ["neuron_id", "layer", "neuron", "mean_abs_atp", "rank"]


def select(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` neurons of the all-neuron table (:func:`neuron_effects.agreement.neuron_table`)
    outside the profile with the largest ``mean_abs_atp`` (ties: lower layer, then lower index),
    in that order, as ``neuron_id`` (``L{layer}/N{neuron}``), layer, neuron, mean_abs_atp, rank."""
    return candidates(table, n, ("atp",))[CANDIDATE_COLUMNS]


def neuron_table(selected: pd.DataFrame) -> list[list[Any]]:
    """The ``[neuron_id, layer, neuron]`` rows of the selected candidates: a shard's neurons."""
    return [[str(i), int(layer), int(n)] for i, layer, n in
            zip(selected["neuron_id"], selected["layer"], selected["neuron"])]


def check_profile_ids(profile: Sequence[Neuron]) -> None:
    """Candidates are named ``L{layer}/N{neuron}``: a profile neuron may not carry such an id
    for another position (its rows and the candidate's would share an id)."""
    for neuron in profile:
        match = re.fullmatch(r"L(\d+)/N(\d+)", neuron.neuron_id)
        if match and (int(match[1]), int(match[2])) != (neuron.layer, neuron.neuron):
            raise InputError(
                f"profile neuron {neuron.neuron_id!r} (layer {neuron.layer}, neuron "
                f"{neuron.neuron}): with atp.verify_candidates its id must name its own layer "
                f"and index, or not have the form L<layer>/N<neuron> (the candidates' ids)")


def check_config(verify: int, atp_enabled: bool, methods: Sequence[str], census: bool) -> None:
    """Stop the parse when ``atp.verify_candidates: verify`` cannot run with these settings."""
    if verify and census:
        raise InputError("atp.verify_candidates needs census.layers: null (a census computes "
                         "every neuron of its layers exactly already; set verify_candidates: 0)")
    if verify and (not atp_enabled or "atp" not in methods):
        raise InputError("atp.verify_candidates ranks the neurons by attribution patching: it "
                         "needs atp.enabled: true and atp in atp.methods")


def above_profile_median(profile: pd.DataFrame, candidates: pd.DataFrame) -> pd.DataFrame:
    """The verified ``candidates`` (neuron summaries) whose exact ``mean_abs_total`` (mean
    over prompts of |total|) exceeds the median ``mean_abs_total`` of the ``profile``'s
    neurons, largest first."""
    median = profile["mean_abs_total"].median()
    return candidates[candidates["mean_abs_total"] > median].sort_values(
        "mean_abs_total", ascending=False, kind="stable")
