"""Results cached by what they are (neuron_effects.cache): verified entries, and the model steps
computing only what the cache lacks, whatever the shard layout, with results equal to a fresh
computation."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from neuron_effects import cache, store
from neuron_effects.jobs import setup
from neuron_effects.jobs.clean_runs import cache_clean_runs
from neuron_effects.jobs.estimates import estimate_attribution
from neuron_effects.jobs.shard import compute_shard
from neuron_effects.effects import EffectSettings
from neuron_effects.model import ModelSpec

PROMPTS = [{"prompt_id": "a", "input_ids": [5, 17, 2, 99, 43], "target_id": 7,
            "distractor_id": 13},
           {"prompt_id": "b", "input_ids": [8, 61, 30, 12], "target_id": None,
            "distractor_id": None},
           {"prompt_id": "c", "input_ids": [77, 3, 9, 14, 15, 16], "target_id": 11,
            "distractor_id": None}]
NEURONS = [["L0/N1", 0, 1], ["L0/N50", 0, 50], ["L1/N7", 1, 7], ["L1/N95", 1, 95],
           ["L1/N20", 1, 20]]
SETTINGS = EffectSettings(batch_rows=4, vocab_rows=16, top_k=5)
TABLES = ("per_prompt", "mediation", "mediators", "edges")


def computed(caplog, what: str = "rows") -> tuple[int, int]:
    """(computed, reused) of the last ``<what> computed: N, reused: M`` line logged."""
    lines = [record.getMessage() for record in caplog.records
             if record.getMessage().startswith(f"{what} computed:")]
    numbers = lines[-1].removeprefix(f"{what} computed: ").split(", reused: ")
    return int(numbers[0]), int(numbers[1])


@pytest.fixture(scope="module")
def clean_chunk(tiny_model_dir, tmp_path_factory):
    """A clean-run file of 3 prompts of the tiny model, as cache_clean_runs writes it."""
    folder = tmp_path_factory.mktemp("clean")
    spec = ModelSpec(str(tiny_model_dir), device="cpu")
    cache_clean_runs(spec, PROMPTS, str(folder / "c000.safetensors"))
    return spec, folder / "c000.safetensors"


def shard(clean_chunk, folder, cache_root, neurons=NEURONS, settings=SETTINGS, **options):
    """Run compute_shard into ``folder``; return its four tables."""
    spec, clean = clean_chunk
    folder.mkdir(parents=True, exist_ok=True)
    paths = {table: str(folder / f"{table}.parquet") for table in TABLES}
    options = {"neurons_per_block": 2, "edge_targets": {"L0/N1": [[1, 3], [1, 4]]}, **options}
    compute_shard(spec, str(clean), neurons, settings, paths["per_prompt"],
                        str(cache_root), mediation_output=paths["mediation"],
                        mediators_output=paths["mediators"], edges_output=paths["edges"],
                        **options)
    return {table: pd.read_parquet(path) for table, path in paths.items()}


def by_row(frame: pd.DataFrame, keys=("prompt_id", "neuron_id")) -> pd.DataFrame:
    """The table in a canonical order (by its keys and every column), ids as strings."""
    frame = frame.copy()
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.CategoricalDtype):
            frame[column] = frame[column].astype(str)
    columns = [c for c in frame.columns if not frame[c].map(
        lambda v: isinstance(v, (list, np.ndarray))).any()]
    return frame.sort_values([*keys, *(c for c in columns if c not in keys)]
                             ).reset_index(drop=True)


def assert_same(first: dict, second: dict, atol: float = 1e-5, rtol: float = 1e-3) -> None:
    """Equal tables. Rows computed in other batches differ by float32 rounding (about 1e-6 at
    the tiny model's logit scale; more, relatively, in the ratios of tiny effects); rows read
    back from the cache not at all (``atol=rtol=0``)."""
    for table in TABLES:
        pd.testing.assert_frame_equal(by_row(first[table]), by_row(second[table]),
                                      check_dtype=False, check_categorical=False,
                                      rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def fresh(clean_chunk, tmp_path_factory):
    """The shard computed once, into a cache of its own."""
    folder = tmp_path_factory.mktemp("fresh")
    return shard(clean_chunk, folder / "out", folder / "cache")


# --- entries ----------------------------------------------------------------------------------

def test_an_entry_verifies_and_a_damaged_one_is_moved_aside(tmp_path, caplog):
    folder = tmp_path / "cache" / "clean"
    cache.write_entry(folder, "k1", {"bin": lambda path: path.write_bytes(b"x" * 100)},
                      {"note": 1})
    manifest = cache.verified_manifest(tmp_path / "cache", folder, "k1")
    assert manifest["note"] == 1 and manifest["files"]["bin"]["bytes"] == 100
    assert cache.verified_manifest(tmp_path / "cache", folder, "absent") is None
    for damage, why in ((lambda p: p.write_bytes(b"x" * 50), "has 50 bytes, 100 recorded"),
                        (lambda p: p.write_bytes(b"y" * 100), "does not match its recorded"),
                        (lambda p: p.unlink(), "k1.bin is missing")):
        cache.write_entry(folder, "k1", {"bin": lambda path: path.write_bytes(b"x" * 100)}, {})
        damage(folder / "k1.bin")
        with caplog.at_level(logging.WARNING, logger="neuron_effects"):
            assert cache.verified_manifest(tmp_path / "cache", folder, "k1") is None
        assert f"cache entry {folder / 'k1'} is damaged" in caplog.text and why in caplog.text
        assert not list(folder.glob("k1.*"))
        assert (tmp_path / "cache" / "damaged" / "clean" / "k1.json").exists()
    # files without a manifest (a writer killed between its files) are never served
    (folder / "k2.bin").write_bytes(b"half")
    assert cache.verified_manifest(tmp_path / "cache", folder, "k2") is None
    assert not (folder / "k2.bin").exists()


def test_row_keys_cover_the_neuron_and_its_edge_targets():
    assert cache.row_key(3, 7) != cache.row_key(3, 8) != cache.row_key(4, 7)
    assert cache.row_key(3, 7, [[5, 1]]) != cache.row_key(3, 7)
    assert cache.row_key(3, 7, [[5, 1], [6, 2]]) == cache.row_key(3, 7, [(6, 2), (5, 1)])


# --- the shard step -----------------------------------------------------------------------------

def test_reused_rows_equal_recomputed_ones_whatever_the_layout(clean_chunk, fresh, tmp_path,
                                                                caplog, monkeypatch):
    """Three neurons first, then all five in other blocks: only the two new neurons' rows are
    computed, and the tables equal a fresh computation; removing a neuron computes nothing and
    loads no model."""
    root = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="neuron_effects"):
        shard(clean_chunk, tmp_path / "three", root, NEURONS[:3])
        assert computed(caplog) == (3 * 3, 0)
        grown = shard(clean_chunk, tmp_path / "five", root, NEURONS, neurons_per_block=3)
        assert computed(caplog) == (2 * 3, 3 * 3)
        assert_same(grown, fresh)
        monkeypatch.setattr(setup, "load_model", lambda *a, **k: pytest.fail("model loaded"))
        fewer = shard(clean_chunk, tmp_path / "four", root, NEURONS[1:])
        assert computed(caplog) == (0, 4 * 3)
    expected = {table: frame[frame["neuron_id"] != "L0/N1"] for table, frame in fresh.items()}
    assert_same(fewer, expected)
    # the job's own ids label the rows, whatever ids computed them
    renamed = shard(clean_chunk, tmp_path / "renamed", root, [["first", 0, 1], *NEURONS[1:]],
                    edge_targets={"first": [[1, 4], [1, 3]]})
    assert set(renamed["per_prompt"]["neuron_id"]) == {"first", *(n[0] for n in NEURONS[1:])}
    assert set(renamed["edges"]["neuron_id"].astype(str)) == {"first"}


def test_a_killed_shard_resumes_from_its_saved_units(clean_chunk, fresh, tmp_path, caplog,
                                                     monkeypatch):
    root = tmp_path / "cache"
    saved, original_save = [], cache.RowCache.save

    def failing_save(self, rows, tables, made_by=""):
        if len(saved) == 4:
            raise KeyboardInterrupt("killed")
        saved.append(made_by)
        return original_save(self, rows, tables, made_by)

    monkeypatch.setattr(cache.RowCache, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        shard(clean_chunk, tmp_path / "killed", root)
    monkeypatch.undo()
    assert not (tmp_path / "killed" / "per_prompt.parquet").exists()
    with caplog.at_level(logging.INFO, logger="neuron_effects"):
        resumed = shard(clean_chunk, tmp_path / "killed", root)
    assert "5 neurons x 3 prompts in 9 units; 4 already done (resuming)" in caplog.text
    units = [r.args[0] for r in caplog.records if r.msg.startswith("unit %s")]
    assert len(units) == 5 and not {f"unit {unit}" for unit in units} & {
        made_by.split(" ", 1)[1] for made_by in saved}
    assert_same(resumed, fresh, atol=0, rtol=0)
    assert not list(tmp_path.glob("killed/.*pieces"))


def test_a_damaged_entry_is_recomputed_and_the_results_equal_an_undamaged_run(
        clean_chunk, fresh, tmp_path, caplog):
    root = tmp_path / "cache"
    shard(clean_chunk, tmp_path / "first", root)
    entry = sorted((root / "effects").glob("*/*.mediation.parquet"))[0]
    entry.write_bytes(entry.read_bytes()[:100])  # a truncated file, as a storage fault leaves
    with caplog.at_level(logging.INFO, logger="neuron_effects"):
        again = shard(clean_chunk, tmp_path / "again", root)
    assert "is damaged" in caplog.text and entry.name.split(".")[0] in caplog.text
    assert computed(caplog)[0] == 2  # the entry's two rows (a block of two neurons)
    assert_same(again, fresh, atol=0, rtol=0)


@pytest.mark.parametrize("change", [
    "treatment", "top_k", "noise_floor", "mediators", "mediator_top_k", "products", "full_vocab",
    "positions", "prompt_format", "edges", "mean_statistics", "engine_version", "model",
    "target",
])
def test_a_change_of_any_key_part_is_never_served_from_the_cache(clean_chunk, tmp_path, caplog,
                                                                  monkeypatch, change,
                                                                  tiny_model_dir):
    root = tmp_path / "cache"
    stats = tmp_path / "stats.parquet"
    layers, width = 2, 128
    base = {"layer": np.repeat(np.arange(layers), width), "neuron": np.tile(np.arange(width),
                                                                            layers)}
    pd.DataFrame({**base, "mean": np.full(layers * width, 0.5),
                  "mean_all_positions": 0.0}).to_parquet(stats)
    settings = replace(SETTINGS, treatment="mean_ablate")
    options = {"neuron_stats": str(stats), "prompt_format": {"chat_template": False}}
    with caplog.at_level(logging.INFO, logger="neuron_effects"):
        shard(clean_chunk, tmp_path / "first", root, NEURONS[:2], settings, **options)
        assert computed(caplog) == (6, 0)
        shard(clean_chunk, tmp_path / "same", root, NEURONS[:2],
              replace(settings, batch_rows=1, vocab_rows=3), **options)  # the schedule only
        assert computed(caplog) == (0, 6)
        expected = 6
        if change in {"treatment", "top_k", "noise_floor", "mediator_top_k", "full_vocab",
                      "positions", "products"}:
            value = {"treatment": "add", "top_k": 3, "noise_floor": 1e-3, "mediator_top_k": 2,
                     "full_vocab": False, "positions": "all", "products": "split_bf16"}[change]
            settings = replace(settings, **{change: value})
        elif change == "mediators":
            settings = replace(settings, mediators=False)
        elif change == "prompt_format":
            options["prompt_format"] = {"chat_template": True}
        elif change == "edges":
            options["edge_targets"] = {"L0/N1": [[1, 3]]}
            expected = 3  # that neuron only
        elif change == "mean_statistics":
            pd.DataFrame({**base, "mean": np.full(layers * width, 0.25),
                          "mean_all_positions": 0.0}).to_parquet(stats)
        elif change == "engine_version":
            monkeypatch.setattr(cache, "ENGINE_VERSION", cache.ENGINE_VERSION + 1)
        elif change == "model":
            other = tmp_path / "model"
            shutil.copytree(tiny_model_dir, other)
            weights = load_file(str(other / "model.safetensors"))
            name = next(n for n in weights if "mlp.down_proj" in n)
            weights[name] = weights[name] * 1.5
            save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
            clean_chunk = (ModelSpec(str(other), device="cpu"), clean_chunk[1])
        elif change == "target":  # prompt a's target: its two rows only
            retargeted = tmp_path / "retargeted.safetensors"
            cache_clean_runs(clean_chunk[0], [{**PROMPTS[0], "target_id": 8}, *PROMPTS[1:]],
                                   str(retargeted))
            clean_chunk = (clean_chunk[0], retargeted)
            expected = 2
        shard(clean_chunk, tmp_path / "changed", root, NEURONS[:2], settings, **options)
        assert computed(caplog) == (expected, 6 - expected)


# --- clean runs and attribution estimates -------------------------------------------------------

def test_clean_runs_and_estimates_are_computed_once_per_prompt(tiny_model_dir, tmp_path, caplog,
                                                               monkeypatch):
    spec = ModelSpec(str(tiny_model_dir), device="cpu")
    root = str(tmp_path / "cache")
    form = {"chat_template": False}
    methods = {"atp": [], "relp": ["ln", "identity", "half"]}

    def run(name, prompts):
        clean = str(tmp_path / f"{name}.safetensors")
        cache_clean_runs(spec, prompts, clean, cache_root=root, prompt_format=form)
        estimates = str(tmp_path / f"{name}.atp.safetensors")
        estimate_attribution(spec, clean, "add", "last", estimates, methods=methods,
                                   cache_root=root)
        return load_file(clean), load_file(estimates)

    with caplog.at_level(logging.INFO, logger="neuron_effects"):
        first = run("first", PROMPTS)
        assert computed(caplog, "prompts") == (3, 0)
        uncached_clean = str(tmp_path / "uncached.safetensors")
        cache_clean_runs(spec, PROMPTS, uncached_clean)  # no cache: the reference
        # a new target for one prompt, and one prompt renamed: one clean run, one estimate
        changed = [{**PROMPTS[0], "target_id": 9}, {**PROMPTS[1], "prompt_id": "renamed"},
                   PROMPTS[2]]
        second = run("second", changed)
        assert computed(caplog, "prompts") == (1, 2)
        monkeypatch.setattr(setup, "load_model", lambda *a, **k: pytest.fail("model loaded"))
        third = run("third", PROMPTS)
        assert computed(caplog, "prompts") == (0, 3)
    for name, tensor in load_file(uncached_clean).items():
        assert (first[0][name] == tensor).all() and (third[0][name] == tensor).all(), name
    for name, tensor in first[1].items():
        assert (third[1][name] == tensor).all(), name
        assert (second[1][name][1:] == tensor[1:]).all(), name
    assert not (second[1]["estimates"][0] == first[1]["estimates"][0]).all()
    records = store.load_clean_records(str(tmp_path / "second.safetensors"))
    assert [r["prompt_id"] for r in records] == ["a", "renamed", "c"]
    assert records[0]["target_id"] == 9
    # the same estimate name with other rules (as when the default rule set changed): the rules
    # are in the key, so no entry is reused
    monkeypatch.undo()
    methods["relp"] = ["ln", "identity", "half", "frozen_attention"]
    with caplog.at_level(logging.INFO, logger="neuron_effects"):
        fourth = run("fourth", PROMPTS)
        assert computed(caplog, "prompts") == (3, 0)
    assert not (fourth[1]["relp"] == first[1]["relp"]).all()
