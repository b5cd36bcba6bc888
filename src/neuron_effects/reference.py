"""The slow, obviously-correct reference paths: full forwards of the unmodified model with hooks.

* TOTAL (the plan's method): one full forward per (neuron, prompt) with a forward hook on
  decoder layer ``L`` that adds ``V`` to its output (at the last position, or at every position
  with its own ``V_t``). Effect = its last-position logits - those of the same forward without
  the treatment.
* DIRECT, frozen downstream: one full forward in which every decoder layer ``l >= L`` has its
  output at the last position replaced by (clean output of layer ``l``) + ``V``, so that the
  final norm reads ``h_c + V``. Effect = its logits - the clean logits.
* DIRECT with the final-norm scale frozen: the same forward, read out with the clean
  ``r(h_c)`` instead of recomputing it.

Logits are read out from the final norm's input ``h`` (last position) in float32, as the
definitions ask: ``lm_head.weight @ (g * h) / sqrt(mean(h^2) + eps)``.

Nothing here is used by the fast path; tests and the workflow's validation rule compare them.
"""

from __future__ import annotations

import torch

from .clean import CleanRun
from .model import LlamaFamily
from .treatments import add_to_residual


def _logits(
    model: LlamaFamily, input_ids: torch.Tensor, inverse_rms: torch.Tensor | None = None
) -> torch.Tensor:
    """One forward; the last position's logits [vocab] read out in float32 from the final
    norm's input (with ``inverse_rms`` instead of ``1 / r(h)`` when given)."""
    captured = []
    handle = model.final_norm.register_forward_pre_hook(
        lambda module, args: captured.append(args[0][0, -1].float()))
    try:
        model.causal_lm(input_ids=input_ids.reshape(1, -1).to(model.device), logits_to_keep=1)
    finally:
        handle.remove()
    norm_weight, unembedding, eps = model.readout()
    hidden = captured[0]
    if inverse_rms is None:
        inverse_rms = torch.rsqrt(hidden.pow(2).mean() + eps)
    return unembedding @ (norm_weight * hidden) * inverse_rms


def _replace_output(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@torch.inference_mode()
def treated_logits(
    model: LlamaFamily, input_ids: torch.Tensor, layer: int, vector: torch.Tensor
) -> torch.Tensor:
    """Last-position logits [vocab] of one full forward in which a forward hook adds ``vector``
    to the output of decoder layer ``layer``: a [hidden] vector at the last position, or a
    [T, hidden] one at every position."""

    def treat(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        if vector.dim() == 1:
            hidden[:, -1] = add_to_residual(hidden[:, -1], vector.to(hidden.device))
        else:
            hidden[0] = add_to_residual(hidden[0], vector.to(hidden.device))
        return _replace_output(output, hidden)

    handle = model.layers[layer].register_forward_hook(treat)
    try:
        return _logits(model, input_ids)
    finally:
        handle.remove()


@torch.inference_mode()
def reference_total(
    model: LlamaFamily, input_ids: torch.Tensor, layer: int, vector: torch.Tensor
) -> torch.Tensor:
    """Total effect [vocab]: :func:`treated_logits` minus the untreated forward's logits."""
    return treated_logits(model, input_ids, layer, vector) - _logits(model, input_ids)


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

    handles = [model.layers[downstream].register_forward_hook(freeze(downstream))
               for downstream in range(layer, model.n_layers)]
    _, _, eps = model.readout()
    clean_inverse_rms = torch.rsqrt(clean.final_hidden.float().pow(2).mean() + eps)
    try:
        direct_logits = _logits(model, clean.input_ids, clean_inverse_rms if freeze_norm else None)
    finally:
        for handle in handles:
            handle.remove()
    return direct_logits - _logits(model, clean.input_ids)


@torch.inference_mode()
def reference_clean_logits(model: LlamaFamily, input_ids: torch.Tensor) -> torch.Tensor:
    """The untreated forward's last-position logits [vocab], read out in float32."""
    return _logits(model, input_ids)


def reference_layer_gradients(
    model: LlamaFamily, input_ids: torch.Tensor, target_id: int
) -> torch.Tensor:
    """``d logit_target / d x_L`` [n_layers, T, hidden] (float32) for every decoder layer ``L``,
    by plain autograd: a forward hook adds a zero leaf ``delta_L`` [T, hidden] to each layer's
    output and the gradient of the target logit (read out as in :func:`_logits`) is taken with
    respect to the deltas."""
    length = int(torch.as_tensor(input_ids).numel())
    deltas = [torch.zeros(length, model.hidden_size, dtype=model.dtype, device=model.device,
                          requires_grad=True) for _ in range(model.n_layers)]

    def perturb(layer: int):
        def hook(module, args, output):
            return _replace_output(output, (output[0] if isinstance(output, tuple) else output)
                                   + deltas[layer][None])

        return hook

    handles = [block.register_forward_hook(perturb(layer))
               for layer, block in enumerate(model.layers)]
    try:
        with torch.enable_grad():
            logit = _logits(model, torch.as_tensor(input_ids))[target_id]
            gradients = torch.autograd.grad(logit, deltas)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([gradient.float() for gradient in gradients])
