"""One function per workflow step: read files, call the math, write files atomically.

The Snakemake scripts in ``workflow/scripts/`` are thin wrappers around these, and the functions
work without Snakemake too (tests call them directly).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import aggregate, attribution, store
from .clean import run_clean
from .effects import EffectSettings, compute_effects, neuron_block
from .inputs import InputError, Neuron, load_profile_document, read_neurons, read_prompts
from .model import (ModelSpec, check_neurons, check_prompt_length, load_config, load_model,
                    load_tokenizer)
from .prompts import prepare_prompt
from .validation import compare_with_reference, sample_pairs

log = logging.getLogger("neuron_effects")

# Progress bars go to the job's log (stderr); update them at most every few seconds there.
PROGRESS = {"mininterval": 5.0, "dynamic_ncols": False, "ncols": 100}
# Prompt-level columns copied from the clean cache into every per-prompt row.
PROMPT_COLUMNS = ("prompt_id", "target_id", "target_token", "target_source", "distractor_id",
                  "distractor_token")


def configure_job(threads: int) -> None:
    """Log INFO and warnings to stderr (the job's log) and use ``threads`` CPU threads."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.captureWarnings(True)
    torch.set_num_threads(max(1, threads))


def prepare_inputs(
    neurons_path: str, prompts_path: str, spec: ModelSpec, chat_template: bool,
    system_prompt: str | None, prompts_out: str, neurons_out: str,
) -> None:
    """Validate both input files against the model (config and tokenizer only, no weights) and
    write the prepared prompts (token ids, targets resolved in context) and the neuron table."""
    neurons = read_neurons(neurons_path)
    records = read_prompts(prompts_path)
    config = load_config(spec)
    check_neurons(config, neurons, neurons_path)
    tokenizer = load_tokenizer(spec)
    rows = []
    for record in records:
        try:
            prepared = prepare_prompt(tokenizer, record, chat_template, system_prompt)
        except InputError as error:  # name the file too, as the parse-time checks do
            raise InputError(f"{prompts_path}: {error}") from error
        check_prompt_length(config, len(prepared.input_ids),
                            f"{prompts_path}: line {record.line}: prompt {record.prompt_id!r}")
        for warning in prepared.warnings:
            log.warning("prompt %r: %s", record.prompt_id, warning)
        rows.append({
            "prompt_id": prepared.prompt_id, "prompt": record.prompt, "text": prepared.text,
            "n_tokens": len(prepared.input_ids), "input_ids": prepared.input_ids,
            "target": prepared.target, "target_id": prepared.target_id,
            "distractor": prepared.distractor, "distractor_id": prepared.distractor_id,
            "warnings": prepared.warnings,
        })
    frame = pd.DataFrame(rows).astype({"target_id": "Int64", "distractor_id": "Int64"})
    store.write_parquet(prompts_out, frame)
    store.write_parquet(neurons_out, pd.DataFrame([vars(n) for n in neurons]))
    log.info("%d prompts (%d-%d tokens) and %d neurons validated", len(frame),
             frame["n_tokens"].min(), frame["n_tokens"].max(), len(neurons))


def cache_clean_runs(spec: ModelSpec, prompts_table: str, prompt_ids: Sequence[str],
                     output: str) -> None:
    """One clean forward per prompt of the chunk; saves the runs and, per prompt, the target
    (given, or the clean argmax), the distractor and the clean prediction."""
    table = pd.read_parquet(prompts_table).set_index("prompt_id")
    model = load_model(spec)
    tokenizer = load_tokenizer(spec)
    runs, records = [], []
    for prompt_id in tqdm(prompt_ids, desc="clean forwards", **PROGRESS):
        row = table.loc[prompt_id]
        run = run_clean(model, list(row["input_ids"]), prompt_id)
        probabilities = run.logits.softmax(-1)
        top = int(run.logits.argmax())
        given = not pd.isna(row["target_id"])
        target = int(row["target_id"]) if given else top
        distractor = None if pd.isna(row["distractor_id"]) else int(row["distractor_id"])
        records.append({
            "prompt_id": prompt_id, "n_tokens": run.n_tokens,
            "target_id": target, "target_token": tokenizer.decode([target]),
            "target_source": "given" if given else "argmax",
            "distractor_id": distractor,
            "distractor_token": None if distractor is None else tokenizer.decode([distractor]),
            "clean_top_token": tokenizer.decode([top]),
            "clean_top_prob": float(probabilities[top]),
            "clean_target_prob": float(probabilities[target]),
            "clean_target_rank": int((run.logits > run.logits[target]).sum()) + 1,
        })
        runs.append(run.to(torch.device("cpu")))
    store.save_clean_runs(output, runs, records)


def extract_activations(clean_paths: Sequence[str], activations_out: str, stats_out: str,
                        active_threshold: float) -> None:
    """Activations of every neuron of every layer at the last position, per prompt
    ([prompts, layers, intermediate] float32), and per-neuron statistics over the prompts:
    mean, std, mean |a|, fraction positive, fraction with |a| > ``active_threshold``, and the mean
    over all positions of all prompts (for ``mean_ablate`` with ``positions: all``)."""
    activations, sums, prompt_ids, n_tokens = [], [], [], 0
    for path in clean_paths:
        runs, _ = store.load_clean_runs(path)
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


def _mean_activations(stats_path: str, positions: str, n_layers: int, width: int) -> torch.Tensor:
    stats = pd.read_parquet(stats_path)
    column = "mean" if positions == "last" else "mean_all_positions"
    return torch.tensor(stats[column].to_numpy(), dtype=torch.float32).reshape(n_layers, width)


def estimate_attribution(spec: ModelSpec, clean_path: str, treatment: str, positions: str,
                         output: str, neuron_stats: str | None = None) -> None:
    """First-order estimates of every neuron of every layer on each prompt of a clean chunk
    (:mod:`neuron_effects.attribution`): one forward and one backward per prompt, for the target
    recorded by the clean run; saved as [prompts, layers, intermediate] float32 with the prompt
    ids in the metadata."""
    runs, records = store.load_clean_runs(clean_path)
    model = load_model(spec)
    means = None
    if treatment == "mean_ablate":
        if neuron_stats is None:
            raise InputError("treatment mean_ablate needs the activation statistics")
        means = _mean_activations(neuron_stats, positions, model.n_layers,
                                  model.intermediate_size).to(model.device)
    estimates = []
    for run, record in tqdm(list(zip(runs, records)), desc="forward + backward", **PROGRESS):
        started = time.perf_counter()
        projections, _ = attribution.neuron_gradients(model, run.input_ids, record["target_id"],
                                                      positions)
        if positions == "all":  # every position's activation of every layer
            clean = run_clean(model, run.input_ids, record["prompt_id"], range(model.n_layers))
            activations = torch.stack([clean.full_activations[layer]
                                       for layer in range(model.n_layers)])
        else:
            activations = run.activations
        estimates.append(attribution.first_order_estimates(
            projections, activations.to(model.device), treatment, means).cpu())
        log.info("prompt %s (%d tokens): estimates in %.2f s", record["prompt_id"],
                 run.n_tokens, time.perf_counter() - started)
    metadata = {"prompt_ids": json.dumps([record["prompt_id"] for record in records]),
                "target_ids": json.dumps([record["target_id"] for record in records]),
                "treatment": treatment, "positions": positions}
    with store.atomic_path(output) as temporary:
        save_file({"estimates": torch.stack(estimates).contiguous()}, str(temporary),
                  metadata=metadata)


def _load_estimates(path: str) -> tuple[torch.Tensor, list[str]]:
    """An estimates file's [prompts, layers, intermediate] tensor and its prompt ids."""
    with safe_open(path, framework="pt") as handle:
        prompt_ids = json.loads(handle.metadata()["prompt_ids"])
    return load_file(path)["estimates"], prompt_ids


def summarize_attribution(chunk_paths: Sequence[str], profile_path: str, n_candidates: int,
                          estimates_out: str, neurons_out: str, candidates_out: str) -> None:
    """Stack the chunks' estimates ([prompts, layers, intermediate], prompt ids in the metadata)
    and write the all-neuron table and the top ``n_candidates`` neurons outside the profile
    file."""
    parts = [_load_estimates(path) for path in chunk_paths]
    estimates = torch.cat([part[0] for part in parts])
    prompt_ids = [prompt_id for part in parts for prompt_id in part[1]]
    with store.atomic_path(estimates_out) as temporary:
        save_file({"estimates": estimates.contiguous()}, str(temporary),
                  metadata={"prompt_ids": json.dumps(prompt_ids)})
    profile = pd.DataFrame([vars(neuron) for neuron in read_neurons(profile_path)])
    table = attribution.neuron_table(estimates.numpy(), profile)
    store.write_parquet(neurons_out, table)
    store.write_parquet(candidates_out, attribution.candidates(table, n_candidates))
    log.info("%d prompts x %d neurons; %d of the top %d by mean |estimate| are studied neurons",
             len(prompt_ids), len(table), int(table["in_profile"].head(n_candidates).sum()),
             n_candidates)


def _with_estimates(per_prompt: pd.DataFrame, estimates_path: str) -> pd.DataFrame:
    """``total_atp`` (the estimate of the row's prompt and neuron) and ``indirect_atp`` (=
    total_atp - direct) inserted after ``total``."""
    estimates, prompt_ids = _load_estimates(estimates_path)
    index = {prompt_id: position for position, prompt_id in enumerate(prompt_ids)}
    total_atp = estimates.numpy()[per_prompt["prompt_id"].map(index).to_numpy(),
                                  per_prompt["layer"].to_numpy(), per_prompt["neuron"].to_numpy()]
    where = per_prompt.columns.get_loc("total") + 1
    per_prompt = per_prompt.copy()
    per_prompt.insert(where, "total_atp", total_atp.astype(np.float64))
    per_prompt.insert(where + 1, "indirect_atp", per_prompt["total_atp"] - per_prompt["direct"])
    return per_prompt


def compute_shard(
    spec: ModelSpec, clean_path: str, neuron_table: Sequence[Sequence[Any]],
    settings: EffectSettings, output: str, partial_root: str, fingerprint: str,
    neuron_stats: str | None = None, neurons_per_block: int = 2048,
) -> None:
    """Effects of the shard's neurons on the chunk's prompts, resumable unit by unit.

    A unit is (neuron block, prompt); each finished unit is saved atomically under
    ``partial_root/fingerprint`` and skipped when the shard is restarted; the output is assembled
    from the units at the end.
    """
    runs, records = store.load_clean_runs(clean_path)
    neurons = [Neuron(str(i), int(layer), int(n)) for i, layer, n in neuron_table]
    blocks = [neurons[start:start + neurons_per_block]
              for start in range(0, len(neurons), neurons_per_block)]
    units = {(b, p): f"n{b:03d}_p{p:05d}" for b in range(len(blocks)) for p in range(len(runs))}
    progress = store.ShardProgress(partial_root, fingerprint)
    todo = [key for key, name in units.items() if not progress.is_done(name)]
    log.info("shard: %d neurons x %d prompts in %d units; %d already done (resuming)",
             len(neurons), len(runs), len(units), len(units) - len(todo))
    if todo:
        model = load_model(spec)
        means = None
        if settings.treatment == "mean_ablate":
            if neuron_stats is None:
                raise InputError("treatment mean_ablate needs the activation statistics")
            means = _mean_activations(neuron_stats, settings.positions, model.n_layers,
                                      model.intermediate_size)
        layers = sorted({n.layer for n in neurons})
        bar = tqdm(total=sum(len(blocks[b]) for b, _ in todo), desc="treated rows", unit="row",
                   **PROGRESS)
        for b, members in enumerate(blocks):
            pending = [p for block_index, p in todo if block_index == b]
            if not pending:
                continue
            block = neuron_block(model, members, settings.full_vocab)
            for p in pending:
                record, clean = records[p], runs[p]
                if settings.positions == "all":  # needs every position of the shard's layers
                    clean = run_clean(model, clean.input_ids, record["prompt_id"], layers)
                started = time.perf_counter()
                frame = compute_effects(model, clean.to(model.device), block, settings,
                                        record["target_id"], record["distractor_id"], means)
                frame = frame.assign(**{key: record[key] for key in PROMPT_COLUMNS})
                progress.save(units[b, p], frame)
                bar.update(len(members))
                log.info("unit %s (%s): %d rows in %.2f s", units[b, p], record["prompt_id"],
                         len(members), time.perf_counter() - started)
        bar.close()
    progress.assemble(list(units.values()), output)


def _ordered_columns(frame: pd.DataFrame) -> pd.DataFrame:
    first = ["prompt_id", "neuron_id", "layer", "neuron", "activation", "scale", "target_id",
             "target_token", "target_source", "distractor_id", "distractor_token", "direct",
             "indirect", "total", "direct_frozen_norm", "norm_mediated", "direct_ratio",
             "cancellation", "sign_aligned", "ratio_defined", "direct_ratio_frozen_norm"]
    return frame[first + [c for c in frame.columns if c not in first]]


def aggregate_effects(
    shard_paths: Sequence[str], prompts_table: str, clean_paths: Sequence[str],
    profile_path: str, thresholds: aggregate.Thresholds, per_prompt_out: str, neurons_out: str,
    neurons_json_out: str, layers_out: str, prompts_out: str, labels_out: str,
    estimates_path: str | None = None,
) -> None:
    """Merge the shards into the long table and write the neuron, layer, prompt and label
    summaries; with ``estimates_path`` (attribution patching), also the estimates
    (``total_atp``, ``indirect_atp``) and their agreement with the exact effects."""
    per_prompt = pd.concat([pd.read_parquet(path) for path in shard_paths], ignore_index=True)
    prompts = pd.read_parquet(prompts_table).drop(columns=["target_id", "distractor_id"])
    clean = pd.DataFrame([record for path in clean_paths
                          for record in store.load_clean_records(path)])
    store.write_parquet(prompts_out, prompts.merge(clean, on="prompt_id", how="inner"))
    order = {prompt_id: index for index, prompt_id in enumerate(prompts["prompt_id"])}
    per_prompt = _ordered_columns(per_prompt.assign(_order=per_prompt["prompt_id"].map(order))
                                  .sort_values(["layer", "neuron", "_order"], ignore_index=True)
                                  .drop(columns="_order"))
    duplicated = per_prompt.duplicated(["prompt_id", "neuron_id"])
    if duplicated.any():
        raise RuntimeError(f"{int(duplicated.sum())} duplicated (prompt, neuron) rows in shards")
    neurons = aggregate.summarize_neurons(per_prompt, thresholds)
    layers = aggregate.summarize_layers(neurons, per_prompt)
    if estimates_path is not None:
        per_prompt = _with_estimates(per_prompt, estimates_path)
        neurons = neurons.merge(attribution.neuron_agreement(per_prompt), on="neuron_id")
        layers = layers.merge(attribution.layer_agreement(per_prompt), on="layer")
    store.write_parquet(per_prompt_out, per_prompt)
    store.write_parquet(neurons_out, neurons)
    store.write_json(neurons_json_out, aggregate.neuron_documents(neurons, per_prompt))
    store.write_parquet(layers_out, layers)
    document = load_profile_document(profile_path)
    store.write_json(labels_out, aggregate.enrich_profiles(document, neurons))


def validate_sample(
    spec: ModelSpec, clean_paths: Sequence[str], per_prompt_path: str, settings: EffectSettings,
    n_pairs: int, seed: int, tolerance: float | None, table_out: str, summary_out: str,
) -> None:
    """Compare ``n_pairs`` sampled rows of the fast path with the reference paths; write the
    per-pair differences and a summary (max difference per metric, pass/fail)."""
    model = load_model(spec)
    if tolerance is None:  # float32 noise is ~1e-5 on logits; bf16 rounds at ~1e-2 relative
        tolerance = 1e-4 if model.dtype == torch.float32 else 5e-2
    runs = {run.prompt_id: run for path in clean_paths for run in store.load_clean_runs(path)[0]}
    pairs = sample_pairs(pd.read_parquet(per_prompt_path), n_pairs, seed)
    rows = []
    for _, row in tqdm(list(pairs.iterrows()), desc="reference forwards", **PROGRESS):
        clean = runs[row["prompt_id"]]
        if settings.positions == "all":
            clean = run_clean(model, clean.input_ids, row["prompt_id"], [int(row["layer"])])
        differences = compare_with_reference(model, clean.to(model.device), row,
                                             settings.treatment, settings.positions,
                                             settings.full_vocab, settings.top_k,
                                             settings.noise_floor)
        rows.append({"prompt_id": row["prompt_id"], "neuron_id": row["neuron_id"],
                     "layer": int(row["layer"]), "total": float(row["total"]),
                     "max_abs_diff": max(differences.values()),
                     **{f"diff_{name}": value for name, value in differences.items()}})
    table = pd.DataFrame(rows)
    store.write_parquet(table_out, table)
    per_metric = {column[len("diff_"):]: float(table[column].max())
                  for column in table.columns if column.startswith("diff_")}
    summary = {
        "n_pairs": len(table), "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device), "tolerance": tolerance,
        "max_abs_diff": float(table["max_abs_diff"].max()), "max_abs_diff_by_metric": per_metric,
        "passed": bool(table["max_abs_diff"].max() <= tolerance),
    }
    store.write_json(summary_out, summary)
    if not summary["passed"]:
        log.warning("validation FAILED: max |fast - reference| = %.3g > tolerance %.3g",
                    summary["max_abs_diff"], tolerance)


def _timings(benchmark_paths: Sequence[str]) -> tuple[pd.DataFrame, float]:
    """Seconds and peak memory per rule from Snakemake's benchmark files (``benchmarks/<rule>/
    ...``), and the seconds from the first benchmarked job's start until now."""
    rows, first_start = [], time.time()
    for path in benchmark_paths:
        if not Path(path).exists():
            continue
        values = pd.read_csv(path, sep="\t").iloc[0]
        rule = Path(path).relative_to("benchmarks").parts[0]
        rows.append({"rule": rule, "s": float(values["s"]), "max_rss_mb": values["max_rss"]})
        first_start = min(first_start, Path(path).stat().st_mtime - float(values["s"]))
    if not rows:
        return pd.DataFrame(), 0.0
    frame = pd.DataFrame(rows).replace("-", np.nan)
    frame["max_rss_mb"] = pd.to_numeric(frame["max_rss_mb"])
    table = frame.groupby("rule", sort=False).agg(jobs=("s", "size"), total_s=("s", "sum"),
                                                  max_job_s=("s", "max"),
                                                  peak_rss_mb=("max_rss_mb", "max"))
    return table.reset_index(), time.time() - first_start


def render_report(
    settings: dict[str, Any], per_prompt_path: str, neurons_path: str, layers_path: str,
    prompts_path: str, activation_stats_path: str, validation_table: str,
    validation_summary: str, benchmark_paths: Sequence[str], top_n: int, output: str,
    atp_candidates: str | None = None,
) -> None:
    """Write the self-contained HTML report (with the attribution-patching section when
    ``atp_candidates`` is given)."""
    import platform

    import transformers

    from . import __version__
    from .report import render_report as render

    validation = json.loads(Path(validation_summary).read_text())
    timings, wall = _timings(benchmark_paths)
    metadata = {
        **settings, "dtype": validation["dtype"], "device": validation["device"],
        "wall time (first heavy job to report)": f"{wall:.0f} s",
        "versions": f"neuron_effects {__version__}, torch {torch.__version__}, transformers "
                    f"{transformers.__version__}, Python {platform.python_version()}",
    }
    stats = pd.read_parquet(activation_stats_path, columns=["layer", "neuron", "frac_active"])
    neurons = pd.read_parquet(neurons_path).merge(stats, on=["layer", "neuron"], how="left")
    page = render(metadata, pd.read_parquet(per_prompt_path), neurons,
                  pd.read_parquet(layers_path), pd.read_parquet(prompts_path), validation,
                  pd.read_parquet(validation_table), timings, top_n,
                  None if atp_candidates is None else pd.read_parquet(atp_candidates))
    store.write_text(output, page)
