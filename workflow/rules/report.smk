rule render_report:
    input:
        per_prompt=rules.aggregate_effects.output.per_prompt,
        neurons=rules.aggregate_effects.output.neurons,
        layers=rules.aggregate_effects.output.layers,
        prompts=rules.aggregate_effects.output.prompts,
        validation_table=rules.validate_sample.output.table,
        validation_summary=rules.validate_sample.output.summary,
        activation_stats=rules.extract_activations.output.stats,
        atp_candidates=atp_output("candidates"),
    output:
        report(
            "results/report/report.html",
            caption="../report/report.rst",
            category="Report",
        ),
    log:
        "logs/render_report.log",
    localrule: True
    conda:
        "../../envs/neuron-effects.yaml"
    params:
        settings={
            "model": config["model"],
            "treatment": config["treatment"],
            "positions": config["positions"],
            "chat_template": config["chat_template"],
            "full_vocab_metrics": config["metrics"]["full_vocab"],
            "top_k": config["metrics"]["top_k"],
            "ratio_noise_floor": config["metrics"]["ratio_noise_floor"],
            "attribution_patching": ATP,
            **config["classification"],
            "shards": len(PLAN.shards),
        },
        top_n=config["report"]["top_n"],
        benchmarks=benchmark_files(),
    script:
        "../scripts/render_report.py"
