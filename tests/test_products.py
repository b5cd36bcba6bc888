"""Split-bf16 products (compute.products: split_bf16) against float32 and float64 references."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import skip_or_fail, tiny_model
from neuron_effects.clean import run_clean
from neuron_effects.direct import Readout
from neuron_effects.effects import EffectSettings, compute_effects, neuron_block
from neuron_effects.inputs import Neuron
from neuron_effects.model import LlamaFamily, cast_parameters, round_parameters
from neuron_effects.torch_builds import cuda_unusable_message, nvidia_driver
from neuron_effects.products import (REPLAY_LINEARS, SplitBf16Linear, SplitWeight,
                                     bf16_product, split_bf16, use_products)


def _activations(seed: int = 0) -> torch.Tensor:
    """Float32 rows spanning many magnitudes, as a residual stream does."""
    generator = torch.Generator().manual_seed(seed)
    scales = 10.0 ** torch.randint(-4, 4, (40, 1), generator=generator)
    return torch.randn(40, 96, generator=generator) * scales


def test_three_bf16_parts_sum_exactly_to_the_float32_value():
    x = _activations()
    parts = split_bf16(x, 3)
    assert parts.dtype == torch.bfloat16 and parts.shape == (3, *x.shape)
    assert torch.equal(parts.double().sum(0), x.double())
    two = split_bf16(x, 2).double().sum(0)
    relative = ((two - x.double()).abs() / x.double().abs()).max()
    assert 0 < relative <= 2.0 ** -16  # 16 significand bits kept (and a sign bit gained)


@pytest.mark.parametrize("bf16_weight", [True, False])
def test_split_product_is_float32_accurate(bf16_weight):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 96, generator=generator) / 10
    if bf16_weight:
        weight = weight.to(torch.bfloat16).float()
    x = _activations(2)
    truth = x.double() @ weight.double().T
    float32_error = ((x @ weight.T).double() - truth).abs().max()
    split = SplitWeight(weight, 3)
    assert split.exact == bf16_weight
    assert len(split.weight_parts) == (1 if bf16_weight else 3)
    assert split.weight_parts.dtype == torch.bfloat16
    assert torch.equal(split.float(), weight)
    error = (split.product_t(x).double() - truth).abs().max()
    assert error <= 2 * float32_error
    two_part_error = (SplitWeight(weight, 2).product_t(x).double() - truth).abs().max()
    assert two_part_error > error  # 2 parts drop the last 8 bits of x


def test_bf16_product_accumulates_in_float32():
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(8, 512, generator=generator).to(torch.bfloat16)
    b = torch.randn(512, 16, generator=generator).to(torch.bfloat16)
    product = bf16_product(a, b)
    assert product.dtype == torch.float32
    assert torch.allclose(product.double(), a.double() @ b.double(), rtol=0, atol=1e-4)


def test_cuda_split_product_agrees_with_the_cpu_one():
    """The tensor-core path (torch.mm with out_dtype float32). Skipped without a GPU; where
    nvidia-smi finds one but CUDA is unusable, a failure under REQUIRE_ALL_TESTS=1."""
    if not torch.cuda.is_available():
        if nvidia_driver()[0] is None:
            pytest.skip("the tensor-core path needs CUDA (no NVIDIA GPU here)")
        reason = cuda_unusable_message("cuda", torch.__version__, torch.version.cuda,
                                       *nvidia_driver())
        skip_or_fail(f"an NVIDIA GPU is present but CUDA is unusable: {reason}")
    weight = torch.randn(256, 384).to(torch.bfloat16).float()
    x = _activations(4).repeat(1, 4)
    cpu = SplitWeight(weight, 3).product_t(x)
    cuda = SplitWeight(weight.cuda(), 3).product_t(x.cuda()).cpu()
    truth = x.double() @ weight.double().T
    assert (cuda.double() - truth).abs().max() <= 2 * (cpu.double() - truth).abs().max() + 1e-6


def test_use_products_keeps_only_bf16_weights_and_the_model_still_reads_them():
    model = tiny_model("llama")
    round_parameters(model.causal_lm, torch.bfloat16)
    down = model.layers[1].mlp.down_proj.weight.clone()
    readout_before = Readout(model).unnormalized(torch.randn(3, model.hidden_size))
    use_products(model, "split_bf16", 3)
    for block in model.layers:
        for name in REPLAY_LINEARS:
            owner, attribute = name.split(".")
            module = getattr(getattr(block, owner), attribute)
            assert isinstance(module, SplitBf16Linear)
            assert module.split.exact and module.split.weight_parts.dtype == torch.bfloat16
            assert not list(module.parameters())  # no float32 copy kept
    assert torch.equal(model.layers[1].mlp.down_proj.weight, down)
    assert model.intermediate_size == down.shape[1]
    hidden = torch.randn(3, model.hidden_size)
    split_readout = Readout(model)
    assert split_readout.split is not None
    assert torch.allclose(split_readout.unnormalized(hidden),
                          hidden * model.readout()[0] @ model.readout()[1].T, atol=1e-4)
    assert readout_before.shape == (3, model.vocab_size)


def _effects(model: LlamaFamily, neurons, settings, input_ids=(3, 14, 15, 92, 65, 35, 89, 79),
             target: int = 7, distractor: int | None = 11) -> dict[str, torch.Tensor]:
    clean = run_clean(model, list(input_ids), "p")
    frame = compute_effects(model, clean, neuron_block(model, neurons, settings.full_vocab),
                            settings, target, distractor).per_prompt
    return {name: torch.tensor(frame[name].to_numpy()) for name in ("total", "indirect", "direct")}


@pytest.mark.parametrize("bf16_weights", [True, False])
def test_split_effects_are_as_close_to_float64_as_float32(bf16_weights):
    """The whole engine with split_bf16 (3 parts) on a tiny random Llama, against the same
    weights in float64: every effect within 2x float32's error (plus 1e-7 for ties near 0)."""
    base = tiny_model("llama", seed=3)
    if bf16_weights:
        round_parameters(base.causal_lm, torch.bfloat16)
    neurons = [Neuron(f"L{layer}/N{n}", layer, n) for layer in range(base.n_layers)
               for n in range(0, base.intermediate_size, 5)]
    settings = EffectSettings(batch_rows=16, vocab_rows=8, top_k=5)
    truth = _effects(LlamaFamily(cast_parameters(copy.deepcopy(base.causal_lm), torch.float64)),
                     neurons, settings)
    float32 = _effects(base, neurons, settings)
    split_model = LlamaFamily(copy.deepcopy(base.causal_lm))
    use_products(split_model, "split_bf16", 3)
    split = _effects(split_model, neurons, settings)
    for name in truth:
        float32_error = (float32[name] - truth[name]).abs().max()
        split_error = (split[name] - truth[name]).abs().max()
        assert split_error <= 2 * float32_error + 1e-7, name
        assert (split[name] - float32[name]).abs().max() < 1e-4


