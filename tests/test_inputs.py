"""Bad input: a clear error before any effect job runs, naming the record and the file (issue 3).

Most checks are tested at unit level: the tokenizer-free ones (``neuron_effects.inputs``) and the
model-dependent ones (``input_checks``/``jobs.preparation.prepare_inputs`` with the tiny model folder: config
and tokenizer only). Both kinds run while the Snakefile is parsed (the model-dependent ones cached
by input digest), so a few tests through the real workflow show that each stops ``snakemake -n``
before any job is planned.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import neuron_effects.model as model_module
import neuron_effects.torch_builds as torch_builds
from conftest import tiny_model
from neuron_effects.clean import run_clean
from neuron_effects.inputs import InputError, model_location, read_neurons, read_prompts
from neuron_effects.model import (ModelSpec, check_prompt_length, load_config, load_model,
                                  resolve_device)
from neuron_effects.jobs.preparation import prepare_inputs
from workflow_helpers import REPO, snakemake, write_workdir

DEMO_PROMPTS = (REPO / "config/demo/prompts.jsonl").read_text().splitlines()


def write_profiles(path: Path, records: list, wrap: bool = True) -> Path:
    path.write_text(json.dumps({"profiles": records} if wrap else records, indent=1))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def raises(pattern: str):
    """``pytest.raises(InputError)`` whose message must match ``pattern`` (a regex)."""
    return pytest.raises(InputError, match=pattern)


# --- files: missing, unreadable, syntax -------------------------------------------------------

@pytest.mark.parametrize("reader, what", [(read_neurons, "neuron profile"),
                                          (read_prompts, "prompt")])
def test_missing_file_is_named(tmp_path, reader, what):
    path = tmp_path / "nowhere" / "input.jsonl"
    with raises(f"^{what} file not found: {re.escape(str(path))}$"):
        reader(path)


@pytest.mark.parametrize("reader", [read_neurons, read_prompts])
def test_unreadable_file_is_named(tmp_path, reader):
    undecodable = tmp_path / "latin1.jsonl"
    undecodable.write_bytes(b'{"prompt": "caf\xe9"}\n')  # not UTF-8
    with raises(f"file {re.escape(str(undecodable))} cannot be read: .*utf-8"):
        reader(undecodable)
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with raises(f"path is not a file: {re.escape(str(folder))}"):
        reader(folder)


@pytest.mark.parametrize("name, text, reader", [
    ("profiles.json", '{"profiles": [\n  {"layer": 0, "neuron": 1},\n  {"layer": 0 "neuron": 2}\n]}',
     read_neurons),
    # line 3 of the file (the blank line 2 counts), not the 2nd record
    ("prompts.jsonl", '{"prompt": "one"}\n\n{"prompt": "two",}\n{"prompt": "three"}\n',
     read_prompts)])
def test_json_syntax_error_names_file_and_line(tmp_path, name, text, reader):
    path = tmp_path / name
    path.write_text(text)
    with raises(rf"^{re.escape(str(path))}: line 3, column \d+: invalid JSON"):
        reader(path)


def test_prompt_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one"}\n["two"]\n')
    with raises(rf"{re.escape(str(path))}: line 2: each line must be a JSON object"):
        read_prompts(path)


# --- neuron profiles --------------------------------------------------------------------------

@pytest.mark.parametrize("missing", ["layer", "neuron"])
def test_profile_without_layer_or_neuron(tmp_path, missing):
    record = {"neuron_id": "L2/N5", "layer": 2, "neuron": 5}
    del record[missing]
    path = write_profiles(tmp_path / "p.json", [{"layer": 0, "neuron": 1}, record])
    with raises(rf"^{re.escape(str(path))}: profile #1 \(neuron_id 'L2/N5'\): "
                rf"missing required field '{missing}'$"):
        read_neurons(path)


def test_profile_without_id_is_named_by_position(tmp_path):
    path = write_profiles(tmp_path / "p.json", [{"layer": 0, "neuron": 1}, {"layer": 3}])
    with raises(rf"^{re.escape(str(path))}: profile #1: missing required field 'neuron'$"):
        read_neurons(path)


@pytest.mark.parametrize("field, value", [("layer", "three"), ("neuron", 1.5),
                                          ("layer", True), ("neuron", None)])
def test_non_integer_layer_or_neuron(tmp_path, field, value):
    record = {"neuron_id": "x", "layer": 1, "neuron": 2, field: value}
    path = write_profiles(tmp_path / "p.json", [record])
    with raises(rf"profile #0 \(neuron_id 'x'\): field '{field}' must be an integer"):
        read_neurons(path)


def test_negative_layer_or_neuron(tmp_path):
    path = write_profiles(tmp_path / "p.json", [{"neuron_id": "n", "layer": -1, "neuron": 2}])
    with raises(r"profile #0 \(neuron_id 'n'\): layer and neuron must be >= 0, got -1, 2"):
        read_neurons(path)


def test_duplicate_neuron_ids(tmp_path):
    path = write_profiles(tmp_path / "p.json", [
        {"neuron_id": "early", "layer": 0, "neuron": 1},
        {"neuron_id": "other", "layer": 0, "neuron": 2},
        {"neuron_id": "early", "layer": 4, "neuron": 9},
    ])
    with raises(rf"^{re.escape(str(path))}: profile #2 \(neuron_id 'early'\): duplicate "
                r"neuron_id 'early' \(first at profile #0\)$"):
        read_neurons(path)


def test_same_neuron_listed_twice_under_different_ids(tmp_path):
    path = write_profiles(tmp_path / "p.json", [
        {"neuron_id": "a", "layer": 3, "neuron": 7}, {"neuron_id": "b", "layer": 3, "neuron": 7},
    ])
    with raises(r"profile #1 \(neuron_id 'b'\): layer 3 neuron 7 is listed twice "
                r"\(first at profile #0\)"):
        read_neurons(path)


@pytest.mark.parametrize("layer, neuron", [(3, 8), (4, 7)])
def test_neuron_id_disagreeing_with_layer_or_neuron(tmp_path, layer, neuron):
    path = write_profiles(tmp_path / "p.json",
                          [{"neuron_id": "L3/N7", "layer": layer, "neuron": neuron}])
    with raises(rf"^{re.escape(str(path))}: profile #0 \(neuron_id 'L3/N7'\): neuron_id "
                rf"'L3/N7' disagrees with layer={layer}, neuron={neuron}$"):
        read_neurons(path)


def test_valid_profiles_in_both_shapes(tmp_path):
    """The checks above reject only what they should: free-form ids, string integers, the
    bare-list shape and extra fields are all accepted, in file order."""
    records = [{"neuron_id": "L3/N7", "layer": 3, "neuron": 7, "label": "x"},
               {"neuron_id": "my favourite", "layer": "1", "neuron": 0},
               {"layer": 0, "neuron": 12}]
    for wrap in (True, False):
        neurons = read_neurons(write_profiles(tmp_path / f"p{wrap}.json", records, wrap))
        assert [(n.neuron_id, n.layer, n.neuron) for n in neurons] == [
            ("L3/N7", 3, 7), ("my favourite", 1, 0), ("L0/N12", 0, 12)]


def test_profile_document_shape_errors(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"neurons": []}')
    with raises("a JSON object needs a 'profiles' list"):
        read_neurons(path)
    write_profiles(path, [])
    with raises(f"{re.escape(str(path))}: the profile file lists no neurons"):
        read_neurons(path)
    write_profiles(path, [{"layer": 0, "neuron": 1}, [0, 2]])
    with raises(r"profile #1: must be a JSON object, got list"):
        read_neurons(path)


# --- prompts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "   \t "])
def test_empty_prompt(tmp_path, text):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": "a", "prompt": "fine"},
                                              {"prompt_id": "b", "prompt": text}])
    with raises(rf"^{re.escape(str(path))}: line 2 \(prompt_id 'b'\): empty prompt$"):
        read_prompts(path)


def test_missing_prompt_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": "a", "target": " x"}])
    with raises(r"line 1 \(prompt_id 'a'\): missing or non-string field 'prompt'"):
        read_prompts(path)


def test_duplicate_prompt_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt_id": "a", "prompt": "x"}\n\n{"prompt_id": "b", "prompt": "y"}\n'
                    '{"prompt_id": "a", "prompt": "z"}\n')
    with raises(rf"^{re.escape(str(path))}: line 4: duplicate prompt_id 'a' "
                r"\(first on line 1\)$"):
        read_prompts(path)


def test_default_prompt_ids_can_collide_with_given_ones(tmp_path):
    """A prompt without an id gets its index; a given id equal to it is a duplicate."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": "1", "prompt": "x"},
                                              {"prompt": "y"}])
    with raises(r"line 2: duplicate prompt_id '1' \(first on line 1\)"):
        read_prompts(path)


