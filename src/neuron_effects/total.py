"""The fast exact path for the TOTAL effect: replaying only the layers downstream of a neuron.

A treatment added to the output of decoder layer ``L`` leaves layers ``0..L`` untouched. With
``positions: last`` it also leaves every earlier position untouched at every layer (causal
attention), so their keys and values are the clean run's. The perturbed final hidden state (the
input of the final norm at the last position ``T-1``) is therefore obtained exactly by

    x = clean output of layer L at T-1  +  V
    for l in L+1 .. n_layers-1:   x = layer_l(x), attending to the clean prefix keys/values of
                                  positions 0..T-2 and to x's own key/value at T-1

which costs one token per layer instead of a full forward. Many treatments (rows, each its own
layer and V) are batched: rows are sorted by start layer so that at layer ``l`` the active rows
(start < l) are a prefix of the batch, and all rows read ONE shared copy of the prefix keys and
values (never one copy per row).

With ``positions: all`` the treatment changes every position, so the replay runs all ``T``
positions of every row from layer ``L+1`` on (from the clean layer-``L`` outputs plus the
per-position V), with causal attention inside the row.

Attention scores, softmax and the weighted sum are computed in float32 in both modes (float64 in
a float64 model).

An optional ``collector`` (see :class:`LayerCollector`) receives, for every replayed layer, the
active rows' components at the last position: the attention output (``o_proj``'s output), its
input ``z`` (the heads' mixed values), the MLP's ``down_proj`` input (the neuron activations)
and the MLP output. :mod:`neuron_effects.mediation` splits the indirect effect with them; without
a collector the replay is unchanged.
"""

from __future__ import annotations

import bisect
from typing import Protocol

import torch

from .clean import CleanRun
from .model import LlamaFamily
from .treatments import add_to_residual


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None, scaling: float,
) -> torch.Tensor:
    """Causal attention of rows' own positions, plus a prefix shared by all rows.

    q: [B, S, heads, d]; k, v: [B, S, kv_heads, d] (the rows' own positions, causal among
    themselves); prefix_k/v: [kv_heads, P, d] (positions before all of them, one copy).
    Returns [B, S, heads * d] in float32 (float64 for float64 inputs). Query head ``h`` reads
    key/value head ``h // (heads // kv_heads)``, as in grouped-query attention.
    """
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    wide = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(wide).reshape(batch, length, kv_heads, groups, dim).permute(0, 2, 3, 1, 4)
    kf = k.to(wide).permute(0, 2, 1, 3)  # [B, kv, S, d]
    vf = v.to(wide).permute(0, 2, 1, 3)
    own = torch.einsum("bhgsd,bhtd->bhgst", qf, kf) * scaling
    if length > 1:
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        own = own.masked_fill(future, float("-inf"))
    if prefix_k is not None and prefix_k.shape[1] > 0:
        pk, pv = prefix_k.to(wide), prefix_v.to(wide)
        shared = torch.einsum("bhgsd,hpd->bhgsp", qf, pk) * scaling
        probs = torch.cat([shared, own], dim=-1).softmax(dim=-1)
        n_prefix = pk.shape[1]
        out = torch.einsum("bhgsp,hpd->bhgsd", probs[..., :n_prefix], pv)
        out = out + torch.einsum("bhgst,bhtd->bhgsd", probs[..., n_prefix:], vf)
    else:
        out = torch.einsum("bhgst,bhtd->bhgsd", own.softmax(dim=-1), vf)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, length, heads * dim)


class LayerCollector(Protocol):
    """Receives one replayed layer's components of the active rows at the last position."""

    def __call__(self, layer: int, active: int, attention_output: torch.Tensor,
                 attention_input: torch.Tensor, activations: torch.Tensor,
                 mlp_output: torch.Tensor) -> None:
        """``attention_output`` = o_proj(z) and ``mlp_output`` = down_proj(act), [active,
        hidden]; ``attention_input`` = z [active, heads * head_dim]; ``activations`` = act
        [active, intermediate]; all in the model dtype."""


