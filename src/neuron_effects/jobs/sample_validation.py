"""Rule validate_sample: sampled rows of the run's table recomputed with the reference paths at a
higher precision, on the run's own rounded weights.

Reads: the clean runs, ``results/effects/per_prompt.parquet`` (the sampled rows' row groups only),
``results/validation/non_finite.json`` and the model. Writes:
``results/validation/pairs.parquet`` and ``results/validation/summary.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import store
from ..clean import load_clean_runs, run_clean
from ..effects import EffectSettings
from ..error_scale import (
    ERROR_FACTOR,
    RELATIVE_FLOOR_FACTOR,
    float32_error_bound,
    logit_scale,
    ratio_noise_floor,
)
from ..model import (
    ModelSpec,
    load_config,
    parameter_sizes,
    precision_flags,
    resolve_device,
    resolve_dtype,
)
from ..precision import low_precision_warning
from ..reference import reference_clean_logits
from ..validation import (
    RELATIVE_METRICS,
    absolute_differences,
    forward_working_bytes,
    reference_bytes,
    reference_dtype,
    reference_metrics,
    relative_errors,
    sample_pairs,
    summarize,
)
from .setup import PROGRESS, load_model_logged, log


def _reference_needs(spec: ModelSpec, max_tokens: int) -> int:
    """Bytes the float64 reference model needs for prompts of up to ``max_tokens`` tokens
    (:func:`neuron_effects.validation.reference_bytes`), from the model config alone."""
    config = load_config(spec)
    n_parameters, largest = parameter_sizes(spec)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    working = forward_working_bytes(
        max_tokens, int(config.num_hidden_layers), int(config.hidden_size),
        int(config.intermediate_size),
        int(getattr(config, "num_key_value_heads", None) or heads) * head_dim, heads,
        int(config.vocab_size))
    return reference_bytes(n_parameters, largest, working)


def validate_sample(
    spec: ModelSpec, clean_paths: Sequence[str], per_prompt_path: str, settings: EffectSettings,
    n_pairs: int, seed: int, tolerance: float | None, max_relative_error: float, table_out: str,
    summary_out: str, non_finite_path: str | None = None,
) -> None:
    """Recompute ``n_pairs`` sampled rows of the run's table with the reference paths at a
    higher precision than the run (:func:`neuron_effects.validation.reference_dtype`), on the
    run's own rounded weights; write the per-pair values and differences and a summary (see
    :func:`neuron_effects.validation.summarize`; ``non_finite_path``: the aggregation's count of
    the rows with a non-finite value, any of which fails it). The run's dtype model is not
    loaded: its values are read from ``per_prompt_path``; the clean runs give the prompts' token
    ids and the run's logit scales. ``tolerance`` None: float32's error bound at the largest
    logit scale of the sampled prompts (:mod:`neuron_effects.error_scale`), that scale taken
    from the reference's clean logits (not the run's, whose rounding is what is checked),
    whatever the run's dtype; the ratios' noise floor is the shards' (``settings.noise_floor``,
    or per prompt the bound at the run's scale)."""
    run_dtype = resolve_dtype(spec.dtype)
    run_dtype_name = str(run_dtype).replace("torch.", "")
    device = resolve_device(spec.device)
    runs = {run.prompt_id: run for path in clean_paths for run in load_clean_runs(path)[0]}
    chosen = sample_pairs(pd.read_parquet(per_prompt_path, columns=["layer"]), n_pairs, seed)
    pairs = store.read_rows(per_prompt_path, chosen.index)  # only their row groups are read
    floors = {prompt_id: ratio_noise_floor(settings.noise_floor, runs[prompt_id].logits)
              for prompt_id in pairs["prompt_id"].unique()}
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    needed = _reference_needs(spec, max(run.n_tokens for run in runs.values()))
    compute_dtype, note = reference_dtype(run_dtype, device, needed, free)
    if note:
        log.warning("%s", note)
    model = load_model_logged(spec, compute_dtype)
    clean_logits = {prompt_id: reference_clean_logits(model, runs[prompt_id].input_ids)
                    for prompt_id in floors}
    scales = {prompt_id: logit_scale(logits) for prompt_id, logits in clean_logits.items()}
    derived = tolerance is None
    if derived:
        tolerance = float32_error_bound(max(scales.values()))
    relative_floor = RELATIVE_FLOOR_FACTOR * tolerance
    log.info("%d pairs (%d prompts), run %s, reference %s on %s; tolerance %.3g (%s), "
             "relative errors above %.3g", len(pairs), pairs["prompt_id"].nunique(),
             run_dtype_name, model.dtype, model.device, tolerance,
             "derived" if derived else "validation.tolerance", relative_floor)
    rows = []
    bar = tqdm(total=len(pairs), desc="reference forwards", **PROGRESS)
    for prompt_id, group in pairs.groupby("prompt_id", sort=False):
        started = time.perf_counter()
        full_layers = sorted(set(group["layer"])) if settings.positions == "all" else ()
        clean = run_clean(model, runs[prompt_id].input_ids, prompt_id, full_layers)
        for _, row in group.iterrows():
            reference = reference_metrics(model, clean, row, settings.treatment,
                                          settings.positions, settings.full_vocab,
                                          settings.top_k, floors[prompt_id],
                                          clean_logits[prompt_id])
            differences = absolute_differences(row, reference, tolerance)
            rows.append({
                "prompt_id": prompt_id, "neuron_id": row["neuron_id"], "layer": int(row["layer"]),
                **{name: float(row[name]) for name in RELATIVE_METRICS},
                **{f"reference_{name}": reference.values[name] for name in RELATIVE_METRICS},
                "max_abs_diff": float(np.max(list(differences.values()), initial=0.0)),
                **{f"diff_{name}": value for name, value in differences.items()}})
            bar.update(1)
        log.info("prompt %s: %d pairs in %.2f s", prompt_id, len(group),
                 time.perf_counter() - started)
    bar.close()
    table = pd.DataFrame(rows)
    for name in RELATIVE_METRICS:
        table.insert(6 + RELATIVE_METRICS.index(name), f"relative_error_{name}",
                     relative_errors(table[name].to_numpy(), table[f"reference_{name}"].to_numpy(),
                                     relative_floor))
    store.write_parquet(table_out, table)
    reference_name = str(model.dtype).replace("torch.", "")
    summary = {
        "n_pairs": len(table), "dtype": run_dtype_name, "reference_dtype": reference_name,
        "reference_note": note, "reference_bytes_needed": needed, "free_bytes": free,
        "dtype_warning": low_precision_warning(run_dtype_name),
        "device": str(model.device), "tolerance": tolerance,
        "tolerance_source": (f"derived: {ERROR_FACTOR:g} x float32 eps x max |clean logit| "
                             f"{max(scales.values()):.4g} (reference {reference_name})"
                             if derived
                             else "validation.tolerance"),
        "logit_scale": {"min": min(scales.values()), "max": max(scales.values())},
        "ratio_noise_floor": {"min": min(floors.values()), "max": max(floors.values()),
                              "source": ("derived per prompt" if settings.noise_floor is None
                                         else "metrics.ratio_noise_floor")},
        **summarize(table, run_dtype_name, reference_name, tolerance, max_relative_error,
                    relative_floor, None if non_finite_path is None
                    else json.loads(Path(non_finite_path).read_text())),
        "precision_flags": precision_flags(),
    }
    store.write_json(summary_out, summary)
    relative = summary["relative_error"]
    largest = summary["max_abs_diff"]  # None when a value was NaN or infinite
    log.info("median relative error: total %s, indirect %s, direct %s; rows off by > 10 %%: %s; "
             "max |run - reference| %s (tolerance %.3g)", relative["total"],
             relative["indirect"], relative["direct"], summary["rows_off_10pct"],
             "non-finite" if largest is None else f"{largest:.3g}", tolerance)
    if summary["passed"]:
        log.info("validation PASSED")
    else:
        log.warning("validation FAILED: %s", summary["failure"])