def test_distractor_equal_to_target(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt_id": "ok", "prompt": "x", "target": " a", "distractor": " b"},
        {"prompt_id": "same", "prompt": "y", "target": " Paris", "distractor": " Paris"}])
    with raises(rf"^{re.escape(str(path))}: line 2 \(prompt_id 'same'\): distractor equals "
                r"target \(' Paris'\)$"):
        read_prompts(path)


def test_distractor_without_target(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": "d", "prompt": "x",
                                               "distractor": " b"}])
    with raises(r"line 1 \(prompt_id 'd'\): a distractor needs a target"):
        read_prompts(path)


@pytest.mark.parametrize("field, known", [("targt", "target"), ("Target", "target"),
                                          ("distracter", "distractor"), ("promt", "prompt"),
                                          ("prompt_ids", "prompt_id"), ("targets", "target")])
def test_near_miss_of_a_known_prompt_field(tmp_path, field, known):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": "a", "prompt": "x"},
                                              {"prompt_id": "u", "prompt": "x", field: " y"}])
    with raises(rf"^{re.escape(str(path))}: line 2: unknown field '{field}': did you mean "
                rf"'{known}'\?$"):
        read_prompts(path)


def test_prompt_field_named_like_a_written_column(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": "u", "prompt": "x", "n_tokens": 3}])
    with raises(r"line 1: field 'n_tokens' is a column the workflow writes; rename it"):
        read_prompts(path)


def test_own_prompt_fields_are_kept(tmp_path):
    """Fields beyond prompt_id, prompt, target and distractor are the user's: kept per record
    (in order), as columns of one type each, and not part of what the clean runs depend on."""
    from neuron_effects.inputs import extra_columns, prompt_fields

    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt_id": "a", "prompt": "x", "category": "cardiology", "answer": " yes",
         "score": 1, "tags": ["a", "b"]},
        {"prompt_id": "b", "prompt": "y", "category": "oncology", "score": 2.5,
         "source": {"doi": "10.1/x"}, "mixed": 3},
        {"prompt_id": "c", "prompt": "z", "mixed": "three"}])
    records = read_prompts(path)
    assert records[0].extra == {"category": "cardiology", "answer": " yes", "score": 1,
                                "tags": ["a", "b"]}
    assert records[2].extra == {"mixed": "three"}
    assert extra_columns(records) == {
        "category": ["cardiology", "oncology", None], "answer": [" yes", None, None],
        "score": [1, 2.5, None], "tags": ['["a", "b"]', None, None],
        "mixed": [None, "3", "three"], "source": [None, '{"doi": "10.1/x"}', None]}
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt_id": r.prompt_id, "prompt": r.prompt}
                                                    for r in records])
    assert prompt_fields(records) == prompt_fields(read_prompts(plain))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_utf8_byte_order_mark_is_accepted(tmp_path, suffix):
    """Files saved by Windows editors and spreadsheet exports start with a BOM (utf-8-sig)."""
    separator = {".csv": ",", ".tsv": "\t"}.get(suffix)
    text = (_table_text(separator) if separator else "".join(
        json.dumps(r) + "\n" for r in [{"prompt_id": "penicillin", "prompt": "Penicillin was "
                                        "discovered in 1928 by Alexander", "target": " Fleming"}]))
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_prompts(marked) == read_prompts(plain)
    profiles = tmp_path / "profiles.json"
    profiles.write_bytes(b"\xef\xbb\xbf" + json.dumps(
        {"profiles": [{"neuron_id": "L0/N1", "layer": 0, "neuron": 1, "label": "é"}]}).encode())
    assert [n.neuron_id for n in read_neurons(profiles)] == ["L0/N1"]


