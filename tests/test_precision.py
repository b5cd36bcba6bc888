"""Precision: float32 by default, TF32 off, the validation's higher-precision reference and its
verdict (issue 9). Tiny models for the mechanics, SmolLM2-135M for the numbers."""

from __future__ import annotations

import copy
import json
import logging
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from engine_checks import random_neurons
from neuron_effects import store
from neuron_effects.clean import run_clean, save_clean_runs
from neuron_effects.effects import (EffectSettings, auto_batch_rows, auto_vocab_rows,
                                    compute_effects, neuron_block)
from neuron_effects.error_scale import float32_error_bound, logit_scale
from neuron_effects.inputs import PromptRecord
from neuron_effects.model import (LlamaFamily, ModelSpec, cast_parameters, load_model,
                                  precision_flags, resolve_dtype)
from neuron_effects.precision import low_precision_warning
from neuron_effects.prompts import prepare_prompt
from neuron_effects.report import precision_banners
from neuron_effects.jobs.sample_validation import validate_sample
from neuron_effects.validation import (CHECKED, RELATIVE_METRICS, absolute_differences,
                                       reference_metrics, relative_errors,
                                       summarize)

PROMPT = ("In the history of medicine, few discoveries changed as much as antibiotics. "
          "Penicillin was discovered in 1928 by the Scottish scientist Alexander")


def test_auto_dtype_is_float32_everywhere():
    assert resolve_dtype("auto") == torch.float32
    assert low_precision_warning("auto") is None and low_precision_warning("float32") is None
    assert "dtype bfloat16" in low_precision_warning("bfloat16")


def test_bf16_load_keeps_rotary_float32_and_reference_has_the_same_weights(tiny_model_dir):
    """from_pretrained sets the parameters' dtype only: the rotary inv_freq stays float32 and
    equal to a float32 load; the float64 reference of a bf16 run holds the bf16 weights."""
    spec = ModelSpec(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    bf16 = load_model(spec)
    fp32 = load_model(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu"))
    reference = load_model(spec, compute_dtype=torch.float64)
    assert bf16.dtype == torch.bfloat16 and bf16.layers[0].mlp.down_proj.weight.dtype == bf16.dtype
    for model in (bf16, reference):
        assert model.rotary_emb.inv_freq.dtype == torch.float32
        assert torch.equal(model.rotary_emb.inv_freq, fp32.rotary_emb.inv_freq)
    assert reference.dtype == torch.float64
    for (name, low), high in zip(bf16.causal_lm.named_parameters(),
                                 reference.causal_lm.parameters()):
        assert high.dtype == torch.float64 and torch.equal(low.double(), high), name
    assert not torch.equal(fp32.lm_head.weight.double(), reference.lm_head.weight)  # rounded


def test_load_model_turns_tf32_off(tiny_model_dir):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    flags = precision_flags()
    assert flags["float32_matmul_precision"] == "highest"
    assert flags["cuda_matmul_allow_tf32"] is False and flags["cudnn_allow_tf32"] is False
    assert {"cuda_matmul_allow_bf16_reduced_precision_reduction",
            "cuda_matmul_allow_fp16_reduced_precision_reduction"} <= set(flags)


def test_float64_model_reads_out_and_normalizes_in_float64(tiny_model_dir):
    model = load_model(ModelSpec(str(tiny_model_dir), device="cpu"), compute_dtype=torch.float64)
    norm_weight, unembedding, eps = model.readout()
    assert norm_weight.dtype == unembedding.dtype == model.readout_dtype == torch.float64
    x = torch.randn(3, model.hidden_size, dtype=torch.float64) * 10
    norm = model.layers[0].input_layernorm
    exact = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    torch.testing.assert_close(norm(x), exact, rtol=1e-14, atol=0)
    rounded = norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)).float()
    assert (rounded - exact).abs().max() > 1e-9  # what transformers' float32 RMSNorm would give
    fp32 = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    assert fp32.readout()[1].dtype == fp32.readout_dtype == torch.float32


