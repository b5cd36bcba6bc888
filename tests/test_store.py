"""Files (neuron_effects.store): atomic writes, the clean-run cache, resumable shard progress,
and resumption of the shard step itself (steps.compute_shard) after an interruption."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyarrow as pa
import pytest
import torch

from conftest import tiny_model
from neuron_effects import steps, store
from neuron_effects.clean import run_clean
from neuron_effects.effects import EffectSettings
from neuron_effects.model import ModelSpec
from neuron_effects.store import ShardProgress, atomic_path, read_rows


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
    store.save_clean_runs(path, runs, records)
    assert store.load_clean_records(path) == records
    loaded, loaded_records = store.load_clean_runs(path)
    assert loaded_records == records
    assert [run.prompt_id for run in loaded] == ["a", "b"]
    for run, back in zip(runs, loaded):
        for name in ("input_ids", "layer_outputs", "final_hidden", "logits", "activations",
                     "activation_sums", "prefix_keys", "prefix_values"):
            assert torch.equal(getattr(run, name), getattr(back, name)), name
    assert loaded[1].prefix_keys.shape[2] == 2  # T - 1 positions of prompt b


# --- shard progress -------------------------------------------------------------------------

def unit_frame(unit: str, rows: int = 2) -> pd.DataFrame:
    return pd.DataFrame({"unit": [unit] * rows, "value": range(rows)})


def test_progress_records_done_units_and_survives_a_restart(tmp_path):
    root = tmp_path / "partial" / "L00-09_c000"
    progress = ShardProgress(root, "fp1")
    assert progress.done_units() == []
    progress.save("n000_p00001", unit_frame("b"))
    progress.save("n000_p00000", unit_frame("a"))
    (progress.folder / ".n000_p00002.parquet.x1y2.tmp").write_bytes(b"half")  # a killed write
    assert progress.done_units() == ["n000_p00000", "n000_p00001"]
    assert not progress.is_done("n000_p00002")
    restarted = ShardProgress(root, "fp1")  # same fingerprint: the units are reused
    assert restarted.done_units() == ["n000_p00000", "n000_p00001"]
    assert restarted.is_done("n000_p00000") and not restarted.is_done("n000_p00002")


def test_progress_of_another_fingerprint_is_discarded(tmp_path):
    root = tmp_path / "partial" / "shard"
    ShardProgress(root, "old").save("n000_p00000", unit_frame("a"))
    ShardProgress(root, "other-old").save("n000_p00001", unit_frame("b"))
    fresh = ShardProgress(root, "new")
    assert fresh.done_units() == []
    assert leftovers(root) == ["new"]


def test_assemble_in_order_then_clean_up(tmp_path):
    root = tmp_path / "partial" / "shard"
    progress = ShardProgress(root, "fp")
    for unit, rows in (("n000_p00002", 1), ("n000_p00000", 2), ("n000_p00001", 3)):
        progress.save(unit, unit_frame(unit, rows))
    output = tmp_path / "shards" / "shard.parquet"
    rows = progress.assemble(["n000_p00000", "n000_p00001", "n000_p00002"], output)
    expected = ["n000_p00000"] * 2 + ["n000_p00001"] * 3 + ["n000_p00002"]
    assert rows == len(expected)
    assert pd.read_parquet(output)["unit"].tolist() == expected
    assert pq.ParquetFile(output).num_row_groups == 3  # a row group per unit
    assert not root.exists()


def test_assemble_refuses_missing_units(tmp_path):
    root = tmp_path / "partial" / "shard"
    progress = ShardProgress(root, "fp")
    progress.save("n000_p00000", unit_frame("a"))
    output = tmp_path / "shard.parquet"
    with pytest.raises(RuntimeError, match=r"units not done: \['n000_p00001', 'n001_p00000'\]"):
        progress.assemble(["n000_p00000", "n000_p00001", "n001_p00000"], output)
    assert not output.exists()
    assert progress.done_units() == ["n000_p00000"]  # the progress is kept


# --- resumption of compute_shard ------------------------------------------------------------

@pytest.fixture(scope="module")
def clean_chunk(tiny_model_dir, tmp_path_factory):
    """A clean-run file of 3 prompts of the tiny model, as cache_clean_runs writes it."""
    folder = tmp_path_factory.mktemp("clean")
    prompts = [{"prompt_id": "a", "input_ids": [5, 17, 2, 99, 43], "target_id": 7,
                "distractor_id": 13},
               {"prompt_id": "b", "input_ids": [8, 61, 30, 12], "target_id": None,
                "distractor_id": None},
               {"prompt_id": "c", "input_ids": [77, 3, 9, 14, 15, 16], "target_id": 11,
                "distractor_id": None}]
    spec = ModelSpec(str(tiny_model_dir), device="cpu")
    steps.cache_clean_runs(spec, prompts, str(folder / "c000.safetensors"))
    return spec, folder / "c000.safetensors"


NEURONS = [["L0/N1", 0, 1], ["L0/N50", 0, 50], ["L1/N7", 1, 7], ["L1/N95", 1, 95],
           ["L1/N20", 1, 20]]
SETTINGS = EffectSettings(batch_rows=4, vocab_rows=16, top_k=5)


def test_compute_shard_resumes_only_the_missing_units(clean_chunk, tmp_path, monkeypatch,
                                                      caplog):
    spec, clean = clean_chunk
    arguments = dict(spec=spec, clean_path=str(clean), neuron_table=NEURONS, settings=SETTINGS,
                     neurons_per_block=2)
    # uninterrupted
    steps.compute_shard(output=str(tmp_path / "full.parquet"),
                        partial_root=str(tmp_path / "p-full"), fingerprint="f",
                        mediation_output=str(tmp_path / "full.mediation.parquet"), **arguments)
    full = pd.read_parquet(tmp_path / "full.parquet")
    full_mediation = pd.read_parquet(tmp_path / "full.mediation.parquet")
    assert full_mediation.groupby(["prompt_id", "neuron_id"]).ngroups == 5 * 3
    assert len(full) == 5 * 3 and not full.duplicated(["prompt_id", "neuron_id"]).any()

    # interrupted after 4 of the 9 units (3 neuron blocks x 3 prompts)
    saved = []
    original_save = ShardProgress.save

    def failing_save(self, unit, frame, tables=None):
        if len(saved) == 4:
            raise KeyboardInterrupt("killed")
        saved.append(unit)
        original_save(self, unit, frame, tables)

    monkeypatch.setattr(ShardProgress, "save", failing_save)
    partial = tmp_path / "p-resumed"
    output = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        steps.compute_shard(output=str(output), partial_root=str(partial), fingerprint="f",
                            **arguments)
    monkeypatch.undo()
    assert not output.exists()
    assert ShardProgress(partial, "f").done_units() == sorted(saved)

    computed = []
    original_compute = steps.compute_effects

    def counting_compute(model, clean_run, *rest, **kw):
        computed.append(clean_run.prompt_id)
        return original_compute(model, clean_run, *rest, **kw)

    monkeypatch.setattr(steps, "compute_effects", counting_compute)
    with caplog.at_level(logging.INFO, logger="neuron_effects"):
        steps.compute_shard(output=str(output), partial_root=str(partial), fingerprint="f",
                            mediation_output=str(tmp_path / "resumed.mediation.parquet"),
                            **arguments)
    assert "5 neurons x 3 prompts in 9 units; 4 already done (resuming)" in caplog.text
    assert len(computed) == 9 - 4
    recomputed = [record.args[0] for record in caplog.records
                  if record.msg.startswith("unit %s")]
    all_units = {f"n{b:03d}_p{p:05d}" for b in range(3) for p in range(3)}
    assert len(recomputed) == 5 and set(recomputed) == all_units - set(saved)
    pd.testing.assert_frame_equal(pd.read_parquet(output), full, rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "resumed.mediation.parquet"),
                                  full_mediation, rtol=0, atol=1e-6)
    assert not partial.exists()


def test_compute_shard_ignores_progress_of_other_settings(clean_chunk, tmp_path, caplog):
    spec, clean = clean_chunk
    partial = tmp_path / "partial"
    ShardProgress(partial, "stale").save("n000_p00000", pd.DataFrame({"bogus": [1]}))
    with caplog.at_level(logging.INFO, logger="neuron_effects"):
        steps.compute_shard(spec, str(clean), NEURONS[:2], SETTINGS, str(tmp_path / "o.parquet"),
                            str(partial), "current", neurons_per_block=2)
    assert "0 already done (resuming)" in caplog.text
    frame = pd.read_parquet(tmp_path / "o.parquet")
    assert "bogus" not in frame.columns and len(frame) == 2 * 3


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
    assert {0, 1, 3} <= set(steps._shard_layers(paths)) <= {0, 1, 2, 3}
    whole = pd.concat([pd.read_parquet(path) for path in paths])
    for layer in (0, 1, 3):
        got = steps.layer_rows(paths, layer, {"a": 0, "b": 1, "c": 2})
        assert list(zip(got["neuron"], got["prompt_id"])) == [
            (n, p) for n in (0, 2) for p in ("a", "b", "c") if (p != "c" or layer < 3)]
        expected = whole[whole["layer"] == layer].set_index(["neuron_id", "prompt_id"])
        assert got.set_index(["neuron_id", "prompt_id"])["total"].equals(
            expected.loc[got.set_index(["neuron_id", "prompt_id"]).index, "total"])
    assert len(steps.layer_rows(paths, 2, {"a": 0, "b": 1, "c": 2})) == 0
