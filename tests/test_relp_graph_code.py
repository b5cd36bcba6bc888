"""The workflow's ``total_relp`` (default rules) and ``total_relp_unmasked`` against an
independent implementation: a Llama forward written here in plain torch over the model's
weights (float64), in which the rules are applied with detach tricks as the attribution graphs'
code (TransluceAI/circuits, ``stop_nonlinear_grad_for_llama`` with ``use_relp_grad=True``)
applies them: RMSNorm ``x * rsqrt(mean x^2 + eps).detach() * w``, SiLU
``g * sigmoid(g).detach()``, the gated product ``0.5 p + 0.5 p.detach()``; attention with q/k
gradients flowing, causal or (as the released code runs it) with no mask."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from neuron_effects import relp_rules
from neuron_effects.jobs.estimates import prompt_estimates
from neuron_effects.clean import run_clean
from neuron_effects.model import LlamaFamily

PROMPT = [5, 17, 2, 99, 43, 8, 61, 30, 12, 77, 3]
TARGET = 7
GRAPH_RULES = ("ln", "identity", "half")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, ln: bool) -> torch.Tensor:
    inverse = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * (inverse.detach() if ln else inverse) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def hand_written_pass(model: LlamaFamily, input_ids: list[int], target_id: int,
                      rules: tuple[str, ...], causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_down_L^T g~_L`` and the MLP activations ``a`` (``down_proj``'s input), both
    [n_layers, intermediate] at the last position, float64: ``g~_L`` the gradient of the target
    logit, through the hand-written forward with ``rules`` applied (``frozen_attention``: q and
    k detached), with respect to a zero added to the output of decoder layer ``L``."""
    config = model.config
    weights = {name: value.detach().double() for name, value in
               model.causal_lm.state_dict().items()}
    prefix = "model."
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = config.rms_norm_eps
    theta = config.rope_parameters["rope_theta"]
    assert config.rope_parameters["rope_type"] == "default"
    length = len(input_ids)
    inverse_frequency = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64)
                                        / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inverse_frequency)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    future = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    deltas = [torch.zeros(length, config.hidden_size, dtype=torch.float64, requires_grad=True)
              for _ in range(config.num_hidden_layers)]
    activations = []
    x = weights[prefix + "embed_tokens.weight"][torch.tensor(input_ids)]
    for layer in range(config.num_hidden_layers):
        p = f"{prefix}layers.{layer}."
        normed = _rms_norm(x, weights[p + "input_layernorm.weight"], eps, "ln" in rules)
        q = (normed @ weights[p + "self_attn.q_proj.weight"].T).view(length, heads, head_dim)
        k = (normed @ weights[p + "self_attn.k_proj.weight"].T).view(length, kv_heads, head_dim)
        v = (normed @ weights[p + "self_attn.v_proj.weight"].T).view(length, kv_heads, head_dim)
        q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
        if "frozen_attention" in rules:
            q, k = q.detach(), k.detach()
        k = k.repeat_interleave(heads // kv_heads, 1)
        v = v.repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        if causal:
            scores = scores.masked_fill(future, -math.inf)
        mixed = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, -1)
        x = x + mixed @ weights[p + "self_attn.o_proj.weight"].T
        normed = _rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps, "ln" in rules)
        gate = normed @ weights[p + "mlp.gate_proj.weight"].T
        sigmoid = torch.sigmoid(gate)
        act = gate * (sigmoid.detach() if "identity" in rules else sigmoid)
        product = act * (normed @ weights[p + "mlp.up_proj.weight"].T)
        activations.append(product[-1].detach())
        if "half" in rules:
            product = 0.5 * product + 0.5 * product.detach()
        x = x + product @ weights[p + "mlp.down_proj.weight"].T + deltas[layer]
    final = _rms_norm(x[-1], weights[prefix + "norm.weight"], eps, "ln" in rules)
    unembedding = weights.get("lm_head.weight", weights[prefix + "embed_tokens.weight"])
    gradients = torch.autograd.grad(final @ unembedding[target_id], deltas)
    projections = torch.stack([gradient[-1] @ weights[f"{prefix}layers.{layer}.mlp.down_proj."
                                                      "weight"]
                               for layer, gradient in enumerate(gradients)])
    return projections, torch.stack(activations)


