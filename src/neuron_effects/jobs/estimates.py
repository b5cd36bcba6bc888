"""Rules estimate_attribution, summarize_attribution and select_candidates: first-order estimates
(AtP, RelP) of every neuron on each prompt chunk, stacked into the all-neuron table, and the
neurons outside the profile to verify exactly.

Reads: a chunk's clean runs, the activation statistics (``mean_ablate``), the estimate cache
(``<cache>/attribution/``), the chunks' estimates, the profile file and the all-neuron table.
Writes: ``results/atp/chunks/<chunk>.safetensors``, the cache's new entries,
``results/atp/estimates.safetensors``, ``results/atp/neurons.parquet``,
``results/atp/candidates.parquet`` and ``results/atp/verified_candidates.parquet``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .. import agreement, attribution, cache, relp_rules, store, verified
from ..clean import load_clean_runs
from ..inputs import read_neurons
from ..model import ModelSpec
from .setup import PROGRESS, load_model_logged, log, model_cache_key, treatment_means


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
    runs, records = load_clean_runs(clean_path)
    means, means_digest = treatment_means(neuron_stats, treatment, positions)
    folder = None if cache_root is None else Path(cache_root) / "attribution"
    keys = [None] * len(records)
    if folder is not None:
        model_key = model_cache_key(spec, cache_root)
        keys = [cache.key("attribution", model_key, run.input_ids.tolist(), record["target_id"],
                          treatment, positions, methods, means_digest)
                for run, record in zip(runs, records)]
    found = {key for key in keys
             if key is not None and cache.verified_manifest(cache_root, folder, key)}
    log.info("prompts computed: %d, reused: %d", sum(key not in found for key in keys),
             sum(key in found for key in keys))
    model = load_model_logged(spec) if len(found) < len(keys) else None
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
            prompt = prompt_estimates(model, run, record, treatment, positions, means, methods,
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


def prompt_estimates(model: Any, run: Any, record: Mapping[str, Any], treatment: str,
                      positions: str, means: torch.Tensor | None,
                      methods: Mapping[str, Sequence[str]], passes: Mapping[str, Sequence[str]]
                      ) -> dict[str, torch.Tensor]:
    """One prompt's estimates [layers, intermediate] per method and its plain ``gradient``
    (last position), on the CPU. The causal methods share one forward (and the clean
    activations: the cached run's at the last position, that forward's at every position);
    ``relp_unmasked`` (:func:`neuron_effects.relp_rules.forward_rules`) has its own unmasked
    forward, whose activations and gradients both make its estimate."""
    split = {name: relp_rules.forward_rules(rules) for name, rules in passes.items()}
    projections, _, forward_activations = attribution.method_gradients(
        model, run.input_ids, record["target_id"], positions,
        {name: rules for name, (causal, rules) in split.items() if causal})
    # every position's activations (positions all) from that causal forward, whose values the
    # rules leave unchanged; the last position's from the cached clean run
    activations = forward_activations if positions == "all" else run.activations
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


def load_estimates(path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
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


def stacked_estimates(paths: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The estimates of several files (:func:`load_estimates`, e.g. the prompt chunks')
    stacked along the prompts, and their prompt ids in that order."""
    parts = [load_estimates(path) for path in paths]
    stacked = {name: torch.cat([part[0][name] for part in parts]) for name in parts[0][0]}
    return stacked, [prompt_id for part in parts for prompt_id in part[1]]


def summarize_attribution(chunk_paths: Sequence[str], profile_path: str, n_candidates: int,
                          estimates_out: str, neurons_out: str, candidates_out: str) -> None:
    """Stack the chunks' estimates ([prompts, layers, intermediate] per method, prompt ids in the
    metadata) and write the all-neuron table and the neurons outside the profile file among the
    top ``n_candidates`` of any method."""
    stacked, prompt_ids = stacked_estimates(chunk_paths)
    names = list(stacked)
    methods = [name for name in names if name != "gradient"]
    with safe_open(chunk_paths[0], framework="pt") as handle:
        method_rules = handle.metadata().get("methods", '{"atp": []}')
    with store.atomic_path(estimates_out) as temporary:
        save_file({estimates_key(name): stacked[name].contiguous() for name in names},
                  str(temporary), metadata={"prompt_ids": json.dumps(prompt_ids),
                                            "methods": method_rules})
    profile = pd.DataFrame([vars(neuron) for neuron in read_neurons(profile_path)])
    table = agreement.neuron_table({name: stacked[name].numpy() for name in methods}, profile)
    store.write_parquet(neurons_out, table)
    store.write_parquet(candidates_out, agreement.candidates(table, n_candidates, methods))
    for method in methods:
        top = table.nsmallest(n_candidates, agreement.rank_column(method))
        log.info("%d prompts x %d neurons; %d of the top %d by mean |%s| are studied neurons",
                 len(prompt_ids), len(table), int(top["in_profile"].sum()), n_candidates, method)


def select_candidates(neurons_path: str, n: int, output: str) -> None:
    """Write the ``n`` neurons outside the profile to verify exactly, from the all-neuron
    table (:func:`neuron_effects.verified.select`)."""
    selected = verified.select(pd.read_parquet(neurons_path), n)
    store.write_parquet(output, selected)
    log.info("verifying exactly the %d neurons outside the profile with the largest mean "
             "|total_atp|: %s", len(selected), ", ".join(selected["neuron_id"]))
