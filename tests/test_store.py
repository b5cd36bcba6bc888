"""Files (neuron_effects.store): atomic writes, the clean-run file format, streamed parquet
concatenation and row reading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from conftest import tiny_model
from neuron_effects import store
from neuron_effects.jobs import layer_streams
from neuron_effects.clean import load_clean_runs, run_clean, save_clean_runs
from neuron_effects.store import atomic_path, read_rows


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- atomic writes --------------------------------------------------------------------------

def test_failed_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target) as temporary:
            temporary.write_text("half of the")
            raise RuntimeError("writer died")
    assert not target.exists()
    assert leftovers(target.parent) == []  # the temporary file is gone too


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.json"
    store.write_json(target, {"version": 1})
    with pytest.raises(KeyboardInterrupt):  # BaseException too
        with atomic_path(target) as temporary:
            temporary.write_text('{"version": 2, "trunc')
            raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"version": 1}
    assert leftovers(tmp_path) == ["out.json"]


def test_failed_parquet_write_leaves_no_file(tmp_path):
    target = tmp_path / "table.parquet"
    mixed = pd.DataFrame({"x": [1, "a", 2.5]})  # pyarrow cannot store this column
    with pytest.raises((pa.ArrowTypeError, pa.ArrowInvalid)):
        store.write_parquet(target, mixed)
    assert leftovers(tmp_path) == []
    store.write_parquet(target, pd.DataFrame({"x": [1, 2]}))
    assert pd.read_parquet(target)["x"].tolist() == [1, 2]
    assert leftovers(tmp_path) == ["table.parquet"]


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    store.write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_write_json_refuses_nan_before_touching_the_file(tmp_path):
    store.write_json(tmp_path / "s.json", {"a": 1})
    with pytest.raises(ValueError):
        store.write_json(tmp_path / "s.json", {"a": float("nan")})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}


# --- the clean-run cache --------------------------------------------------------------------

def test_clean_runs_round_trip(tmp_path):
    model = tiny_model()
    runs = [run_clean(model, [5, 17, 2, 99, 43], "a"), run_clean(model, [8, 61, 30], "b")]
    records = [{"prompt_id": "a", "target_id": 7, "note": "é"},
               {"prompt_id": "b", "target_id": 3, "note": None}]
    path = tmp_path / "c000.safetensors"
    save_clean_runs(path, runs, records)
    assert store.load_clean_records(path) == records
    loaded, loaded_records = load_clean_runs(path)
    assert loaded_records == records
    assert [run.prompt_id for run in loaded] == ["a", "b"]
    for run, back in zip(runs, loaded):
        for name in ("input_ids", "layer_outputs", "final_hidden", "logits", "activations",
                     "activation_sums", "prefix_keys", "prefix_values"):
            assert torch.equal(getattr(run, name), getattr(back, name)), name
    assert loaded[1].prefix_keys.shape[2] == 2  # T - 1 positions of prompt b


def test_concatenated_tables_may_differ_in_their_categoricals_index_width(tmp_path):
    """A unit of fewer than 128 neurons writes its categorical ids with int8 codes, a larger one
    with int16: streamed into one file they are one categorical column."""
    import pandas as pd

    from neuron_effects.store import concat_parquet, write_parquet

    small = pd.DataFrame({"neuron_id": pd.Categorical([f"L0/N{i}" for i in range(3)]),
                          "x": [1.0, 2.0, 3.0]})
    large = pd.DataFrame({"neuron_id": pd.Categorical([f"L1/N{i}" for i in range(300)]),
                          "x": [float(i) for i in range(300)]})
    write_parquet(tmp_path / "large.parquet", large)
    write_parquet(tmp_path / "small.parquet", small)
    for order in (("small", "large"), ("large", "small")):
        out = tmp_path / f"{order[0]}-first.parquet"
        assert concat_parquet([tmp_path / f"{name}.parquet" for name in order], out) == 303
        merged = pd.read_parquet(out)
        expected = pd.concat([{"small": small, "large": large}[name] for name in order],
                             ignore_index=True)
        assert list(merged["neuron_id"].astype(str)) == list(expected["neuron_id"].astype(str))
        assert list(merged["x"]) == list(expected["x"])


def test_read_rows_reads_positions_across_row_groups(tmp_path):
    frame = pd.DataFrame({"x": np.arange(50), "y": [f"r{i}" for i in range(50)]})
    path = tmp_path / "t.parquet"
    frame.to_parquet(path, index=False, row_group_size=7)  # 8 row groups
    rows = [49, 0, 13, 14, 7, 6, 30]
    pd.testing.assert_frame_equal(read_rows(path, rows), frame.loc[rows])
    assert read_rows(path, []).columns.tolist() == ["x", "y"]


@pytest.mark.parametrize("statistics", [True, False])
def test_layer_rows_read_every_row_of_a_layer(tmp_path, statistics):
    """The aggregation's per-layer reading: the layers come from the row groups' statistics (or
    the column, when a file has none; a range may include a layer without rows), and a layer's rows from every file, ordered by neuron
    then by the prompts' order, whatever the files' order."""
    rng = np.random.default_rng(0)
    paths = []
    for index, (layers, prompts) in enumerate([((0, 1), ("b", "a")), ((3,), ("b", "a")),
                                               ((0, 1), ("c",))]):
        rows = pd.DataFrame([{"prompt_id": p, "neuron_id": f"L{layer}/N{n}", "layer": layer,
                              "neuron": n, "total": rng.normal()}
                             for p in prompts for layer in layers for n in (2, 0)])
        path = tmp_path / f"shard{index}.parquet"
        rows.to_parquet(path, index=False, row_group_size=3, write_statistics=statistics)
        paths.append(str(path))
    assert {0, 1, 3} <= set(layer_streams.shard_layers(paths)) <= {0, 1, 2, 3}
    whole = pd.concat([pd.read_parquet(path) for path in paths])
    for layer in (0, 1, 3):
        got = layer_streams.layer_rows(paths, layer, {"a": 0, "b": 1, "c": 2})
        assert list(zip(got["neuron"], got["prompt_id"])) == [
            (n, p) for n in (0, 2) for p in ("a", "b", "c") if (p != "c" or layer < 3)]
        expected = whole[whole["layer"] == layer].set_index(["neuron_id", "prompt_id"])
        assert got.set_index(["neuron_id", "prompt_id"])["total"].equals(
            expected.loc[got.set_index(["neuron_id", "prompt_id"]).index, "total"])
    assert len(layer_streams.layer_rows(paths, 2, {"a": 0, "b": 1, "c": 2})) == 0
