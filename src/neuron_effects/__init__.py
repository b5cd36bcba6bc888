"""neuron_effects: exact direct and indirect effects of single MLP neurons on next-token logits.

The science lives here; the Snakemake workflow only routes files to it. Modules:

* inputs and the model: ``inputs`` (reading the user's files), ``profile_edges`` (the profiles'
  listed edges), ``profile_scores`` (their own scores, judged), ``input_checks`` (the checks
  against the model, at parse time, cached), ``prompts`` (tokenization, targets in context),
  ``targets`` (targets the clean model does not predict), ``model`` (loading, Llama-family
  accessors), ``torch_builds`` (the CUDA build for a driver), ``prepare`` (the model prepared
  once), ``demo`` (the demo model);
* the exact engine: ``clean`` (the clean forward and its file), ``treatments`` (V = s * w),
  ``direct`` (algebraic direct effects), ``total`` (the fast exact total), ``products``
  (split-bf16 products), ``metrics``, ``mediation`` (where the indirect effect goes), ``edges``
  (the listed edges measured), ``effects`` (the per-prompt driver), ``reference`` (slow correct
  paths), ``error_scale`` (float32's error at the run's logit scale: the tolerances),
  ``validation``, ``precision``;
* the estimates: ``attribution`` (attribution patching), ``relp`` with ``relp_rules`` (RelP's
  backward and its rule names), ``agreement`` (estimates against exact, the all-neuron table),
  ``verified`` (the neurons the graph missed), ``census``;
* the schedule: ``plan``, ``plan_cost``, ``cost`` and ``layout`` (the shard plan, its cost, the
  automatic layout), ``cache`` (results stored by what they are), ``store`` (atomic files);
* the outputs: ``aggregate``, ``report`` with ``report_html`` (its HTML and figure helpers), its
  sections (``report_routes``, ``report_attribution``, ``report_census``) and ``report_table``
  (its table of every neuron).

``jobs``: the workflow's steps, a module per rule family. What the workflow's parse imports
(``plan``, ``layout``, ``inputs``, ``profile_edges``, ``relp_rules``, ``torch_builds``, ...)
imports no torch (tests/test_parse_scale.py).
"""

__version__ = "0.1.0"