SCALE_SIGN = {"add": 1.0, "zero_ablate": -1.0}  # s = a, s = -a


def hand_written_estimates(model: LlamaFamily, input_ids: list[int], target_id: int,
                           rules: tuple[str, ...], causal: bool, treatment: str
                           ) -> torch.Tensor:
    """``s * W_down_L^T g~_L`` of :func:`hand_written_pass`, ``s`` from the activations of the
    same forward (add: ``a``; zero_ablate: ``-a``)."""
    projections, activations = hand_written_pass(model, input_ids, target_id, rules, causal)
    return SCALE_SIGN[treatment] * activations * projections


def workflow_estimates(model: LlamaFamily, input_ids: list[int], target_id: int,
                       treatment: str) -> dict[str, torch.Tensor]:
    """The attribution job's estimates of one prompt (:func:`neuron_effects.jobs.estimates.prompt_estimates`) for the
    methods ``atp, relp, relp_unmasked`` with the default rules, as the config names them."""
    methods = relp_rules.method_rules(["atp", "relp", "relp_unmasked"], list(GRAPH_RULES))
    run = run_clean(model, input_ids, "p0")
    return prompt_estimates(model, run, {"target_id": target_id}, treatment, "last",
                                   None, methods, {"atp": (), **methods})


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|."""
    return float((got.double() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("treatment", ["add", "zero_ablate"])
def test_default_relp_and_relp_unmasked_match_the_hand_written_forward(treatment):
    model = tiny_model()
    got = workflow_estimates(model, PROMPT, TARGET, treatment)
    causal = hand_written_estimates(model, PROMPT, TARGET, GRAPH_RULES, True, treatment)
    unmasked = hand_written_estimates(model, PROMPT, TARGET, GRAPH_RULES, False, treatment)
    assert relative_error(got["relp"], causal) < 1e-4
    assert relative_error(got["relp_unmasked"], unmasked) < 1e-4
    plain = hand_written_estimates(model, PROMPT, TARGET, (), True, treatment)
    assert relative_error(got["atp"], plain) < 1e-4
    # the wrong variants are far beyond that tolerance, so each check can fail: frozen attention
    # added to the default, the causal mask kept, the clean (causal) activations used for s
    frozen = hand_written_estimates(model, PROMPT, TARGET, (*GRAPH_RULES, "frozen_attention"),
                                    True, treatment)
    unmasked_projections, _ = hand_written_pass(model, PROMPT, TARGET, GRAPH_RULES, False)
    _, causal_activations = hand_written_pass(model, PROMPT, TARGET, GRAPH_RULES, True)
    clean_scales = SCALE_SIGN[treatment] * causal_activations * unmasked_projections
    for wrong in (frozen, unmasked, plain):
        assert relative_error(got["relp"], wrong) > 1e-2
    for wrong in (causal, clean_scales):
        assert relative_error(got["relp_unmasked"], wrong) > 1e-2


@pytest.mark.slow
def test_default_relp_and_relp_unmasked_match_the_hand_written_forward_on_smollm2(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("Penicillin was discovered in 1928 by Alexander")["input_ids"]
    target = tokenizer(" Fleming", add_special_tokens=False)["input_ids"][0]
    got = workflow_estimates(model, ids, target, "add")
    causal = hand_written_estimates(model, ids, target, GRAPH_RULES, True, "add")
    unmasked = hand_written_estimates(model, ids, target, GRAPH_RULES, False, "add")
    assert relative_error(got["relp"], causal) < 1e-3
    assert relative_error(got["relp_unmasked"], unmasked) < 1e-3
    assert relative_error(got["relp_unmasked"], causal) > 1e-2
    frozen = hand_written_estimates(model, ids, target, (*GRAPH_RULES, "frozen_attention"),
                                    True, "add")
    assert relative_error(got["relp"], frozen) > 1e-2


def test_the_unmasked_forward_refuses_an_attention_that_ignores_the_mask():
    from neuron_effects import attribution

    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="not 'flash_attention_2'"):
        attribution.method_gradients(model, PROMPT, TARGET, "last", {"relp": GRAPH_RULES},
                                     causal=False)
