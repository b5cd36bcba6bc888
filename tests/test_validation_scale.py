"""The validation holds at any scale: its tolerance, noise floor and relative-error floor derive
from the run's own logits, so a correct float32 run passes and a bf16 run fails whether the
logits are x1 or x100 (and the residual stream x1 or x100)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import rescaled, tiny_model
from engine_checks import random_neurons
from neuron_effects import store
from neuron_effects.clean import run_clean, save_clean_runs
from neuron_effects.effects import EffectSettings, compute_effects, neuron_block
from neuron_effects.error_scale import ERROR_FACTOR, FLOAT32_EPS
from neuron_effects.model import ModelSpec, load_model
from neuron_effects.jobs.sample_validation import validate_sample
from neuron_effects.validation import (ReferenceRow, absolute_differences, relative_errors,
                                       summarize)

DEFAULTS = EffectSettings()
PROMPTS = {"p0": [5, 17, 2, 99, 43, 8, 61, 30, 12, 77, 3], "p1": [9, 4, 71, 33, 20, 58, 6, 14]}


def _validated_run(folder, dtype: str, tmp_path, tolerance: float | None = None,
                   settings: EffectSettings = DEFAULTS, stored_logits_factor: float = 1.0
                   ) -> dict:
    """The fast path's table in ``dtype`` for the model saved in ``folder`` (2 prompts x 12
    neurons, target 7, distractor 11), checked by the workflow's validation step (float64
    reference for float32, float32 for bf16); returns the summary. ``stored_logits_factor``
    scales the clean logits saved for the validation (the run's; not the reference's)."""
    spec = ModelSpec(str(folder), dtype=dtype, device="cpu")
    model = load_model(spec)
    block = neuron_block(model, random_neurons(model, 3, seed=4), True)
    runs, tables = [], []
    for prompt_id, input_ids in PROMPTS.items():
        clean = run_clean(model, input_ids, prompt_id)
        table = compute_effects(model, clean, block, settings, 7, 11).per_prompt
        tables.append(table.assign(prompt_id=prompt_id, target_id=7, distractor_id=11))
        clean.logits = clean.logits * stored_logits_factor
        runs.append(clean)
    save_clean_runs(tmp_path / "c000.safetensors", runs,
                          [{"prompt_id": prompt_id} for prompt_id in PROMPTS])
    store.write_parquet(tmp_path / "per_prompt.parquet", pd.concat(tables, ignore_index=True))
    validate_sample(spec, [str(tmp_path / "c000.safetensors")], str(tmp_path / "per_prompt.parquet"),
                    settings, 24, 0, tolerance, 0.05, str(tmp_path / "pairs.parquet"),
                    str(tmp_path / "summary.json"))
    return json.loads((tmp_path / "summary.json").read_text())


@pytest.mark.parametrize("logits, residual", [(1, 1), (100, 1), (100, 100)])
def test_float32_passes_and_bf16_fails_at_every_scale(logits, residual, tmp_path):
    folder = tmp_path / "model"
    rescaled(tiny_model(seed=3), logits, residual).causal_lm.save_pretrained(folder)
    exact = _validated_run(folder, "float32", tmp_path / "float32")
    rounded = _validated_run(folder, "bfloat16", tmp_path / "bfloat16")
    assert exact["reference_dtype"] == "float64" and rounded["reference_dtype"] == "float32"
    # the derived tolerance follows the logits: 64 x eps x max |clean logit| (~5.6 at x1)
    assert 4 * logits < exact["logit_scale"]["max"] < 8 * logits
    assert exact["tolerance"] == pytest.approx(
        ERROR_FACTOR * FLOAT32_EPS * exact["logit_scale"]["max"])
    # the same bound, at the run's scale (the floor) and at the reference's (the tolerance)
    assert exact["ratio_noise_floor"]["max"] <= exact["tolerance"] * (1 + 1e-6)
    assert exact["relative_error_floor"] == pytest.approx(10 * exact["tolerance"])
    assert exact["passed"] is True, exact["failure"]
    assert exact["pairs_above_floor"]["total"] >= 12
    assert exact["max_abs_diff"] < exact["tolerance"] / 2
    assert rounded["passed"] is False and "bfloat16" in rounded["failure"]
    assert rounded["max_abs_diff"] is None or rounded["max_abs_diff"] > 10 * rounded["tolerance"]
    if logits == 100:  # the former fixed tolerance, 1e-4, failed a correct float32 run here
        assert exact["max_abs_diff"] > 1e-4


def test_configured_tolerance_and_noise_floor_are_used(tmp_path):
    folder = tmp_path / "model"
    tiny_model(seed=3).causal_lm.save_pretrained(folder)
    strict = _validated_run(folder, "float32", tmp_path / "strict", tolerance=1e-12,
                            settings=EffectSettings(noise_floor=0.05))
    assert strict["tolerance"] == 1e-12 and strict["tolerance_source"] == "validation.tolerance"
    assert strict["ratio_noise_floor"] == {"min": 0.05, "max": 0.05,
                                           "source": "metrics.ratio_noise_floor"}
    assert strict["passed"] is False and "tolerance 1e-12" in strict["failure"]


def test_the_tolerance_scale_comes_from_the_reference_clean_logits(tmp_path):
    """The run's stored clean logits scaled x3: the derived tolerance still follows the
    float64 reference's own clean logits."""
    folder = tmp_path / "model"
    tiny_model(seed=3).causal_lm.save_pretrained(folder)
    plain = _validated_run(folder, "float32", tmp_path / "plain")
    tampered = _validated_run(folder, "float32", tmp_path / "tampered", stored_logits_factor=3.0,
                              settings=EffectSettings(noise_floor=1e-4))
    assert tampered["logit_scale"] == pytest.approx(plain["logit_scale"], rel=1e-5)
    assert tampered["tolerance"] == pytest.approx(plain["tolerance"], rel=1e-5)
    assert "reference float64" in tampered["tolerance_source"]


