"""The clean run: one ordinary forward of one prompt, capturing what every later step needs.

Captured with forward hooks on the unmodified model (``T`` prompt tokens, last position ``T-1``):

* ``layer_outputs[L]``: output of decoder layer ``L`` (the residual stream) at ``T-1``;
* ``final_hidden``: the input of the final norm ``model.model.norm`` at ``T-1``;
* ``logits``: the model's own next-token logits at ``T-1`` (float32);
* ``activations[L, n]``: input of ``layers[L].mlp.down_proj`` at ``T-1`` (every neuron of every
  layer), and ``activation_sums[L, n]`` the same summed over all ``T`` positions;
* ``prefix_keys/values[L]``: the attention cache of positions ``0..T-2`` (keys after RoPE), which a
  last-position treatment cannot change (causal attention);
* optionally, for the layers in ``full_layers``: the layer outputs and activations at every
  position (the ``positions: all`` treatment needs them).

The clean-run file (:func:`save_clean_runs`): one safetensors file per chunk of prompts, each
run's tensors under ``<i>.<name>`` and the prepared prompt records as the JSON metadata
``records`` (read alone, without torch, by :func:`neuron_effects.store.load_clean_records`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Collection

import torch
from safetensors.torch import load_file, save_file

from .model import LlamaFamily
from .store import atomic_path, load_clean_records


@dataclass
class CleanRun:
    """What one clean forward of one prompt leaves behind (see the module docstring)."""

    prompt_id: str
    input_ids: torch.Tensor  # [T] int64
    layer_outputs: torch.Tensor  # [n_layers, hidden], model dtype
    final_hidden: torch.Tensor  # [hidden], model dtype
    # the next three in the readout dtype: float32 (float64 in a float64 model)
    logits: torch.Tensor  # [vocab]
    activations: torch.Tensor  # [n_layers, intermediate]
    activation_sums: torch.Tensor  # [n_layers, intermediate], summed over positions
    prefix_keys: torch.Tensor  # [n_layers, kv_heads, T-1, head_dim], model dtype
    prefix_values: torch.Tensor  # [n_layers, kv_heads, T-1, head_dim], model dtype
    full_layer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # L -> [T, hidden]
    full_activations: dict[int, torch.Tensor] = field(default_factory=dict)  # L -> [T, inter]

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device) -> "CleanRun":
        """The same run with every tensor on ``device``."""
        moved = {
            name: (value.to(device) if isinstance(value, torch.Tensor) else value)
            for name, value in vars(self).items()
        }
        moved["full_layer_outputs"] = {k: v.to(device) for k, v in self.full_layer_outputs.items()}
        moved["full_activations"] = {k: v.to(device) for k, v in self.full_activations.items()}
        return CleanRun(**moved)


_RUN_TENSORS = [f.name for f in fields(CleanRun) if f.name not in
                ("prompt_id", "full_layer_outputs", "full_activations")]


def save_clean_runs(path: str | Path, runs: list[CleanRun], records: list[dict[str, Any]],
                    atomic: bool = True) -> None:
    """One clean-run file for a chunk of prompts (the module docstring's format; ``atomic``
    False: written in place, for a caller that writes to a temporary path itself)."""
    tensors = {f"{index}.{name}": getattr(run, name).contiguous().cpu()
               for index, run in enumerate(runs) for name in _RUN_TENSORS}
    metadata = {"records": json.dumps(records, ensure_ascii=False)}
    if not atomic:
        save_file(tensors, str(path), metadata=metadata)
        return
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def load_clean_runs(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[list[CleanRun], list[dict[str, Any]]]:
    """The runs and prompt records saved by :func:`save_clean_runs`."""
    records = load_clean_records(path)
    tensors = load_file(str(path), device=str(device))
    runs = [CleanRun(prompt_id=record["prompt_id"],
                     **{name: tensors[f"{index}.{name}"] for name in _RUN_TENSORS})
            for index, record in enumerate(records)]
    return runs, records


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _cache_layer(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [1, kv_heads, T, head_dim] of one layer of a transformers cache."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


@torch.inference_mode()
def run_clean(
    model: LlamaFamily, input_ids: list[int] | torch.Tensor, prompt_id: str,
    full_layers: Collection[int] = (),
) -> CleanRun:
    """One clean forward of ``input_ids`` with hooks (see the module docstring).

    Raises ``FloatingPointError`` naming the prompt and layer when an activation or the logits
    are not finite.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=model.device).reshape(1, -1)
    n_layers = model.n_layers
    layer_outputs: list[torch.Tensor | None] = [None] * n_layers
    activations: list[torch.Tensor | None] = [None] * n_layers
    activation_sums: list[torch.Tensor | None] = [None] * n_layers
    full_outputs: dict[int, torch.Tensor] = {}
    full_activations: dict[int, torch.Tensor] = {}
    final_hidden: list[torch.Tensor] = []

    def keep_layer_output(layer: int):
        def hook(module, args, output):
            hidden = _hidden(output)[0]
            layer_outputs[layer] = hidden[-1].clone()
            if layer in full_layers:
                full_outputs[layer] = hidden.clone()

        return hook

    def keep_activations(layer: int):
        def hook(module, args):
            acts = args[0][0].to(model.readout_dtype)  # [T, intermediate]
            if not torch.isfinite(acts).all():
                raise FloatingPointError(
                    f"prompt {prompt_id!r}: non-finite MLP activations at layer {layer}"
                )
            activations[layer] = acts[-1].clone()
            activation_sums[layer] = acts.sum(0)
            if layer in full_layers:
                full_activations[layer] = acts.clone()

        return hook

    def keep_final_hidden(module, args):
        final_hidden.append(args[0][0, -1].clone())

    handles = [model.final_norm.register_forward_pre_hook(keep_final_hidden)]
    for layer, block in enumerate(model.layers):
        handles.append(block.register_forward_hook(keep_layer_output(layer)))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(keep_activations(layer)))
    try:
        output = model.causal_lm(input_ids=ids, use_cache=True, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    logits = output.logits[0, -1].to(model.readout_dtype)
    if not torch.isfinite(logits).all():
        raise FloatingPointError(f"prompt {prompt_id!r}: non-finite logits")
    keys, values = zip(*(_cache_layer(output.past_key_values, layer) for layer in range(n_layers)))
    return CleanRun(
        prompt_id=prompt_id,
        input_ids=ids[0].clone(),
        layer_outputs=torch.stack(layer_outputs),
        final_hidden=final_hidden[0],
        logits=logits,
        activations=torch.stack(activations),
        activation_sums=torch.stack(activation_sums),
        prefix_keys=torch.stack([k[0, :, :-1] for k in keys]),
        prefix_values=torch.stack([v[0, :, :-1] for v in values]),
        full_layer_outputs=full_outputs,
        full_activations=full_activations,
    )
