"""Rules compute_effects and compute_candidate_effects: one shard's effects, computed unit by
unit into the row cache (a writer thread saves each unit while the next computes), then
assembled from the cache.

Reads: a chunk's clean runs, the activation statistics (``mean_ablate``) and the row cache
(``<cache>/effects/``). Writes: the cache's new entries and the shard's tables
(``results/effects/shards/<block>_<chunk>[.mediation|.mediators|.edges].parquet``, or
``results/effects/candidates/<chunk>...`` for the verified candidates), a row group per unit.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from tqdm import tqdm

from .. import cache, store
from ..clean import load_clean_runs, run_clean
from ..edges import measurable_targets
from ..effects import EffectSettings, EffectTables, compute_effects, neuron_block
from ..inputs import Neuron
from ..model import ModelSpec
from ..products import use_products
from .setup import PROGRESS, load_model_logged, log, model_cache_key, treatment_means

# Prompt-level columns copied from the clean cache into every per-prompt row.
PROMPT_COLUMNS = ("prompt_id", "target_id", "target_token", "target_source", "distractor_id",
                  "distractor_token")


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
    runs, records = load_clean_runs(clean_path)
    neurons = sorted((Neuron(str(i), int(layer), int(n)) for i, layer, n in neuron_table),
                     key=lambda item: (item.layer, item.neuron))
    edge_targets = edge_targets or {}
    rows = {n.neuron_id: cache.row_key(n.layer, n.neuron, edge_targets.get(n.neuron_id, ()))
            for n in neurons}
    blocks = [neurons[start:start + neurons_per_block]
              for start in range(0, len(neurons), neurons_per_block)]
    means, means_digest = treatment_means(neuron_stats, settings.treatment, settings.positions)
    cached_settings = {k: v for k, v in asdict(settings).items()
                       if k not in ("batch_rows", "vocab_rows")}  # the schedule, not the rows
    model_key = model_cache_key(spec, cache_root)
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
    model = load_model_logged(spec)
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
            saving = writer.submit(save_unit, caches[p], found[p],
                                   [rows[n.neuron_id] for n in members], tables,
                                   f"{shard} unit {unit}")
            bar.update(len(members))
            log.info("unit %s (%s): %d rows in %.2f s", unit, record["prompt_id"], len(members),
                     time.perf_counter() - started)
        if saving is not None:
            saving.result()
    bar.close()


def save_unit(row_cache: cache.RowCache, found: dict[str, str], rows: Sequence[str],
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