def test_utf8_byte_order_mark_in_the_config_file(tmp_path):
    """Snakemake reads --configfile with PyYAML, which drops a BOM; the config validates."""
    from snakemake.common.configfile import load_configfile
    from snakemake.utils import validate

    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + (REPO / "config/config.yaml").read_bytes())
    config = load_configfile(str(path))
    assert config == _default_config()
    validate(config, str(REPO / "config/config.schema.yaml"))


def test_unknown_prompt_file_type(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n")
    with raises(r"unknown prompt file type '.txt'"):
        read_prompts(path)


# --- CSV and TSV prompt files -------------------------------------------------------------------

def _table_text(separator: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=separator, lineterminator="\n")
    writer.writerows([
        ["prompt_id", "prompt", "target", "distractor"],
        ["penicillin", "Penicillin was discovered in 1928 by Alexander", " Fleming", " Pasteur"],
        ["capital", "The capital of France, a country in Europe, is", " Paris", ""],
        ["open", 'A "quoted" prompt, with commas', "", ""],
    ])
    return buffer.getvalue()


@pytest.mark.parametrize("suffix, separator", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_prompts_read_like_jsonl(tmp_path, suffix, separator):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(_table_text(separator))
    records = read_prompts(path)
    assert [(r.prompt_id, r.prompt, r.target, r.distractor, r.line) for r in records] == [
        ("penicillin", "Penicillin was discovered in 1928 by Alexander", " Fleming", " Pasteur",
         2),
        ("capital", "The capital of France, a country in Europe, is", " Paris", None, 3),
        ("open", 'A "quoted" prompt, with commas', None, None, 4),  # empty cell: no target
    ]


@pytest.mark.parametrize("suffix, separator", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_errors_name_file_and_line(tmp_path, suffix, separator):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(separator.join(["prompt_id", "prompt"]) + "\n" + separator.join(["a", "x"])
                    + "\n" + separator.join(["a", "y"]) + "\n")
    with raises(rf"{re.escape(str(path))}: line 3: duplicate prompt_id 'a' \(first on line 2\)"):
        read_prompts(path)
    path.write_text(separator.join(["prompt_id", "prompt"]) + "\n" + separator.join(["b", ""])
                    + "\n")
    with raises(rf"{re.escape(str(path))}: line 2 \(prompt_id 'b'\): empty prompt"):
        read_prompts(path)
    path.write_text(separator.join(["prompt_id", "text"]) + "\n" + separator.join(["c", "x"])
                    + "\n")
    with raises(rf"{re.escape(str(path))}: line 1: the header needs a 'prompt' column"):
        read_prompts(path)
    path.write_text(separator.join(["prompt_id", "prompt"]) + "\n"
                    + separator.join(["d", "x", "extra"]) + "\n")
    with raises(rf"{re.escape(str(path))}: line 2: more cells than header columns"):
        read_prompts(path)


def test_csv_tsv_and_jsonl_prepare_identically(tmp_path, tiny_model_dir):
    """The same prompts as CSV, TSV and JSONL give the same prepared table (token ids,
    targets and distractors resolved in context)."""
    spec = ModelSpec(str(tiny_model_dir))
    neurons = write_profiles(tmp_path / "n.json", [{"layer": 0, "neuron": 1}])
    tables = {}
    for suffix, separator in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"prompts{suffix}"
        path.write_text(_table_text(separator))
        tables[suffix] = tmp_path / f"prepared{suffix}.parquet"
        prepare_inputs(str(neurons), str(path), spec, False, None, str(tables[suffix]),
                       str(tmp_path / "neurons.parquet"))
    jsonl = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt_id": "penicillin", "prompt": "Penicillin was discovered in 1928 by Alexander",
         "target": " Fleming", "distractor": " Pasteur"},
        {"prompt_id": "capital", "prompt": "The capital of France, a country in Europe, is",
         "target": " Paris"},
        {"prompt_id": "open", "prompt": 'A "quoted" prompt, with commas'}])
    tables[".jsonl"] = tmp_path / "prepared.jsonl.parquet"
    prepare_inputs(str(neurons), str(jsonl), spec, False, None, str(tables[".jsonl"]),
                   str(tmp_path / "neurons.parquet"))
    frames = {suffix: pd.read_parquet(path) for suffix, path in tables.items()}
    reference = frames[".jsonl"]
    assert reference["target_id"].notna().tolist() == [True, True, False]
    assert reference["distractor_id"].notna().tolist() == [True, False, False]
    for suffix in (".csv", ".tsv"):
        pd.testing.assert_frame_equal(frames[suffix], reference)


