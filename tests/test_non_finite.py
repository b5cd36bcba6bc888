"""Non-finite values are counted over every row of the run's table by the aggregation, and any
at all fails the validation naming the rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuron_effects import aggregate
from neuron_effects.jobs.aggregation import aggregate_block, non_finite_summary
from neuron_effects.aggregate import Thresholds, non_finite_mask, non_finite_rows


def _table() -> pd.DataFrame:
    """Four rows in the per-prompt shape: p1 has no distractor (its _logit_diff columns NaN),
    row 3 an undefined ratio; full-vocabulary metrics on, the mediation split off."""
    return pd.DataFrame({
        "prompt_id": ["p0", "p1", "p0", "p1"], "neuron_id": ["L0/N1", "L0/N1", "L0/N2", "L0/N2"],
        "layer": [0, 0, 0, 0], "distractor_id": [5.0, np.nan, 5.0, np.nan],
        "activation": 1.0, "scale": 1.0, "direct": 0.1, "indirect": 0.2, "total": 0.3,
        "total_atp": 0.3, "indirect_atp": 0.2, "total_relp": 0.25,
        "direct_frozen_norm": 0.1, "norm_mediated": 0.0,
        "direct_ratio": [0.3, 0.3, 0.3, np.nan], "cancellation": [0.0, 0.0, 0.0, np.nan],
        "ratio_defined": [True, True, True, False],
        "direct_ratio_frozen_norm": [0.3, 0.3, np.nan, np.nan],
        "direct_logit_diff": [0.1, np.nan, 0.1, np.nan],
        "total_logit_diff": [0.1, np.nan, 0.1, np.nan],
        "prob_change_total": 0.01, "indirect_attn": np.nan, "indirect_attn_logit_diff": np.nan,
    })


def _plain_mask(frame: pd.DataFrame) -> np.ndarray:
    """The obviously-correct reference: a row at a time, column by column."""
    bad = []
    for _, row in frame.iterrows():
        found = False
        for column, value in row.items():
            if not isinstance(value, float) or column in ("distractor_id",
                                                          "direct_ratio_frozen_norm"):
                found |= isinstance(value, float) and np.isinf(value)
                continue
            if np.isinf(value):
                found = True
            elif np.isnan(value):
                if column in ("direct_ratio", "cancellation"):
                    found |= bool(row["ratio_defined"])
                elif column.endswith("_logit_diff"):
                    computed = np.isfinite(frame.loc[frame["distractor_id"].notna(),
                                                     column]).any()
                    found |= bool(pd.notna(row["distractor_id"]) and (
                        computed or column in aggregate.WITH_DISTRACTOR))
                elif column in aggregate.ALWAYS_FINITE or column.startswith("total_") \
                        or column == "indirect_atp":
                    found = True
                else:
                    found |= bool(np.isfinite(frame[column]).any())
        bad.append(found)
    return np.array(bad)


def test_a_clean_table_has_no_non_finite_rows():
    rows, by_column = non_finite_mask(_table())
    assert not rows.any() and by_column == {}


@pytest.mark.parametrize("column, row, value, bad", [
    ("total", 1, np.nan, True), ("indirect", 0, np.inf, True), ("total_relp", 2, np.nan, True),
    ("indirect_atp", 3, -np.inf, True), ("activation", 0, np.nan, True),
    ("direct_ratio", 0, np.nan, True),  # defined ratio
    ("direct_ratio", 3, np.inf, True),  # inf is never by design
    ("direct_logit_diff", 0, np.nan, True),  # a row with a distractor
    ("prob_change_total", 2, np.nan, True),  # computed on the other rows
    ("direct_ratio_frozen_norm", 0, np.nan, False),  # below its own floor: by design
    ("direct_ratio_frozen_norm", 0, np.inf, True),
    ("indirect_attn", 1, np.inf, True), ("distractor_id", 0, np.nan, False),
])
def test_each_kind_of_value_is_judged_as_the_row_by_row_reference_does(column, row, value, bad):
    frame = _table()
    frame.loc[row, column] = value
    rows, by_column = non_finite_mask(frame)
    np.testing.assert_array_equal(rows, _plain_mask(frame))
    assert rows[row] == bad and rows.sum() == int(bad)
    assert (column in by_column) == bad


def test_counts_per_neuron_and_the_rows_named():
    frame = _table()
    frame.loc[[1, 2, 3], "total"] = np.nan
    frame.loc[3, "direct"] = np.inf
    counts, named = non_finite_rows(frame, limit=2)
    assert counts.to_dict() == {"L0/N1": 1, "L0/N2": 2}
    assert named.to_dict("records") == [
        {"prompt_id": "p1", "neuron_id": "L0/N1", "layer": 0, "columns": "total"},
        {"prompt_id": "p0", "neuron_id": "L0/N2", "layer": 0, "columns": "total"}]


@pytest.mark.slow
def test_the_aggregation_counts_every_row_and_names_them(tiny_workflow, tmp_path):
    """A NaN written into two rows of one shard of the tiny run: the block's aggregation counts
    them in n_non_finite and names them, whatever the sampled validation pairs."""
    workdir = tiny_workflow[0]
    shards = sorted(str(path) for path in (workdir / "results/effects/shards").glob(
        "L00-01_c00?.parquet"))
    tampered = pd.read_parquet(shards[1])
    tampered.loc[[0, 3], "total"] = np.nan
    shards[1] = str(tmp_path / "tampered.parquet")
    tampered.to_parquet(shards[1], index=False)
    parts = {part: str(tmp_path / f"{part}.parquet") for part in aggregate.BLOCK_PARTS
             if part not in ("mediation", "mediators", "flow_sums", "mediator_lists", "edges")}
    prompts = [line.split('"prompt_id": "')[1].split('"')[0] for line in
               (workdir / "prompts.jsonl").read_text().splitlines()]
    aggregate_block(shards, prompts, str(workdir / "neurons.json"), Thresholds(), parts)
    neurons = pd.read_parquet(parts["neurons"])
    summary = non_finite_summary(neurons, pd.read_parquet(parts["non_finite"]))
    expected = tampered.loc[[0, 3], ["prompt_id", "neuron_id"]].to_dict("records")
    assert summary["n_rows"] == 2 and summary["columns"] == ["total"]
    assert {(row["prompt_id"], row["neuron_id"]) for row in summary["rows"]} == {
        (row["prompt_id"], row["neuron_id"]) for row in expected}
    assert neurons.set_index("neuron_id")["n_non_finite"].sum() == 2
