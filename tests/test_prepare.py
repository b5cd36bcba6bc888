"""The model prepared once (neuron_effects.prepare): a GGUF converted to a safetensors folder that
loads to exactly the same model, a hub snapshot linked from the hub cache, a local folder used
as it is, and the folder's name following the GGUF's digest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir

from neuron_effects.inputs import InputError, digest
from neuron_effects.model import ModelSpec, load_model, load_tokenizer
from neuron_effects.prepare import (
    MANIFEST,
    file_sha256,
    model_digest,
    place_in_hub_cache,
    prepared_location,
)


def test_a_local_folders_digest_covers_its_weights(tiny_model_dir, tmp_path):
    """A folder used as it is: the SHA-256 of its weight files and config, each file hashed once
    (cached by path, size and mtime), changed by a changed weight."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    first = model_digest(folder, tmp_path / "digests")
    assert len(list((tmp_path / "digests").iterdir())) == 2  # model.safetensors, config.json
    assert model_digest(folder, tmp_path / "digests") == first
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    assert model_digest(folder, tmp_path / "digests") != first
    with pytest.raises(InputError, match="no model weights"):
        model_digest(tmp_path / "digests")


def test_a_local_folder_is_used_as_it_is(tiny_model_dir):
    prepared = prepared_location(str(tiny_model_dir))
    assert (prepared.kind, prepared.folder, prepared.manifest) == (
        "folder", str(tiny_model_dir), None)


def test_a_hub_id_gets_its_own_folder(tmp_path):
    prepared = prepared_location("meta-llama/Llama-3.1-8B-Instruct", root=tmp_path)
    assert prepared.kind == "hub"
    assert prepared.folder == str(tmp_path / "meta-llama--Llama-3.1-8B-Instruct")
    assert prepared.manifest == str(tmp_path / "meta-llama--Llama-3.1-8B-Instruct" / MANIFEST)


def test_missing_paths_are_refused(tmp_path):
    with pytest.raises(InputError, match="model file not found"):
        prepared_location(str(tmp_path / "missing.gguf"))
    with pytest.raises(InputError, match="model path not found"):
        prepared_location(str(tmp_path / "missing"))


def test_a_gguf_folder_is_keyed_by_the_file_digest(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"first version")
    cache = tmp_path / "digests"
    first = prepared_location(str(gguf), root=tmp_path / "prepared", cache_dir=cache)
    assert first.kind == "gguf" and first.sha256 == file_sha256(gguf)
    assert Path(first.folder).name == f"model-{first.sha256[:12]}"
    assert prepared_location(str(gguf), root=tmp_path / "prepared", cache_dir=cache) == first
    gguf.write_bytes(b"second version")  # a new size and modification time: a new digest
    second = prepared_location(str(gguf), root=tmp_path / "prepared", cache_dir=cache)
    assert second.sha256 == file_sha256(gguf) != first.sha256
    assert second.folder != first.folder


@pytest.mark.slow
def test_prepared_gguf_loads_the_same_model_and_tokenizer(demo_model_path, prepared_demo_model):
    """Every parameter, the config's dimensions, the tokenizer's ids and the chat template of the
    prepared folder equal those of the GGUF loaded directly; the folder has no GGUF."""
    direct_spec = ModelSpec(str(demo_model_path), dtype="float32", device="cpu")
    prepared_spec = ModelSpec(str(prepared_demo_model), dtype="float32", device="cpu")
    direct, prepared = load_model(direct_spec), load_model(prepared_spec)
    want = direct.causal_lm.state_dict()
    got = prepared.causal_lm.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], tensor), name
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(prepared.config, key) == getattr(direct.config, key), key
    assert prepared.causal_lm.lm_head.weight.data_ptr() == \
        prepared.causal_lm.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(prepared.causal_lm(ids).logits, direct.causal_lm(ids).logits)
    a, b = load_tokenizer(direct_spec), load_tokenizer(prepared_spec)
    text = "Penicillin was discovered in 1928 by Alexander Fleming."
    assert a(text)["input_ids"] == b(text)["input_ids"]
    chat = [{"role": "user", "content": text}]
    assert a.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        b.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    manifest = json.loads((prepared_demo_model / MANIFEST).read_text())
    assert manifest["kind"] == "gguf" and manifest["sha256"] == file_sha256(demo_model_path)
    # the cache keys' model part: recorded once, read back without hashing the weights
    assert model_digest(prepared_demo_model) == manifest["weights_digest"] == digest(
        ["gguf", manifest["sha256"]])
    assert not list(prepared_demo_model.glob("*.gguf"))


def test_a_hub_snapshot_is_linked_from_the_hub_cache(tiny_model_dir, tmp_path):
    """A hub cache (HF_HOME) holding a snapshot of org/tiny in the layout of a download (blobs
    named by their SHA-256, the snapshot's links to them, refs/main), read offline: the prepared
    folder links its files (no copy) and loads; the cache is not written to."""
    snapshot = place_in_hub_cache(tiny_model_dir, tmp_path / "hf-home", "org/tiny")
    cache = scan_cache_dir(tmp_path / "hf-home" / "hub")
    assert not cache.warnings
    (repo,) = cache.repos
    (revision,) = repo.revisions
    assert (repo.repo_id, revision.commit_hash, revision.snapshot_path) == (
        "org/tiny", snapshot.name, snapshot)
    assert {file.blob_path.name for file in revision.files} == {
        file_sha256(path) for path in tiny_model_dir.iterdir()}
    assert place_in_hub_cache(tiny_model_dir, tmp_path / "hf-home", "org/tiny") == snapshot
    root = tmp_path / "prepared"
    code = ("from neuron_effects.prepare import prepared_location, prepare_model; "
            f"prepare_model(prepared_location('org/tiny', root={str(root)!r}))")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    folder = root / "org--tiny"
    links = sorted(path.name for path in folder.iterdir() if path.is_symlink())
    assert links == sorted(path.name for path in snapshot.iterdir())
    assert all((folder / name).resolve() == (snapshot / name).resolve() for name in links)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["kind"] == "hub" and manifest["snapshot"] == str(snapshot)
    assert model_digest(folder) == manifest["weights_digest"]
    model = load_model(ModelSpec(str(folder), device="cpu"))
    original = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    for (name, a), (_, b) in zip(model.causal_lm.named_parameters(),
                                 original.causal_lm.named_parameters()):
        assert torch.equal(a, b), name


def test_an_unreachable_hub_id_says_what_to_do(tmp_path):
    root = tmp_path / "prepared"
    code = ("from neuron_effects.prepare import prepared_location, prepare_model; "
            f"prepare_model(prepared_location('org/absent', root={str(root)!r}))")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "cannot download the model org/absent" in result.stderr
    assert "set model: to the local folder" in result.stderr
    assert not (root / "org--absent").exists()
