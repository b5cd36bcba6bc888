rule compute_effects:
    input:
        clean="results/clean/{chunk}.safetensors",
        # ancient: only orders the shards after validation, never reruns them
        neurons=ancient(rules.prepare_inputs.output.neurons),
        model=ancient(model_files),
        stats=activation_stats_if_needed,
    output:
        "results/effects/shards/{block}_{chunk}.parquet",
    params:
        model=MODEL,
        neurons=shard_neurons,
        settings=EFFECT_SETTINGS,
        neurons_per_block=config["compute"]["neurons_per_block"],
        fingerprint=shard_fingerprint,
        partial="results/effects/partial/{block}_{chunk}",
    log:
        "logs/compute_effects/{block}_{chunk}.log",
    benchmark:
        "benchmarks/compute_effects/{block}_{chunk}.tsv"
    threads: 2
    resources:
        gpu=GPUS,
    script:
        "../scripts/compute_effects.py"