def _reference(**values) -> ReferenceRow:
    base = {"direct": 0.5, "indirect": 0.25, "total": 0.75, "direct_frozen_norm": 0.4,
            "norm_mediated": 0.1, "direct_ratio": 2 / 3, "cancellation": 0.0,
            "direct_ratio_frozen_norm": 0.4 / 0.75, "sign_aligned": True, "ratio_defined": True,
            **{f"{name}_logit_diff": 0.1 for name in ("direct", "indirect", "total",
                                                       "direct_frozen_norm", "norm_mediated")},
            **{f"prob_change_{name}": 0.01 for name in ("direct", "indirect", "total")},
            **{f"top_k_{name}_{stat}": 0.5 for name in ("direct", "indirect", "total")
               for stat in ("mean", "max")},
            **{f"top_k_{name}_tokens": np.array([2, 0]) for name in ("direct", "indirect",
                                                                     "total")}}
    vector = np.array([0.5, 0.0, 0.5, 0.1])
    return ReferenceRow({**base, **values}, {name: vector for name in
                                             ("direct", "indirect", "total")}, 1e-4)


def test_nan_on_either_side_fails_and_tied_tokens_pass():
    reference = _reference()
    row = pd.Series({**reference.values, "distractor_id": 3,
                     **{f"top_k_{name}_tokens": [0, 2] for name in ("direct", "indirect",
                                                                    "total")}})
    differences = absolute_differences(row, reference, 1e-5)
    assert max(differences.values()) == 0.0  # a tie broken the other way is no difference
    assert np.isinf(absolute_differences(row.copy().replace({0.75: np.nan}), reference,
                                         1e-5)["total"])
    both_nan = _reference(prob_change_total=np.nan)
    assert np.isinf(absolute_differences(row.copy().replace({0.01: np.nan}), both_nan,
                                         1e-5)["prob_change_total"])
    wrong = row.copy()
    wrong["top_k_total_tokens"] = [0, 3]
    assert absolute_differences(wrong, reference, 1e-5)["top_k_total_tokens"] == 0.4
    flipped = row.copy()
    flipped["sign_aligned"] = False
    assert np.isinf(absolute_differences(flipped, reference, 1e-5)["sign_aligned"])
    run = np.array([0.1, np.nan, 0.2, 1e-9])
    errors = relative_errors(run, np.array([0.1, 0.1, np.inf, 1e-9]), 1e-3)
    assert errors[0] == 0 and np.isinf(errors[1]) and np.isinf(errors[2]) and np.isnan(errors[3])
    pairs = pd.DataFrame({"max_abs_diff": [0.0, np.nan], "diff_total": [0.0, np.inf],
                          "diff_total_logit_diff": [0.0, np.nan],  # no distractor: undefined
                          **{f"relative_error_{name}": [0.0, 0.0]
                             for name in ("direct", "indirect", "total")}})
    verdict = summarize(pairs, "float32", "float64", 1e-4, 0.05, 1e-3)
    assert verdict["passed"] is False and verdict["max_abs_diff"] is None
    assert verdict["non_finite_columns"] == ["total"]


