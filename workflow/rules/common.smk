"""Config validation, the shard plan (read at parse time) and input functions."""

from pathlib import Path

from snakemake.utils import validate

from neuron_effects.demo import DEFAULT_PATH as DEMO_MODEL
from neuron_effects.inputs import digest, model_location, read_neurons, read_prompts
from neuron_effects.plan import make_plan

validate(config, "../../config/config.schema.yaml")

# Bad input stops the run here, before any job is submitted (file, line, record in the error).
if config["model"] != str(DEMO_MODEL):  # the demo model is fetched by a rule
    model_location(config["model"])
NEURONS = read_neurons(config["neurons"])
PROMPTS = read_prompts(config["prompts"])
PLAN = make_plan(
    NEURONS,
    PROMPTS,
    config["sharding"]["layers_per_shard"],
    config["sharding"]["prompts_per_chunk"],
)

MODEL = {
    key: config[key]
    for key in ("model", "tokenizer", "dtype", "device", "trust_remote_code")
}
PROMPT_FORMAT = {key: config[key] for key in ("chat_template", "system_prompt")}
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
    "vocab_rows": config["compute"]["vocab_rows"],
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
    if location == str(DEMO_MODEL) or Path(location).expanduser().exists():
        return [str(Path(location).expanduser())]
    return []


def clean_chunks(wildcards=None):
    return expand(
        "results/clean/{chunk}.safetensors", chunk=[c.name for c in PLAN.chunks]
    )


def effect_shards(wildcards=None):
    return expand(
        "results/effects/shards/{shard}.parquet", shard=[s.name for s in PLAN.shards]
    )


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


def chunk_prompt_ids(wildcards):
    return PLAN.chunk(wildcards.chunk).prompt_ids


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
