"""Rules cache_clean_runs and extract_activations: one clean forward per prompt, and the
activations of every neuron at the last position with their statistics.

Reads: the prepared prompts (a chunk of them), the clean runs
(``results/clean/<chunk>.safetensors``) and the clean-run cache (``<cache>/clean/``). Writes: the
chunk's clean runs, the cache's new entries, ``results/activations/activations.safetensors`` and
``results/activations/neuron_stats.parquet``.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .. import cache, store
from ..clean import load_clean_runs, run_clean, save_clean_runs
from ..model import ModelSpec, load_tokenizer
from ..targets import check_target_ranks
from .setup import PROGRESS, load_model_logged, log, model_cache_key


def cache_clean_runs(spec: ModelSpec, prompts: Sequence[dict[str, Any]], output: str,
                     max_rank: int = 100, on_low_rank: str = "warn",
                     cache_root: str | None = None,
                     prompt_format: Mapping[str, Any] | None = None) -> None:
    """One clean forward per prepared prompt of the chunk (``prompt_id``, ``input_ids``,
    ``target_id`` and ``distractor_id``, ``None`` when not given); saves the runs and, per prompt,
    the target (given, or the clean argmax), the distractor and the clean prediction. Given
    targets ranked below the top ``max_rank`` are logged, or stop the job
    (:func:`neuron_effects.targets.check_target_ranks`).

    With ``cache_root``, each prompt's run is cached under ``<cache_root>/clean/`` by the model,
    its token ids, target, distractor and ``prompt_format`` (:mod:`neuron_effects.cache`): only
    the prompts not found are computed, and the model is not loaded when none is missing."""
    folder = None if cache_root is None else Path(cache_root) / "clean"
    keys = [None] * len(prompts)
    if folder is not None:
        model_key = model_cache_key(spec, cache_root)
        keys = [cache.key("clean", model_key, list(map(int, row["input_ids"])), row["target_id"],
                          row["distractor_id"], prompt_format) for row in prompts]
    found = {key for key in keys
             if key is not None and cache.verified_manifest(cache_root, folder, key)}
    missing = [row for row, key in zip(prompts, keys) if key not in found]
    log.info("prompts computed: %d, reused: %d", len(missing), len(prompts) - len(missing))
    if missing:
        model = load_model_logged(spec)
        tokenizer = load_tokenizer(spec)
    runs, records = [], []
    for row, key in tqdm(list(zip(prompts, keys)), desc="clean forwards", **PROGRESS):
        prompt_id = row["prompt_id"]
        if key in found:
            [run], [record] = load_clean_runs(folder / f"{key}.safetensors")
            run.prompt_id = record["prompt_id"] = prompt_id
        else:
            run, record = _clean_run(model, tokenizer, row)
            if key is not None:
                cache.write_entry(folder, key, {"safetensors": partial(
                    save_clean_runs, runs=[run], records=[record], atomic=False)}, {})
        runs.append(run)
        records.append(record)
    for line in check_target_ranks(records, max_rank, on_low_rank):
        log.warning("low-ranked target (above targets.max_rank %d): %s", max_rank, line)
    save_clean_runs(output, runs, records)


def _clean_run(model: Any, tokenizer: Any, row: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """One prompt's clean forward (on the CPU afterwards) and its record: the target (given, or
    the clean argmax), the distractor and the clean prediction."""
    prompt_id, started = row["prompt_id"], time.perf_counter()
    run = run_clean(model, list(row["input_ids"]), prompt_id)
    probabilities = run.logits.softmax(-1)
    top = int(run.logits.argmax())
    given = row["target_id"] is not None
    target = int(row["target_id"]) if given else top
    distractor = None if row["distractor_id"] is None else int(row["distractor_id"])
    record = {
        "prompt_id": prompt_id, "n_tokens": run.n_tokens,
        "target_id": target, "target_token": tokenizer.decode([target]),
        "target_source": "given" if given else "argmax",
        "distractor_id": distractor,
        "distractor_token": None if distractor is None else tokenizer.decode([distractor]),
        "clean_top_token": tokenizer.decode([top]),
        "clean_top_prob": float(probabilities[top]),
        "clean_target_prob": float(probabilities[target]),
        "clean_target_rank": int((run.logits > run.logits[target]).sum()) + 1,
    }
    log.info("prompt %s (%d tokens): clean forward in %.2f s", prompt_id, run.n_tokens,
             time.perf_counter() - started)
    return run.to(torch.device("cpu")), record


def extract_activations(clean_paths: Sequence[str], activations_out: str, stats_out: str,
                        active_threshold: float) -> None:
    """Activations of every neuron of every layer at the last position, per prompt
    ([prompts, layers, intermediate] float32), and per-neuron statistics over the prompts:
    mean, std, mean |a|, fraction positive, fraction with |a| > ``active_threshold``, and the mean
    over all positions of all prompts (for ``mean_ablate`` with ``positions: all``)."""
    activations, sums, prompt_ids, n_tokens = [], [], [], 0
    for path in clean_paths:
        runs, _ = load_clean_runs(path)
        for run in runs:
            activations.append(run.activations)
            sums.append(run.activation_sums)
            prompt_ids.append(run.prompt_id)
            n_tokens += run.n_tokens
    stacked = torch.stack(activations)  # [P, L, I]
    with store.atomic_path(activations_out) as temporary:
        save_file({"activations": stacked.contiguous()}, str(temporary),
                  metadata={"prompt_ids": json.dumps(prompt_ids)})
    n_layers, width = stacked.shape[1:]
    values = stacked.double()
    stats = pd.DataFrame({
        "layer": np.repeat(np.arange(n_layers), width),
        "neuron": np.tile(np.arange(width), n_layers),
        "mean": values.mean(0).flatten().numpy(),
        "std": values.std(0, unbiased=False).flatten().numpy(),
        "mean_abs": values.abs().mean(0).flatten().numpy(),
        "frac_positive": (values > 0).double().mean(0).flatten().numpy(),
        "frac_active": (values.abs() > active_threshold).double().mean(0).flatten().numpy(),
        "mean_all_positions": (torch.stack(sums).double().sum(0) / n_tokens).flatten().numpy(),
    })
    store.write_parquet(stats_out, stats)
