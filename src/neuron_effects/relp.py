"""RelP's relevance rules as a modified backward pass, on the same forward as the plain gradient.

RelP ("Relevance Patching", arXiv 2508.21258) is attribution patching whose backward pass
follows relevance-propagation rules instead of the plain gradient. The rules, per module of a
Llama-family decoder (``x``: a module's input):

* ``ln``: every RMSNorm (``input_layernorm``, ``post_attention_layernorm``, Qwen3's ``q_norm``
  and ``k_norm``, and the final norm: see :func:`routed_readout`) treats ``1/rms(x)`` as a
  constant: ``d out / d x = g / rms(x)``;
* ``identity``: the MLP's SiLU ``act_fn(x) = x * sigmoid(x)`` with the sigmoid constant:
  ``d act / d x = sigmoid(x)``;
* ``half``: the gated product ``p = act(gate) * up`` (``down_proj``'s input) passes
  ``p/2 + (p/2).detach()``: half the gradient of ``p`` reaches each factor;
* ``frozen_attention``: the attention pattern is constant: the outputs of ``q_proj`` and
  ``k_proj`` get no gradient, which flows through ``v_proj`` and ``o_proj`` only;
* linear layers (projections, residual sums, the unembedding): the plain gradient.

The default rule set, :data:`neuron_effects.relp_rules.DEFAULT_RULES` (``ln``, ``identity``,
``half``; the estimate ``relp``), is the one the attribution graphs' public code applies
(TransluceAI/circuits, ``circuits/core/grad.py``, ``stop_nonlinear_grad_for_llama`` with
``use_relp_grad=True`` as ``Circuit.from_dataset`` calls it; its attention lets q/k gradients
flow). ``relp_unmasked`` (:data:`neuron_effects.relp_rules.UNMASKED`) is that rule set on the
forward pass that code runs: attention without the causal mask. The rule names and the config's
estimate methods are in :mod:`neuron_effects.relp_rules`.

Every rule is installed by :func:`relevance_rules` as a forward hook whose output is a
:class:`_Routed` tensor: its forward value IS the module's own output (so forward values are
unchanged, bit for bit), and its backward sends the incoming gradient either into the module's
own graph (the plain gradient) or into a surrogate whose gradient is the rule's. Which way is
decided at backward time by a :class:`RuleSwitch`, so one forward serves the plain backward and
one backward per rule set.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .model import LlamaFamily


@dataclass
class RuleSwitch:
    """The rules the next backward pass applies (empty: the plain gradient)."""

    active: frozenset[str] = field(default_factory=frozenset)


class _Routed(torch.autograd.Function):
    """Value of ``value``; the gradient goes to ``value`` (plain) or to ``surrogate`` (when
    ``rule`` is active in ``switch`` at backward time)."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, surrogate: torch.Tensor, rule: str,
                switch: RuleSwitch) -> torch.Tensor:
        ctx.rule, ctx.switch = rule, switch
        ctx.surrogate_has_graph = surrogate.requires_grad
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.rule not in ctx.switch.active:
            return gradient, None, None, None
        return None, (gradient if ctx.surrogate_has_graph else None), None, None


def routed(value: torch.Tensor, surrogate: torch.Tensor, rule: str,
           switch: RuleSwitch) -> torch.Tensor:
    """``value``, whose gradient under ``rule`` is the ``surrogate``'s (see :class:`_Routed`)."""
    return _Routed.apply(value, surrogate, rule, switch)


def _epsilon(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", None) or norm.eps)


def _norm_surrogate(norm: nn.Module, hidden: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``g * x / rms(x)`` with ``1/rms`` detached (the LN-rule), computed as transformers'
    RMSNorm computes it (float32 inside), in the output's dtype."""
    wide = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    inverse = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + _epsilon(norm)).detach()
    return (norm.weight * (wide * inverse).to(hidden.dtype)).to(output.dtype)


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


@contextmanager
def relevance_rules(model: LlamaFamily, switch: RuleSwitch) -> Iterator[None]:
    """Install every rule (:data:`neuron_effects.relp_rules.RULES`) on ``model`` (see the module
    docstring) for the duration; which of them a backward pass applies is ``switch.active`` at
    that time."""

    def norm_rule(module, args, output):
        return routed(output, _norm_surrogate(module, args[0], output), "ln", switch)

    def identity_rule(module, args, output):
        gate = args[0]
        return routed(output, gate * torch.sigmoid(gate).detach(), "identity", switch)

    def half_rule(module, args):
        product = args[0]
        return (routed(product, product * 0.5, "half", switch),)

    def frozen_attention(module, args, output):
        return routed(output, output.detach(), "frozen_attention", switch)

    activation = getattr(model.config, "hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"RelP's identity rule is defined for SiLU, not {activation!r}")
    handles = [module.register_forward_hook(norm_rule)
               for module in model.causal_lm.modules() if _is_rms_norm(module)]
    activations = {id(block.mlp.act_fn): block.mlp.act_fn for block in model.layers}
    handles += [module.register_forward_hook(identity_rule) for module in activations.values()]
    for block in model.layers:
        handles.append(block.mlp.down_proj.register_forward_pre_hook(half_rule))
        handles.append(block.self_attn.q_proj.register_forward_hook(frozen_attention))
        handles.append(block.self_attn.k_proj.register_forward_hook(frozen_attention))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def routed_readout(logit: torch.Tensor, unnormalized: torch.Tensor, inverse_rms: torch.Tensor,
                   switch: RuleSwitch) -> torch.Tensor:
    """The target ``logit`` = ``unnormalized / rms(h)`` of the final norm's input ``h``, whose
    gradient under the LN-rule is that of ``unnormalized * inverse_rms.detach()``."""
    return routed(logit, unnormalized * inverse_rms.detach(), "ln", switch)
