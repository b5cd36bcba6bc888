"""Where the indirect effect goes: an exact split over downstream attention/MLP layers, heads
and neurons, from the components the replay computes anyway.

At the last position the final hidden state is the embedding plus every layer's attention
output ``A_l`` (``o_proj``'s output) and MLP output ``M_l`` (``down_proj``'s output). A treatment
after layer ``L`` changes only layers ``l > L``. With the readout direction ``u = g * W_U[target]``
(``g``: the final norm's weight; ``u = g * (W_U[target] - W_U[distractor])`` for the logit
difference), ``1/r`` the clean final-norm scale and Δ = treated row − its V = 0 baseline row of
the same replay batch (as the total is taken), exactly:

    total = direct_frozen_norm + Σ_{l>L} attn_l + Σ_{l>L} mlp_l + norm_term
    attn_l = ΔA_l · u / r,    mlp_l = ΔM_l · u / r
    norm_term = u · h' (1/r' − 1/r)          (h', r': the treated final hidden state and scale)
    mlp_l  = Σ_m Δact_m (w_m · u) / r        (act: down_proj's input, w_m: its column m)
    attn_l = Σ_h Δz_h · (W_O[:, block h]ᵀ u) / r   (z: o_proj's input, block h: head h's slice)

so ``indirect = indirect_attn + indirect_mlp + indirect_norm`` with ``indirect_norm = norm_term −
norm_mediated``. Everything is float32. Per batch, a :class:`MediationCollector` keeps per row
the per-layer sums and a running top-k of neurons and heads (target logit, by |contribution|);
the per-layer neuron contributions [rows, intermediate] exist one layer at a time.

The aggregation side (:func:`mediator_summary`, :func:`layer_flow`) reads only small tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .model import LlamaFamily

MEDIATION_COMPONENTS = ("attn", "mlp", "norm")
MEDIATION_COLUMNS = ("neuron_id", "layer", "component", "contribution")
MEDIATOR_COLUMNS = ("neuron_id", "kind", "rank", "layer", "index", "contribution")


@dataclass
class MediationReadout:
    """Per-prompt readout directions and their images in every layer's weights, in the readout
    dtype (float32, float64 for a float64 model); the split is computed in that dtype.

    ``directions`` [D, hidden]: u for the target (row 0) and, with a distractor, for the logit
    difference (row 1); ``heads[l]`` = W_O(l)ᵀ u [D, heads * head_dim]; ``neurons[l]`` =
    W_down(l)ᵀ u [D, intermediate]; ``inverse_rms``: the clean 1/r; ``eps``: the final norm's."""

    directions: torch.Tensor
    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    inverse_rms: float
    eps: float

    def norm_term(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """``u · h' (1/r' − 1/r)`` for treated final hidden states h' [B, hidden] -> [D, B]."""
        hidden = final_hidden.to(self.directions.dtype)
        inverse = torch.rsqrt(hidden.pow(2).mean(dim=-1) + self.eps)
        return (self.directions @ hidden.T) * (inverse - self.inverse_rms)


@torch.inference_mode()
def mediation_readout(
    model: LlamaFamily, clean_final_hidden: torch.Tensor, target_id: int,
    distractor_id: int | None,
) -> MediationReadout:
    """Build the :class:`MediationReadout` of one prompt (clean final hidden [hidden])."""
    norm_weight, unembedding, eps = model.readout()
    rows = [unembedding[target_id]]
    if distractor_id is not None:
        rows.append(unembedding[target_id] - unembedding[distractor_id])
    directions = torch.stack(rows) * norm_weight
    dtype = directions.dtype
    hidden = clean_final_hidden.to(dtype)
    inverse_rms = float(torch.rsqrt(hidden.pow(2).mean() + eps))
    heads = [directions @ block.self_attn.o_proj.weight.to(dtype) for block in model.layers]
    neurons = [directions @ block.mlp.down_proj.weight.to(dtype) for block in model.layers]
    return MediationReadout(directions, heads, neurons, inverse_rms, eps)


@dataclass
class TopK:
    """A running top-k per row by |contribution|: ``values``, ``layers``, ``indices`` [rows, k];
    unused slots have layer −1."""

    values: torch.Tensor
    layers: torch.Tensor
    indices: torch.Tensor

    def to_host(self) -> "TopK":
        """A copy on the CPU."""
        return TopK(self.values.cpu(), self.layers.cpu(), self.indices.cpu())

    @classmethod
    def empty(cls, rows: int, k: int, device: torch.device, dtype: torch.dtype) -> "TopK":
        return cls(torch.zeros(rows, k, device=device, dtype=dtype),
                   torch.full((rows, k), -1, dtype=torch.long, device=device),
                   torch.full((rows, k), -1, dtype=torch.long, device=device))

    def merge(self, active: int, layer: int, contributions: torch.Tensor) -> None:
        """Merge one layer's contributions [active, units] into the first ``active`` rows."""
        k = self.values.shape[1]
        new_values, new_indices = _largest(contributions, min(k, contributions.shape[1]))
        values = torch.cat([self.values[:active], new_values], dim=1)
        layers = torch.cat([self.layers[:active], torch.full_like(new_indices, layer)], dim=1)
        indices = torch.cat([self.indices[:active], new_indices], dim=1)
        keys = torch.where(layers >= 0, values.abs(), -1.0)
        keep = keys.topk(k, dim=1).indices
        self.values[:active] = values.gather(1, keep)
        self.layers[:active] = layers.gather(1, keep)
        self.indices[:active] = indices.gather(1, keep)


def _largest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k entries of largest |value| per row: (values, column indices) [rows, k]."""
    indices = values.abs().topk(k, dim=1).indices
    return values.gather(1, indices), indices


@dataclass
class BatchMediation:
    """The split of one replay batch's treated rows: ``attn``/``mlp`` [D, rows, n_layers]
    (zero at layers <= the row's start layer), ``norm`` [D, rows], and the target-logit top-k
    ``neurons`` and ``heads``."""

    attn: torch.Tensor
    mlp: torch.Tensor
    norm: torch.Tensor
    neurons: TopK
    heads: TopK


class MediationCollector:
    """A :class:`neuron_effects.total.LayerCollector` for one replay batch.

    ``baselines[p]``: the replay row holding row p's V = 0 baseline (itself for a baseline), so
    that every Δ is taken inside the batch. Keeps per replay row and layer the attention and MLP
    contributions, and the running top-k neurons and heads of the target logit."""

    def __init__(self, readout: MediationReadout, baselines: torch.Tensor, n_layers: int,
                 n_heads: int, top_k: int):
        rows, device, dtype = len(baselines), baselines.device, readout.directions.dtype
        self.readout = readout
        self.baselines = baselines
        self.n_heads = n_heads
        self.attn = torch.zeros(len(readout.directions), rows, n_layers, device=device,
                                dtype=dtype)
        self.mlp = torch.zeros_like(self.attn)
        self.neurons = TopK.empty(rows, top_k, device, dtype)
        self.heads = TopK.empty(rows, top_k, device, dtype)

    def __call__(self, layer: int, active: int, attention_output: torch.Tensor,
                 attention_input: torch.Tensor, activations: torch.Tensor,
                 mlp_output: torch.Tensor) -> None:
        base = self.baselines[:active]
        scale = self.readout.inverse_rms
        directions = self.readout.directions
        dtype = directions.dtype
        delta_attention = attention_output.to(dtype) - attention_output[base].to(dtype)
        delta_mlp = mlp_output.to(dtype) - mlp_output[base].to(dtype)
        self.attn[:, :active, layer] = (directions @ delta_attention.T) * scale
        self.mlp[:, :active, layer] = (directions @ delta_mlp.T) * scale
        delta_z = attention_input.to(dtype) - attention_input[base].to(dtype)
        per_head = (delta_z * self.readout.heads[layer][0]).view(active, self.n_heads, -1)
        self.heads.merge(active, layer, per_head.sum(dim=-1) * scale)
        delta_act = activations.to(dtype) - activations[base].to(dtype)
        delta_act.mul_(self.readout.neurons[layer][0] * scale)  # [active, intermediate]
        self.neurons.merge(active, layer, delta_act)

    def result(self, treated: torch.Tensor, final_hidden: torch.Tensor) -> BatchMediation:
        """The treated rows' split (replay positions ``treated``); ``final_hidden``: the
        replay's final hidden states of all its rows [rows, hidden]."""
        return BatchMediation(
            self.attn[:, treated], self.mlp[:, treated],
            self.readout.norm_term(final_hidden[treated]),
            TopK(*(part[treated] for part in (self.neurons.values, self.neurons.layers,
                                              self.neurons.indices))),
            TopK(*(part[treated] for part in (self.heads.values, self.heads.layers,
                                              self.heads.indices))),
        )


def mediation_rows(neuron_ids: Sequence[str], start_layers: np.ndarray, attn: np.ndarray,
                   mlp: np.ndarray, norm: np.ndarray) -> pd.DataFrame:
    """The long table of one prompt's rows: per neuron, one row per downstream layer l > L and
    component ``attn``/``mlp``, then one ``norm`` row (layer −1) holding norm_term.

    ``attn``, ``mlp``: [rows, n_layers]; ``norm``: [rows] (target logit)."""
    n_rows, n_layers = attn.shape
    downstream = np.arange(n_layers)[None, :] > np.asarray(start_layers)[:, None]
    row_index, layer = np.nonzero(downstream)
    rows = np.concatenate([np.repeat(row_index, 2), np.arange(n_rows)])
    layers = np.concatenate([np.repeat(layer, 2), np.full(n_rows, -1)])
    components = np.concatenate([np.tile([0, 1], len(layer)), np.full(n_rows, 2)])
    contributions = np.concatenate([
        np.stack([attn[row_index, layer], mlp[row_index, layer]], axis=1).reshape(-1), norm])
    # per neuron: its layers ascending (attn, then mlp), then its norm row
    order = np.lexsort((components, np.where(layers < 0, n_layers, layers), rows))
    return pd.DataFrame({
        "neuron_id": _repeated_ids(neuron_ids, rows[order]),
        "layer": layers[order].astype(np.int16),
        "component": np.asarray(MEDIATION_COMPONENTS, dtype=object)[components[order]],
        "contribution": contributions[order].astype(np.float32),
    })


def mediator_rows(neuron_ids: Sequence[str], neurons: TopK, heads: TopK) -> pd.DataFrame:
    """The top-k tables of one prompt's rows: per neuron, kind ``neuron`` then ``head``, rank 1 =
    largest |contribution| (slots a row does not fill are dropped)."""
    tops = (("neuron", neurons), ("head", heads))
    # a row's slots side by side are in the table's order: neuron ranks, then head ranks
    layers, indices, values = (np.concatenate([getattr(top, name).cpu().numpy()
                                               for _, top in tops], axis=1)
                               for name in ("layers", "indices", "values"))
    widths = [top.layers.shape[1] for _, top in tops]
    kinds = np.repeat(np.array([kind for kind, _ in tops]), widths)
    ranks = np.concatenate([np.arange(1, width + 1) for width in widths])
    rows, slots = np.nonzero(layers >= 0)
    return pd.DataFrame({
        "neuron_id": _repeated_ids(neuron_ids, rows), "kind": kinds[slots],
        "rank": ranks[slots].astype(np.int16), "layer": layers[rows, slots].astype(np.int16),
        "index": indices[rows, slots].astype(np.int32),
        "contribution": values[rows, slots].astype(np.float32),
    })


def _repeated_ids(neuron_ids: Sequence[str], rows: np.ndarray) -> pd.Categorical:
    """``neuron_ids[rows]`` as a categorical column: the long tables repeat each (unique) id
    many times, and codes cost far less to build than one string per row."""
    return pd.Categorical.from_codes(rows, categories=list(neuron_ids))


# ---- aggregation over prompts (small tables only; the long table is read in row groups) ----

def layer_flow_sums(mediation: pd.DataFrame, source_layers: pd.Series) -> pd.DataFrame:
    """Partial sums over a piece of the long table, per (source_layer, layer, component) of
    the attn/mlp rows: ``n``, ``sum``, ``sum_abs`` of the contribution. ``source_layers``:
    the layer of each neuron id."""
    rows = mediation[mediation["component"] != "norm"]
    contribution = rows["contribution"].astype(float)
    frame = pd.DataFrame({"source_layer": rows["neuron_id"].map(source_layers).to_numpy(),
                          "layer": rows["layer"].to_numpy(), "component": rows["component"],
                          "sum": contribution, "sum_abs": contribution.abs()})
    return (frame.groupby(["source_layer", "layer", "component"], observed=True)
            .agg(n=("sum", "size"), sum=("sum", "sum"), sum_abs=("sum_abs", "sum"))
            .reset_index())


def layer_flow(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Per (source_layer, layer, component): ``mean_contribution`` and
    ``mean_abs_contribution`` over every (prompt, neuron) of the source layer, and ``n``."""
    columns = ["source_layer", "layer", "component"]
    if not parts:
        return pd.DataFrame(columns=[*columns, "n", "mean_contribution",
                                     "mean_abs_contribution"])
    total = pd.concat(parts).groupby(columns).sum().reset_index()
    return total.assign(mean_contribution=total["sum"] / total["n"],
                        mean_abs_contribution=total["sum_abs"] / total["n"]
                        ).drop(columns=["sum", "sum_abs"])


def mediator_sums(mediators: pd.DataFrame) -> pd.DataFrame:
    """Partial sums over a piece of the top-k table, per (neuron_id, kind, layer, index): the
    ``sum`` of contributions (in float64: whatever the order in which pieces are added, the
    sums' rounding stays far below that of the table's float32 values) and the ``count`` of
    prompts in the top k."""
    contributions = mediators.assign(contribution=mediators["contribution"].astype(np.float64))
    return (contributions.groupby(["neuron_id", "kind", "layer", "index"], observed=True)
            ["contribution"].agg(sum="sum", count="size").reset_index())


def combined_mediator_sums(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Partial sums of :func:`mediator_sums` added up: one row per (neuron_id, kind, layer,
    index)."""
    return (pd.concat(parts).groupby(["neuron_id", "kind", "layer", "index"], observed=True)
            .sum().reset_index())


def mediator_summary(parts: Sequence[pd.DataFrame], n_prompts: pd.Series,
                     keep: int) -> pd.DataFrame:
    """Per neuron, its ``keep`` top mediators of each kind over prompts: ``mean_contribution``
    (sum over the prompts where it is in the top k, divided by all the neuron's prompts, i.e. 0
    elsewhere: there it is below the k-th largest), ``frac_in_top_k`` and ``mediator`` (e.g.
    ``L12/N345``, ``L12/H3``), ranked by |mean_contribution| (``rank`` 1 = largest)."""
    columns = ["neuron_id", "kind", "rank", "mediator", "layer", "index", "mean_contribution",
               "frac_in_top_k"]
    if not parts:
        return pd.DataFrame(columns=columns)
    total = combined_mediator_sums(parts)
    prompts = total["neuron_id"].map(n_prompts).to_numpy(dtype=float)
    total = total.assign(mean_contribution=total["sum"] / prompts,
                         frac_in_top_k=total["count"] / prompts)
    total = total.assign(_size=-total["mean_contribution"].abs()).sort_values(
        ["neuron_id", "kind", "_size", "layer", "index"])
    total["rank"] = total.groupby(["neuron_id", "kind"]).cumcount() + 1
    total = total[total["rank"] <= keep]
    total["mediator"] = [f"L{layer}/{'N' if kind == 'neuron' else 'H'}{index}"
                         for kind, layer, index in
                         zip(total["kind"], total["layer"], total["index"])]
    return total[columns].reset_index(drop=True)


def indirect_part_sums(per_prompt: pd.DataFrame) -> pd.DataFrame:
    """Per neuron id (the index): Σ_prompts |indirect_attn|, |indirect_mlp|, |indirect_norm| of
    the target-logit split (NaN without the split); additive over pieces of distinct neurons."""
    parts = per_prompt[["neuron_id", "indirect_attn", "indirect_mlp", "indirect_norm"]]
    return parts.set_index("neuron_id").abs().groupby(level=0, sort=False).sum(min_count=1)


def neuron_mediation(part_sums: pd.DataFrame, summary: pd.DataFrame,
                     listed: int = 5) -> pd.DataFrame:
    """Per neuron: ``top_mediator`` (neurons and heads together, by |mean contribution|),
    ``top_mediators`` (the first ``listed`` as text: mediator, mean contribution, fraction of
    prompts in the top k) and ``indirect_share_{attn,mlp,norm}`` = Σ_prompts |part| /
    Σ_prompts (|attn| + |mlp| + |norm|) (``part_sums``: :func:`indirect_part_sums`)."""
    sizes = part_sums.sort_index()
    whole = sizes.sum(axis=1, min_count=1).replace(0.0, np.nan)
    shares = pd.DataFrame({f"indirect_share_{part}": sizes[f"indirect_{part}"] / whole
                           for part in ("attn", "mlp", "norm")})
    ranked = summary.assign(_size=-summary["mean_contribution"].abs()).sort_values(
        ["neuron_id", "_size", "kind"])
    listed_rows = ranked.groupby("neuron_id", observed=True).head(listed)
    entries = (listed_rows["mediator"].astype(str) + " "
               + listed_rows["mean_contribution"].map("{:+.3g}".format) + " ("
               + listed_rows["frac_in_top_k"].map("{:.0%}".format) + ")")
    text = entries.groupby(listed_rows["neuron_id"], observed=True).agg("; ".join)
    top = ranked.groupby("neuron_id", observed=True)["mediator"].first()
    result = shares.assign(top_mediator=top.reindex(shares.index),
                           top_mediators=text.reindex(shares.index))
    return result.rename_axis("neuron_id").reset_index()


def mediators_document(summary: pd.DataFrame, shares: dict[str, float | None],
                       listed: int) -> dict:
    """A neuron's ``effect_mediators`` for the JSON outputs: the shares of the indirect effect
    and its top ``listed`` mediators of each kind."""
    return {
        "indirect_shares": shares,
        "top_mediators": [
            {"mediator": row.mediator, "kind": row.kind, "layer": int(row.layer),
             "index": int(row.index), "mean_contribution": float(row.mean_contribution),
             "frac_in_top_k": float(row.frac_in_top_k)}
            for row in summary[summary["rank"] <= listed].itertuples()
        ],
    }