def test_unknown_products_are_rejected():
    with pytest.raises(ValueError, match="products"):
        EffectSettings(products="bf16")
    with pytest.raises(ValueError, match="split_parts"):
        EffectSettings(products="split_bf16", split_parts=4)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="float32 model"):
        use_products(LlamaFamily(cast_parameters(model.causal_lm, torch.float64)), "split_bf16")


@pytest.mark.slow
def test_three_parts_are_within_twice_float32_error_on_smollm2(smollm2):
    """SmolLM2 with its weights rounded to bf16 (as bench_precision.py), 90 neurons x 1 demo
    prompt, target-only metrics: against float64, split_bf16 with 3 parts has at most twice
    float32's median and max error on total and indirect (measured on the benchmark's 1,800
    rows: 0.65x); 2 parts are worse (10x: BENCHMARKS.md section 8)."""
    from neuron_effects.inputs import PromptRecord
    from neuron_effects.prompts import prepare_prompt

    model, tokenizer = smollm2
    base = LlamaFamily(copy.deepcopy(model.causal_lm))
    round_parameters(base.causal_lm, torch.bfloat16)
    prepared = prepare_prompt(tokenizer, PromptRecord(
        "p", "The antibiotic penicillin was discovered by Alexander", " Fleming", None, 1))
    generator = torch.Generator().manual_seed(0)
    neurons = [Neuron(f"L{layer}/N{int(n)}", layer, int(n)) for layer in range(base.n_layers)
               for n in torch.randperm(base.intermediate_size, generator=generator)[:3]]
    settings = EffectSettings(full_vocab=False, mediators=False)
    run = {"input_ids": prepared.input_ids, "target": prepared.target_id, "distractor": None}
    truth = _effects(LlamaFamily(cast_parameters(copy.deepcopy(base.causal_lm), torch.float64)),
                     neurons, settings, **run)
    float32 = _effects(base, neurons, settings, **run)
    errors = {}
    for parts in (3, 2):
        split_model = LlamaFamily(copy.deepcopy(base.causal_lm))
        use_products(split_model, "split_bf16", parts)
        errors[parts] = _effects(split_model, neurons, settings, **run)
    for name in ("total", "indirect"):
        reference = (float32[name] - truth[name]).abs()
        three = (errors[3][name] - truth[name]).abs()
        two = (errors[2][name] - truth[name]).abs()
        assert three.median() <= 2 * reference.median() and three.max() <= 2 * reference.max()
        assert two.median() > three.median()