# --- checks that need the model (prepare_inputs, config and tokenizer only) --------------------

def prepare(tmp_path: Path, model_dir: Path, profiles: list | None = None,
            prompts: list[dict] | None = None) -> tuple[Path, Path, Path]:
    """Write the input files and run the prepare_inputs step; returns (neurons, prompts,
    prepared prompts table)."""
    neurons = write_profiles(tmp_path / "neurons.json",
                             profiles or [{"neuron_id": "L0/N1", "layer": 0, "neuron": 1}])
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", prompts or [
        {"prompt_id": "p", "prompt": "Penicillin was discovered by Alexander",
         "target": " Fleming"}])
    table = tmp_path / "out" / "prompts.parquet"
    prepare_inputs(str(neurons), str(prompt_file), ModelSpec(str(model_dir)), False, None,
                   str(table), str(tmp_path / "out" / "neurons.parquet"))
    return neurons, prompt_file, table


def test_layer_out_of_range(tmp_path, tiny_model_dir):
    profiles = [{"neuron_id": "L5/N3", "layer": 5, "neuron": 3},  # the last layer: fine
                {"neuron_id": "L6/N0", "layer": 6, "neuron": 0}]
    with raises(rf"^{re.escape(str(tmp_path / 'neurons.json'))}: neuron L6/N0: layer 6 out of "
                r"range \(the model has 6 layers, 0\.\.5\)$"):
        prepare(tmp_path, tiny_model_dir, profiles)
    assert not (tmp_path / "out").exists()  # nothing written


