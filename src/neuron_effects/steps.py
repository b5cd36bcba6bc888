"""One function per workflow step: read files, call the math, write files atomically.

The Snakemake scripts in ``workflow/scripts/`` are thin wrappers around these, and the functions
work without Snakemake too (tests call them directly).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import re
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import aggregate, attribution, cache, mediation, relp, store, verified
from .census import census_columns, layer_ranking_agreement
from .clean import run_clean
from .edges import (EDGE_COLUMNS, edge_agreement, edge_table, measurable_targets,
                    neuron_target_weights, read_edges, real_edges)
from .effects import EffectSettings, EffectTables, compute_effects, neuron_block
from .input_checks import checked_inputs
from .inputs import (InputError, Neuron, extra_columns, load_profile_document, read_neurons,
                     read_profile_scores)
from .error_scale import (ERROR_FACTOR, RELATIVE_FLOOR_FACTOR, float32_error_bound, logit_scale,
                          ratio_noise_floor)
from .model import (CUDA_UNUSABLE, CudaUnusableError, ModelSpec, load_config, load_model, load_tokenizer,
                    parameter_sizes, precision_flags, resolve_device, resolve_dtype)
from .precision import low_precision_warning
from .prepare import model_digest
from .products import use_products
from .profile_scores import judge_profile_scores as judged_scores
from .reference import reference_clean_logits
from .targets import check_target_ranks, is_low_rank
from .targets import describe as describe_target
from .validation import (RELATIVE_METRICS, absolute_differences, forward_working_bytes,
                         reference_bytes, reference_dtype, reference_metrics, relative_errors,
                         sample_pairs, summarize)

log = logging.getLogger("neuron_effects")

# Progress bars go to the job's log (stderr); update them at most every few seconds there.
PROGRESS = {"mininterval": 5.0, "dynamic_ncols": False, "ncols": 100}
# The columns of the prepared prompt table, in order; the user's own prompt fields follow them.
PREPARED_COLUMNS = ("prompt_id", "prompt", "text", "n_tokens", "input_ids", "target",
                    "target_id", "distractor", "distractor_id", "warnings")
# The long table's columns that the report reads (with every estimate's total_<method>).
REPORT_COLUMNS = ("prompt_id", "neuron_id", "layer", "direct", "indirect", "total",
                  "direct_ratio", "ratio_defined")
# Rows of partial mediator sums held before they are added up (the aggregation's memory for the
# top-k table stays about three times the size of its per-neuron sums).
MEDIATOR_ROWS_HELD = 1_000_000
# Prompt-level columns copied from the clean cache into every per-prompt row.
PROMPT_COLUMNS = ("prompt_id", "target_id", "target_token", "target_source", "distractor_id",
                  "distractor_token")


def _log_peak_gpu_memory() -> None:
    if torch.cuda.is_initialized():
        log.info("peak GPU memory %.3f GiB allocated, %.3f GiB reserved",
                 torch.cuda.max_memory_allocated() / 2**30,
                 torch.cuda.max_memory_reserved() / 2**30)


def _record_cuda_unusable(kind: type, error: BaseException, trace: Any) -> None:
    """The job's excepthook: a :class:`CudaUnusableError` is written to :data:`CUDA_UNUSABLE`
    before the usual traceback."""
    if isinstance(error, CudaUnusableError):
        CUDA_UNUSABLE.parent.mkdir(parents=True, exist_ok=True)
        staging = CUDA_UNUSABLE.with_suffix(".tmp")
        staging.write_text(f"{error}\n")
        staging.replace(CUDA_UNUSABLE)
    sys.__excepthook__(kind, error, trace)


def configure_job(threads: int) -> None:
    """Log INFO and warnings to stderr (the job's log), use ``threads`` CPU threads, log the
    job's fixed cost so far (its start-up: Python and the imports), and log the peak GPU memory
    allocated and reserved when the job ends (if it used CUDA); an unusable CUDA is recorded
    in :data:`CUDA_UNUSABLE`, so that the job is not retried."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.captureWarnings(True)
    torch.set_num_threads(max(1, threads))
    atexit.register(_log_peak_gpu_memory)
    sys.excepthook = _record_cuda_unusable
    log_fixed_cost()


# The line each job logs when its own work starts (the report reads the last one of each log).
FIXED_COST = re.compile(r"fixed cost: ([0-9.]+) s since the job's process started")


def log_fixed_cost() -> None:
    """Log the seconds since this process started: what the job spent before its own work
    (start-up; in a model job, also loading the model, logged again after the load)."""
    started = psutil.Process().create_time()
    log.info("fixed cost: %.2f s since the job's process started", time.time() - started)


def _load_model(spec: ModelSpec, compute_dtype: torch.dtype | None = None) -> Any:
    """:func:`~neuron_effects.model.load_model`, then the job's fixed cost logged."""
    model = load_model(spec, compute_dtype=compute_dtype)
    log_fixed_cost()
    return model


def prepare_inputs(
    neurons_path: str, prompts_path: str, spec: ModelSpec, chat_template: bool,
    system_prompt: str | None, prompts_out: str, neurons_out: str, cache_dir: str | None = None,
    response_prefix: str = "",
) -> None:
    """Validate both input files against the model (config and tokenizer only, no weights;
    reusing the parse-time checks cached in ``cache_dir``) and write the prepared prompts (the
    user's records with token ids and targets resolved in context) and the neuron table."""
    warning = low_precision_warning(spec.dtype)
    if warning:
        log.warning("%s", warning)
    checked = checked_inputs(neurons_path, prompts_path, asdict(spec), chat_template,
                             system_prompt, cache_dir, response_prefix)
    for row in checked.prepared:
        for warning in row["warnings"]:
            log.warning("prompt %r: %s", row["prompt_id"], warning)
    records = pd.DataFrame([{"prompt_id": r.prompt_id, "prompt": r.prompt, "target": r.target,
                             "distractor": r.distractor} for r in checked.records])
    prepared = pd.DataFrame(checked.prepared).drop(columns="prompt_id")
    frame = pd.concat([records, prepared, pd.DataFrame(extra_columns(checked.records))], axis=1)
    frame = frame[[*PREPARED_COLUMNS, *(c for c in frame.columns if c not in PREPARED_COLUMNS)]]
    frame = frame.astype({"target_id": "Int64", "distractor_id": "Int64"})
    store.write_parquet(prompts_out, frame)
    store.write_parquet(neurons_out, pd.DataFrame([vars(n) for n in checked.neurons]))
    log.info("%d prompts (%d-%d tokens) and %d neurons validated", len(frame),
             frame["n_tokens"].min(), frame["n_tokens"].max(), len(checked.neurons))


def _model_key(spec: ModelSpec, cache_root: str | None) -> list[str]:
    """The model part of every cache key: its weights digest (recorded when it was prepared;
    a local folder's files hashed once, the digests kept in ``<cache_root>/model-digests``) and
    the dtype it runs in."""
    cache_dir = None if cache_root is None else Path(cache_root) / "model-digests"
    return [model_digest(spec.model, cache_dir), str(resolve_dtype(spec.dtype))]


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
        model_key = _model_key(spec, cache_root)
        keys = [cache.key("clean", model_key, list(map(int, row["input_ids"])), row["target_id"],
                          row["distractor_id"], prompt_format) for row in prompts]
    found = {key for key in keys
             if key is not None and cache.verified_manifest(cache_root, folder, key)}
    missing = [row for row, key in zip(prompts, keys) if key not in found]
    log.info("prompts computed: %d, reused: %d", len(missing), len(prompts) - len(missing))
    if missing:
        model = _load_model(spec)
        tokenizer = load_tokenizer(spec)
    runs, records = [], []
    for row, key in tqdm(list(zip(prompts, keys)), desc="clean forwards", **PROGRESS):
        prompt_id = row["prompt_id"]
        if key in found:
            [run], [record] = store.load_clean_runs(folder / f"{key}.safetensors")
            run.prompt_id = record["prompt_id"] = prompt_id
        else:
            run, record = _clean_run(model, tokenizer, row)
            if key is not None:
                cache.write_entry(folder, key, {"safetensors": partial(
                    store.save_clean_runs, runs=[run], records=[record], atomic=False)}, {})
        runs.append(run)
        records.append(record)
    for line in check_target_ranks(records, max_rank, on_low_rank):
        log.warning("low-ranked target (above targets.max_rank %d): %s", max_rank, line)
    store.save_clean_runs(output, runs, records)


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


def _mean_activations(stats_path: str | None, treatment: str, positions: str
                      ) -> tuple[torch.Tensor | None, str | None]:
    """``mean_ablate``'s prompt-set means [n_layers, intermediate] (over the last positions, or
    all positions with ``positions: all``) and their digest (a part of the cache keys); None
    and None for the other treatments."""
    if treatment != "mean_ablate":
        return None, None
    if stats_path is None:
        raise InputError("treatment mean_ablate needs the activation statistics")
    stats = pd.read_parquet(stats_path).sort_values(["layer", "neuron"])
    column = "mean" if positions == "last" else "mean_all_positions"
    values = stats[column].to_numpy(np.float32)
    means = torch.from_numpy(values.copy()).reshape(int(stats["layer"].max()) + 1, -1)
    return means, hashlib.sha256(values.tobytes()).hexdigest()


def estimate_attribution(spec: ModelSpec, clean_path: str, treatment: str, positions: str,
                         output: str, neuron_stats: str | None = None,
                         methods: dict[str, Sequence[str]] | None = None,
                         cache_root: str | None = None) -> None:
    """First-order estimates of every neuron of every layer on each prompt of a clean chunk
    (:mod:`neuron_effects.attribution`): one forward per prompt, then one backward per method
    (``methods``: name -> RelP rules, empty for the plain gradient; default AtP alone), for the
    target recorded by the clean run. Saved as [prompts, layers, intermediate] float32 per method
    (:func:`estimates_key`), with ``gradient``: the plain ``d logit_target / d a`` of every neuron
    at the last position (what the edge weights need), and the prompt ids in the metadata.

    With ``cache_root``, each prompt's estimates are cached under ``<cache_root>/attribution/``
    by the model, the prompt's token ids and target, the treatment (and its means), positions
    and methods: only the prompts not found are computed (the model is loaded only then)."""
    methods = {"atp": ()} if methods is None else dict(methods)
    runs, records = store.load_clean_runs(clean_path)
    means, means_digest = _mean_activations(neuron_stats, treatment, positions)
    folder = None if cache_root is None else Path(cache_root) / "attribution"
    keys = [None] * len(records)
    if folder is not None:
        model_key = _model_key(spec, cache_root)
        keys = [cache.key("attribution", model_key, run.input_ids.tolist(), record["target_id"],
                          treatment, positions, methods, means_digest)
                for run, record in zip(runs, records)]
    found = {key for key in keys
             if key is not None and cache.verified_manifest(cache_root, folder, key)}
    log.info("prompts computed: %d, reused: %d", sum(key not in found for key in keys),
             sum(key in found for key in keys))
    model = _load_model(spec) if len(found) < len(keys) else None
    if means is not None and model is not None:
        means = means.to(model.device)
    passes = {"atp": (), **methods}  # the plain gradient always: the edges' weights use it
    names = [*methods, "gradient"]
    tensors: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for run, record, key in tqdm(list(zip(runs, records, keys)), desc="forward + backward",
                                 **PROGRESS):
        if key in found:
            prompt = load_file(str(folder / f"{key}.safetensors"))
        else:
            started = time.perf_counter()
            prompt = _prompt_estimates(model, run, record, treatment, positions, means, methods,
                                       passes)
            log.info("prompt %s (%d tokens): %s in %.2f s", record["prompt_id"], run.n_tokens,
                     ", ".join(passes), time.perf_counter() - started)
            if key is not None:
                cache.write_entry(folder, key, {"safetensors": lambda path, values=prompt:
                                                save_file(values, str(path))}, {})
        for name in names:
            tensors[name].append(prompt[name])
    metadata = {"prompt_ids": json.dumps([record["prompt_id"] for record in records]),
                "target_ids": json.dumps([record["target_id"] for record in records]),
                "treatment": treatment, "positions": positions,
                "methods": json.dumps({name: list(rules) for name, rules in methods.items()})}
    with store.atomic_path(output) as temporary:
        save_file({estimates_key(name): torch.stack(values).contiguous()
                   for name, values in tensors.items()}, str(temporary), metadata=metadata)


def _prompt_estimates(model: Any, run: Any, record: Mapping[str, Any], treatment: str,
                      positions: str, means: torch.Tensor | None,
                      methods: Mapping[str, Sequence[str]], passes: Mapping[str, Sequence[str]]
                      ) -> dict[str, torch.Tensor]:
    """One prompt's estimates [layers, intermediate] per method and its plain ``gradient``
    (last position), on the CPU. The causal methods share one forward (and the clean run's
    activations); ``relp_unmasked`` (:func:`neuron_effects.relp.forward_rules`) has its own
    unmasked forward, whose activations and gradients both make its estimate."""
    split = {name: relp.forward_rules(rules) for name, rules in passes.items()}
    projections, _, _ = attribution.method_gradients(
        model, run.input_ids, record["target_id"], positions,
        {name: rules for name, (causal, rules) in split.items() if causal})
    if positions == "all":  # every position's activation of every layer
        clean = run_clean(model, run.input_ids, record["prompt_id"], range(model.n_layers))
        activations = torch.stack([clean.full_activations[layer]
                                   for layer in range(model.n_layers)])
    else:
        activations = run.activations
    values = {name: attribution.first_order_estimates(
        projections[name], activations.to(model.device), treatment, means).cpu().contiguous()
        for name in methods if split[name][0]}
    for name in (name for name in methods if not split[name][0]):
        unmasked, _, unmasked_activations = attribution.method_gradients(
            model, run.input_ids, record["target_id"], positions, {name: split[name][1]},
            causal=False)
        values[name] = attribution.first_order_estimates(
            unmasked[name], unmasked_activations, treatment, means).cpu().contiguous()
    plain = projections["atp"]
    values["gradient"] = (plain if positions == "last" else plain[:, -1]).cpu().contiguous()
    return {name: values[name] for name in [*methods, "gradient"]}


def estimates_key(method: str) -> str:
    """The tensor of ``method`` in the estimates files: ``estimates`` for atp (its name before
    RelP), the method's name otherwise."""
    return "estimates" if method == "atp" else method


def _load_estimates(path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An estimates file's [prompts, layers, intermediate] tensors by method (and
    ``gradient`` [prompts, layers, intermediate] where present) and its prompt ids."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    methods = json.loads(metadata.get("methods", '{"atp": []}'))
    tensors = load_file(path)
    loaded = {name: tensors[estimates_key(name)] for name in methods}
    if "gradient" in tensors:
        loaded["gradient"] = tensors["gradient"]
    return loaded, json.loads(metadata["prompt_ids"])


def _stacked_estimates(paths: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The estimates of several files (:func:`_load_estimates`, e.g. the prompt chunks')
    stacked along the prompts, and their prompt ids in that order."""
    parts = [_load_estimates(path) for path in paths]
    stacked = {name: torch.cat([part[0][name] for part in parts]) for name in parts[0][0]}
    return stacked, [prompt_id for part in parts for prompt_id in part[1]]


def summarize_attribution(chunk_paths: Sequence[str], profile_path: str, n_candidates: int,
                          estimates_out: str, neurons_out: str, candidates_out: str) -> None:
    """Stack the chunks' estimates ([prompts, layers, intermediate] per method, prompt ids in the
    metadata) and write the all-neuron table and the neurons outside the profile file among the
    top ``n_candidates`` of any method."""
    stacked, prompt_ids = _stacked_estimates(chunk_paths)
    names = list(stacked)
    methods = [name for name in names if name != "gradient"]
    with safe_open(chunk_paths[0], framework="pt") as handle:
        method_rules = handle.metadata().get("methods", '{"atp": []}')
    with store.atomic_path(estimates_out) as temporary:
        save_file({estimates_key(name): stacked[name].contiguous() for name in names},
                  str(temporary), metadata={"prompt_ids": json.dumps(prompt_ids),
                                            "methods": method_rules})
    profile = pd.DataFrame([vars(neuron) for neuron in read_neurons(profile_path)])
    table = attribution.neuron_table({name: stacked[name].numpy() for name in methods}, profile)
    store.write_parquet(neurons_out, table)
    store.write_parquet(candidates_out, attribution.candidates(table, n_candidates, methods))
    for method in methods:
        top = table.nsmallest(n_candidates, attribution.rank_column(method))
        log.info("%d prompts x %d neurons; %d of the top %d by mean |%s| are studied neurons",
                 len(prompt_ids), len(table), int(top["in_profile"].sum()), n_candidates, method)


def select_candidates(neurons_path: str, n: int, output: str) -> None:
    """Write the ``n`` neurons outside the profile to verify exactly, from the all-neuron
    table (:func:`neuron_effects.verified.select`)."""
    selected = verified.select(pd.read_parquet(neurons_path), n)
    store.write_parquet(output, selected)
    log.info("verifying exactly the %d neurons outside the profile with the largest mean "
             "|total_atp|: %s", len(selected), ", ".join(selected["neuron_id"]))


def _with_estimates(per_prompt: pd.DataFrame, estimates: dict[str, torch.Tensor],
                    prompt_ids: list[str]) -> pd.DataFrame:
    """``total_<method>`` for each method of an estimates file (:func:`_load_estimates`: the
    estimate of the row's prompt and neuron) inserted after ``total``, with ``indirect_atp``
    (= total_atp - direct) after ``total_atp``."""
    index = {prompt_id: position for position, prompt_id in enumerate(prompt_ids)}
    rows = (per_prompt["prompt_id"].map(index).to_numpy(), per_prompt["layer"].to_numpy(),
            per_prompt["neuron"].to_numpy())
    where = per_prompt.columns.get_loc("total") + 1
    per_prompt = per_prompt.copy()
    for method in (name for name in estimates if name != "gradient"):
        per_prompt.insert(where, f"total_{method}",
                          estimates[method].numpy()[rows].astype(np.float64))
        where += 1
        if method == "atp":
            per_prompt.insert(where, "indirect_atp", per_prompt["total_atp"] - per_prompt["direct"])
            where += 1
    return per_prompt


def compute_shard(
    spec: ModelSpec, clean_path: str, neuron_table: Sequence[Sequence[Any]],
    settings: EffectSettings, output: str, cache_root: str,
    neuron_stats: str | None = None, neurons_per_block: int = 2048,
    mediation_output: str | None = None, mediators_output: str | None = None,
    edge_targets: Mapping[str, Sequence[Sequence[int]]] | None = None,
    edges_output: str | None = None, prompt_format: Mapping[str, Any] | None = None,
) -> None:
    """Effects of the shard's neurons on the chunk's prompts, computing only the rows that the
    row cache (:class:`neuron_effects.cache.RowCache` under ``cache_root``) lacks.

    A unit is (block of ``neurons_per_block`` neurons, prompt); the missing rows of a unit are
    computed together and saved as one cache entry as soon as they are done (a killed job
    resumes from them); the outputs (per-prompt rows, mediation rows, top-k mediators, edge
    rows) are then assembled from the cache, a row group per unit. A row's key: the model, the
    prompt (token ids, target, distractor, ``prompt_format``), ``settings`` (but batch sizes),
    the ``mean_ablate`` means, the neuron and its edge targets. The model is loaded only when
    a row is missing. ``edge_targets``: neuron id -> the ``(layer, neuron)`` targets of its
    profile's edges, whose ``Δa_t`` goes to ``edges_output``; targets not in a later layer of
    the model are left out with a warning.
    """
    runs, records = store.load_clean_runs(clean_path)
    neurons = sorted((Neuron(str(i), int(layer), int(n)) for i, layer, n in neuron_table),
                     key=lambda item: (item.layer, item.neuron))
    edge_targets = edge_targets or {}
    rows = {n.neuron_id: cache.row_key(n.layer, n.neuron, edge_targets.get(n.neuron_id, ()))
            for n in neurons}
    blocks = [neurons[start:start + neurons_per_block]
              for start in range(0, len(neurons), neurons_per_block)]
    means, means_digest = _mean_activations(neuron_stats, settings.treatment, settings.positions)
    cached_settings = {k: v for k, v in asdict(settings).items()
                       if k not in ("batch_rows", "vocab_rows")}  # the schedule, not the rows
    model_key = _model_key(spec, cache_root)
    caches = [cache.RowCache(cache_root, cache.key(
        "effects", model_key, run.input_ids.tolist(), record["target_id"],
        record["distractor_id"], prompt_format, cached_settings, means_digest))
        for run, record in zip(runs, records)]
    found = [row_cache.find(set(rows.values())) for row_cache in caches]
    missing = {(b, p): [n for n in block if rows[n.neuron_id] not in found[p]]
               for b, block in enumerate(blocks) for p in range(len(runs))}
    todo = {unit: members for unit, members in missing.items() if members}
    computed = sum(map(len, todo.values()))
    log.info("shard: %d neurons x %d prompts in %d units; %d already done (resuming)",
             len(neurons), len(runs), len(missing), len(missing) - len(todo))
    log.info("rows computed: %d, reused: %d", computed, len(neurons) * len(runs) - computed)
    name = Path(output).name.removesuffix(".parquet")
    if todo:
        _compute_units(spec, settings, runs, records, todo, caches, found, rows, means,
                       edge_targets, name)
    tables = {"per_prompt": output, "mediation": mediation_output,
              "mediators": mediators_output, "edges": edges_output}
    _assemble_shard(blocks, records, caches, found, rows,
                    {table: path for table, path in tables.items() if path})


def _compute_units(spec: ModelSpec, settings: EffectSettings, runs: Sequence[Any],
                   records: Sequence[Mapping[str, Any]],
                   todo: Mapping[tuple[int, int], Sequence[Neuron]],
                   caches: Sequence[cache.RowCache], found: Sequence[dict[str, str]],
                   rows: Mapping[str, str], means: torch.Tensor | None,
                   edge_targets: Mapping[str, Sequence[Sequence[int]]], shard: str) -> None:
    """Compute the missing rows of each unit ``(block, prompt)`` of ``todo`` and save each unit
    as a cache entry (noted in ``found``), written by a second thread while the next unit
    computes (on a GPU the host work would otherwise leave the device idle)."""
    model = _load_model(spec)
    use_products(model, settings.products, settings.split_parts)
    if means is not None:
        means = means.to(model.device)
    pending = {n.neuron_id: n for members in todo.values() for n in members}
    canonical = {i: cache.canonical_id(n.layer, n.neuron) for i, n in pending.items()}
    # computed under canonical ids: the cached rows do not depend on the job's names
    targets = _measurable_targets(
        [Neuron(canonical[i], n.layer, n.neuron) for i, n in pending.items()],
        {canonical[i]: t for i, t in edge_targets.items() if i in canonical}, model)
    layers = sorted({n.layer for n in pending.values()})
    bar = tqdm(total=sum(map(len, todo.values())), desc="treated rows", unit="row", **PROGRESS)
    block, block_members = None, None
    with ThreadPoolExecutor(max_workers=1) as writer:
        saving: Future | None = None
        for (b, p), members in todo.items():
            if [n.neuron_id for n in members] != block_members:
                block_members = [n.neuron_id for n in members]
                block = neuron_block(model, [Neuron(canonical[n.neuron_id], n.layer, n.neuron)
                                             for n in members], settings.full_vocab)
            record, clean = records[p], runs[p]
            if settings.positions == "all":  # every position of the shard's layers
                clean = run_clean(model, clean.input_ids, record["prompt_id"], layers)
            started = time.perf_counter()
            tables = compute_effects(model, clean.to(model.device), block, settings,
                                     record["target_id"], record["distractor_id"], means,
                                     targets)
            if saving is not None:
                saving.result()
            unit = f"n{b:03d}_p{p:05d}"
            saving = writer.submit(_save_unit, caches[p], found[p],
                                   [rows[n.neuron_id] for n in members], tables,
                                   f"{shard} unit {unit}")
            bar.update(len(members))
            log.info("unit %s (%s): %d rows in %.2f s", unit, record["prompt_id"], len(members),
                     time.perf_counter() - started)
        if saving is not None:
            saving.result()
    bar.close()


def _save_unit(row_cache: cache.RowCache, found: dict[str, str], rows: Sequence[str],
               tables: EffectTables, made_by: str) -> None:
    """Save one unit's tables (rows in the order of ``rows``) as a cache entry; note where its
    rows are in ``found``."""
    name = row_cache.save(rows, {"per_prompt": tables.per_prompt, "mediation": tables.mediation,
                                 "mediators": tables.mediators, "edges": tables.edges},
                          made_by)
    found.update(dict.fromkeys(rows, name))


def _assemble_shard(blocks: Sequence[Sequence[Neuron]], records: Sequence[Mapping[str, Any]],
                    caches: Sequence[cache.RowCache], found: Sequence[Mapping[str, str]],
                    rows: Mapping[str, str], outputs: Mapping[str, str]) -> None:
    """Write each table of ``outputs`` (per_prompt, mediation, mediators, edges) from the
    cached rows, a row group per unit (block-major, then prompt), relabelled with the shard's
    neuron ids and given the prompt's columns (all atomically)."""
    pieces = Path(outputs["per_prompt"]).with_name(
        f".{Path(outputs['per_prompt']).name}.pieces")
    shutil.rmtree(pieces, ignore_errors=True)
    paths: dict[str, list[Path]] = {table: [] for table in outputs}
    try:
        for b, block in enumerate(blocks):
            for p, record in enumerate(records):
                entries: dict[str, dict[str, str]] = {}
                for n in block:
                    entries.setdefault(found[p][rows[n.neuron_id]], {})[
                        cache.canonical_id(n.layer, n.neuron)] = n.neuron_id
                for table in outputs:
                    frame = _concat_pieces([caches[p].read(entry, table, ids)
                                            for entry, ids in entries.items()])
                    if table == "per_prompt":
                        frame = frame.assign(**{key: record[key] for key in PROMPT_COLUMNS})
                    else:
                        frame.insert(0, "prompt_id", record["prompt_id"])
                    path = pieces / f"{b:05d}_{p:06d}.{table}.parquet"
                    store.write_parquet(path, frame)
                    paths[table].append(path)
        for table, output in outputs.items():
            if table != "per_prompt":
                store.concat_parquet(paths[table], output)
        store.concat_parquet(paths["per_prompt"], outputs["per_prompt"])
    finally:
        shutil.rmtree(pieces, ignore_errors=True)


def _concat_pieces(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One frame of a unit's rows read from one or more cache entries; ``neuron_id`` keeps the
    first entry's type (categorical or not)."""
    if len(frames) == 1:
        return frames[0]
    frame = pd.concat(frames, ignore_index=True)
    if isinstance(frames[0]["neuron_id"].dtype, pd.CategoricalDtype):
        frame["neuron_id"] = frame["neuron_id"].astype(str).astype("category")
    return frame


def _measurable_targets(neurons: Sequence[Neuron], edge_targets: Mapping[str, Sequence[
        Sequence[int]]], model: Any) -> dict[str, list[tuple[int, int]]]:
    """The shard's edge targets that the replay can measure (:func:`edges.measurable_targets`);
    a warning in the log for each one left out."""
    kept = {}
    for neuron in neurons:
        if neuron.neuron_id not in edge_targets:
            continue
        kept[neuron.neuron_id], warnings = measurable_targets(
            neuron.neuron_id, neuron.layer, [tuple(target) for target in
                                             edge_targets[neuron.neuron_id]],
            model.n_layers, model.intermediate_size)
        for warning in warnings:
            log.warning("%s", warning)
    return kept


def _ordered_columns(frame: pd.DataFrame) -> pd.DataFrame:
    first = ["prompt_id", "neuron_id", "layer", "neuron", "activation", "scale", "target_id",
             "target_token", "target_source", "distractor_id", "distractor_token", "direct",
             "indirect", "total", "direct_frozen_norm", "norm_mediated", "direct_ratio",
             "cancellation", "sign_aligned", "ratio_defined", "direct_ratio_frozen_norm"]
    return frame[first + [c for c in frame.columns if c not in first]]


def _row_groups(path: str) -> Any:
    source = pq.ParquetFile(path)
    for group in range(source.num_row_groups):
        yield source.read_row_group(group).to_pandas()


def _shard_layers(shard_paths: Sequence[str]) -> list[int]:
    """The layers that may have rows in the shards: every layer between the smallest and the
    largest of each row group, from its statistics of the ``layer`` column (the column is read
    only for a file written without statistics)."""
    layers: set[int] = set()
    for path in shard_paths:
        metadata = pq.ParquetFile(path).metadata
        column = metadata.schema.to_arrow_schema().get_field_index("layer")
        groups = [metadata.row_group(g) for g in range(metadata.num_row_groups)]
        groups = [group.column(column).statistics for group in groups if group.num_rows]
        if all(statistics is not None and statistics.has_min_max for statistics in groups):
            layers.update(layer for statistics in groups
                          for layer in range(int(statistics.min), int(statistics.max) + 1))
        else:
            layers.update(pc.unique(pq.read_table(path, columns=["layer"])["layer"]).to_pylist())
    return sorted(layers)


def layer_rows(shard_paths: Sequence[str], layer: int, prompt_order: Mapping[str, int]
               ) -> pd.DataFrame:
    """Every per-prompt row of ``layer`` in the shards (only the row groups whose statistics
    allow that layer are read), ordered by neuron index then prompt (``prompt_order``)."""
    parts = [pq.read_table(path, filters=[("layer", "==", layer)]).to_pandas()
             for path in shard_paths]
    frame = pd.concat([part for part in parts if len(part)] or parts[:1], ignore_index=True)
    order = frame["prompt_id"].map(prompt_order)
    return frame.assign(_order=order).sort_values(["neuron", "_order"], ignore_index=True
                                                  ).drop(columns="_order")


def _source_layers_by_row_group(source: pq.ParquetFile, source_layers: Mapping[str, int]
                                ) -> list[set[int]]:
    """The source layers of the neurons in each row group of a top-k mediator table
    (``source_layers``: each neuron id's layer), read from the ``neuron_id`` column only."""
    layers = []
    for group in range(source.num_row_groups):
        ids = pc.unique(source.read_row_group(group, columns=["neuron_id"])["neuron_id"])
        if isinstance(ids, pa.DictionaryArray):
            ids = ids.dictionary.take(pc.unique(ids.indices))
        layers.append({source_layers[neuron_id] for neuron_id in ids.to_pylist()})
    return layers


def layer_mediator_summaries(mediators_path: str, neurons: pd.DataFrame, top_k: int) -> Any:
    """:func:`mediation.mediator_summary` of each source layer, as ``(layer, summary)`` pairs in
    ascending layer order: a layer is summarised from the row groups of the top-k table that
    hold its neurons, then let go, so the running sums (added up whenever a layer's pieces
    outgrow twice its running total) hold one layer's (neuron, mediator) pairs, plus the next
    layer's from row groups that span both (a unit of neurons across a layer boundary). Each
    row group is read once, when its smallest layer is summarised, whatever the order of the
    row groups in the file (the shards' prompt chunks put a layer's last row group near the end
    of the file: summarising a layer after its last row group held every layer of a layer block
    at once, BENCHMARKS.md section 14). ``neurons``: ``neuron_id``, ``layer``, ``n_prompts``."""
    by_id = neurons.set_index("neuron_id")
    source_layers = by_id["layer"].to_dict()
    source = pq.ParquetFile(mediators_path)
    groups = _source_layers_by_row_group(source, source_layers)
    read_with: dict[int, list[int]] = {}  # layer -> the row groups whose smallest layer it is
    for group, layers in enumerate(groups):
        if layers:
            read_with.setdefault(min(layers), []).append(group)
    sums: dict[int, list[pd.DataFrame]] = {}

    def add(layer: int, part: pd.DataFrame) -> None:
        pieces = sums.setdefault(layer, [])
        pieces.append(part)
        if sum(map(len, pieces)) > max(2 * len(pieces[0]), MEDIATOR_ROWS_HELD):
            sums[layer] = [mediation.combined_mediator_sums(pieces)]

    bar = tqdm(total=sum(map(bool, groups)), desc="mediator row groups", unit="group", **PROGRESS)
    for layer in sorted(set().union(*groups)):
        for group in read_with.get(layer, []):
            layers = groups[group]
            part = mediation.mediator_sums(source.read_row_group(group).to_pandas())
            if len(layers) == 1:
                add(layer, part)
            else:
                part_layers = part["neuron_id"].map(source_layers).to_numpy()
                for each in sorted(layers):
                    add(each, part[part_layers == each])
            bar.update(1)
        yield layer, mediation.mediator_summary(sums.pop(layer), by_id["n_prompts"], keep=top_k)
    bar.close()


def aggregate_mediation(
    mediation_shards: Sequence[str], mediator_shards: Sequence[str], neurons: pd.DataFrame,
    part_sums: pd.DataFrame, direct_tokens: Mapping[str, list], profile_path: str, top_k: int,
    mediation_out: str, mediators_out: str, flow_sums_out: str,
    documented: set[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stream the shards' mediation and top-k tables into one file each, write the partial sums
    of the layer flow (source layer x mediator layer: :func:`mediation.layer_flow_sums`), and
    return per neuron the mediation and edge-agreement
    columns, and the top mediators over prompts (:func:`mediation.mediator_summary`) of the
    ``documented`` neurons (None: all). The mediators are summarised one source layer at a
    time (:func:`layer_mediator_summaries`).
    ``neurons``: ``neuron_id``, ``layer``, ``n_prompts`` of every studied neuron;
    ``part_sums``: :func:`mediation.indirect_part_sums` of every row; ``direct_tokens``: per
    neuron with profile edges, its per-prompt ``top_k_direct_tokens``."""
    store.concat_parquet(mediation_shards, mediation_out)
    store.concat_parquet(mediator_shards, mediators_out)
    by_id = neurons.set_index("neuron_id")
    flow = [mediation.layer_flow_sums(part, by_id["layer"])
            for part in _row_groups(mediation_out)]
    store.write_parquet(flow_sums_out, pd.concat(flow, ignore_index=True) if flow else
                        pd.DataFrame(columns=["source_layer", "layer", "component", "n", "sum",
                                              "sum_abs"]))
    layer_ids = {layer: list(ids) for layer, ids in neurons.groupby("layer")["neuron_id"]}
    empty = mediation.mediator_summary([], by_id["n_prompts"], keep=top_k)
    column_parts, kept = [], []

    def reduce(layer: int, summary: pd.DataFrame) -> None:
        """A layer's columns (every neuron), and its mediator lists (documented neurons)."""
        column_parts.append(mediation.neuron_mediation(part_sums.loc[layer_ids.pop(layer)],
                                                       summary))
        kept.append(summary if documented is None
                    else summary[summary["neuron_id"].isin(documented)])

    for layer, summary in layer_mediator_summaries(mediators_out, neurons, top_k):
        reduce(layer, summary)
    for layer in list(layer_ids):  # no mediators (the last layer)
        reduce(layer, empty)
    columns = pd.concat(column_parts, ignore_index=True)
    summary = pd.concat(kept, ignore_index=True)
    edges = read_edges(profile_path)
    mediator_neurons = summary[summary["kind"] == "neuron"]
    by_neuron = {neuron_id: group for neuron_id, group in mediator_neurons.groupby("neuron_id")}
    agreement = pd.DataFrame([
        {"neuron_id": neuron_id,
         **edge_agreement(edges[neuron_id], by_neuron.get(neuron_id, mediator_neurons.iloc[:0]),
                          direct_tokens[neuron_id], top_k)}
        for neuron_id in columns["neuron_id"] if neuron_id in edges
    ], columns=["neuron_id", *EDGE_COLUMNS[:EDGE_COLUMNS.index("edge_n_measured")]])
    return columns.merge(agreement, on="neuron_id", how="left"), summary


def aggregate_edges(edge_shards: Sequence[str], profile_path: str, studied: Sequence[str],
                    gradients: dict[str, np.ndarray] | None, min_relative_delta: float,
                    edges_out: str) -> pd.DataFrame:
    """Write the exact measurement of every neuron edge of the studied neurons' profiles
    (:func:`neuron_effects.edges.edge_table`, from the shards' per-prompt ``Δa_t`` and the
    plain gradients of the attribution pass) and return per studied neuron with edges
    ``edge_n_measured`` and ``edge_real_fraction`` (:func:`neuron_effects.edges.real_edges`);
    listed edges that were not measured are named in a warning."""
    weights = {neuron_id: neuron_target_weights(listed)
               for neuron_id, listed in read_edges(profile_path).items() if neuron_id in studied}
    deltas = pd.concat([pd.read_parquet(path) for path in edge_shards], ignore_index=True)
    table = edge_table(deltas, gradients, weights)
    store.write_parquet(edges_out, table)
    measured = set(zip(table["neuron_id"], table["target_layer"], table["target_neuron"]))
    for neuron_id, targets in weights.items():
        for layer, neuron in targets:
            if (neuron_id, layer, neuron) not in measured:
                log.warning("edge %s -> %d_%d left out: its target is not a neuron of a later "
                            "layer of the model", neuron_id, layer, neuron)
    per_neuron = real_edges(table, min_relative_delta).set_index("neuron_id")
    per_neuron = per_neuron.reindex(list(weights))
    per_neuron["edge_n_measured"] = per_neuron["edge_n_measured"].fillna(0.0)
    log.info("%d edges of %d neurons measured; %.0f %% real (|Δa_t| >= %g |a_t|, sign agrees)",
             len(table), len(weights), 100 * per_neuron["edge_real_fraction"].mean(),
             min_relative_delta)
    return per_neuron.rename_axis("neuron_id").reset_index()


def _with_mediation(records: list[dict[str, Any]], columns: pd.DataFrame,
                    summary: pd.DataFrame, listed: int) -> None:
    """Add ``effect_mediators`` and ``edge_agreement`` (None without edges) to each record
    (a neuron document or a profile) in place."""
    by_id = columns.set_index("neuron_id")
    groups = {neuron_id: group for neuron_id, group in summary.groupby("neuron_id")}
    for record in records:
        neuron_id = record.get("neuron_id", f"L{record['layer']}/N{record['neuron']}")
        row = by_id.loc[neuron_id]
        shares = {part: aggregate._clean_float(row[f"indirect_share_{part}"])
                  for part in ("attn", "mlp", "norm")}
        record["effect_mediators"] = mediation.mediators_document(
            groups.get(neuron_id, summary.iloc[:0]), shares, listed)
        edges = {name: aggregate._clean_float(row[name]) for name in EDGE_COLUMNS}
        record["edge_agreement"] = (None if pd.isna(row["edge_n_neuron_targets"])
                                    else edges)


def _written_with(rows_out: Any, table: pa.Table, temporary: Path) -> Any:
    """``rows_out`` (a ParquetWriter or None) after writing ``table``: the first table fixes
    the schema (and the pandas metadata), later ones are cast to it."""
    if rows_out is None:
        rows_out = pq.ParquetWriter(temporary, table.schema)
    rows_out.write_table(table.cast(rows_out.schema))
    return rows_out


def aggregate_block(
    shard_paths: Sequence[str], prompt_order: Sequence[str], profile_path: str,
    thresholds: aggregate.Thresholds, parts: Mapping[str, str],
    mediation_shards: Sequence[str] = (), mediator_shards: Sequence[str] = (),
    edge_shards: Sequence[str] = (), mediator_top_k: int = 10,
    estimate_chunks: Sequence[str] = (), edge_min_relative_delta: float = 0.01,
    census: bool = False, outside_profile: bool = False,
) -> None:
    """One layer block's part of the aggregation (the block's shards, every prompt chunk),
    written to ``parts`` (:data:`aggregate.BLOCK_PARTS`; without ``mediation`` the mediation parts are
    left out): the long table's rows (ordered by layer, then neuron, then ``prompt_order``), the
    block's neuron and layer summaries, the per-prompt breakdown of the neurons that get a
    JSON document (the profile's, in a census); with the mediation tables, their rows, the
    partial sums of the layer flow, the per-neuron mediation and edge-agreement columns (in the
    neuron summary) and the documented neurons' top mediators (:func:`aggregate_mediation`);
    with ``estimate_chunks`` (attribution patching: the prompt chunks' estimates files; not
    the stacked file, which a profile edit rewrites), the estimates (``total_atp``,
    ``indirect_atp``, ``total_relp``...) and their agreement with the exact effects; with the
    edge tables, the exact measurement of the profiles' neuron edges (:func:`aggregate_edges`).
    With ``census``, the neurons gain :func:`census_columns` and the layers the ranking
    agreement of each estimate over all their neurons (:func:`layer_ranking_agreement`). The
    rows and the neurons get ``in_profile`` (listed in the profile file); ``outside_profile``:
    the shards hold the verified candidates (:mod:`neuron_effects.verified`), none in the
    profile.

    Streamed one layer at a time (:func:`layer_rows`): every summary is per neuron or per layer,
    so only one layer's rows are in memory, and the long table is written one layer (row
    group) at a time; what is kept across layers is per neuron, plus the per-prompt breakdown
    of the documented neurons."""
    mediated = "mediation" in parts
    order = {prompt_id: index for index, prompt_id in enumerate(prompt_order)}
    estimates = _stacked_estimates(estimate_chunks) if estimate_chunks else None
    profile_ids = set() if outside_profile else {neuron.neuron_id
                                                 for neuron in read_neurons(profile_path)}
    with_edges = set(read_edges(profile_path)) if mediated and not outside_profile else set()
    neuron_parts, layer_parts, breakdowns, part_sums, direct_tokens = [], [], [], [], {}
    non_finite: list[pd.DataFrame] = []
    with store.atomic_path(parts["per_prompt"]) as temporary:
        rows_out = None
        try:
            for layer in tqdm(_shard_layers(shard_paths), desc="layers", unit="layer",
                              **PROGRESS):
                frame = _ordered_columns(layer_rows(shard_paths, layer, order))
                if not len(frame):
                    continue
                frame.insert(frame.columns.get_loc("neuron") + 1, "in_profile",
                             frame["neuron_id"].isin(profile_ids).to_numpy())
                duplicated = frame.duplicated(["prompt_id", "neuron_id"])
                if duplicated.any():
                    raise RuntimeError(f"{int(duplicated.sum())} duplicated (prompt, neuron) "
                                       f"rows in the shards of layer {layer}")
                neurons = aggregate.summarize_neurons(frame, thresholds)
                layers = aggregate.summarize_layers(neurons, frame)
                if estimates is not None:
                    frame = _with_estimates(frame, *estimates)
                    for method in aggregate.estimate_methods(frame.columns):
                        neurons = neurons.merge(attribution.neuron_agreement(frame, method),
                                                on="neuron_id")
                        layers = layers.merge(attribution.layer_agreement(frame, method),
                                              on="layer")
                        if census:
                            layers = layers.merge(layer_ranking_agreement(frame, method),
                                                  on="layer")
                if census:
                    neurons = census_columns(neurons, frame, profile_ids)
                else:
                    neurons["in_profile"] = neurons["neuron_id"].isin(profile_ids)
                counts, named = aggregate.non_finite_rows(frame)
                neurons.insert(neurons.columns.get_loc("n_prompts") + 1, "n_non_finite",
                               counts.reindex(neurons["neuron_id"]).to_numpy())
                if len(named):
                    log.warning("layer %d: %d rows with a NaN or infinite value, first: %s",
                                layer, int(counts.sum()), named.to_dict("records"))
                    non_finite.append(named)
                if mediated:
                    part_sums.append(mediation.indirect_part_sums(frame))
                    listed = frame[frame["neuron_id"].isin(with_edges)]
                    direct_tokens.update(listed.groupby("neuron_id")["top_k_direct_tokens"]
                                         .apply(list).to_dict())
                documented = frame["neuron_id"].isin(profile_ids) if census else \
                    np.ones(len(frame), dtype=bool)
                breakdowns.append(frame.loc[documented, ["neuron_id", *aggregate.BREAKDOWN_COLUMNS,
                                                         *(f"total_{method}" for method in
                                                           aggregate.estimate_methods(
                                                               frame.columns))]])
                neuron_parts.append(neurons)
                layer_parts.append(layers)
                rows_out = _written_with(rows_out, pa.Table.from_pandas(
                    frame, preserve_index=False), temporary)
            if rows_out is None:
                raise RuntimeError(f"the shards hold no rows: {list(shard_paths)}")
        finally:
            if rows_out is not None:
                rows_out.close()
    neurons = pd.concat(neuron_parts, ignore_index=True)
    if mediated:
        columns, lists = aggregate_mediation(
            mediation_shards, mediator_shards, neurons[["neuron_id", "layer", "n_prompts"]],
            pd.concat(part_sums), direct_tokens, profile_path, mediator_top_k,
            parts["mediation"], parts["mediators"], parts["flow_sums"],
            documented=profile_ids if census else None)
        if "edges" in parts:
            gradients = None
            if estimates is not None and "gradient" in estimates[0]:
                gradients = dict(zip(estimates[1], estimates[0]["gradient"].numpy()))
            measured = aggregate_edges(edge_shards, profile_path, list(neurons["neuron_id"]),
                                       gradients, edge_min_relative_delta, parts["edges"])
            columns = columns.merge(measured, on="neuron_id", how="left")
        else:
            columns[["edge_n_measured", "edge_real_fraction"]] = np.nan
        # the mediation columns follow the summary's, before the estimates' and the census's
        summary_columns = list(neurons.columns[:neurons.columns.get_loc("mean_norm_mediated")
                                               + 1])
        neurons = neurons.merge(columns, on="neuron_id", how="left")
        neurons = neurons[summary_columns + list(columns.columns[1:])
                          + [c for c in neurons.columns if c not in summary_columns
                             and c not in columns.columns]]
        store.write_parquet(parts["mediator_lists"], lists)
    store.write_parquet(parts["neurons"], neurons)
    store.write_parquet(parts["layers"], pd.concat(layer_parts, ignore_index=True))
    store.write_parquet(parts["breakdowns"], pd.concat(breakdowns, ignore_index=True))
    store.write_parquet(parts["non_finite"], pd.concat(
        non_finite, ignore_index=True).head(aggregate.NON_FINITE_LISTED) if non_finite else
        pd.DataFrame(columns=["prompt_id", "neuron_id", "layer", "columns"]))


def non_finite_summary(neurons: pd.DataFrame, listed: pd.DataFrame) -> dict[str, Any]:
    """``n_rows``: the rows with a non-finite value (the sum of the neurons' ``n_non_finite``,
    counted over every row by :func:`aggregate_block`), ``rows``: the first
    :data:`aggregate.NON_FINITE_LISTED` of those the blocks named (``prompt_id, neuron_id,
    layer, columns``), ``columns``: the offending columns among them."""
    n_rows = int(neurons["n_non_finite"].sum())
    rows = [{"prompt_id": str(row.prompt_id), "neuron_id": str(row.neuron_id),
             "layer": int(row.layer), "columns": str(row.columns)}
            for row in listed.head(aggregate.NON_FINITE_LISTED).itertuples(index=False)]
    if n_rows:
        log.warning("%d (prompt, neuron) rows hold a NaN or infinite value; first: %s", n_rows,
                    rows)
    return {"n_rows": n_rows, "rows": rows,
            "columns": sorted({name for row in rows for name in row["columns"].split(", ")})}


def aggregate_effects(
    blocks: Sequence[Mapping[str, str]], prompts_table: str, clean_paths: Sequence[str],
    profile_path: str, per_prompt_out: str, neurons_out: str, neurons_json_out: str,
    layers_out: str, prompts_out: str, labels_out: str, mediation_out: str | None = None,
    mediators_out: str | None = None, mediation_layers_out: str | None = None,
    edges_out: str | None = None, mediator_top_k: int = 10, max_rank: int = 100,
    non_finite_out: str | None = None, candidates: Mapping[str, str] | None = None,
) -> None:
    """The final, light step of the aggregation: the layer blocks' parts (``blocks``, in
    layer order, each :data:`aggregate.BLOCK_PARTS` -> path, written by :func:`aggregate_block`) into the
    long table, the neuron and layer summaries, the mediation tables and layer flow, the edge
    table (each streamed or concatenated), and the prompt table (the prompts'
    ``target_low_rank``: a given target ranked below the top ``max_rank`` by the clean model),
    the neuron documents (``neurons.json``: the profile's neurons only; every neuron stays in
    ``neurons.parquet``) and the enriched labels. ``candidates``: the verified candidates'
    parts (:mod:`neuron_effects.verified`), whose rows and neurons (``in_profile`` false) follow
    the blocks' in the long table and the neuron summary, and nowhere else. ``non_finite_out``:
    the rows with a value NaN or infinite where it must be finite, counted over every row by the
    blocks and the candidates (:func:`non_finite_summary`), for the validation's verdict."""
    prompts = pd.read_parquet(prompts_table).drop(columns=["target_id", "distractor_id"])
    clean = pd.DataFrame([record for path in clean_paths
                          for record in store.load_clean_records(path)])
    clean["target_low_rank"] = [is_low_rank(record, max_rank)
                                for record in clean.to_dict("records")]
    for record in clean[clean["target_low_rank"]].to_dict("records"):
        log.warning("low-ranked target (above targets.max_rank %d): %s", max_rank,
                    describe_target(record))
    store.write_parquet(prompts_out, prompts.merge(clean.drop(columns="n_tokens"),  # in both
                                                   on="prompt_id", how="inner"))

    def read(part: str) -> pd.DataFrame:
        return pd.concat([pd.read_parquet(block[part]) for block in blocks], ignore_index=True)

    outside = [candidates] if candidates else []
    rows = store.concat_parquet([parts["per_prompt"] for parts in [*blocks, *outside]],
                                per_prompt_out)
    neurons = pd.concat([read("neurons"), *(pd.read_parquet(parts["neurons"])
                                            for parts in outside)], ignore_index=True)
    log.info("%d blocks: %d rows, %d neurons", len(blocks), rows, len(neurons))
    store.write_parquet(neurons_out, neurons)
    if non_finite_out is not None:
        listed = pd.concat([read("non_finite"), *(pd.read_parquet(parts["non_finite"])
                                                  for parts in outside)], ignore_index=True)
        store.write_json(non_finite_out, non_finite_summary(neurons, listed))
    store.write_parquet(layers_out, read("layers"))
    documents = aggregate.neuron_documents(neurons[neurons["in_profile"]], read("breakdowns"))
    document = aggregate.enrich_profiles(load_profile_document(profile_path), neurons)
    if mediation_out is not None:
        store.concat_parquet([block["mediation"] for block in blocks], mediation_out)
        store.concat_parquet([block["mediators"] for block in blocks], mediators_out)
        store.write_parquet(mediation_layers_out, mediation.layer_flow(
            [pd.read_parquet(block["flow_sums"]) for block in blocks]))
        lists = read("mediator_lists")
        _with_mediation(documents, neurons, lists, listed=mediator_top_k)
        _with_mediation(document["profiles"] if isinstance(document, dict) else document,
                        neurons, lists, listed=mediator_top_k)
    if edges_out is not None:
        store.write_parquet(edges_out, read("edges"))
    store.write_json(neurons_json_out, documents)
    store.write_json(labels_out, document)


def judge_profile_scores(neurons_path: str, profile_path: str, fields: Sequence[str],
                         output: str) -> None:
    """``results/summary/profile_scores.parquet``: each profile score field of ``fields`` judged
    against the profile neurons' exact mean total (:mod:`neuron_effects.profile_scores`)."""
    neurons = pd.read_parquet(neurons_path)
    if "in_profile" in neurons:  # a census: the profile's neurons only
        neurons = neurons[neurons["in_profile"]]
    table = judged_scores(read_profile_scores(profile_path, fields), neurons)
    for row in table.itertuples(index=False):
        log.info("profile score %r: %d neurons (%d without it), Spearman with the exact mean "
                 "total %.3g, sign agreement %.3g", row.field, row.n_neurons, row.n_missing,
                 row.spearman, row.sign_agreement)
    store.write_parquet(output, table)


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
    runs = {run.prompt_id: run for path in clean_paths for run in store.load_clean_runs(path)[0]}
    chosen = sample_pairs(pd.read_parquet(per_prompt_path, columns=["layer"]), n_pairs, seed)
    pairs = store.read_rows(per_prompt_path, chosen.index)  # only their row groups are read
    floors = {prompt_id: ratio_noise_floor(settings.noise_floor, runs[prompt_id].logits)
              for prompt_id in pairs["prompt_id"].unique()}
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    needed = _reference_needs(spec, max(run.n_tokens for run in runs.values()))
    compute_dtype, note = reference_dtype(run_dtype, device, needed, free)
    if note:
        log.warning("%s", note)
    model = _load_model(spec, compute_dtype)
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


# The line each model job logs once it knows what the cache holds (rows or prompts).
COMPUTED = re.compile(r"(?:rows|prompts) computed: (\d+), reused: (\d+)")


def _logged(log_path: str | Path) -> tuple[float, float, float]:
    """The last fixed cost a job logged (:func:`log_fixed_cost`) and the last counts of what it
    computed and reused (rows or prompts); NaN for what it did not log."""
    path = Path(log_path)
    text = path.read_text(errors="replace") if path.exists() else ""
    fixed, counts = FIXED_COST.findall(text), COMPUTED.findall(text)
    computed, reused = (float(value) for value in counts[-1]) if counts else (np.nan, np.nan)
    return float(fixed[-1]) if fixed else float("nan"), computed, reused


def job_timings(jobs: Sequence[tuple[str, str]],
                estimate: Mapping[str, Any] | None = None) -> tuple[pd.DataFrame, float]:
    """Per rule, from each job's benchmark file and log (``jobs``: ``(benchmark, log)`` paths,
    benchmarks under ``benchmarks/<rule>/``): jobs, seconds in all, the fixed part (start-up and
    loading, as logged) and the rest (the job's own work), the median seconds a job spent
    outside its work, the longest job, the peak memory, and what the model jobs computed and
    reused from the cache (rows of effects, or prompts: their logged counts); with the plan's ``estimate``
    (:meth:`neuron_effects.plan.PlanEstimate.as_dict`), its compute and fixed seconds beside
    them. Also the seconds from the first benchmarked job's start until now."""
    rows, first_start = [], time.time()
    for benchmark, log_path in jobs:
        if not Path(benchmark).exists():
            continue
        values = pd.read_csv(benchmark, sep="\t").iloc[0]
        rule = Path(benchmark).relative_to("benchmarks").parts[0]
        fixed, computed, reused = _logged(log_path)
        rows.append({"rule": rule, "s": float(values["s"]), "fixed": fixed,
                     "computed": computed, "reused": reused, "max_rss_mb": values["max_rss"]})
        first_start = min(first_start, Path(benchmark).stat().st_mtime - float(values["s"]))
    if not rows:
        return pd.DataFrame(), 0.0
    frame = pd.DataFrame(rows).replace("-", np.nan)
    frame["max_rss_mb"] = pd.to_numeric(frame["max_rss_mb"])
    frame["fixed"] = frame["fixed"].clip(upper=frame["s"])  # NaN: the job logged none
    table = frame.groupby("rule", sort=False).agg(
        jobs=("s", "size"), total_s=("s", "sum"),
        fixed_s=("fixed", lambda values: values.sum(min_count=1)),
        median_fixed_s=("fixed", "median"), max_job_s=("s", "max"),
        peak_rss_mb=("max_rss_mb", "max"),
        computed=("computed", lambda values: values.sum(min_count=1)),
        reused=("reused", lambda values: values.sum(min_count=1))).reset_index()
    table.insert(4, "work_s", table["total_s"] - table["fixed_s"])
    if estimate is not None:
        aggregation = {"rule": "aggregate_block", "jobs": estimate["aggregate_jobs"],
                       "compute_s": estimate["aggregate_s"], "fixed_s": None}
        planned = pd.DataFrame([*estimate["rules"], aggregation]).rename(columns={
            "jobs": "planned_jobs", "compute_s": "estimated_compute_s",
            "fixed_s": "estimated_fixed_s"})
        table = table.merge(planned, on="rule", how="left")
    return table, time.time() - first_start


def render_report(
    settings: dict[str, Any], per_prompt_path: str, neurons_path: str, layers_path: str,
    prompts_path: str, activation_stats_path: str, validation_table: str,
    validation_summary: str, jobs: Sequence[tuple[str, str]], top_n: int, output: str,
    figures_dir: str | None = None,
    mediation_layers_path: str | None = None,
    atp_candidates: str | None = None, edges_path: str | None = None,
    plan_estimate: Mapping[str, Any] | None = None, census_table_top: int = 200,
    profile_scores: str | None = None, census: bool = False,
) -> None:
    """Write the self-contained HTML report (with the attribution-patching section when
    ``atp_candidates`` is given, the profile scores' table when ``profile_scores`` is) and, into
    ``figures_dir``, its figures as ``<name>.png`` (for Snakemake's report). Outside a
    ``census``, the neurons outside the profile are the verified candidates: the report's
    analysis is the profile's, and they have a section of their own."""
    import platform

    import transformers

    from . import __version__
    from .report import png_bytes, report_figures
    from .report import render_report as render

    validation = json.loads(Path(validation_summary).read_text())
    timings, wall = job_timings(jobs, plan_estimate)
    metadata = {
        **settings, "dtype": validation["dtype"], "device": validation["device"],
        "wall time (first heavy job to report)": f"{wall:.0f} s",
        "versions": f"neuron_effects {__version__}, torch {torch.__version__}, transformers "
                    f"{transformers.__version__}, Python {platform.python_version()}",
    }
    stats = pd.read_parquet(activation_stats_path, columns=["layer", "neuron", "frac_active"])
    neurons = pd.read_parquet(neurons_path).merge(stats, on=["layer", "neuron"], how="left")
    names = pq.read_schema(per_prompt_path).names
    per_prompt = pd.read_parquet(per_prompt_path, columns=[  # what the report shows, no more
        name for name in names if name in REPORT_COLUMNS or name.startswith("total_")
        or name == "in_profile"])
    outside = None
    if not census:
        outside = neurons[~neurons["in_profile"]]
        neurons = neurons[neurons["in_profile"]].drop(columns="in_profile")
        per_prompt = per_prompt[per_prompt["in_profile"].to_numpy()].reset_index(drop=True)
    per_prompt = per_prompt.drop(columns="in_profile")
    layers = pd.read_parquet(layers_path)
    figures = report_figures(per_prompt, layers)
    page = render(
        metadata, per_prompt, neurons, layers, pd.read_parquet(prompts_path), validation,
        pd.read_parquet(validation_table), timings, top_n, figures=figures,
        mediation_layers=(pd.read_parquet(mediation_layers_path) if mediation_layers_path
                          else None),
        atp_candidates=None if atp_candidates is None else pd.read_parquet(atp_candidates),
        edges=None if edges_path is None else pd.read_parquet(edges_path),
        edge_min_relative_delta=settings.get("edge_min_relative_delta", 0.01),
        census_table_top=census_table_top, verified=outside,
        profile_scores=None if profile_scores is None else pd.read_parquet(profile_scores))
    if figures_dir is not None:
        for name, uri in figures.items():
            with store.atomic_path(Path(figures_dir) / f"{name}.png") as temporary:
                temporary.write_bytes(png_bytes(uri))
    store.write_text(output, page)
