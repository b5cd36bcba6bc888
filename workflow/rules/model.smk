# The model, prepared once for every model job (src/neuron_effects/prepare.py): a GGUF file
# converted to safetensors with its config and tokenizer, or a hub snapshot downloaded into the
# hub cache (HF_HOME) and linked. A local folder needs nothing: this rule is then not defined.
# On the login node under Slurm: a hub download needs the network, which compute nodes may lack.
if PREPARED.manifest:

    rule prepare_model:
        output:
            PREPARED.manifest,
        log:
            "logs/prepare_model.log",
        benchmark:
            "benchmarks/prepare_model/all.tsv"
        localrule: True
        conda:
            "../../envs/neuron-effects.yaml"
        params:
            prepared=vars(PREPARED),
            trust_remote_code=config["trust_remote_code"],
        script:
            "../scripts/prepare_model.py"