def test_neuron_index_at_intermediate_size(tmp_path, tiny_model_dir):
    """The tiny model's MLPs have 96 neurons: index 95 is the last valid one."""
    with raises(rf"^{re.escape(str(tmp_path / 'neurons.json'))}: neuron edge: index 96 >= the "
                r"intermediate size 96$"):
        prepare(tmp_path, tiny_model_dir, [{"neuron_id": "edge", "layer": 2, "neuron": 96}])
    prepare(tmp_path, tiny_model_dir, [{"neuron_id": "last", "layer": 2, "neuron": 95}])
    assert pd.read_parquet(tmp_path / "out" / "neurons.parquet").to_dict("records") == [
        {"neuron_id": "last", "layer": 2, "neuron": 95}]


def test_layer_and_index_checked_against_an_8b_config(tmp_path, llama_8b_dir):
    """The same checks on a Llama-3.1-8B config (32 layers, 14336 neurons), no weights."""
    from neuron_effects.inputs import Neuron
    from neuron_effects.model import check_neurons

    config = load_config(ModelSpec(str(llama_8b_dir)))
    check_neurons(config, [Neuron("a", 31, 14335), Neuron("b", 0, 0)], "f.json")
    with raises(r"^f\.json: neuron c: index 14336 >= the intermediate size 14336$"):
        check_neurons(config, [Neuron("a", 31, 14335), Neuron("c", 4, 14336)], "f.json")
    with raises(r"^f\.json: neuron d: layer 32 out of range \(the model has 32 layers"):
        check_neurons(config, [Neuron("d", 32, 0)], "f.json")


def test_prompt_longer_than_the_context(tmp_path, tiny_model_dir):
    long_prompt = " ".join(["cardiology"] * 200)  # > 256 tokens in SmolLM2's vocabulary
    prompts = [{"prompt_id": "short", "prompt": "Hello"},
               {"prompt_id": "long", "prompt": long_prompt}]
    with raises(rf"^{re.escape(str(tmp_path / 'prompts.jsonl'))}: line 2: prompt 'long': "
                r"\d+ tokens exceed the model's context of 256$"):
        prepare(tmp_path, tiny_model_dir, prompts=prompts)


def test_prompt_longer_than_a_sliding_window():
    from transformers import MistralConfig

    config = MistralConfig(num_hidden_layers=2, sliding_window=16, max_position_embeddings=64)
    check_prompt_length(config, 16, "f: line 1: prompt 'a'")
    with raises(r"^f: line 1: prompt 'a': 17 tokens exceed the sliding attention window \(16\) "
                r"of layer 0"):
        check_prompt_length(config, 17, "f: line 1: prompt 'a'")


@pytest.mark.parametrize("role", ["target", "distractor"])
def test_target_or_distractor_that_tokenizes_to_nothing(tmp_path, tiny_model_dir, role):
    record = {"prompt_id": "void", "prompt": "Penicillin was discovered by Alexander",
              "target": " Fleming", "distractor": " Pasteur", role: ""}
    with raises(rf"^{re.escape(str(tmp_path / 'prompts.jsonl'))}: prompt 'void' \(line 2\): "
                rf"the {role} '' tokenizes to nothing$"):
        prepare(tmp_path, tiny_model_dir, prompts=[{"prompt": "fine"}, record])


def test_distractor_starting_with_the_target_token(tmp_path, tiny_model_dir):
    """' Fleming' and " Fleming's" differ as strings but share their first token."""
    record = {"prompt_id": "twin", "prompt": "Penicillin was discovered by Alexander",
              "target": " Fleming", "distractor": " Fleming's"}
    with raises(rf"^{re.escape(str(tmp_path / 'prompts.jsonl'))}: prompt 'twin' \(line 1\): "
                r"distractor \" Fleming's\" and target ' Fleming' start with the same token$"):
        prepare(tmp_path, tiny_model_dir, prompts=[record])


def test_prepare_inputs_leaves_the_input_files_untouched(tmp_path, tiny_model_dir):
    neurons, prompts, table = prepare(tmp_path, tiny_model_dir)
    before = (neurons.read_bytes(), prompts.read_bytes())
    prepare(tmp_path, tiny_model_dir,
            json.loads(neurons.read_text())["profiles"],
            [json.loads(line) for line in prompts.read_text().splitlines()])
    assert (neurons.read_bytes(), prompts.read_bytes()) == before
    assert table.exists()


