"""The slow, obviously-correct reference paths: full forwards of the unmodified model with hooks.

* TOTAL (the plan's method): one full forward per (neuron, prompt) with a forward hook on
  decoder layer ``L`` that adds ``V`` to its output (at the last position, or at every position
  with its own ``V_t``). Effect = its last-position logits - those of the same forward without
  the treatment.
* DIRECT, frozen downstream: one full forward in which every decoder layer ``l >= L`` has its
  output at the last position replaced by (clean output of layer ``l``) + ``V``; the model's own
  final norm and ``lm_head`` then read ``h_c + V``. Effect = its logits - the clean logits.
* DIRECT with the final-norm scale frozen: the same forward with a hook on the final norm that
  divides by the clean ``r(h_c)`` instead of recomputing it.

Nothing here is used by the fast path; tests and the workflow's validation rule compare them.
"""

from __future__ import annotations

import torch

from .clean import CleanRun
from .model import LlamaFamily
from .treatments import add_to_residual


def _logits(model: LlamaFamily, input_ids: torch.Tensor) -> torch.Tensor:
    ids = input_ids.reshape(1, -1).to(model.device)
    return model.causal_lm(input_ids=ids, logits_to_keep=1).logits[0, -1].float()


def _replace_output(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@torch.inference_mode()
def reference_total(
    model: LlamaFamily, input_ids: torch.Tensor, layer: int, vector: torch.Tensor
) -> torch.Tensor:
    """Total effect [vocab] of adding ``vector`` to the output of layer ``layer``: a [hidden]
    vector at the last position, or a [T, hidden] one at every position."""

    def treat(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        if vector.dim() == 1:
            hidden[:, -1] = add_to_residual(hidden[:, -1], vector.to(hidden.device))
        else:
            hidden[0] = add_to_residual(hidden[0], vector.to(hidden.device))
        return _replace_output(output, hidden)

    clean_logits = _logits(model, input_ids)
    handle = model.layers[layer].register_forward_hook(treat)
    try:
        treated_logits = _logits(model, input_ids)
    finally:
        handle.remove()
    return treated_logits - clean_logits


@torch.inference_mode()
def reference_direct(
    model: LlamaFamily, clean: CleanRun, layer: int, vector: torch.Tensor, freeze_norm: bool = False
) -> torch.Tensor:
    """Direct effect [vocab] of a last-position ``vector`` [hidden] added after layer ``layer``,
    with every downstream layer output frozen at its clean value (+ V). ``freeze_norm`` also
    freezes the final norm's scale at its clean value."""

    def freeze(downstream: int):
        def hook(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            hidden[:, -1] = add_to_residual(clean.layer_outputs[downstream][None], vector)
            return _replace_output(output, hidden)

        return hook

    clean_hidden = clean.final_hidden.float()
    norm_weight, _, eps = model.readout()
    clean_inverse_rms = torch.rsqrt(clean_hidden.pow(2).mean() + eps)

    def frozen_norm(module, args, output):
        normed = output.clone()
        normed[:, -1] = (norm_weight * args[0][:, -1].float() * clean_inverse_rms).to(output.dtype)
        return normed

    handles = [model.layers[downstream].register_forward_hook(freeze(downstream))
               for downstream in range(layer, model.n_layers)]
    if freeze_norm:
        handles.append(model.final_norm.register_forward_hook(frozen_norm))
    try:
        direct_logits = _logits(model, clean.input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return direct_logits - _logits(model, clean.input_ids)
