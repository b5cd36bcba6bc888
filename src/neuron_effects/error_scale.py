"""How large float32's rounding error on a logit effect is, from the run's own scale.

A logit is a dot product of the final residual (through the final norm) with a row of the
unembedding. Rounding every operation that leads to it in float32 leaves an error proportional
to the size of the logits themselves, not to the model's parameter count: scaling the
unembedding by 100 scales every logit, every effect and every rounding error by 100. So the
bound on the error of an effect (a difference of two logits) is

    bound = ERROR_FACTOR * eps_float32 * logit_scale,   logit_scale = max_t |clean logit_t|

taken per prompt from its clean run. ``ERROR_FACTOR`` is measured, not derived: the largest
``|float32 fast path - float64 reference| / (eps * logit_scale)`` over every metric was 2.7-9.6 on
tiny random Llama/Qwen3 models with logits and residuals scaled by 1 and by 100 (the same
ratio at every scale) and at most 13.5 on SmolLM2-135M (30 layers; max error 3.3e-5 over 6
prompts whose max |logit| is 20.5-31.2, BENCHMARKS.md "Precision"). 64 leaves a margin of 4.7x
over the worst of these. bfloat16's eps
is 2^16 times float32's, so a bf16 run is off by many bounds and fails at every scale.

The same bound is the default noise floor of ``direct_ratio`` (``|d| + |i|`` below it is float
noise, the ratio is undefined), and the validation's tolerance on ``|run - reference|``.
Relative errors are taken only where ``|reference|`` is at least ``RELATIVE_FLOOR_FACTOR``
bounds, so that float32's own error there is at most 1/``RELATIVE_FLOOR_FACTOR`` of the value.
"""

from __future__ import annotations

import torch

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)  # 2^-23 ~ 1.19e-7
ERROR_FACTOR = 64.0
RELATIVE_FLOOR_FACTOR = 10.0


def logit_scale(clean_logits: torch.Tensor) -> float:
    """``max_t |clean logit_t|`` of one prompt's clean run (its last position)."""
    return float(clean_logits.detach().abs().max())


def float32_error_bound(scale: float) -> float:
    """``ERROR_FACTOR * eps_float32 * scale``: the largest error of a float32 logit effect when
    the logits are of size ``scale`` (:func:`logit_scale`)."""
    return ERROR_FACTOR * FLOAT32_EPS * scale


def ratio_noise_floor(configured: float | None, clean_logits: torch.Tensor) -> float:
    """The noise floor of ``direct_ratio`` for one prompt: ``configured``
    (``metrics.ratio_noise_floor``), or when None (``auto``) :func:`float32_error_bound` at the
    prompt's :func:`logit_scale`."""
    return float32_error_bound(logit_scale(clean_logits)) if configured is None else configured
