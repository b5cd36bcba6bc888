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
        outside_profile=False,
    script:
        "../scripts/aggregate_block.py"


# The verified candidates' part of the aggregation (atp.verify_candidates): one CPU job, the
# same script as a layer block's, every neuron outside the profile.
rule aggregate_candidates:
    input:
        shards=candidate_shards(),
        mediation_shards=candidate_shards("mediation"),
        mediator_shards=candidate_shards("mediators"),
        edge_shards=[],
        profiles=ancient(config["neurons"]),
        estimates=atp_chunks_if_enabled,
    output:
        **CANDIDATE_PARTS,
    log:
        "logs/aggregate_candidates.log",
    benchmark:
        "benchmarks/aggregate_candidates/all.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    params:
        prompt_order=[record.prompt_id for record in CHECKED.records],
        thresholds=config["classification"],
        mediator_top_k=config["mediators"]["top_k"],
        edge_min_relative_delta=config["mediators"]["edge_min_relative_delta"],
        census=False,
        outside_profile=True,
    script:
        "../scripts/aggregate_block.py"


rule aggregate_effects:
    input:
        parts=block_part_files(),
        candidates=list(CANDIDATE_PARTS.values()) if VERIFY else [],
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
        non_finite="results/validation/non_finite.json",
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
        candidates=CANDIDATE_PARTS if VERIFY else None,
    script:
        "../scripts/aggregate_effects.py"


rule validate_sample:
    input:
        per_prompt=rules.aggregate_effects.output.per_prompt,
        non_finite=rules.aggregate_effects.output.non_finite,
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


# The profile's own scores (profile_scores fields) judged against the exact mean totals: a light
# job of its own, so that changing profile_scores reruns only it and the report (a score edited
# in the profile file reruns no block: their params digest only ids and edges).
rule judge_profile_scores:
    input:
        neurons=rules.aggregate_effects.output.neurons,
        profiles=config["neurons"],
    output:
        table=report(
            "results/summary/profile_scores.parquet",
            caption="../report/profile_scores.rst",
            category="Tables",
        ),
    log:
        "logs/judge_profile_scores.log",
    localrule: True
    conda:
        "../../envs/neuron-effects.yaml"
    params:
        fields=config["profile_scores"],
    script:
        "../scripts/judge_profile_scores.py"
