"""Direct, indirect and total effects of a block of neurons on one prompt, streamed in batches.

For each neuron (L, n) of the block and the prompt's clean run:

* ``a``: its clean activation at the last position; ``s``: the treatment's scale; ``V = s * w_n``;
* TOTAL = logits(perturbed final hidden) - logits(baseline final hidden), both at the last
  position, both from :mod:`neuron_effects.total` in the SAME batch (the baseline is a V = 0 row
  per start layer), so a zero treatment gives exactly zero;
* DIRECT and DIRECT_FROZEN_NORM algebraically from the clean final hidden state
  (:mod:`neuron_effects.direct`); INDIRECT = TOTAL - DIRECT;
* the metrics of :mod:`neuron_effects.metrics` on the target (and distractor) token;
* with ``mediators``, the exact split of the indirect effect over the downstream attention and
  MLP layers, heads and neurons (:mod:`neuron_effects.mediation`), from the components the
  replay computes: ``indirect_attn``, ``indirect_mlp``, ``indirect_norm`` (and their
  ``_logit_diff`` versions), the long per-layer table and the top-k mediator table;
* with ``edge_targets``, ``Δa_t`` of the listed downstream neurons at the last position
  (:class:`neuron_effects.edges.EdgeCollector`), from the same replay.

Only [batch_rows x vocabulary] effect matrices ever exist; the result is one row of metrics per
neuron. Final norm, unembedding and all differences are float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals
import torch

from .clean import CleanRun
from .direct import Readout, direct_effects
from .error_scale import ratio_noise_floor
from .edges import EDGE_DELTA_COLUMNS, EdgeCollector
from .inputs import Neuron
from .mediation import (MEDIATION_COLUMNS, MEDIATION_COMPONENTS, MEDIATOR_COLUMNS,
                        BatchMediation, MediationCollector, mediation_readout, mediation_rows,
                        mediator_rows)
from .metrics import effect_metrics
from .model import LlamaFamily
from .products import PRODUCTS, SPLIT_PARTS
from .total import LayerCollector, perturbed_final_hidden, perturbed_final_hidden_all_positions
from .treatments import POSITIONS, TREATMENTS, treatment_scales


@dataclass(frozen=True)
class EffectSettings:
    """How effects are computed (see :mod:`neuron_effects.treatments` and ``metrics``)."""

    treatment: str = "add"
    positions: str = "last"
    full_vocab: bool = True  # probability changes and top-k need the whole unembedding
    top_k: int = 10
    # |d| + |i| below this: direct_ratio undefined; None: float32's error bound at the prompt's
    # logit scale (neuron_effects.error_scale)
    noise_floor: float | None = None
    batch_rows: int | None = None  # treated rows per replay batch; None: from free memory
    vocab_rows: int | None = None  # rows per vocabulary-wide metric chunk; None: per device
    mediators: bool = True  # split the indirect effect over downstream layers, heads, neurons
    mediator_top_k: int = 10  # top neurons and top heads kept per (prompt, neuron)
    products: str = "float32"  # or split_bf16 (neuron_effects.products), set up at model load
    split_parts: int = 3

    def __post_init__(self) -> None:
        if self.treatment not in TREATMENTS:
            raise ValueError(f"unknown treatment {self.treatment!r} (use {', '.join(TREATMENTS)})")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r} (use {', '.join(POSITIONS)})")
        if self.products not in PRODUCTS or self.split_parts not in SPLIT_PARTS:
            raise ValueError(f"products must be one of {PRODUCTS} with split_parts in "
                             f"{SPLIT_PARTS}, got {self.products!r}, {self.split_parts!r}")
        if min(self.batch_rows or 1, self.vocab_rows or 1, self.top_k, self.mediator_top_k) < 1:
            raise ValueError("batch_rows, vocab_rows, top_k and mediator_top_k must be >= 1")


@dataclass
class EffectTables:
    """What :func:`compute_effects` returns for one prompt: one row per neuron
    (``per_prompt``), the long per-layer split (``mediation``: neuron_id, layer, component,
    contribution) and the top-k mediators (``mediators``: neuron_id, kind, rank, layer, index,
    contribution); the last two are empty without ``mediators``. ``edges``: ``Δa_t`` per
    requested edge (:data:`~neuron_effects.edges.EDGE_DELTA_COLUMNS`), empty without
    ``edge_targets``."""

    per_prompt: pd.DataFrame
    # the long tables' batches, built when first read: a shard reads them on its writer
    # thread, off the device's critical path (jobs.shard.compute_shard)
    mediation_batches: list[Callable[[], pd.DataFrame]] = field(default_factory=list)
    mediator_batches: list[Callable[[], pd.DataFrame]] = field(default_factory=list)
    edges: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=list(EDGE_DELTA_COLUMNS)))

    @cached_property
    def mediation(self) -> pd.DataFrame:
        return _concat_batches([build() for build in self.mediation_batches], MEDIATION_COLUMNS)

    @cached_property
    def mediators(self) -> pd.DataFrame:
        return _concat_batches([build() for build in self.mediator_batches], MEDIATOR_COLUMNS)


@dataclass
class NeuronBlock:
    """Neurons sorted by (layer, neuron) with their prompt-independent tensors: the output
    directions ``w_n`` [N, hidden] and, for full-vocabulary metrics, ``B_n = W_U (g * w_n)``
    [N, vocab] (float32)."""

    neuron_ids: list[str]
    layers: torch.Tensor
    neurons: torch.Tensor
    directions: torch.Tensor
    unembedded: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.neuron_ids)


@torch.inference_mode()
def neuron_block(model: LlamaFamily, neurons: Sequence[Neuron], full_vocab: bool) -> NeuronBlock:
    """Build a :class:`NeuronBlock` (sorting the neurons by layer, then index)."""
    ordered = sorted(neurons, key=lambda item: (item.layer, item.neuron))
    layers = torch.tensor([item.layer for item in ordered], dtype=torch.long, device=model.device)
    indices = torch.tensor([item.neuron for item in ordered], dtype=torch.long,
                           device=model.device)
    directions = model.output_directions(layers, indices)
    unembedded = Readout(model).unnormalized(directions) if full_vocab else None
    return NeuronBlock([item.neuron_id for item in ordered], layers, indices, directions,
                       unembedded)


def _with_baselines(layers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows for the replay: one V = 0 baseline per distinct start layer, then the treated rows,
    sorted by layer (stable, so baselines lead their layer). Returns ``(start layers, position of
    each treated row, position of each treated row's baseline)``."""
    distinct = torch.unique(layers)
    starts = torch.cat([distinct, layers])
    order = torch.argsort(starts, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=order.device)
    treated = position[len(distinct):]
    baseline = position[torch.searchsorted(distinct, layers)]
    return starts[order], treated, baseline


