rule compute_effects:
    input:
        clean="results/clean/{chunk}.safetensors",
        model=ancient(model_ready),
        stats=activation_stats_if_needed,
    output:
        per_prompt="results/effects/shards/{block}_{chunk}.parquet",
        mediation="results/effects/shards/{block}_{chunk}.mediation.parquet",
        mediators="results/effects/shards/{block}_{chunk}.mediators.parquet",
        edges="results/effects/shards/{block}_{chunk}.edges.parquet",
    log:
        "logs/compute_effects/{block}_{chunk}.log",
    benchmark:
        "benchmarks/compute_effects/{block}_{chunk}.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    threads: 2
    resources:
        gpu=GPUS,
    params:
        model=MODEL,
        neurons=shard_neurons,
        edges=shard_edges,
        settings=EFFECT_SETTINGS,
        neurons_per_block=config["compute"]["neurons_per_block"],
        prompt_format=PROMPT_FORMAT,
        cache=CACHE,
    script:
        "../scripts/compute_effects.py"

