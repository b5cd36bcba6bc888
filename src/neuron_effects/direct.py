"""The final readout in float32 (float64 for a float64 model), and the DIRECT effects, computed
algebraically (no forward).

Readout of a final pre-norm hidden state ``h`` (the input of ``model.model.norm``) over a set of
vocabulary rows ``W`` of ``lm_head`` (all of them, or only the target/distractor rows):

    logits(h) = W (g * h) / r(h),      r(h) = sqrt(mean(h^2) + eps)

in float32 even when the model runs in bf16, in float64 when it runs in float64 (``g``: the
final norm's weight).

Freezing every downstream layer at its clean value makes the final hidden state ``h_c + V``
(``h_c``: the clean one, last position). With ``A = W (g * h_c)`` and the neuron's unembedded
output direction ``B_n = W (g * w_n)`` (prompt-independent), ``V = s * w_n`` gives:

* DIRECT (final norm recomputed, the plan's):  ``(A + s B_n) / r(h_c + V) - A / r(h_c)``
* DIRECT with the norm scale frozen at its clean value (direct logit attribution, linear in V):
  ``s B_n / r(h_c)``
* NORM-MEDIATED = direct - direct_frozen_norm.
"""

from __future__ import annotations

import torch

from .model import LlamaFamily
from .products import SplitWeight


class Readout:
    """Final norm and unembedding in the model's readout dtype (max(float32, model dtype)), over
    all vocabulary rows or the given ones. With ``compute.products: split_bf16``
    (``model.split_unembedding``) the product with ``W`` is a split-bf16 product
    (:mod:`neuron_effects.products`)."""

    def __init__(self, model: LlamaFamily, token_ids: torch.Tensor | None = None):
        norm_weight, unembedding, eps = model.readout()
        self.norm_weight = norm_weight
        self.dtype = norm_weight.dtype
        self.eps = eps
        self.token_ids = token_ids
        self.unembedding = unembedding if token_ids is None else unembedding[token_ids]
        split = model.split_unembedding
        if split is not None and token_ids is not None:
            split = SplitWeight(self.unembedding, split.parts)
        self.split = split

    def inverse_rms(self, hidden: torch.Tensor) -> torch.Tensor:
        """``1 / r(h)`` for rows h [B, hidden] (readout dtype) -> [B, 1]."""
        return torch.rsqrt(hidden.pow(2).mean(dim=-1, keepdim=True) + self.eps)

    def unnormalized(self, hidden: torch.Tensor) -> torch.Tensor:
        """``W (g * h)`` for rows h [B, hidden] -> [B, vocab rows]."""
        if self.split is not None:
            return self.split.product_t(hidden * self.norm_weight)
        return (hidden * self.norm_weight) @ self.unembedding.T

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``W (g * h) / r(h)`` for rows h [B, hidden] (any dtype; computed in the readout
        dtype)."""
        hidden = hidden.to(self.dtype)
        return self.unnormalized(hidden).mul_(self.inverse_rms(hidden))


def direct_effects(
    readout: Readout, clean_hidden: torch.Tensor, scales: torch.Tensor,
    directions: torch.Tensor, unembedded_directions: torch.Tensor,
    frozen_columns: torch.Tensor | None = None, clean_unnormalized: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct effects of ``V_b = scales[b] * directions[b]`` on the logits.

    clean_hidden: h_c [hidden]; directions: w_n [B, hidden]; unembedded_directions: B_n = W (g*w_n)
    [B, vocab rows] (from :meth:`Readout.unnormalized`); ``clean_unnormalized``: A = W (g*h_c)
    [1, vocab rows], computed here when not given (a caller with many batches of one prompt
    computes it once: it reads the whole unembedding). Returns ``(direct, direct_frozen_norm,
    clean_logits)``: [B, vocab rows], [B, vocab rows or len(frozen_columns)] and [vocab rows],
    in the readout dtype. A zero V gives exactly zero (the clean row is normalized in the same
    batch as the treated rows).
    """
    clean_hidden = clean_hidden.to(readout.dtype)
    scales = scales.to(readout.dtype)[:, None]
    rows = torch.cat([clean_hidden[None], clean_hidden + scales * directions.to(readout.dtype)])
    inverse = readout.inverse_rms(rows)
    if clean_unnormalized is None:
        clean_unnormalized = readout.unnormalized(clean_hidden[None])  # A
    clean_logits = clean_unnormalized * inverse[0]
    # (A + s B) / r(h_c + V) - A / r(h_c), in three passes over [B, vocab]
    direct = torch.addcmul(clean_unnormalized, scales, unembedded_directions)
    direct.mul_(inverse[1:]).sub_(clean_logits)
    if frozen_columns is not None:
        unembedded_directions = unembedded_directions[:, frozen_columns]
    frozen = unembedded_directions * (scales * inverse[0])
    return direct, frozen, clean_logits[0]
