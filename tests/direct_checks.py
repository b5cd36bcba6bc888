"""A finished run's clean records and activation statistics against a direct computation: plain
forwards of the model with hooks, nothing from the workflow's own code paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file


def assert_clean_runs_match_direct_computation(
    workdir: Path, model_dir: Path, max_rank: int, active_threshold: float,
) -> None:
    """``clean_target_rank``, ``clean_target_prob`` and ``target_low_rank`` of
    ``results/summary/prompts.parquet``, the activations and every column of
    ``neuron_stats.parquet``, recomputed from the prepared token ids by one float32 forward per
    prompt: rank = 1 + #{tokens with a larger logit}; activations = the inputs of each
    ``down_proj`` (last position; summed over positions for ``mean_all_positions``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    captured: list[torch.Tensor] = []
    for block in model.model.layers:
        block.mlp.down_proj.register_forward_pre_hook(
            lambda module, args: captured.append(args[0][0].double()))
    prepared = pd.read_parquet(workdir / "results/inputs/prompts.parquet")
    summary = pd.read_parquet(workdir / "results/summary/prompts.parquet").set_index("prompt_id")
    last, sums, n_tokens = [], [], 0
    for row in prepared.itertuples():
        captured.clear()
        with torch.no_grad():
            logits = model(torch.tensor([list(row.input_ids)])).logits[0, -1].double()
        given = not pd.isna(row.target_id)
        target = int(row.target_id) if given else int(logits.argmax())
        rank = 1 + int((logits > logits[target]).sum())
        record = summary.loc[row.prompt_id]
        assert record["clean_target_rank"] == rank, row.prompt_id
        np.testing.assert_allclose(record["clean_target_prob"],
                                   float(logits.softmax(-1)[target]), rtol=1e-4, atol=1e-9)
        assert bool(record["target_low_rank"]) == (given and rank > max_rank)
        last.append(torch.stack([layer[-1] for layer in captured]))
        sums.append(torch.stack([layer.sum(0) for layer in captured]))
        n_tokens += len(row.input_ids)
    activations = torch.stack(last)  # [prompts, layers, intermediate], float64
    saved = load_file(workdir / "results/activations/activations.safetensors")["activations"]
    torch.testing.assert_close(saved.double(), activations, rtol=1e-4, atol=1e-5)
    values = activations.numpy()
    expected = {
        "mean": values.mean(0), "std": values.std(0), "mean_abs": np.abs(values).mean(0),
        "frac_positive": (values > 0).mean(0),
        "frac_active": (np.abs(values) > active_threshold).mean(0),
        "mean_all_positions": torch.stack(sums).sum(0).numpy() / n_tokens}
    stats = pd.read_parquet(workdir / "results/activations/neuron_stats.parquet")
    n_layers, width = values.shape[1:]
    assert stats["layer"].tolist() == np.repeat(np.arange(n_layers), width).tolist()
    assert stats["neuron"].tolist() == np.tile(np.arange(width), n_layers).tolist()
    for column, value in expected.items():
        np.testing.assert_allclose(stats[column], value.reshape(-1), rtol=1e-4, atol=1e-5,
                                   err_msg=column)
