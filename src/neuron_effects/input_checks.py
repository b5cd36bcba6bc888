"""The input checks that need the model's config and tokenizer, run while the workflow is parsed.

Running them at parse time means that bad input stops ``snakemake`` (a dry run too) before any
job is planned, and that the plan's jobs get their prepared prompts (token ids, targets resolved
in context) from their params: no job waits for a checking job, so a dry run after an edit lists
exactly the jobs that will rerun. The result is cached in ``<cache_dir>/<digest>.json``, the
digest covering the two input files' bytes, the model and tokenizer settings (and the
modification time of a local model or tokenizer path), the prompt format and the package
version, so that parsing again (every Slurm job parses the workflow) reads one small file
instead of loading a tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .inputs import InputError, Neuron, PromptRecord, digest, read_neurons, read_prompts
from .prompts import prepare_prompt
from .store import write_json

# What the clean runs need of each prepared prompt (the rest of the table is the user's record).
PREPARED_FIELDS = ("prompt_id", "text", "n_tokens", "input_ids", "target_id", "distractor_id",
                   "warnings")


@dataclass(frozen=True)
class CheckedInputs:
    """Both input files, validated against the model: the neurons, the prompt records, per
    prompt the fields of :data:`PREPARED_FIELDS` (in the records' order), and the model's
    dimensions (:class:`~neuron_effects.cost.ModelShape` fields, for the cost model)."""

    neurons: list[Neuron]
    records: list[PromptRecord]
    prepared: list[dict[str, Any]]
    shape: dict[str, Any]


def prepare_prompts(
    neurons: list[Neuron], records: list[PromptRecord], neurons_path: str, prompts_path: str,
    model: dict[str, Any], chat_template: bool, system_prompt: str | None,
    response_prefix: str = "",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Check the neurons against the model config (layer range, intermediate size), tokenize
    every prompt, resolve its target and distractor in context and check its length; returns
    the prepared prompts and the model's dimensions."""
    from .cost import ModelShape
    from .model import ModelSpec, check_neurons, check_prompt_length, load_config, load_tokenizer

    spec = ModelSpec(**model)
    config = load_config(spec)
    check_neurons(config, neurons, neurons_path)
    tokenizer = load_tokenizer(spec)
    rows = []
    for record in records:
        try:
            prepared = prepare_prompt(tokenizer, record, chat_template, system_prompt,
                                      response_prefix)
        except InputError as error:  # name the file too, as the tokenizer-free checks do
            raise InputError(f"{prompts_path}: {error}") from error
        check_prompt_length(config, len(prepared.input_ids),
                            f"{prompts_path}: line {record.line}: prompt {record.prompt_id!r}")
        rows.append({"prompt_id": prepared.prompt_id, "text": prepared.text,
                     "n_tokens": len(prepared.input_ids), "input_ids": prepared.input_ids,
                     "target_id": prepared.target_id, "distractor_id": prepared.distractor_id,
                     "warnings": prepared.warnings})
    return rows, asdict(ModelShape.from_config(config))


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _modified(location: str | None) -> int | None:
    """The modification time of a local model or tokenizer path (``None`` for a hub id)."""
    path = None if location is None else Path(location).expanduser()
    return path.stat().st_mtime_ns if path is not None and path.exists() else None


def checked_inputs(
    neurons_path: str, prompts_path: str, model: dict[str, Any], chat_template: bool,
    system_prompt: str | None, cache_dir: str | Path | None = None, response_prefix: str = "",
) -> CheckedInputs:
    """Read and check both input files (:func:`read_neurons`, :func:`read_prompts`, then
    :func:`prepare_prompts`), reusing a cached result for the same files and settings.

    ``model`` holds the :class:`~neuron_effects.model.ModelSpec` fields. A failed check raises
    :class:`InputError` and caches nothing; ``cache_dir=None`` caches nothing either."""
    neurons = read_neurons(neurons_path)
    records = read_prompts(prompts_path)
    key = digest([_file_digest(neurons_path), _file_digest(prompts_path), model,
                  _modified(model["model"]), _modified(model.get("tokenizer")), chat_template,
                  system_prompt, response_prefix, __version__])
    cached = None if cache_dir is None else Path(cache_dir) / f"{key}.json"
    if cached is not None and cached.exists():
        result = json.loads(cached.read_text())
        return CheckedInputs(neurons, records, result["prepared"], result["shape"])
    prepared, shape = prepare_prompts(neurons, records, str(neurons_path), str(prompts_path),
                                      model, chat_template, system_prompt, response_prefix)
    if cached is not None:
        write_json(cached, {"prepared": prepared, "shape": shape})
    return CheckedInputs(neurons, records, prepared, shape)