CPU_BATCH_ROWS = 512  # on a CPU, larger batches gain nothing and leave the cache
# Rows per vocabulary-wide metric chunk: on a CPU few enough that the [rows x vocab] passes stay
# in cache; on CUDA many, since each chunk ends in one blocking copy of its metrics to the host
# (1024 x 128,256 x 4 B = 0.5 GB per float32 [rows x vocab] matrix on Llama-3.1-8B).
VOCAB_ROWS = {"cpu": 64, "cuda": 1024}
VOCAB_CHUNK_MATRICES = 6  # [vocab_rows x vocab] matrices alive at once in the metric passes


def auto_vocab_rows(device: torch.device) -> int:
    """``compute.vocab_rows: auto``: 64 on a CPU, 1024 on CUDA (:data:`VOCAB_ROWS`)."""
    return VOCAB_ROWS["cuda" if device.type == "cuda" else "cpu"]


def auto_batch_rows(model: LlamaFamily, n_tokens: int, full_vocab: bool,
                    positions: str = "last", vocab_rows: int | None = None,
                    free_bytes: int | None = None) -> int:
    """Rows per replay batch that fit in ~60 % of the free device memory (CUDA).

    Per row, for the ``P = T - 1`` prompt positions before the last and ``S`` replayed
    positions (``S = 1`` for ``positions: last``, ``S = T`` for ``all``): residual, attention and
    MLP intermediates of S tokens in the model dtype; readout-dtype attention scores and
    probabilities (4 copies) of S queries over ``P + S`` keys per head; the row's own keys and
    values in the readout dtype; and the readout-dtype logits row (full-vocabulary metrics).
    The vocabulary-wide metric chunk (``vocab_rows`` rows) is taken off the free memory first.
    """
    if model.device.type != "cuda" and free_bytes is None:
        return CPU_BATCH_ROWS
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(model.device)[0]
    width = torch.finfo(model.dtype).bits // 8
    wide = torch.finfo(model.readout_dtype).bits // 8
    replayed = n_tokens if positions == "all" else 1
    prefix = n_tokens - 1 if positions == "last" else 0
    per_row = (replayed * width * (8 * model.hidden_size + 4 * model.intermediate_size)
               + 4 * wide * model.n_heads * replayed * (prefix + replayed)
               + 2 * wide * model.n_kv_heads * model.head_dim * replayed
               + (wide * model.vocab_size if full_vocab else 0))
    chunk = VOCAB_CHUNK_MATRICES * wide * model.vocab_size * (
        (vocab_rows or auto_vocab_rows(model.device)) if full_vocab else 0)
    usable = max(0.0, 0.6 * free_bytes - chunk)
    return int(max(16, min(16384, usable // per_row)) // 16 * 16)


@torch.inference_mode()
def compute_effects(
    model: LlamaFamily, clean: CleanRun, block: NeuronBlock, settings: EffectSettings,
    target_id: int, distractor_id: int | None = None,
    mean_activations: torch.Tensor | None = None,
    edge_targets: Mapping[str, Sequence[tuple[int, int]]] | None = None,
) -> EffectTables:
    """One row of metrics per neuron of ``block`` for the prompt of ``clean``, and the
    mediation and edge tables (see :class:`EffectTables`).

    ``edge_targets``: neuron id -> its downstream targets ``(layer, neuron)``, each in a later
    layer than the neuron's (:func:`neuron_effects.edges.measurable_targets`).

    ``mean_activations`` [n_layers, intermediate]: the prompt-set means (``mean_ablate`` only;
    last-position means for ``positions: last``, all-position means for ``positions: all``).
    Columns: ``neuron_id, layer, neuron, activation, scale``, those of
    :func:`neuron_effects.metrics.effect_metrics` and ``indirect_{attn,mlp,norm}[_logit_diff]``
    (NaN without ``mediators``; the ``_logit_diff`` ones also without a distractor). The ratios'
    noise floor: ``settings.noise_floor``, or float32's error bound at the logit scale of
    ``clean`` (:func:`neuron_effects.error_scale.float32_error_bound`).
    """
    device = model.device
    if settings.full_vocab:
        readout = Readout(model)
        target_column, distractor_column = target_id, distractor_id
        # the frozen-norm direct effect is only read at the target and distractor
        frozen_columns = torch.tensor(
            [target_id] + ([distractor_id] if distractor_id is not None else []), device=device)
    else:
        token_ids = [target_id] + ([distractor_id] if distractor_id is not None else [])
        readout = Readout(model, torch.tensor(token_ids, device=device))
        target_column, distractor_column = 0, (1 if distractor_id is not None else None)
        frozen_columns = None
    means = mean_activations.to(device) if mean_activations is not None else None
    noise_floor = ratio_noise_floor(settings.noise_floor, clean.logits)
    clean_unnormalized = readout.unnormalized(clean.final_hidden.to(readout.dtype)[None])  # A
    vocab_rows = settings.vocab_rows or auto_vocab_rows(device)
    batch_rows = settings.batch_rows or auto_batch_rows(
        model, clean.n_tokens, settings.full_vocab, settings.positions, vocab_rows)
    mediation = (mediation_readout(model, clean.final_hidden, target_id, distractor_id)
                 if settings.mediators else None)
    parts: list[dict[str, np.ndarray]] = []
    mediation_parts: list[Callable[[], pd.DataFrame]] = []
    mediator_parts: list[Callable[[], pd.DataFrame]] = []
    edge_parts: list[pd.DataFrame] = []
    for start in range(0, len(block), batch_rows):
        rows = slice(start, start + batch_rows)
        layers, indices, directions = block.layers[rows], block.neurons[rows], block.directions[rows]
        activation = clean.activations[layers, indices]
        mean = means[layers, indices] if means is not None else None
        if settings.positions == "last":
            scale = treatment_scales(activation, settings.treatment, mean)
            vectors = scale[:, None] * directions
        else:
            per_position = torch.stack([clean.full_activations[layer][:, neuron] for layer, neuron
                                        in zip(layers.tolist(), indices.tolist())])  # [B, T]
            scales = treatment_scales(per_position, settings.treatment,
                                      None if mean is None else mean[:, None])
            scale = scales[:, -1]
            vectors = scales[:, :, None] * directions[:, None, :]
        starts, treated, baseline = _with_baselines(layers)
        replay_vectors = torch.zeros((len(starts), *vectors.shape[1:]), device=device,
                                     dtype=vectors.dtype)
        replay_vectors[treated] = vectors
        replay = (perturbed_final_hidden if settings.positions == "last"
                  else perturbed_final_hidden_all_positions)
        baselines = torch.arange(len(starts), device=device)
        baselines[treated] = baseline
        collectors: list[LayerCollector] = []
        if mediation is not None:
            splitter = MediationCollector(mediation, baselines, model.n_layers, model.n_heads,
                                          settings.mediator_top_k)
            collectors.append(splitter)
        requests = _edge_requests(block.neuron_ids[rows], edge_targets or {})
        if requests:
            targets = torch.tensor([request[1:] for request in requests], dtype=torch.long,
                                   device=device).reshape(-1, 2)
            edge_collector = EdgeCollector(
                treated[torch.tensor([request[0] for request in requests], device=device)],
                targets[:, 0], targets[:, 1], baselines)
            collectors.append(edge_collector)
        final_hidden = replay(model, clean, starts, replay_vectors, _all_of(collectors))
        split = splitter.result(treated, final_hidden) if mediation is not None else None
        if requests:
            edge_parts.append(_edge_rows(block.neuron_ids[rows], requests,
                                         edge_collector.deltas, clean.activations))
        if split is not None:
            ids = block.neuron_ids[rows]
            mediation_parts.append(partial(
                mediation_rows, ids, layers.cpu().numpy(), split.attn[0].cpu().numpy(),
                split.mlp[0].cpu().numpy(), split.norm[0].cpu().numpy()))
            mediator_parts.append(partial(mediator_rows, ids, split.neurons.to_host(),
                                          split.heads.to_host()))
        # One unembedding GEMM for the whole batch (W_U is read once), then the memory-bound
        # vocabulary-wide work in small row chunks that stay in cache.
        final_logits = readout.logits(final_hidden)
        for part in range(0, len(layers), vocab_rows):
            chunk = slice(part, part + vocab_rows)
            total = final_logits[treated[chunk]].sub_(final_logits[baseline[chunk]])
            unembedded = (block.unembedded[rows][chunk] if block.unembedded is not None
                          else readout.unnormalized(directions[chunk]))
            direct, frozen, clean_logits = direct_effects(
                readout, clean.final_hidden, scale[chunk], directions[chunk], unembedded,
                frozen_columns, clean_unnormalized)
            columns = effect_metrics(direct, frozen, total, clean_logits, target_column,
                                     distractor_column, settings.full_vocab, settings.top_k,
                                     noise_floor)
            columns.update(
                layer=layers[chunk].cpu().numpy(), neuron=indices[chunk].cpu().numpy(),
                activation=activation[chunk].double().cpu().numpy(),
                scale=scale[chunk].double().cpu().numpy(),
            )
            columns.update(_split_columns(split, chunk, columns))
            parts.append(columns)
    table = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]
             if not name.startswith("top_k_") or not name.endswith("_tokens")}
    frame = pd.DataFrame({"neuron_id": block.neuron_ids, **table})
    for name in parts[0]:
        if name.startswith("top_k_") and name.endswith("_tokens"):
            frame[name] = [list(map(int, tokens)) for part in parts for tokens in part[name]]
    return EffectTables(frame, mediation_parts, mediator_parts,
                        *([pd.concat(edge_parts, ignore_index=True)] if edge_parts else []))


def _concat_batches(parts: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """The batches' long tables as one, their categorical ``neuron_id`` columns (each batch its
    own neurons) united into one categorical (in block order) rather than strings."""
    if not parts:
        return pd.DataFrame(columns=list(columns))
    frame = pd.concat(parts, ignore_index=True)
    frame["neuron_id"] = union_categoricals([part["neuron_id"] for part in parts])
    return frame



def _all_of(collectors: list[LayerCollector]) -> LayerCollector | None:
    """One collector calling each of ``collectors`` (None for none, so the replay stays
    unchanged)."""
    if not collectors:
        return None
    if len(collectors) == 1:
        return collectors[0]

    def collect(*components: torch.Tensor | int) -> None:
        for collector in collectors:
            collector(*components)

    return collect


def _edge_requests(neuron_ids: Sequence[str], edge_targets: Mapping[str, Sequence[tuple[int, int]]]
                   ) -> list[tuple[int, int, int]]:
    """``(row in the batch, target layer, target neuron)`` for every target of the batch's
    neurons."""
    return [(row, int(layer), int(neuron)) for row, neuron_id in enumerate(neuron_ids)
            for layer, neuron in edge_targets.get(neuron_id, ())]


def _edge_rows(neuron_ids: Sequence[str], requests: list[tuple[int, int, int]],
               deltas: torch.Tensor, clean_activations: torch.Tensor) -> pd.DataFrame:
    """The batch's edge table: per request the neuron id, target, ``Δa_t`` and the target's
    clean activation ``a_t`` at the last position."""
    rows, layers, neurons = (np.array(column) for column in zip(*requests))
    return pd.DataFrame({
        "neuron_id": np.asarray(neuron_ids, dtype=object)[rows],
        "target_layer": layers.astype(np.int16), "target_neuron": neurons.astype(np.int32),
        "delta_activation": deltas.cpu().numpy(),
        "target_activation": clean_activations[torch.as_tensor(layers), torch.as_tensor(neurons)
                                               ].double().cpu().numpy(),
    })


def _split_columns(split: BatchMediation | None, chunk: slice,
                   columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``indirect_{attn,mlp,norm}`` (row 0 of the split: target logit) and their
    ``_logit_diff`` versions (row 1, when there is a distractor) for a chunk of treated rows;
    ``indirect_norm = norm_term - norm_mediated``. NaN where there is no split."""
    rows = len(columns["direct"])
    result = {}
    for index, suffix in enumerate(("", "_logit_diff")):
        if split is None or split.attn.shape[0] <= index:
            for part in MEDIATION_COMPONENTS:
                result[f"indirect_{part}{suffix}"] = np.full(rows, np.nan)
            continue
        result[f"indirect_attn{suffix}"] = split.attn[index, chunk].double().sum(-1).cpu().numpy()
        result[f"indirect_mlp{suffix}"] = split.mlp[index, chunk].double().sum(-1).cpu().numpy()
        result[f"indirect_norm{suffix}"] = (split.norm[index, chunk].double().cpu().numpy()
                                            - columns[f"norm_mediated{suffix}"])
    return result
