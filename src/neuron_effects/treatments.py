"""Treatments: the vector ``V = s * w_n`` added to the residual stream after decoder layer ``L``.

``w_n`` is column ``n`` of ``layers[L].mlp.down_proj.weight``; the scale ``s`` depends on the
neuron's clean activation ``a`` (the input of ``down_proj``, same position):

* ``add`` (the plan's default): ``s = a``, the neuron's own contribution, added once more;
* ``zero_ablate``: ``s = -a``, exactly equivalent to setting the neuron to zero;
* ``mean_ablate``: ``s = mean_a - a``, setting it to its mean over the prompt set.

With ``positions: last`` V is added at the last position only; with ``positions: all`` at every
position ``t``, each with its own ``s_t`` from ``a_t``.
"""

from __future__ import annotations

import torch

TREATMENTS = ("add", "zero_ablate", "mean_ablate")
POSITIONS = ("last", "all")


def treatment_scales(
    activations: torch.Tensor, treatment: str, mean_activations: torch.Tensor | None = None
) -> torch.Tensor:
    """The scale ``s`` for each activation ``a`` (any shape; ``mean_activations`` broadcasts)."""
    if treatment == "add":
        return activations.clone()
    if treatment == "zero_ablate":
        return -activations
    if treatment == "mean_ablate":
        if mean_activations is None:
            raise ValueError("mean_ablate needs the neurons' mean activations")
        return mean_activations - activations
    raise ValueError(f"unknown treatment {treatment!r} (use one of {', '.join(TREATMENTS)})")


def add_to_residual(residual: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``residual + V`` computed in float32 (float64 for a float64 residual) and rounded once to
    the residual's dtype.

    The single place where a treatment enters the residual stream, shared by the fast path and
    the reference path so that both round identically in bf16.
    """
    wide = torch.promote_types(residual.dtype, torch.float32)
    return (residual.to(wide) + vectors.to(wide)).to(residual.dtype)