def _layer_step(
    model: LlamaFamily, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
    collector: LayerCollector | None = None,
) -> torch.Tensor:
    """One pre-norm decoder layer on rows x [B, S, hidden] (model dtype), as the model does it:
    ``x += o_proj(attn(input_layernorm(x)))``, then ``x += mlp(post_attention_layernorm(x))``.
    With a ``collector``, the MLP is spelled out as ``down_proj(act_fn(gate_proj(y)) *
    up_proj(y))`` (the model's own modules) to hand its input to the collector."""
    block = model.layers[layer]
    attention = block.self_attn
    h = block.input_layernorm(x)
    shape = (*h.shape[:-1], -1, model.head_dim)
    q = attention.q_proj(h).view(shape)
    k = attention.k_proj(h).view(shape)
    v = attention.v_proj(h).view(shape)
    if hasattr(attention, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
        q, k = attention.q_norm(q), attention.k_norm(k)
    # RoPE on [B, heads, S, d] with cos/sin [1, S, d], the model's own function
    q, k = model.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos[None], sin[None])
    mixed = _attend(q.transpose(1, 2), k.transpose(1, 2), v, prefix_k, prefix_v,
                    float(attention.scaling))
    mixed = mixed.to(x.dtype)
    attention_output = attention.o_proj(mixed)
    x = x + attention_output
    if collector is None:
        return x + block.mlp(block.post_attention_layernorm(x))
    mlp = block.mlp
    normed = block.post_attention_layernorm(x)
    activations = mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed)
    mlp_output = mlp.down_proj(activations)
    collector(layer, x.shape[0], attention_output[:, -1], mixed[:, -1], activations[:, -1],
              mlp_output[:, -1])
    return x + mlp_output


def _run_downstream(
    model: LlamaFamily, start_layers: torch.Tensor, x: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, clean: CleanRun | None,
    collector: LayerCollector | None = None,
) -> torch.Tensor:
    """Run rows x [B, S, hidden] (sorted by ``start_layers``) through layers start+1..end."""
    starts = start_layers.tolist()  # one device sync, not one per layer
    if starts != sorted(starts):
        raise ValueError("rows must be sorted by start layer")
    for layer in range(starts[0] + 1, model.n_layers):
        active = bisect.bisect_left(starts, layer)  # rows with start < layer
        prefix_k = clean.prefix_keys[layer] if clean is not None else None
        prefix_v = clean.prefix_values[layer] if clean is not None else None
        x[:active] = _layer_step(model, layer, x[:active], cos, sin, prefix_k, prefix_v,
                                   collector)
    return x


@torch.inference_mode()
def perturbed_final_hidden(
    model: LlamaFamily, clean: CleanRun, start_layers: torch.Tensor, vectors: torch.Tensor,
    collector: LayerCollector | None = None,
) -> torch.Tensor:
    """Final pre-norm hidden state at the last position after adding ``vectors[b]`` [B, hidden]
    (float32) to the output of layer ``start_layers[b]`` at the last position.

    Rows must be sorted by start layer. Returns [B, hidden] in the model dtype. ``collector``:
    see :class:`LayerCollector`.
    """
    device = model.device
    start_layers = start_layers.to(device)
    last = torch.tensor([clean.n_tokens - 1], device=device)
    cos, sin = model.rope(last)
    x = add_to_residual(clean.layer_outputs[start_layers], vectors.to(device))[:, None, :]
    return _run_downstream(model, start_layers, x, cos, sin, clean, collector)[:, 0, :]


@torch.inference_mode()
def perturbed_final_hidden_all_positions(
    model: LlamaFamily, clean: CleanRun, start_layers: torch.Tensor, vectors: torch.Tensor,
    collector: LayerCollector | None = None,
) -> torch.Tensor:
    """As :func:`perturbed_final_hidden` but with ``vectors[b]`` [B, T, hidden] added at every
    position (``positions: all``); needs ``clean.full_layer_outputs`` for the start layers."""
    device = model.device
    start_layers = start_layers.to(device)
    cos, sin = model.rope(torch.arange(clean.n_tokens, device=device))
    missing = sorted(set(start_layers.tolist()) - set(clean.full_layer_outputs))
    if missing:
        raise ValueError(f"the clean run lacks full-sequence outputs of layers {missing}")
    residual = torch.stack([clean.full_layer_outputs[layer] for layer in start_layers.tolist()])
    x = add_to_residual(residual, vectors.to(device))
    return _run_downstream(model, start_layers, x, cos, sin, None, collector)[:, -1, :]
