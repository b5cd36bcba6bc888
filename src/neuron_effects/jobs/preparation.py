"""Rule prepare_inputs: the two input files validated against the model and prepared.

Reads: the neurons (profile) file and the prompts file, the model's config and tokenizer.
Writes: ``results/inputs/prompts.parquet`` (the prepared prompts) and
``results/inputs/neurons.parquet`` (the neuron table).
"""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd

from .. import store
from ..input_checks import checked_inputs
from ..inputs import extra_columns
from ..model import ModelSpec
from ..precision import low_precision_warning
from .setup import log

# The columns of the prepared prompt table, in order; the user's own prompt fields follow them.
PREPARED_COLUMNS = ("prompt_id", "prompt", "text", "n_tokens", "input_ids", "target",
                    "target_id", "distractor", "distractor_id", "warnings")


def prepare_inputs(
    neurons_path: str, prompts_path: str, spec: ModelSpec, chat_template: bool,
    system_prompt: str | None, prompts_out: str, neurons_out: str, cache_dir: str | None = None,
    response_prefix: str = "",
) -> None:
    """Validate both input files against the model (config and tokenizer only, no weights;
    reusing the parse-time checks cached in ``cache_dir``) and write the prepared prompts (the
    user's records with token ids and targets resolved in context) and the neuron table."""
    warning = low_precision_warning(spec.dtype)
    if warning:
        log.warning("%s", warning)
    checked = checked_inputs(neurons_path, prompts_path, asdict(spec), chat_template,
                             system_prompt, cache_dir, response_prefix)
    for row in checked.prepared:
        for warning in row["warnings"]:
            log.warning("prompt %r: %s", row["prompt_id"], warning)
    records = pd.DataFrame([{"prompt_id": r.prompt_id, "prompt": r.prompt, "target": r.target,
                             "distractor": r.distractor} for r in checked.records])
    prepared = pd.DataFrame(checked.prepared).drop(columns="prompt_id")
    frame = pd.concat([records, prepared, pd.DataFrame(extra_columns(checked.records))], axis=1)
    frame = frame[[*PREPARED_COLUMNS, *(c for c in frame.columns if c not in PREPARED_COLUMNS)]]
    frame = frame.astype({"target_id": "Int64", "distractor_id": "Int64"})
    store.write_parquet(prompts_out, frame)
    store.write_parquet(neurons_out, pd.DataFrame([vars(n) for n in checked.neurons]))
    log.info("%d prompts (%d-%d tokens) and %d neurons validated", len(frame),
             frame["n_tokens"].min(), frame["n_tokens"].max(), len(checked.neurons))