LLAMA_8B = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32,
                           readout_dtype=torch.float32, hidden_size=4096,
                           intermediate_size=14336, n_heads=32, n_kv_heads=8, head_dim=128,
                           vocab_size=128256)


def test_auto_batch_rows_counts_positions_and_prompt_length():
    """With positions: all a row is T tokens and T x T attention scores per head: at Llama-3.1-8B
    scale in float32 (H100, ~45 GB free) a few hundred rows, not thousands."""
    free = 45 * 10**9
    last = auto_batch_rows(LLAMA_8B, 100, True, "last", free_bytes=free)
    every = auto_batch_rows(LLAMA_8B, 100, True, "all", free_bytes=free)
    longer = auto_batch_rows(LLAMA_8B, 400, True, "all", free_bytes=free)
    assert last == 16384 and 256 <= every <= 1024 and longer < every / 3
    per_row_all = 100 * 4 * (8 * 4096 + 4 * 14336) + 4 * 4 * 32 * 100 * 100  # activations, scores
    assert every * per_row_all <= 0.6 * free
    bf16 = SimpleNamespace(**{**vars(LLAMA_8B), "dtype": torch.bfloat16})
    assert auto_batch_rows(bf16, 100, True, "all", free_bytes=free) > every
    assert auto_vocab_rows(torch.device("cpu")) == 64 and auto_vocab_rows(LLAMA_8B.device) >= 512


def test_summarize_names_the_dtype_and_the_fix():
    pairs = pd.DataFrame({
        "total": [0.02, 0.5, -0.01], "reference_total": [0.01, 0.4, 0.0005],
        "indirect": [0.0, 0.1, 0.0], "reference_indirect": [0.001, 0.1, 0.0],
        "direct": [0.02, 0.4, -0.01], "reference_direct": [0.02, 0.4, -0.01],
        "max_abs_diff": [0.01, 0.1, 0.0105], "diff_total": [0.01, 0.1, 0.0105]})
    for name in RELATIVE_METRICS:
        pairs[f"relative_error_{name}"] = relative_errors(pairs[name].to_numpy(),
                                                          pairs[f"reference_{name}"].to_numpy(),
                                                          1e-3)
    summary = summarize(pairs, "bfloat16", "float32", 5e-2, 0.05, 1e-3)
    assert summary["relative_error"]["total"] == pytest.approx(0.625)  # median of 1.0, 0.25
    assert summary["pairs_above_floor"] == {"direct": 3, "indirect": 2, "total": 2}
    assert summary["rows_off_10pct"] == 1.0 and summary["passed"] is False
    assert "bfloat16" in summary["failure"] and "dtype: float32" in summary["failure"]
    banner = precision_banners({**summary, "dtype_warning": low_precision_warning("bfloat16")})
    assert 'class="banner"' in banner and "dtype: float32" in banner and "bfloat16" in banner
    exact = pairs.assign(**{column: 0.0 for column in pairs if column.startswith(
        ("relative_error_", "diff_", "max_abs"))})
    passed = summarize(exact, "float32", "float64", 1e-4, 0.05, 1e-3)
    assert passed["passed"] is True and passed["failure"] is None
    assert precision_banners({**passed, "dtype_warning": None}) == ""


def _run_table(model: LlamaFamily, tokenizer, per_layer: int, seed: int):
    prepared = prepare_prompt(tokenizer, PromptRecord("p", PROMPT, " Fleming", " Pasteur", 1))
    clean = run_clean(model, prepared.input_ids, "p")
    block = neuron_block(model, random_neurons(model, per_layer, seed), True)
    frame = compute_effects(model, clean, block, EffectSettings(), prepared.target_id,
                            prepared.distractor_id).per_prompt
    return frame.assign(prompt_id="p", target_id=prepared.target_id,
                        distractor_id=prepared.distractor_id), clean, prepared


