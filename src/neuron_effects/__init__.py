"""neuron_effects: exact direct and indirect effects of single MLP neurons on next-token logits.

The science lives here; the Snakemake workflow only routes files to it. Modules: ``inputs``
(reading the user's files), ``input_checks`` (their checks against the model, at parse time,
cached), ``model`` (loading, Llama-family accessors), ``prompts``
(tokenization, targets in context), ``targets`` (targets the clean model does not predict),
``clean`` (the clean forward), ``treatments`` (V = s * w),
``direct`` (algebraic direct effects), ``total`` (the fast exact total), ``metrics``, ``effects``
(the per-prompt driver), ``reference`` (slow correct paths), ``store`` (files, resumable shards),
``aggregate``, ``error_scale`` (float32's error at the run's logit scale: the tolerances),
``validation``, ``plan``, ``plan_cost`` and ``layout`` (the shard plan, its cost, the automatic
layout), ``report`` with ``report_html`` (its HTML and figure helpers), its sections
(``report_routes``, ``report_attribution``, ``report_census``) and ``report_table`` (its table of
every neuron). ``jobs``: the workflow's steps, a module per rule family.
"""

__version__ = "0.1.0"
