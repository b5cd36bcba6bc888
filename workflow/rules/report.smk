rule render_report:
    input:
        per_prompt=rules.aggregate_effects.output.per_prompt,
        neurons=rules.aggregate_effects.output.neurons,
        layers=rules.aggregate_effects.output.layers,
        prompts=rules.aggregate_effects.output.prompts,
        mediation_layers=rules.aggregate_effects.output.mediation_layers,
        edges=rules.aggregate_effects.output.edges,
        validation_table=rules.validate_sample.output.table,
        validation_summary=rules.validate_sample.output.summary,
        activation_stats=rules.extract_activations.output.stats,
        atp_candidates=atp_output("candidates"),
        profile_scores=profile_scores_if_any,
    output:
        page=report(
            "results/report/report.html",
            caption="../report/report.rst",
            category="Report",
        ),
        # the report's figures as files too, for Snakemake's report (one caption each)
        class_bars=report(
            "results/report/figures/class_bars.png",
            caption="../report/figure_class_bars.rst",
            category="Figures",
        ),
        ratio_distributions=report(
            "results/report/figures/ratio_distributions.png",
            caption="../report/figure_ratio_distributions.rst",
            category="Figures",
        ),
        direct_vs_indirect=report(
            "results/report/figures/direct_vs_indirect.png",
            caption="../report/figure_direct_vs_indirect.rst",
            category="Figures",
        ),
        alignment=report(
            "results/report/figures/alignment.png",
            caption="../report/figure_alignment.rst",
            category="Figures",
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
            "estimates": ", ".join(ATP_METHODS) if ATP else "none",
            "edge_min_relative_delta": config["mediators"]["edge_min_relative_delta"],
            "census_layers": config["census"]["layers"],
            **config["classification"],
            "shards": len(PLAN.shards),
            "n_layers": SHAPE.n_layers,
        },
        top_n=config["report"]["top_n"],
        census_table_top=config["census"]["table_top"],
        census=CENSUS,
        jobs=benchmarked_jobs(),
        estimate=ESTIMATE.as_dict(),
    script:
        "../scripts/render_report.py"
