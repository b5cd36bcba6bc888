"""Attribution patching: the gradient is exact (finite differences on a tiny float64 model,
plain autograd through hooked forwards on SmolLM2), the estimate is ``s * (g . w_n)``, and it
agrees with the exact totals on SmolLM2."""

from __future__ import annotations


import pandas as pd
import pytest
import torch

from conftest import tiny_model
from engine_checks import random_neurons
from neuron_effects import agreement, attribution
from neuron_effects.clean import run_clean
from neuron_effects.effects import EffectSettings, compute_effects, neuron_block
from neuron_effects.model import LlamaFamily
from neuron_effects.reference import reference_layer_gradients
from neuron_effects.treatments import TREATMENTS

PROMPT = [5, 17, 2, 99, 43, 8, 61, 30, 12, 77, 3]
TARGET = 7


def float64_model(architecture: str = "llama") -> LlamaFamily:
    """A tiny random model entirely in float64: transformers' RMSNorm computes in float32 even
    for a float64 input, which would leave ~1e-7 noise in the finite differences, so each norm
    is replaced by the same formula in the input's dtype."""
    model = tiny_model(architecture).causal_lm.double()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = lambda x, m=module: m.weight * x * torch.rsqrt(
                x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
    return LlamaFamily(model)


def target_logit(model: LlamaFamily, layer: int, vector: torch.Tensor) -> float:
    """The model's own target logit (float64) with ``vector`` ([hidden] at the last position or
    [T, hidden] at every position) added to the output of decoder layer ``layer``."""

    def add(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        if vector.dim() == 1:
            hidden[0, -1] += vector
        else:
            hidden[0] += vector
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.layers[layer].register_forward_hook(add)
    try:
        with torch.no_grad():
            logits = model.causal_lm(input_ids=torch.tensor([PROMPT]), logits_to_keep=1).logits
    finally:
        handle.remove()
    return float(logits[0, -1, TARGET])


def central_difference(model: LlamaFamily, layer: int, direction: torch.Tensor,
                       step: float = 1e-4) -> float:
    """d logit_target / d epsilon of ``direction * epsilon`` added after ``layer``, at 0."""
    return (target_logit(model, layer, step * direction)
            - target_logit(model, layer, -step * direction)) / (2 * step)


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_gradient_matches_finite_differences_last_position(architecture):
    model = float64_model(architecture)
    projections, logit = attribution.neuron_gradients(model, PROMPT, TARGET, "last")
    assert projections.shape == (model.n_layers, model.intermediate_size)
    assert projections.dtype == torch.float32
    assert logit == pytest.approx(target_logit(model, 0, torch.zeros(model.hidden_size)),
                                  abs=1e-5)
    generator = torch.Generator().manual_seed(3)
    for layer in range(model.n_layers):
        for neuron in torch.randint(0, model.intermediate_size, (3,), generator=generator):
            direction = model.layers[layer].mlp.down_proj.weight[:, neuron]
            expected = central_difference(model, layer, direction)
            assert float(projections[layer, neuron]) == pytest.approx(expected, abs=1e-6), \
                (layer, int(neuron))
    assert projections.abs().max() > 0.1  # gradients well above the tolerance


def test_gradient_matches_finite_differences_every_position():
    """With positions all, the estimate is the directional derivative along the per-position
    treatment V_t = s_t * w_n (each position its own activation), i.e. sum_t s_t p_{L,t}[n]."""
    model = float64_model()
    projections, _ = attribution.neuron_gradients(model, PROMPT, TARGET, "all")
    assert projections.shape == (model.n_layers, len(PROMPT), model.intermediate_size)
    clean = run_clean(model, PROMPT, "p", range(model.n_layers))
    activations = torch.stack([clean.full_activations[layer] for layer in range(model.n_layers)])
    estimates = attribution.first_order_estimates(projections, activations, "add")
    for layer, neuron in [(0, 5), (1, 40), (2, 63), (3, 17)]:
        weight = model.layers[layer].mlp.down_proj.weight[:, neuron]
        vectors = clean.full_activations[layer][:, neuron, None].double() * weight[None]
        assert float(estimates[layer, neuron]) == pytest.approx(
            central_difference(model, layer, vectors), abs=1e-6)
    # the last position's row of the all-position gradient is the last-position gradient
    last, _ = attribution.neuron_gradients(model, PROMPT, TARGET, "last")
    torch.testing.assert_close(projections[:, -1], last, rtol=0, atol=1e-6)


@pytest.mark.parametrize("treatment", TREATMENTS)
def test_estimate_is_scale_times_gradient_dot_direction(treatment):
    """est(L, n) = s * (g_L . w_n) with g_L from the plain-autograd reference, for each
    treatment's s (add a, zero_ablate -a, mean_ablate mean - a)."""
    model = tiny_model()
    clean = run_clean(model, PROMPT, "p")
    means = torch.linspace(-0.5, 0.5, model.intermediate_size).repeat(model.n_layers, 1)
    projections, _ = attribution.neuron_gradients(model, PROMPT, TARGET, "last")
    estimates = attribution.first_order_estimates(projections, clean.activations, treatment,
                                                  means)
    gradients = reference_layer_gradients(model, torch.tensor(PROMPT), TARGET)[:, -1]
    for layer in range(model.n_layers):
        weight = model.layers[layer].mlp.down_proj.weight
        a = clean.activations[layer]
        scale = {"add": a, "zero_ablate": -a, "mean_ablate": means[layer] - a}[treatment]
        expected = scale * (gradients[layer] @ weight)
        torch.testing.assert_close(estimates[layer], expected, rtol=1e-4, atol=1e-5)
    assert estimates.abs().max() > 0.1


def test_estimate_with_positions_sums_over_positions():
    model = tiny_model()
    clean = run_clean(model, PROMPT, "p", range(model.n_layers))
    activations = torch.stack([clean.full_activations[layer] for layer in range(model.n_layers)])
    projections, _ = attribution.neuron_gradients(model, PROMPT, TARGET, "all")
    means = torch.full((model.n_layers, model.intermediate_size), 0.25)
    estimates = attribution.first_order_estimates(projections, activations, "mean_ablate", means)
    expected = ((means[:, None, :] - activations) * projections).sum(1)
    torch.testing.assert_close(estimates, expected)
    with pytest.raises(ValueError, match="differ in shape"):
        attribution.first_order_estimates(projections, clean.activations, "add")


# --- SmolLM2: against plain autograd, and against the exact engine ------------------------------

SMOLLM2_PROMPTS = [
    ("In the history of medicine, few discoveries changed as much as antibiotics. Penicillin "
     "was discovered in 1928 by the Scottish scientist Alexander", " Fleming"),
    ("The organ that pumps blood through the human body is the", " heart"),
    ("Insulin is a hormone produced by the", " pancreas"),
    ("The largest bone in the human body is the", " femur"),
]


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["last", "all"])
def test_gradient_matches_plain_autograd_on_smollm2(smollm2, positions):
    model, tokenizer = smollm2
    prompt, target = SMOLLM2_PROMPTS[0]
    ids = tokenizer(prompt)["input_ids"]
    target_id = tokenizer(target, add_special_tokens=False)["input_ids"][0]
    projections, _ = attribution.neuron_gradients(model, ids, target_id, positions)
    gradients = reference_layer_gradients(model, torch.tensor(ids), target_id)
    if positions == "last":
        gradients = gradients[:, -1]
    for layer in range(model.n_layers):
        expected = gradients[layer] @ model.layers[layer].mlp.down_proj.weight
        torch.testing.assert_close(projections[layer], expected, rtol=0, atol=1e-4)
    assert projections.abs().max() > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("treatment, threshold", [("add", 0.99), ("zero_ablate", 0.95)])
def test_estimates_agree_with_exact_totals_on_smollm2(smollm2, treatment, threshold):
    """On 4 prompts x 60 neurons: ranks agree closely, the estimate is a good screen."""
    model, tokenizer = smollm2
    neurons = random_neurons(model, per_layer=2, seed=5)
    block = neuron_block(model, neurons, full_vocab=False)
    settings = EffectSettings(treatment=treatment, full_vocab=False, batch_rows=64)
    frames = []
    for index, (prompt, target) in enumerate(SMOLLM2_PROMPTS):
        ids = tokenizer(prompt)["input_ids"]
        target_id = tokenizer(target, add_special_tokens=False)["input_ids"][0]
        clean = run_clean(model, ids, f"p{index}")
        exact = compute_effects(model, clean, block, settings, target_id, None, None).per_prompt
        projections, _ = attribution.neuron_gradients(model, ids, target_id)
        estimates = attribution.first_order_estimates(projections, clean.activations, treatment)
        frames.append(exact.assign(prompt_id=f"p{index}", total_atp=estimates.numpy()[
            exact["layer"].to_numpy(), exact["neuron"].to_numpy()]))
    table = pd.concat(frames, ignore_index=True)
    overall = agreement.overall_agreement(table)
    assert overall["atp_spearman"] > threshold, overall
    assert overall["atp_sign_agreement"] > 0.9, overall
    assert overall["atp_median_relative_error"] < 0.2, overall
    per_neuron = agreement.neuron_agreement(table)
    assert len(per_neuron) == len(neurons)
    assert per_neuron["atp_spearman"].median() > 0.5
