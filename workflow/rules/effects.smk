rule compute_effects:
    input:
        clean="results/clean/{chunk}.safetensors",
        model=ancient(model_ready),
        stats=activation_stats_if_needed,
    output:
        per_prompt="results/effects/shards/{block}_{chunk}.parquet",
        mediation="results/effects/shards/{block}_{chunk}.mediation.parquet",
        mediators="results/effects/shards/{block}_{chunk}.mediators.parquet",
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
        settings=EFFECT_SETTINGS,
        neurons_per_block=config["compute"]["neurons_per_block"],
        fingerprint=shard_fingerprint,
        partial="results/effects/partial/{block}_{chunk}",
    script:
        "../scripts/compute_effects.py"