@pytest.mark.slow
def test_float32_run_agrees_with_float64_reference(smollm2):
    """The float32 fast path against the float64 reference path on the same weights: every
    checked column within the derived tolerance, median relative error of total and indirect far below 1e-3."""
    model, tokenizer = smollm2
    reference = LlamaFamily(cast_parameters(copy.deepcopy(model.causal_lm), torch.float64))
    table, _, prepared = _run_table(model, tokenizer, 1, seed=3)
    clean = run_clean(reference, prepared.input_ids, "p")
    tolerance = float32_error_bound(logit_scale(clean.logits))
    rows = []
    for _, row in table.iterrows():
        reference_row = reference_metrics(reference, clean, row, "add", "last", True, 10,
                                          tolerance)
        differences = absolute_differences(row, reference_row, tolerance)
        assert set(differences) <= set(CHECKED) and max(differences.values()) <= tolerance, row
        rows.append({**{name: row[name] for name in RELATIVE_METRICS},
                     **{f"reference_{name}": reference_row.values[name]
                        for name in RELATIVE_METRICS},
                     "max_abs_diff": max(differences.values()),
                     **{f"diff_{name}": value for name, value in differences.items()}})
    pairs = pd.DataFrame(rows)
    for name in RELATIVE_METRICS:
        pairs[f"relative_error_{name}"] = relative_errors(pairs[name].to_numpy(),
                                                          pairs[f"reference_{name}"].to_numpy(),
                                                          10 * tolerance)
    summary = summarize(pairs, "float32", "float64", tolerance, 0.05, 10 * tolerance)
    assert summary["passed"] is True
    assert summary["pairs_above_floor"]["total"] >= 15
    assert summary["relative_error"]["total"] < 1e-3
    assert summary["relative_error"]["indirect"] < 1e-3
    assert summary["rows_off_10pct"] == 0.0


@pytest.mark.slow
def test_bf16_run_fails_validation_naming_the_dtype(smollm2, prepared_demo_model, tmp_path,
                                                    caplog):
    """A bf16 run's table (the fast path on SmolLM2 in bf16), checked by the validation step:
    the float32 reference on the same bf16 weights finds it mostly rounding noise."""
    model, tokenizer = smollm2
    bf16 = LlamaFamily(cast_parameters(copy.deepcopy(model.causal_lm), torch.bfloat16))
    table, clean, _ = _run_table(bf16, tokenizer, 1, seed=3)
    per_prompt = tmp_path / "per_prompt.parquet"
    store.write_parquet(per_prompt, table)
    clean_path = tmp_path / "c000.safetensors"
    save_clean_runs(clean_path, [clean.to(torch.device("cpu"))], [{"prompt_id": "p"}])
    spec = ModelSpec(str(prepared_demo_model), dtype="bfloat16", device="cpu")
    summary_path = tmp_path / "summary.json"
    with caplog.at_level(logging.INFO, logger="neuron_effects"):
        validate_sample(spec, [str(clean_path)], str(per_prompt), EffectSettings(), 16, 0, None,
                        0.05, str(tmp_path / "pairs.parquet"), str(summary_path))
    summary = json.loads(summary_path.read_text())
    assert summary["dtype"] == "bfloat16" and summary["reference_dtype"] == "float32"
    assert summary["passed"] is False and summary["relative_error"]["total"] > 0.1
    assert summary["rows_off_10pct"] > 0.5
    assert "bfloat16" in summary["failure"] and "dtype: float32" in summary["failure"]
    assert summary["precision_flags"]["float32_matmul_precision"] == "highest"
    assert "dtype bfloat16" in summary["dtype_warning"]
    assert "validation FAILED" in caplog.records[-1].getMessage()
    pairs = pd.read_parquet(tmp_path / "pairs.parquet")
    assert len(pairs) == 16 and pairs["layer"].nunique() == 16
