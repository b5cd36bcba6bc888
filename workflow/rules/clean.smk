rule cache_clean_runs:
    input:
        model=ancient(model_ready),
    output:
        "results/clean/{chunk}.safetensors",
    log:
        "logs/cache_clean_runs/{chunk}.log",
    benchmark:
        "benchmarks/cache_clean_runs/{chunk}.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    threads: 2
    resources:
        gpu=gpu_request,
    params:
        model=MODEL,
        prompts=chunk_prompts,
        fingerprint=chunk_fingerprint,
        prompt_format=PROMPT_FORMAT,
        cache=CACHE,
    script:
        "../scripts/cache_clean_runs.py"


rule extract_activations:
    input:
        clean_chunks,
    output:
        activations="results/activations/activations.safetensors",
        stats="results/activations/neuron_stats.parquet",
    log:
        "logs/extract_activations.log",
    benchmark:
        "benchmarks/extract_activations/all.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    params:
        active_threshold=config["activation_stats"]["active_threshold"],
    script:
        "../scripts/extract_activations.py"
