"""RelP: the modified backward of :mod:`neuron_effects.relp` against an independent
implementation of the same rules written here in plain transformers (monkey-patched norms,
forward hooks that detach), on a tiny random Llama and on SmolLM2; forward values unchanged."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import pytest
import torch

from conftest import REPO, tiny_model
from neuron_effects import attribution, relp, relp_rules
from neuron_effects.model import LlamaFamily

PROMPT = [5, 17, 2, 99, 43, 8, 61, 30, 12, 77, 3]
TARGET = 7


@contextmanager
def detached_rules(model: LlamaFamily, rules: Sequence[str]) -> Iterator[None]:
    """The rules as the issue spells them, by detaching inside a plain forward: every RMSNorm's
    forward replaced by ``g * x * rsqrt(mean(x^2) + eps).detach()``; ``act_fn(x)`` replaced by
    ``x * sigmoid(x).detach()``; ``down_proj``'s input ``p`` by ``p/2 + (p/2).detach()``;
    ``q_proj`` and ``k_proj`` outputs detached."""
    patched, handles = [], []
    if "ln" in rules:
        for module in model.causal_lm.modules():
            if type(module).__name__.endswith("RMSNorm"):
                def forward(x, m=module):
                    wide = x.float()
                    scale = torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
                    return m.weight * (wide * scale.detach()).to(x.dtype)

                module.forward = forward
                patched.append(module)
    for block in model.layers:
        if "identity" in rules:
            handles.append(block.mlp.act_fn.register_forward_hook(
                lambda module, args, output: args[0] * torch.sigmoid(args[0]).detach()))
        if "half" in rules:
            handles.append(block.mlp.down_proj.register_forward_pre_hook(
                lambda module, args: (args[0] / 2 + (args[0] / 2).detach(),)))
        if "frozen_attention" in rules:
            for projection in (block.self_attn.q_proj, block.self_attn.k_proj):
                handles.append(projection.register_forward_hook(
                    lambda module, args, output: output.detach()))
    try:
        yield
    finally:
        for module in patched:
            del module.forward
        for handle in handles:
            handle.remove()


def independent_projections(model: LlamaFamily, input_ids: list[int], target_id: int,
                            rules: Sequence[str]) -> torch.Tensor:
    """``W_down_L^T g~_L`` [n_layers, intermediate] at the last position: ``g~_L`` the gradient,
    through the detached forward, of the model's own target logit (``lm_head(norm(h))``) with
    respect to a zero leaf added to the output of each decoder layer."""
    deltas = [torch.zeros(len(input_ids), model.hidden_size, requires_grad=True)
              for _ in range(model.n_layers)]
    handles = [block.register_forward_hook(
        lambda module, args, output, delta=delta: (output[0] + delta[None], *output[1:])
        if isinstance(output, tuple) else output + delta[None])
        for block, delta in zip(model.layers, deltas)]
    try:
        with torch.enable_grad(), detached_rules(model, rules):
            logits = model.causal_lm(input_ids=torch.tensor([input_ids])).logits
            gradients = torch.autograd.grad(logits[0, -1, target_id].float(), deltas)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([gradient[-1].float() @ block.mlp.down_proj.weight.float()
                        for gradient, block in zip(gradients, model.layers)])


RULE_SETS = [(rule,) for rule in relp_rules.RULES] + [relp_rules.DEFAULT_RULES, relp_rules.RULES]


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_relp_gradients_match_the_detached_implementation(architecture):
    model = tiny_model(architecture)
    methods = {"atp": (), **{relp_rules.method_name(rules): rules for rules in RULE_SETS}}
    projections, _, _ = attribution.method_gradients(model, PROMPT, TARGET, "last", methods)
    plain, _ = attribution.neuron_gradients(model, PROMPT, TARGET)
    torch.testing.assert_close(projections["atp"], plain, rtol=0, atol=0)
    for rules in RULE_SETS:
        expected = independent_projections(model, PROMPT, TARGET, rules)
        got = projections[relp_rules.method_name(rules)]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=str(rules))
        assert (got - plain).abs().max() > 1e-2, rules  # each rule changes the gradient
    assert projections["relp"].abs().max() > 0.05
    assert (projections["relp"] - projections["relp_ln_identity_half_frozen_attention"]
            ).abs().max() > 1e-2


def test_forward_values_are_unchanged_by_the_rules():
    model = tiny_model()
    ids = torch.tensor([PROMPT])

    def hooks() -> int:
        return sum(len(module._forward_hooks) + len(module._forward_pre_hooks)
                   for module in model.causal_lm.modules())

    with torch.no_grad():
        expected = model.causal_lm(input_ids=ids, output_hidden_states=True)
    before = hooks()  # transformers installs its own on the first call
    switch = relp.RuleSwitch(frozenset(relp_rules.RULES))
    with torch.enable_grad(), relp.relevance_rules(model, switch):
        treated = model.causal_lm(input_ids=ids, output_hidden_states=True)
    assert torch.equal(treated.logits, expected.logits)
    for mine, theirs in zip(treated.hidden_states, expected.hidden_states):
        assert torch.equal(mine, theirs)
    # the hooks are gone afterwards
    assert hooks() == before


def test_rule_sets_and_names():
    assert relp_rules.rule_sets(["half", "ln"]) == [("ln", "half")]
    assert relp_rules.rule_sets([["ln"], ["frozen_attention", "identity"], ["ln"]]) == [
        ("ln",), ("identity", "frozen_attention")]
    assert relp_rules.method_name(["half", "identity", "ln"]) == "relp"  # the graphs' code's rules
    assert relp_rules.method_name(relp_rules.RULES) == "relp_ln_identity_half_frozen_attention"
    assert relp_rules.method_name(["half", "ln"]) == "relp_ln_half"
    with pytest.raises(ValueError, match="unknown RelP rules"):
        relp_rules.rule_sets(["lrp"])
    with pytest.raises(ValueError, match="unknown RelP rules"):  # a forward, not a rule
        relp_rules.rule_sets([relp_rules.UNMASKED])


@pytest.mark.slow
def test_relp_gradients_match_the_detached_implementation_on_smollm2(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("Insulin is a hormone produced by the")["input_ids"]
    target = tokenizer(" pancreas", add_special_tokens=False)["input_ids"][0]
    projections, _, _ = attribution.method_gradients(model, ids, target, "last",
                                                  {"relp": relp_rules.RULES})
    expected = independent_projections(model, ids, target, relp_rules.RULES)
    torch.testing.assert_close(projections["relp"], expected, rtol=0, atol=1e-4)
    assert projections["relp"].abs().max() > 0.1


def test_method_rules_from_the_config():
    four = relp_rules.RULES
    assert relp_rules.method_rules(["atp", "relp"], list(relp_rules.DEFAULT_RULES)) == {
        "atp": (), "relp": relp_rules.DEFAULT_RULES}
    assert relp_rules.method_rules(["relp"], [["ln"], list(four), ["half", "identity", "ln"]]) == {
        "relp_ln": ("ln",), "relp_ln_identity_half_frozen_attention": four,
        "relp": ("ln", "identity", "half")}
    assert relp_rules.method_rules(["atp"], list(four)) == {"atp": ()}
    unmasked = relp_rules.method_rules(["relp_unmasked"], list(four))  # always the default rules
    assert unmasked == {"relp_unmasked": ("ln", "identity", "half", relp_rules.UNMASKED)}
    assert relp_rules.forward_rules(unmasked["relp_unmasked"]) == (
        False, ("ln", "identity", "half"))
    assert relp_rules.forward_rules(four) == (True, four)


def test_the_default_rules_are_the_graph_codes_everywhere():
    """config.yaml, the schema's defaults and the user's 8B config: [ln, identity, half]
    (no frozen_attention), relp_unmasked off; the default set is the estimate ``relp``."""
    import yaml

    config = yaml.safe_load((REPO / "config/config.yaml").read_text())["atp"]
    schema = yaml.safe_load((REPO / "config/config.schema.yaml").read_text())
    atp = schema["properties"]["atp"]
    real = yaml.safe_load((REPO / "config/llama-3.1-8b.yaml").read_text())["atp"]
    for rules in (config["relp_rules"], atp["default"]["relp_rules"],
                  atp["properties"]["relp_rules"]["default"], real["relp_rules"]):
        assert rules == ["ln", "identity", "half"]
    for methods in (config["methods"], atp["default"]["methods"],
                    atp["properties"]["methods"]["default"], real["methods"]):
        assert methods == ["atp", "relp"]
    assert relp_rules.method_rules(config["methods"], config["relp_rules"])["relp"] == \
        relp_rules.DEFAULT_RULES


def test_report_compares_every_rule_set():
    """With several rule sets, the report's attribution section has one row per method in its
    summary table, one line per method in the by-layer figure and one scatter each."""
    import numpy as np
    import pandas as pd

    from neuron_effects.agreement import layer_agreement
    from neuron_effects.report_attribution import attribution_section

    rng = np.random.default_rng(0)
    per_prompt = pd.DataFrame({"prompt_id": np.repeat(["p0", "p1", "p2"], 8),
                               "neuron_id": np.tile([f"L{i // 2}/N{i}" for i in range(8)], 3),
                               "layer": np.tile(np.arange(8) // 2, 3),
                               "total": rng.normal(size=24)})
    methods = ("atp", "relp", "relp_ln", "relp_unmasked")
    for method in methods:
        per_prompt[f"total_{method}"] = per_prompt["total"] + rng.normal(0, 0.3, 24)
    layers = pd.DataFrame({"layer": range(4), "n_neurons": 2})
    for method in methods:
        layers = layers.merge(layer_agreement(per_prompt, method), on="layer")
    candidates = pd.DataFrame({"neuron_id": ["L0/N9"], "layer": [0], "neuron": [9],
                               "listed_by": ["atp, relp"], "rank": [1], "rank_relp": [1]})
    page = "".join(attribution_section(per_prompt, layers, candidates, 5, n_layers=6))
    for method in methods:
        assert f"<td>{method}</td>" in page and f"{method}: first-order estimate" in page
    assert page.count("<img") == 1 + 4 and "L0/N9" in page
    # by band: one row per (method, band of the model's 6 layers)
    assert "thirds of the model's 6 layers" in page
    assert page.count("<td>early</td>") == page.count("<td>late</td>") == len(methods)
    assert "<td>4-5</td>" in page
    assert "what the attribution graphs' code as released computes, NOT the model's" in page
