"""What computing in bfloat16 or float16 does to single-neuron effects, as measured.

Kept free of torch so that the workflow can warn at parse time, before any job runs.
"""

from __future__ import annotations

# Measured by benchmarks/bench_precision.py (BENCHMARKS.md, "Precision"): SmolLM2-135M with
# bf16-rounded weights, 300 neurons x 6 prompts, treatment add, target logit, against float64.
LOW_PRECISION_CONSEQUENCE = {
    "bfloat16": "the median error of a total effect is 0.053 logits against a median |total| "
                "of 0.0032; 99 % of the rows are off by more than 10 %, 39 % have the wrong "
                "sign, correlation with the truth 0.39 (indirect alike)",
    "float16": "the median error of a total effect is 0.0076 logits against a median |total| "
               "of 0.0032; 87 % of the rows are off by more than 10 %, 26 % have the wrong "
               "sign, correlation with the truth 0.94 (indirect alike)",
}


def low_precision_warning(dtype: str) -> str | None:
    """The warning for an explicit bfloat16/float16 run (None for float32/auto), naming the
    consequence measured by ``benchmarks/bench_precision.py``."""
    if dtype not in LOW_PRECISION_CONSEQUENCE:
        return None
    return (
        f"dtype {dtype}: single-neuron effects are mostly rounding noise at this precision. "
        "Measured on SmolLM2-135M (300 neurons x 6 prompts, treatment add, target logit, "
        f"against float64 on the same weights): {LOW_PRECISION_CONSEQUENCE[dtype]}. float32 is "
        "off by 5.5e-6 (median; max 3.3e-5) there. Use dtype: float32 (the default) for "
        "indirect effects, direct ratios and effect types; the validation will fail."
    )