# --- model, device, config ----------------------------------------------------------------------

def test_model_path_not_found(tmp_path):
    for location in (str(tmp_path / "no-model"), "./models/llama", "~/nothing/here",
                     "just-a-name"):
        with raises(f"^model path not found: {re.escape(location)}$"):
            model_location(location)
    with raises(f"^model file not found: {re.escape(str(tmp_path / 'm.gguf'))}$"):
        model_location(str(tmp_path / "m.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with raises("is neither a folder nor a .gguf file"):
        model_location(str(tmp_path / "weights.bin"))
    # what is accepted: a hub id (org/name) and an existing folder
    assert model_location("meta-llama/Llama-3.1-8B-Instruct") == (
        "meta-llama/Llama-3.1-8B-Instruct", {})
    assert model_location(str(tmp_path)) == (str(tmp_path), {})


def test_unsupported_architecture_in_the_config(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path)
    with raises(rf"^unsupported architecture 'gpt2' \(.*\) in {re.escape(str(tmp_path))}: "
                r"supported model types are llama, mistral, qwen2, qwen3"):
        load_config(ModelSpec(str(tmp_path)))


def test_cuda_requested_where_none_exists(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(model_module, "nvidia_driver", lambda: (None, None))
    for device in ("cuda", "cuda:1"):
        with raises(rf"^device '{device}' requested but CUDA is unusable here: torch "
                    r".* and there is no NVIDIA driver \(nvidia-smi not found\)"):
            resolve_device(device)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with raises("unknown device 'tpu'"):
        resolve_device("tpu")
    # loading fails with the same message before any weight is read
    with raises("device 'cuda' requested but CUDA is unusable"):
        load_model(ModelSpec(str(tiny_model_dir), device="cuda"))


@pytest.mark.parametrize("driver_cuda, build", [
    ("11.8", None),     # R520: no build of torch 2.13 runs on it
    ("12.2", "cu126"),  # R535: the 12.x build runs on every 12.x driver (minor-version compat)
    ("12.4", "cu126"),  # R550
    ("12.8", "cu126"),  # R570: there is no cu128 build of 2.13
    ("13.0", "cu130"),  # R580
    ("13.1", "cu130"),
])
def test_torch_build_advice_per_driver(driver_cuda, build):
    assert torch_builds.torch_build_for(driver_cuda) == build
    names = {entry.name for entry in torch_builds.TORCH_CUDA_BUILDS}
    assert build is None or build in names


def test_cuda_error_names_both_versions_and_the_fix():
    """torch 2.13.0's default build (CUDA 13.0) on a cluster whose driver supports 12.4 only."""
    old_driver = torch_builds.cuda_unusable_message("cuda", "2.13.0", "13.0", "550.54.15", "12.4")
    assert "built for CUDA 13.0" in old_driver and "driver is 550.54.15" in old_driver
    assert "supports CUDA up to 12.4" in old_driver
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 tools/setup-venv.sh" \
        in old_driver  # the 12.x build of torch 2.13 runs on any 12.x driver
    cpu_build = torch_builds.cuda_unusable_message("cuda", "2.13.0+cpu", None, "570.1", "12.8")
    assert "CPU-only build" in cpu_build and "whl/cu126" in cpu_build
    # a 12.6 build on a 12.2 driver: minor-version compatible, so the build is not the cause
    for torch_cuda, driver_cuda in (("12.6", "12.6"), ("12.6", "12.2")):
        matching = torch_builds.cuda_unusable_message("cuda:0", "2.13.0", torch_cuda, "535.1",
                                                      driver_cuda)
        assert "CUDA_VISIBLE_DEVICES" in matching
    assert "update the NVIDIA driver" in torch_builds.cuda_unusable_message(
        "cuda", "2.13.0", "13.0", "470.1", "11.4")


def _default_config() -> dict:
    return yaml.safe_load((REPO / "config/config.yaml").read_text())


@pytest.mark.parametrize("change, message", [
    ({"treatment": "knockout"}, r"'knockout' is not one of \['add', 'zero_ablate', "
                                r"'mean_ablate'\]"),
    ({"positions": "first"}, r"'first' is not one of \['last', 'all'\]"),
    ({"treatmnt": "add"}, r"Additional properties are not allowed \('treatmnt' was unexpected\)"),
    ({"metrics": {"full_vocab": True, "top_k": 10, "ratio_noise_floor": 0, "topk": 3}},
     r"Additional properties are not allowed \('topk' was unexpected\)"),
    ({"device": "gpu"}, r"'gpu' does not match"),
    ({"sharding": {"layers_per_shard": 0, "prompts_per_chunk": 5}},
     r"0 is not valid under any of the given schemas"),  # neither auto nor >= 1
    ({"sharding": {"layers_per_shard": "aut"}}, r"'aut' is not valid under any of the given"),
    ({"sharding": {"max_fixed_share": 1.5}}, r"1.5 is greater than the maximum of 1"),
    ({"sharding": {"rates": {"flops_per_second": 1e9}}},
     r"Additional properties are not allowed \('flops_per_second' was unexpected\)"),
])
def test_config_schema_rejects_unknown_treatment_or_option(change, message):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    config = {**_default_config(), **change}
    with pytest.raises(WorkflowError, match=message):
        validate(config, str(REPO / "config/config.schema.yaml"))
    validate(_default_config(), str(REPO / "config/config.schema.yaml"))  # the default passes


def test_non_finite_logits_name_the_prompt():
    """Non-finite activations (naming prompt and layer) are tested in test_engine_tiny.py
    (test_non_finite_activation_names_prompt_and_layer); here the logits."""
    model = tiny_model()
    with torch.no_grad():
        model.final_norm.weight[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^prompt 'nan-logits': non-finite logits$"):
        run_clean(model, [5, 17, 2, 99], "nan-logits")


# --- through the real workflow ------------------------------------------------------------------

def _break_profiles(workdir: Path) -> str:
    path = workdir / "neurons.json"
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"neuron_id": "L0/N7"' in line)
    lines[index] = lines[index].rstrip(",")  # drop a comma inside the second profile
    path.write_text("\n".join(lines))
    return rf"neurons\.json: line {index + 2}, column \d+: invalid JSON"


def _duplicate_prompt(workdir: Path) -> str:
    path = workdir / "prompts.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[1]]) + "\n")
    return r"prompts\.jsonl: line 7: duplicate prompt_id 'heart_chambers' \(first on line 2\)"


def _set_config(workdir: Path, key: str, value: str) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config[key] = value
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def _missing_model(workdir: Path) -> str:
    _set_config(workdir, "model", str(workdir / "models" / "absent"))
    return rf"model path not found: {re.escape(str(workdir / 'models' / 'absent'))}"


def _unknown_treatment(workdir: Path) -> str:
    _set_config(workdir, "treatment", "knockout")
    return r"'knockout' is not one of"


def _disagreeing_id(workdir: Path) -> str:
    path = workdir / "neurons.json"
    document = json.loads(path.read_text())
    document["profiles"][4]["neuron"] += 1  # neuron_id stays L1/N8
    path.write_text(json.dumps(document))
    return r"neurons\.json: profile #4 \(neuron_id 'L1/N8'\): neuron_id 'L1/N8' disagrees"


@pytest.mark.slow
@pytest.mark.parametrize("breaker", [_break_profiles, _duplicate_prompt, _missing_model,
                                     _unknown_treatment, _disagreeing_id])
def test_parse_time_errors_stop_the_dry_run(tmp_path, tiny_model_dir, breaker):
    workdir = write_workdir(tmp_path / "run", str(tiny_model_dir), device="cpu")
    message = breaker(workdir)
    result = snakemake(workdir, "-n", check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout), result.stdout[-3000:]
    assert "Job stats" not in result.stdout  # no job was even planned
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()


def _layer_the_model_lacks(workdir: Path) -> str:
    document = json.loads((workdir / "neurons.json").read_text())
    document["profiles"].append({"neuron_id": "L6/N0", "layer": 6, "neuron": 0})
    (workdir / "neurons.json").write_text(json.dumps(document))
    return r"neurons\.json: neuron L6/N0: layer 6 out of range \(the model has 6 layers"


def _target_merging_with_the_prompt(workdir: Path) -> str:
    path = workdir / "prompts.jsonl"
    path.write_text(path.read_text() + json.dumps(
        {"prompt_id": "merge", "prompt": "Penicillin was discovered by Alex", "target": "ander"})
        + "\n")
    return r"prompts\.jsonl: prompt 'merge' \(line 7\): the target 'ander' merges with the prompt"


@pytest.mark.slow
@pytest.mark.parametrize("breaker", [_layer_the_model_lacks, _target_merging_with_the_prompt])
def test_model_dependent_errors_stop_the_dry_run(tmp_path, tiny_model_dir, breaker):
    """The checks that need the model's config or tokenizer run at parse time too: nothing is
    planned, nothing written but Snakemake's own folder, and nothing cached."""
    workdir = write_workdir(tmp_path / "run", str(tiny_model_dir), device="cpu")
    assert snakemake(workdir, "-n").returncode == 0
    cached = set((workdir / ".snakemake/input-checks").glob("*.json"))
    assert len(cached) == 1  # the good inputs' checks
    message = breaker(workdir)
    for arguments in (["-n"], ["--cores", "2"]):
        result = snakemake(workdir, *arguments, check=False)
        assert result.returncode != 0
        assert re.search(message, result.stdout), result.stdout[-3000:]
        assert "Job stats" not in result.stdout
    assert not (workdir / "results").exists() and not (workdir / "logs").exists()
    assert set((workdir / ".snakemake/input-checks").glob("*.json")) == cached


def test_input_checks_are_cached_by_digest(tmp_path, tiny_model_dir, monkeypatch):
    """The second parse with the same files and settings reads the cache (no tokenizer); any
    change of a file's bytes or of a setting checks again."""
    from neuron_effects import input_checks

    neurons, prompts, _ = prepare(tmp_path, tiny_model_dir)
    model = {"model": str(tiny_model_dir), "tokenizer": None, "dtype": "auto", "device": "cpu",
             "trust_remote_code": False}
    cache = tmp_path / "cache"
    first = input_checks.checked_inputs(str(neurons), str(prompts), model, False, None, cache)
    assert len(list(cache.glob("*.json"))) == 1
    calls = []
    real = input_checks.prepare_prompts
    monkeypatch.setattr(input_checks, "prepare_prompts",
                        lambda *arguments: calls.append(1) or real(*arguments))
    again = input_checks.checked_inputs(str(neurons), str(prompts), model, False, None, cache)
    assert calls == [] and again == first
    assert first.prepared[0]["target_id"] is not None and first.prepared[0]["input_ids"]
    input_checks.checked_inputs(str(neurons), str(prompts), model, True, None, cache)
    prompts.write_text(prompts.read_text().replace("Alexander", "Sir Alexander"))
    changed = input_checks.checked_inputs(str(neurons), str(prompts), model, False, None, cache)
    assert len(calls) == 2 and len(list(cache.glob("*.json"))) == 3
    assert changed.prepared[0]["input_ids"] != first.prepared[0]["input_ids"]


def test_own_prompt_fields_reach_the_prepared_table(tmp_path, tiny_model_dir):
    _, _, table = prepare(tmp_path, tiny_model_dir, prompts=[
        {"prompt_id": "p", "prompt": "Penicillin was discovered by Alexander",
         "target": " Fleming", "category": "history", "year": 1928},
        {"prompt_id": "q", "prompt": "The heart has four", "tags": ["anatomy"]}])
    frame = pd.read_parquet(table)
    assert list(frame.columns) == ["prompt_id", "prompt", "text", "n_tokens", "input_ids",
                                   "target", "target_id", "distractor", "distractor_id",
                                   "warnings", "category", "year", "tags"]
    assert frame["category"].tolist()[0] == "history" and pd.isna(frame["category"][1])
    assert frame["year"].tolist()[0] == 1928 and pd.isna(frame["year"][1])
    assert pd.isna(frame["tags"][0]) and frame["tags"][1] == '["anatomy"]'


@pytest.mark.slow
def test_non_finite_activations_stop_the_clean_runs(tmp_path, tiny_model_dir):
    """A model whose layer-2 activations overflow: the clean-run jobs fail naming prompt and
    layer, and no effect shard starts."""
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.2.mlp.up_proj.weight"][:, :] = float("inf")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    workdir = write_workdir(tmp_path / "run", str(model_dir), device="cpu",
                            sharding={"layers_per_shard": 2, "prompts_per_chunk": 4})
    result = snakemake(workdir, "--cores", "1", "--keep-going", check=False)
    assert result.returncode != 0
    assert "Error in rule cache_clean_runs" in result.stdout, result.stdout[-3000:]
    first_prompts = {"c000": "penicillin", "c001": "dna_shape"}
    for chunk, prompt_id in first_prompts.items():
        log = (workdir / f"logs/cache_clean_runs/{chunk}.log").read_text()
        assert re.search(rf"FloatingPointError: prompt '{prompt_id}': non-finite MLP "
                         r"activations at layer 2", log), log[-2000:]
    assert not (workdir / "logs/compute_effects").exists()
    assert not (workdir / "results/effects").exists()


@pytest.mark.slow
def test_input_files_are_never_modified(tiny_workflow):
    workdir, before = tiny_workflow
    for name, content in before.items():
        assert (workdir / name).read_bytes() == content, name