def test_reference_dtype_fits_float64_on_an_h100():
    """Llama-3.1-8B: 8.03e9 parameters, the largest (embedding, unembedding) 525M: 64.2 GB of
    float64 weights. On an 80 GB H100 (~84.5e9 bytes free) it fits with its working memory."""
    from neuron_effects.validation import forward_working_bytes, reference_bytes, reference_dtype

    gpu = torch.device("cuda", 0)
    working = forward_working_bytes(200, 32, 4096, 14336, 1024, 32, 128256)
    needed = reference_bytes(8_030_261_248, 525_336_576, working)
    assert 64.2e9 < needed < 72e9
    assert reference_dtype(torch.float32, gpu, needed, 84_500_000_000) == (torch.float64, None)
    assert reference_dtype(torch.float32, gpu, needed, 139_000_000_000)[0] == torch.float64
    dtype, note = reference_dtype(torch.float32, gpu, needed, 47_000_000_000)  # a 48 GB card
    assert dtype == torch.float32 and f"{needed / 1e9:.1f} GB" in note
    assert reference_dtype(torch.bfloat16, gpu, needed, 10**12) == (torch.float32, None)
    assert reference_dtype(torch.float32, torch.device("cpu"), needed, None)[0] == torch.float64


@pytest.mark.parametrize("name", ["direct_ratio", "cancellation", "direct_ratio_frozen_norm"])
def test_a_wrong_ratio_is_weighed_in_logit_units(name):
    """A ratio off by 0.01 at |d| + |i| = 0.75 differs by 0.01 x 0.75 / 3 = 2.5e-3 in logit
    units: far past a 1e-5 tolerance (a difference scaled down 3000-fold would pass it)."""
    reference = _reference()
    row = pd.Series({**reference.values, "distractor_id": 3})
    row[name] = reference.values[name] + 0.01
    differences = absolute_differences(row, reference, 1e-5)
    assert differences[name] == pytest.approx(0.01 * 0.75 / 3)
    others = {key: value for key, value in differences.items() if key != name}
    assert max(others.values()) == 0.0


def test_a_wrong_ratio_defined_fails_away_from_the_noise_floor():
    """|d| + |i| = 0.75, noise floor 1e-4: a row calling the ratio undefined is wrong (inf);
    within 2 x tolerance of the floor either answer passes."""
    reference = _reference()
    row = pd.Series({**reference.values, "distractor_id": 3, "ratio_defined": False})
    assert np.isinf(absolute_differences(row, reference, 1e-5)["ratio_defined"])
    undefined = _reference(ratio_defined=False, direct_ratio=np.nan, cancellation=np.nan,
                           direct_ratio_frozen_norm=np.nan)
    defined_row = pd.Series({**reference.values, "distractor_id": 3})
    assert np.isinf(absolute_differences(defined_row, undefined, 1e-5)["ratio_defined"])
    near = ReferenceRow(undefined.values, undefined.effects, noise_floor=0.75 + 1e-5)
    assert absolute_differences(defined_row, near, 1e-5)["ratio_defined"] == 0.0
    verdict = summarize(pd.DataFrame({"max_abs_diff": [np.inf], "diff_ratio_defined": [np.inf],
                                      **{f"relative_error_{name}": [0.0] for name in
                                         ("direct", "indirect", "total")}}),
                        "float32", "float64", 1e-5, 0.05, 1e-4)
    assert verdict["passed"] is False and verdict["non_finite_columns"] == ["ratio_defined"]


def test_non_finite_rows_of_the_whole_table_fail_naming_them():
    pairs = pd.DataFrame({"max_abs_diff": [0.0], "diff_total": [0.0],
                          **{f"relative_error_{name}": [0.0] for name in
                             ("direct", "indirect", "total")}})
    assert summarize(pairs, "float32", "float64", 1e-4, 0.05, 1e-3)["passed"] is True
    rows = [{"prompt_id": "q7", "neuron_id": "L3/N9", "layer": 3, "columns": "total, indirect"}]
    verdict = summarize(pairs, "float32", "float64", 1e-4, 0.05, 1e-3,
                        {"n_rows": 5, "rows": rows, "columns": ["indirect", "total"]})
    assert verdict["passed"] is False and verdict["non_finite"]["n_rows"] == 5
    assert "5 (prompt, neuron) rows" in verdict["failure"]
    assert "prompt 'q7', neuron L3/N9 (total, indirect) and 4 more" in verdict["failure"]
