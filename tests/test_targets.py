"""Targets in chat mode: the leading-space warning, response_prefix, and the low-rank check."""

from __future__ import annotations

import pandas as pd
import pytest

from neuron_effects.inputs import InputError, PromptRecord
from neuron_effects.model import ModelSpec, load_tokenizer
from neuron_effects.prompts import prepare_prompt
from neuron_effects.report import low_rank_banner
from neuron_effects.targets import check_target_ranks, is_low_rank

QUESTION = "Which city is the capital of France?"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    """SmolLM2's tokenizer, with its chat template."""
    return load_tokenizer(ModelSpec(str(tiny_model_dir)))


def test_leading_space_in_chat_mode_warns_naming_the_no_space_token(tokenizer):
    record = PromptRecord("capital", QUESTION, " Paris", " Lyon", 3)
    prepared = prepare_prompt(tokenizer, record, chat_template=True)
    assert prepared.text.endswith("<|im_start|>assistant\n")
    target_warning, distractor_warning = prepared.warnings
    assert "chat mode: the target ' Paris' starts with a space" in target_warning
    assert "write 'Paris' (one token here) instead" in target_warning
    assert "distractor ' Lyon'" in distractor_warning
    fixed = prepare_prompt(tokenizer, PromptRecord("capital", QUESTION, "Paris", None, 3),
                           chat_template=True)
    assert fixed.warnings == [] and tokenizer.decode([fixed.target_id]) == "Paris"
    # plain mode: a leading space is right, and there is no warning
    assert prepare_prompt(tokenizer, record).warnings == []


def test_no_space_word_of_several_tokens_suggests_response_prefix(tokenizer):
    record = PromptRecord("drug", "Who discovered penicillin?", " Fleming", None, 1)
    (warning,) = prepare_prompt(tokenizer, record, chat_template=True).warnings
    assert "'Fleming' spans" in warning and "response_prefix" in warning


def test_response_prefix_follows_the_assistant_header(tokenizer):
    record = PromptRecord("drug", "Who discovered penicillin?", " Fleming", None, 1)
    prepared = prepare_prompt(tokenizer, record, chat_template=True,
                              response_prefix="It was discovered by Alexander")
    assert prepared.text.endswith("<|im_start|>assistant\nIt was discovered by Alexander")
    assert prepared.warnings == []  # the target follows text: its space is right
    assert tokenizer.decode([prepared.target_id]) == " Fleming"
    assert prepared.input_ids == tokenizer(prepared.text, add_special_tokens=False)["input_ids"]
    with pytest.raises(InputError, match="response_prefix 'The answer is' is set but "
                                         "chat_template is false"):
        prepare_prompt(tokenizer, record, response_prefix="The answer is")


def _record(prompt_id: str, rank: int, source: str = "given") -> dict:
    return {"prompt_id": prompt_id, "target_token": " Fleming", "target_source": source,
            "clean_target_rank": rank, "clean_target_prob": 2e-6, "clean_top_token": "The",
            "clean_top_prob": 0.4}


def test_low_rank_targets_are_listed_or_stop_the_run():
    records = [_record("ok", 100), _record("low", 4_600), _record("argmax", 1, "argmax")]
    assert [is_low_rank(record, 100) for record in records] == [False, True, False]
    (line,) = check_target_ranks(records, 100, "warn")
    assert line == ("prompt 'low': target ' Fleming' has clean rank 4,600 (probability 2e-06); "
                    "the model predicts 'The' (probability 0.4)")
    with pytest.raises(InputError, match=r"(?s)1 prompt\(s\) have a target ranked below the top "
                                         r"100.*prompt 'low'.*response_prefix"):
        check_target_ranks(records, 100, "stop")
    assert check_target_ranks(records, 5_000, "stop") == []
    with pytest.raises(InputError, match="on_low_rank must be one of warn, stop"):
        check_target_ranks(records, 100, "ignore")


def test_report_banner_shows_rank_and_probability():
    prompts = pd.DataFrame([{**_record("low", 4_600), "target_low_rank": True},
                            {**_record("ok", 3), "target_low_rank": False}])
    banner = low_rank_banner(prompts)
    assert 'id="low-rank-targets"' in banner and "1 of 2 prompts" in banner
    assert "low: target &#x27; Fleming&#x27; rank 4,600, probability 2e-06" in banner
    assert low_rank_banner(prompts.iloc[1:]) == ""


@pytest.mark.slow
def test_chat_warnings_at_parse_time_and_stop_after_the_clean_runs(tiny_model_dir, tmp_path):
    """The demo prompts (leading-space targets) in chat mode: a dry run already warns, naming
    each prompt; with on_low_rank: stop the clean-run job fails listing the prompts (the tiny
    random model predicts none of the targets)."""
    from workflow_helpers import snakemake, write_workdir

    workdir = write_workdir(tmp_path / "run", str(tiny_model_dir), n_prompts=2, device="cpu",
                            chat_template=True, targets={"on_low_rank": "stop"})
    dry = snakemake(workdir, "-n").stdout
    assert ("prompt 'penicillin': chat mode: the target ' Fleming' starts with a space" in dry)
    assert "prompt 'heart_chambers': chat mode: the target ' ventricles'" in dry
    failed = snakemake(workdir, "--cores", "1", "results/clean/c000.safetensors", check=False)
    assert failed.returncode != 0
    log = (workdir / "logs/cache_clean_runs/c000.log").read_text()
    assert "2 prompt(s) have a target ranked below the top 100" in log
    assert "prompt 'penicillin': target ' Fleming' has clean rank" in log
    assert not (workdir / "results/clean/c000.safetensors").exists()
