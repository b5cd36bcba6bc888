"""Attribution patching: a first-order estimate of every neuron's TOTAL effect on the target logit,
from one forward and one backward per prompt, and its agreement with the exact effects.

For one prompt (``T`` tokens, last position ``T-1``) and its target token ``y``:

* the target logit is read out as the exact engine does, in float32 from the input ``h`` of the
  final norm at ``T-1``: ``logit_y = W_U[y] . (g * h) / r(h)`` (:class:`~.direct.Readout`);
* ``g_L = d logit_y / d x_L``, ``x_L`` the output of decoder layer ``L`` (the residual stream at
  the hook point where treatments are added), at ``T-1`` (``positions: last``) or at every
  position ``t`` (``positions: all``);
* reduced at once to the neuron space: ``p_L = W_down_L^T g_L`` ([intermediate], or
  [T, intermediate]), ``W_down_L = layers[L].mlp.down_proj.weight``, so that
  ``p_L[n] = g_L . w_n``; nothing else of the backward pass is kept;
* the estimate of neuron ``(L, n)`` under ``V = s * w_n``: ``est(L, n) = g_L . V = s * p_L[n]``
  with the treatment's scale ``s`` (add: ``a``; zero_ablate: ``-a``; mean_ablate: ``mean - a``);
  with ``positions: all``, ``sum_t s_t * p_{L,t}[n]`` (each position its own ``s_t``).

The model's parameters stay frozen (``requires_grad`` False): the backward computes gradients
with respect to activations only, starting from the input embeddings.

Their agreement with the exact effects is :mod:`neuron_effects.agreement`'s.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch

from . import relp, relp_rules
from .direct import Readout
from .model import LlamaFamily
from .treatments import treatment_scales


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def neuron_gradients(
    model: LlamaFamily, input_ids: list[int] | torch.Tensor, target_id: int,
    positions: str = "last",
) -> tuple[torch.Tensor, float]:
    """``p_L = W_down_L^T (d logit_target / d x_L)`` for every decoder layer ``L`` (see the module
    docstring): [n_layers, intermediate] at the last position, or [n_layers, T, intermediate]
    with ``positions='all'``; float32. Also returns the target logit."""
    projections, logit, _ = method_gradients(model, input_ids, target_id, positions,
                                             {"atp": ()})
    return projections["atp"], logit


def method_gradients(
    model: LlamaFamily, input_ids: list[int] | torch.Tensor, target_id: int,
    positions: str, methods: dict[str, Sequence[str]], causal: bool = True,
) -> tuple[dict[str, torch.Tensor], float, torch.Tensor]:
    """:func:`neuron_gradients`' projections ``W_down_L^T g_L`` for each method, from ONE forward
    and one backward per method: ``methods`` maps a name to its RelP rules
    (:mod:`neuron_effects.relp`; empty: the plain gradient ``g_L``, else the modified gradient
    ``g~_L`` at the same hook point, the output ``x_L`` of decoder layer ``L``). Forward values
    do not depend on the rules. With ``causal`` False the forward's attention has no mask
    (every position attends to every position, as the attribution graphs' released code runs
    it: :data:`neuron_effects.relp_rules.UNMASKED`). Also returns the target logit and that
    forward's MLP activations (``down_proj``'s input, float32, the positions of the
    projections)."""
    implementation = model.config._attn_implementation
    if not causal and implementation not in ("eager", "sdpa"):
        raise ValueError(f"the unmasked forward needs eager or sdpa attention (an additive 4D "
                         f"mask), not {implementation!r}")
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=model.device).reshape(1, -1)
    projections: list[torch.Tensor | None] = [None] * model.n_layers
    activations: list[torch.Tensor | None] = [None] * model.n_layers
    final_hidden: list[torch.Tensor] = []
    switch = relp.RuleSwitch()

    def project(layer: int):
        weight = model.layers[layer].mlp.down_proj.weight  # [hidden, intermediate]

        def on_gradient(gradient: torch.Tensor) -> None:
            kept = gradient[0, -1] if positions == "last" else gradient[0]
            projections[layer] = kept.float() @ weight.float()

        return on_gradient

    def keep_layer_output(layer: int):
        def hook(module, args, output):
            _hidden(output).register_hook(project(layer))

        return hook

    def keep_activations(layer: int):
        def hook(module, args):
            kept = args[0][0, -1] if positions == "last" else args[0][0]
            activations[layer] = kept.detach().float()

        return hook

    handles = [model.final_norm.register_forward_pre_hook(
        lambda module, args: final_hidden.append(args[0][0, -1]))]
    handles += [block.register_forward_hook(keep_layer_output(layer))
                for layer, block in enumerate(model.layers)]
    handles += [block.mlp.down_proj.register_forward_pre_hook(keep_activations(layer))
                for layer, block in enumerate(model.layers)]
    readout = Readout(model, torch.tensor([target_id], device=model.device))
    rules = relp.relevance_rules(model, switch) if any(methods.values()) else nullcontext()
    results: dict[str, torch.Tensor] = {}
    try:
        with torch.enable_grad(), rules:
            embeddings = model.causal_lm.get_input_embeddings()(ids).detach().requires_grad_()
            # a prepared 4D additive mask is used as given: zeros attend everywhere
            mask = None if causal else torch.zeros(1, 1, ids.shape[1], ids.shape[1],
                                                   dtype=embeddings.dtype, device=model.device)
            model.causal_lm.model(inputs_embeds=embeddings, attention_mask=mask, use_cache=False)
            hidden = final_hidden[0][None].to(readout.dtype)
            unnormalized, inverse_rms = readout.unnormalized(hidden), readout.inverse_rms(hidden)
            logit = relp.routed_readout(unnormalized * inverse_rms, unnormalized, inverse_rms,
                                        switch)[0, 0]
            for number, (name, method_rules) in enumerate(methods.items()):
                switch.active = frozenset(relp_rules.rule_set(method_rules))
                torch.autograd.grad(logit, embeddings, retain_graph=number < len(methods) - 1)
                results[name] = torch.stack(projections)
    finally:
        for handle in handles:
            handle.remove()
    return results, float(logit.detach()), torch.stack(activations)


def first_order_estimates(
    projections: torch.Tensor, activations: torch.Tensor, treatment: str,
    mean_activations: torch.Tensor | None = None,
) -> torch.Tensor:
    """``est[L, n] = s[L, n] * p_L[n]`` [n_layers, intermediate] from :func:`neuron_gradients`'
    projections and the clean activations of the same positions ([L, I] or [L, T, I]); with
    positions, the sum over them of ``s_t * p_{L,t}``. ``mean_activations`` [L, I] for
    mean_ablate."""
    if projections.shape != activations.shape:
        raise ValueError(f"projections {tuple(projections.shape)} and activations "
                         f"{tuple(activations.shape)} differ in shape")
    if mean_activations is not None and activations.dim() == 3:
        mean_activations = mean_activations[:, None, :]
    estimates = treatment_scales(activations.float(), treatment, mean_activations) * projections
    return estimates.sum(1) if estimates.dim() == 3 else estimates
