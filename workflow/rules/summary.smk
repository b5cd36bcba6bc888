# The aggregation, one CPU job per layer block of the shard plan (in parallel on a cluster;
# only the blocks whose shards or profile neurons changed run again), then a light final step
# that joins the blocks' parts into the outputs.
rule aggregate_block:
    input:
        shards=block_shards(),
        mediation_shards=block_shards("mediation"),
        mediator_shards=block_shards("mediators"),
        edge_shards=block_shards("edges"),
        # what the block reads of the profile is in its params (block_profile)
        profiles=ancient(config["neurons"]),
        # the chunks' estimates, not the stacked file: summarize_attribution rewrites that one
        # after any profile edit
        estimates=atp_chunks_if_enabled,
    output:
        **{part: f"results/aggregate/{{block}}/{part}.parquet" for part in BLOCK_PARTS},
    log:
        "logs/aggregate_block/{block}.log",
    benchmark:
        "benchmarks/aggregate_block/{block}.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    resources:
        runtime=block_runtime,
    params:
        prompt_order=[record.prompt_id for record in CHECKED.records],
        profile=block_profile,
        thresholds=config["classification"],
        mediator_top_k=config["mediators"]["top_k"],
        edge_min_relative_delta=config["mediators"]["edge_min_relative_delta"],
        census=CENSUS,
    script:
        "../scripts/aggregate_block.py"


rule aggregate_effects:
    input:
        parts=block_part_files(),
        prompts=rules.prepare_inputs.output.prompts,
        clean=clean_chunks(),
        profiles=config["neurons"],
    output:
        per_prompt=report(
            "results/effects/per_prompt.parquet",
            caption="../report/per_prompt.rst",
            category="Tables",
        ),
        neurons=report(
            "results/summary/neurons.parquet",
            caption="../report/neurons.rst",
            category="Tables",
        ),
        neurons_json=report(
            "results/summary/neurons.json",
            caption="../report/neurons.rst",
            category="Tables",
        ),
        layers=report(
            "results/summary/layers.parquet",
            caption="../report/layers.rst",
            category="Tables",
        ),
        mediation="results/effects/mediation.parquet",
        mediators="results/effects/mediators.parquet",
        mediation_layers="results/summary/mediation_layers.parquet",
        edges="results/summary/edges.parquet",
        prompts="results/summary/prompts.parquet",
        labels=report(LABELS, caption="../report/labels.rst", category="Labels"),
    log:
        "logs/aggregate_effects.log",
    benchmark:
        "benchmarks/aggregate_effects/all.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    resources:
        runtime=aggregate_runtime,
    params:
        blocks=block_parts(),
        mediator_top_k=config["mediators"]["top_k"],
        max_rank=config["targets"]["max_rank"],
        census=CENSUS,
    script:
        "../scripts/aggregate_effects.py"


rule validate_sample:
    input:
        per_prompt=rules.aggregate_effects.output.per_prompt,
        clean=clean_chunks(),
        model=ancient(model_ready),
    output:
        table="results/validation/pairs.parquet",
        summary=report(
            "results/validation/summary.json",
            caption="../report/validation.rst",
            category="Validation",
        ),
    log:
        "logs/validate_sample.log",
    benchmark:
        "benchmarks/validate_sample/all.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    threads: 2
    resources:
        gpu=gpu_request,
    params:
        model=MODEL,
        settings=EFFECT_SETTINGS,
        validation=config["validation"],
    script:
        "../scripts/validate_sample.py"
