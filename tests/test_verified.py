"""atp.verify_candidates: the selection of the neurons outside the profile, the parse-time
checks, the report's list and the plan's cost of the second stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuron_effects import verified
from neuron_effects.agreement import neuron_table
from neuron_effects.cost import DEVICES, ModelShape
from neuron_effects.inputs import InputError, Neuron, PromptRecord
from neuron_effects.plan import make_plan
from neuron_effects.plan_cost import Workload, candidate_neurons, estimate, shard_seconds


def _table(seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """An all-neuron table of 3 prompts x 4 layers x 6 neurons, with ties, and its profile
    (two of the largest neurons among them)."""
    rng = np.random.default_rng(seed)
    estimates = rng.normal(size=(3, 4, 6)).round(1)  # rounded: ties in mean |estimate|
    estimates[:, 2, 1] = estimates[:, 0, 5] = 9.0  # the same largest mean, two layers
    profile = pd.DataFrame({"layer": [2, 1], "neuron": [1, 0]})
    return neuron_table({"atp": estimates}, profile), estimates, profile


def _reference(estimates: np.ndarray, profile: pd.DataFrame, n: int) -> list[str]:
    """Every (layer, neuron) outside the profile, sorted by -mean |estimate|, layer, neuron."""
    listed = set(zip(profile["layer"], profile["neuron"]))
    means = np.abs(estimates).mean(0)
    keys = sorted((-means[layer, neuron], layer, neuron) for layer in range(means.shape[0])
                  for neuron in range(means.shape[1]) if (layer, neuron) not in listed)
    return [f"L{layer}/N{neuron}" for _, layer, neuron in keys[:n]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_is_the_top_n_outside_the_profile_by_mean_abs_atp(seed):
    table, estimates, profile = _table(seed)
    selected = verified.select(table, 10)
    assert list(selected["neuron_id"]) == _reference(estimates, profile, 10)
    assert selected.iloc[0]["neuron_id"] == "L0/N5"  # the tie at 9.0: L2/N1 is in the profile
    assert list(selected.columns) == verified.CANDIDATE_COLUMNS
    assert verified.neuron_table(selected)[0] == ["L0/N5", 0, 5]


def test_select_ranks_by_atp_not_by_another_method():
    table, estimates, profile = _table()
    other = neuron_table({"atp": estimates, "relp": -estimates[:, ::-1]}, profile)
    assert list(verified.select(other, 5)["neuron_id"]) == _reference(estimates, profile, 5)


def test_profile_ids_of_the_candidates_form_must_name_their_own_neuron():
    verified.check_profile_ids([Neuron("L3/N5", 3, 5), Neuron("my neuron", 2, 7)])
    with pytest.raises(InputError, match="'L3/N5' .layer 3, neuron 6"):
        verified.check_profile_ids([Neuron("L3/N5", 3, 6)])


def test_config_is_checked():
    verified.check_config(0, False, [], True)
    verified.check_config(10, True, ["atp", "relp"], False)
    with pytest.raises(InputError, match="census.layers: null"):
        verified.check_config(10, True, ["atp"], True)
    with pytest.raises(InputError, match="atp in atp.methods"):
        verified.check_config(10, True, ["relp"], False)
    with pytest.raises(InputError, match="atp.enabled: true"):
        verified.check_config(10, False, ["atp"], False)


def test_above_profile_median():
    profile = pd.DataFrame({"neuron_id": list("abcd"), "mean_abs_total": [1.0, 2.0, 3.0, 10.0]})
    candidates = pd.DataFrame({"neuron_id": list("xyz"), "mean_abs_total": [2.5, 2.6, 9.0]})
    above = verified.above_profile_median(profile, candidates)  # the median is 2.5
    assert list(above["neuron_id"]) == ["z", "y"]


def test_plan_states_the_second_stage_cost():
    shape = ModelShape(n_layers=4, hidden=64, intermediate=96, vocab=1000, n_heads=4,
                       n_kv_heads=4, head_dim=16, tied=False)
    rates = DEVICES["h100"]
    prompts = [PromptRecord(f"p{i}", "text", None, None, i + 1) for i in range(6)]
    tokens = {record.prompt_id: 10 + i for i, record in enumerate(prompts)}
    plan = make_plan([Neuron("a", 1, 3)], prompts, 2, 6)  # one prompt chunk
    plain = estimate(plan, tokens, shape, rates, Workload())
    work = Workload(verify_candidates=8)
    verifying = estimate(plan, tokens, shape, rates, work)
    rule = {r.rule: r for r in verifying.rules}["compute_candidate_effects"]
    spread = candidate_neurons(8, 4)
    assert sorted(n.layer for n in spread) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert rule.jobs == 1 and rule.compute_s == pytest.approx(
        shard_seconds(shape, rates, work, spread, list(tokens.values())))
    assert verifying.candidate_rows == 8 * 6 and "48 rows" in verifying.table()
    assert verifying.aggregate_jobs == plain.aggregate_jobs + 1
    assert verifying.aggregate_s > plain.aggregate_s
    off = estimate(plan, tokens, shape, rates, Workload(verify_candidates=8, backward_passes=0))
    assert "compute_candidate_effects" not in {r.rule for r in off.rules}
