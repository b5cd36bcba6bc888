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


# atp.verify_candidates: the neurons outside the profile with the largest mean |total_atp| over
# prompts, whose effects compute_candidate_effects computes exactly (neuron_effects.verified).
rule select_candidates:
    input:
        rules.summarize_attribution.output.neurons,
    output:
        "results/atp/verified_candidates.parquet",
    log:
        "logs/select_candidates.log",
    benchmark:
        "benchmarks/select_candidates/all.tsv"
    localrule: True
    conda:
        "../../envs/neuron-effects.yaml"
    params:
        n=config["atp"]["verify_candidates"],
    script:
        "../scripts/select_candidates.py"


# The verified candidates (atp.verify_candidates) on one prompt chunk: the same engine, settings
# and row cache as the profile's shards (a candidate that enters the profile later reuses its
# rows); its neurons are read from the selection, known only after the attribution jobs.
rule compute_candidate_effects:
    input:
        clean="results/clean/{chunk}.safetensors",
        model=ancient(model_ready),
        stats=activation_stats_if_needed,
        candidates=rules.select_candidates.output[0],
    output:
        per_prompt="results/effects/candidates/{chunk}.parquet",
        mediation="results/effects/candidates/{chunk}.mediation.parquet",
        mediators="results/effects/candidates/{chunk}.mediators.parquet",
        edges="results/effects/candidates/{chunk}.edges.parquet",
    log:
        "logs/compute_candidate_effects/{chunk}.log",
    benchmark:
        "benchmarks/compute_candidate_effects/{chunk}.tsv"
    conda:
        "../../envs/neuron-effects.yaml"
    threads: 2
    resources:
        gpu=gpu_request,
    params:
        model=MODEL,
        neurons=[],
        edges={},
        settings=EFFECT_SETTINGS,
        neurons_per_block=config["compute"]["neurons_per_block"],
        prompt_format=PROMPT_FORMAT,
        cache=CACHE,
    script:
        "../scripts/compute_effects.py"
