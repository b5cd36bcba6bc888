"""The shard plan (neuron_effects.plan): prompt chunks stable under appending, layer block names,
which shards exist and what their parameters hold (what Snakemake compares to rerun them)."""

from __future__ import annotations

import random

import pytest

from neuron_effects.inputs import InputError, Neuron, PromptRecord
from neuron_effects.plan import block_name, make_plan


def prompts(n: int, line_offset: int = 0) -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", f"prompt number {i}", " yes", None, i + 1 + line_offset)
            for i in range(n)]


def neurons(layers, per_layer: int = 3) -> list[Neuron]:
    return [Neuron(f"L{layer}/N{10 * k + layer}", layer, 10 * k + layer)
            for layer in layers for k in range(per_layer)]


def fingerprints(plan) -> dict[str, str]:
    return {chunk.name: chunk.fingerprint for chunk in plan.chunks}


# --- chunks ---------------------------------------------------------------------------------

def test_chunks_are_consecutive_slices():
    plan = make_plan(neurons([0]), prompts(10), 4, 4)
    assert [c.name for c in plan.chunks] == ["c000", "c001", "c002"]
    assert [c.prompt_ids for c in plan.chunks] == [
        ["p0", "p1", "p2", "p3"], ["p4", "p5", "p6", "p7"], ["p8", "p9"]]


@pytest.mark.parametrize("n", [9, 10, 11, 12])
def test_appending_a_prompt_changes_only_the_last_chunk(n):
    before = fingerprints(make_plan(neurons([0]), prompts(n), 4, 4))
    after = fingerprints(make_plan(neurons([0]), prompts(n + 1), 4, 4))
    changed = {name for name in after if before.get(name) != after[name]}
    last = f"c{n // 4:03d}"  # the chunk holding the new prompt (new if n is a multiple of 4)
    assert changed == {last}
    assert (last in before) == (n % 4 != 0)


def test_editing_one_prompt_changes_only_its_chunk():
    records = prompts(10)
    base = fingerprints(make_plan(neurons([0]), records, 4, 4))
    for field, value in (("prompt", "edited text"), ("target", " no"), ("distractor", " no"),
                         ("prompt_id", "renamed")):
        edited = list(records)
        edited[5] = PromptRecord(**{**vars(records[5]), field: value})
        after = fingerprints(make_plan(neurons([0]), edited, 4, 4))
        assert {n for n in base if base[n] != after[n]} == {"c001"}, field


def test_line_numbers_do_not_count():
    """Blank or comment lines moving the prompts down in the file change nothing."""
    assert fingerprints(make_plan(neurons([0]), prompts(10), 1, 4)) == \
        fingerprints(make_plan(neurons([0]), prompts(10, line_offset=7), 1, 4))


# --- blocks and shards ----------------------------------------------------------------------

@pytest.mark.parametrize("layer, size, name", [
    (0, 10, "L00-09"), (9, 10, "L00-09"), (10, 10, "L10-19"), (13, 4, "L12-15"),
    (31, 4, "L28-31"), (5, 1, "L05-05"), (0, 32, "L00-31"), (105, 10, "L100-109"),
])
def test_block_names(layer, size, name):
    assert block_name(layer, size) == name


def test_shards_are_non_empty_blocks_times_chunks():
    layers = [0, 1, 2, 5, 13, 14, 31]  # blocks of 4: L00-03, L04-07, L12-15, L28-31
    plan = make_plan(neurons(layers), prompts(9), 4, 4)
    blocks = ["L00-03", "L04-07", "L12-15", "L28-31"]
    assert [s.name for s in plan.shards] == [f"{b}_c00{c}" for b in blocks for c in range(3)]
    assert len(plan.shards) == len(blocks) * len(plan.chunks) == 12
    assert plan.shard("L12-15_c002").chunk is plan.chunk("c002")


def test_each_neuron_is_in_exactly_one_block_and_sorted():
    shuffled = neurons(range(12), per_layer=5)
    random.Random(0).shuffle(shuffled)
    plan = make_plan(shuffled, prompts(3), 5, 10)
    tables = {s.block: s.neuron_table for s in plan.shards}
    assert list(tables) == ["L00-04", "L05-09", "L10-14"]
    flat = [tuple(row) for table in tables.values() for row in table]
    assert sorted(flat, key=lambda row: (row[1], row[2])) == flat  # by layer, then index
    assert len(flat) == len(set(flat)) == 60
    for block, table in tables.items():
        first = int(block[1:3])
        assert all(first <= layer < first + 5 for _, layer, _ in table)


def test_profile_order_does_not_change_any_shard():
    ordered = neurons(range(8), per_layer=4)
    shuffled = list(ordered)
    random.Random(1).shuffle(shuffled)
    a, b = make_plan(ordered, prompts(5), 3, 2), make_plan(shuffled, prompts(5), 3, 2)
    assert [(s.name, s.neuron_table) for s in a.shards] == \
        [(s.name, s.neuron_table) for s in b.shards]


def test_editing_a_neuron_changes_only_its_blocks_shards():
    base = neurons(range(8), per_layer=4)
    edited = [Neuron("L5/N99", 5, 99) if n.neuron_id == "L5/N15" else n for n in base]
    before = {s.name: s.neuron_table for s in make_plan(base, prompts(7), 2, 3).shards}
    after = {s.name: s.neuron_table for s in make_plan(edited, prompts(7), 2, 3).shards}
    assert {name for name in before if before[name] != after[name]} == {
        "L04-05_c000", "L04-05_c001", "L04-05_c002"}


@pytest.mark.parametrize("layers_per_shard, prompts_per_chunk", [(0, 4), (4, 0)])
def test_sizes_below_one_are_refused(layers_per_shard, prompts_per_chunk):
    with pytest.raises(InputError, match="must be >= 1, got 0"):
        make_plan(neurons([0]), prompts(3), layers_per_shard, prompts_per_chunk)
