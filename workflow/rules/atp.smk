# Attribution patching (config atp.enabled): a first-order estimate of every neuron's total effect
# from one forward and one backward per prompt, beside the exact effects of the studied neurons.
# Its own GPU job per prompt chunk rather than a part of cache_clean_runs: the clean cache (and
# everything downstream of it) stays independent of the attribution settings, at the price of one
# more model load per chunk.


rule estimate_attribution:
    input:
        clean="results/clean/{chunk}.safetensors",
        model=ancient(model_ready),
        stats=activation_stats_if_needed,
    output:
        "results/atp/chunks/{chunk}.safetensors",
    log:
        "logs/estimate_attribution/{chunk}.log",
    benchmark:
        "benchmarks/estimate_attribution/{chunk}.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    threads: 2
    resources:
        gpu=gpu_request,
    params:
        model=MODEL,
        treatment=config["treatment"],
        positions=config["positions"],
        methods=ATP_METHODS,
        cache=CACHE,
    script:
        "../scripts/estimate_attribution.py"


rule summarize_attribution:
    input:
        chunks=atp_chunks(),
        profiles=config["neurons"],
    output:
        estimates="results/atp/estimates.safetensors",
        neurons=report(
            "results/atp/neurons.parquet",
            caption="../report/atp.rst",
            category="Attribution patching",
        ),
        candidates=report(
            "results/atp/candidates.parquet",
            caption="../report/atp.rst",
            category="Attribution patching",
        ),
    log:
        "logs/summarize_attribution.log",
    benchmark:
        "benchmarks/summarize_attribution/all.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    params:
        candidates=config["atp"]["candidates"],
    script:
        "../scripts/summarize_attribution.py"
