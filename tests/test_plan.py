"""The shard plan (neuron_effects.plan): prompt chunks stable under appending, layer block names,
which shards exist and what their parameters hold (what Snakemake compares to rerun them); its
cost (neuron_effects.plan_cost) and the automatic layout (neuron_effects.layout)."""

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


# --- sizing from the cost model (sharding: auto) --------------------------------------------

import json  # noqa: E402
from itertools import combinations  # noqa: E402

from conftest import LLAMA_8B_CONFIG  # noqa: E402

from neuron_effects.cost import DEVICES, ModelShape, device_rates  # noqa: E402
from neuron_effects.inputs import digest  # noqa: E402
from neuron_effects.layout import auto_layout, balanced_blocks, resolve_layout  # noqa: E402
from neuron_effects.plan_cost import (Workload, aggregate_runtime_minutes,  # noqa: E402
                                      aggregate_seconds, block_aggregate_seconds, estimate,
                                      shard_seconds)

LLAMA_8B = ModelShape.from_config(LLAMA_8B_CONFIG)
SMOLLM2 = ModelShape(n_layers=30, hidden=576, intermediate=1536, vocab=49152, n_heads=9,
                     n_kv_heads=3, head_dim=64, tied=True)


def test_model_shape_reads_the_checkpoint_dtype_from_a_loaded_config(llama_8b_dir):
    """transformers turns config.json's "torch_dtype": "bfloat16" into torch.bfloat16."""
    from transformers import AutoConfig

    assert ModelShape.from_config(AutoConfig.from_pretrained(llama_8b_dir)) == LLAMA_8B


def test_model_shape_counts_the_parameters_of_llama_3_1_8b():
    assert LLAMA_8B.n_parameters == 8_030_261_248  # the published count
    assert LLAMA_8B.bytes_per_parameter == 2 and LLAMA_8B.weight_bytes == 2 * 8_030_261_248
    assert SMOLLM2.n_parameters == 134_515_008  # SmolLM2-135M (tied)


def test_row_flops_follow_the_replayed_layers():
    """A row of layer l replays n_layers - 1 - l layers; the last layer's row only unembeds."""
    last = LLAMA_8B.row_flops(31, 128, full_vocab=True, mediators=False)
    assert last == 2 * 4096 * 128256
    first = LLAMA_8B.row_flops(0, 128, full_vocab=False, mediators=False)
    assert first == 31 * LLAMA_8B.layer_flops(128)
    assert LLAMA_8B.row_flops(0, 128, mediators=True) > LLAMA_8B.row_flops(0, 128, mediators=False)
    assert LLAMA_8B.row_flops(5, 20, positions="all", full_vocab=False, mediators=False) == \
        20 * LLAMA_8B.row_flops(5, 20, full_vocab=False, mediators=False)


def brute_force_blocks(costs, n_blocks):
    best = None
    for cuts in combinations(range(1, len(costs)), n_blocks - 1):
        starts = [0, *cuts]
        worst = max(sum(costs[a:b]) for a, b in zip(starts, [*cuts, len(costs)]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_balanced_blocks_minimise_the_largest_block(seed):
    rng = random.Random(seed)
    costs = [rng.uniform(0.1, 10) for _ in range(9)]
    for n_blocks in range(1, 6):
        starts = balanced_blocks(costs, n_blocks)
        assert starts[0] == 0 and starts == sorted(set(starts)) and len(starts) == n_blocks
        worst = max(sum(costs[a:b]) for a, b in zip(starts, [*starts[1:], len(costs)]))
        assert worst == pytest.approx(brute_force_blocks(costs, n_blocks))


def user_job(n_neurons=8177, n_prompts=100, n_tokens=150, seed=0):
    """The user's job: neurons spread over Llama-3.1-8B's 32 layers, ~150-token chat prompts."""
    rng = random.Random(seed)
    picks = set()
    while len(picks) < n_neurons:
        picks.add((rng.randrange(32), rng.randrange(14336)))
    records = prompts(n_prompts)
    return ([Neuron(f"L{layer}/N{n}", layer, n) for layer, n in sorted(picks)], records,
            {record.prompt_id: n_tokens for record in records})


def test_real_config_plans_few_jobs_with_little_fixed_cost():
    """8,177 neurons x 100 prompts on H200s with the Slurm profile's 32 jobs: at most 12 model
    jobs, fixed cost at most 30 % of the estimated GPU time, every shard worth 3 fixed costs;
    the old fixed sizes (4 layers x 25 prompts) made 41 jobs, three quarters of them loading.
    Without the fixed-share bound the job limit and the compute ratio allow more shards."""
    neurons, records, tokens = user_job()
    rates, work = device_rates("h200"), Workload(validation_pairs=64)
    blocks, per_chunk = auto_layout(neurons, records, tokens, LLAMA_8B, rates, work, 3, 32, 0.3)
    plan = make_plan(neurons, records, blocks, per_chunk)
    cost = estimate(plan, tokens, LLAMA_8B, rates, work)
    assert cost.jobs <= 12 and cost.fixed_share <= 0.3
    fixed = rates.fixed_s(LLAMA_8B.weight_bytes)
    for shard in plan.shards:
        assert shard_seconds(LLAMA_8B, rates, work, shard.neurons,
                             [tokens[p] for p in shard.chunk.prompt_ids]) >= 3 * fixed
    assert blocks[0][0] == 0 and blocks[-1][1] == 31
    assert all(a[1] + 1 == b[0] for a, b in zip(blocks, blocks[1:]))
    wider, _ = auto_layout(neurons, records, tokens, LLAMA_8B, rates, work, 3, 32, 1.0)
    assert len(wider) > len(blocks)
    old = estimate(make_plan(neurons, records, 4, 25), tokens, LLAMA_8B, rates, work)
    assert old.jobs == 41 and old.fixed_share > 0.6
    assert cost.total_s < old.total_s / 2


def test_blocks_are_balanced_by_cost_not_by_layer_count():
    """Early layers replay more layers per row: with neurons spread evenly, the first block
    holds fewer layers than the last."""
    neurons, records, tokens = user_job(n_neurons=3200, n_prompts=40)
    rates = device_rates("h200", {"startup_s": 0.5, "read_bytes_per_s": 1e12})
    blocks, _ = auto_layout(neurons, records, tokens, LLAMA_8B, rates, Workload(), 1, 4, 1.0)
    assert len(blocks) == 4
    sizes = [last - first + 1 for first, last in blocks]
    assert sizes[0] < sizes[-1]

    def costs(layer_blocks):
        plan = make_plan(neurons, records, layer_blocks, 40)
        return [shard_seconds(LLAMA_8B, rates, Workload(), shard.neurons, [40 * [150]][0])
                for shard in plan.shards]

    balanced, by_count = costs(blocks), costs(8)  # 8 layers per block: 4 blocks too
    assert len(by_count) == 4
    assert max(balanced) < 1.25 * sum(balanced) / 4 < max(by_count)


def test_a_local_run_is_one_shard_and_one_chunk():
    neurons, records, tokens = user_job(n_neurons=420, n_prompts=21, n_tokens=25)
    blocks, per_chunk = auto_layout(neurons, records, tokens, SMOLLM2.__class__(
        **{**vars(SMOLLM2), "n_layers": 32}), device_rates("cpu"), Workload(), 3, 1, 0.3)
    assert blocks == [(0, 31)] and per_chunk == 21


def test_shards_are_never_below_the_compute_ratio():
    """A tiny job on a GPU is not worth splitting: one shard, whatever the job limit."""
    neurons, records, tokens = user_job(n_neurons=50, n_prompts=3)
    blocks, per_chunk = auto_layout(neurons, records, tokens, LLAMA_8B, device_rates("h200"),
                                    Workload(), 3, 32, 1.0)
    assert len(blocks) == 1 and per_chunk == 3


def test_prompt_chunks_come_in_when_layers_run_out():
    """Neurons of one layer, many prompts, cheap jobs: the work is split by prompts."""
    neurons = [Neuron(f"L0/N{n}", 0, n) for n in range(2000)]
    records = prompts(40)
    tokens = {record.prompt_id: 150 for record in records}
    rates = device_rates("h200", {"startup_s": 0.5, "read_bytes_per_s": 1e12})
    blocks, per_chunk = auto_layout(neurons, records, tokens, LLAMA_8B, rates, Workload(), 3, 8,
                                    1.0)
    assert len(blocks) == 1 and per_chunk == 5  # 8 chunks of 5 prompts


def test_device_rates_take_overrides_and_keep_the_defaults():
    rates = device_rates("h100", {"read_bytes_per_s": 5e8})
    assert rates.read_bytes_per_s == 5e8 and rates.flops_per_s == DEVICES["h100"].flops_per_s
    assert rates.fixed_s(1e9) == DEVICES["h100"].startup_s + 2.0


SHARDING = {"layers_per_shard": "auto", "prompts_per_chunk": "auto", "min_compute_ratio": 3,
            "max_fixed_share": 0.3, "max_parallel_jobs": "auto", "gpu": "h200", "rates": {}}


def test_a_cluster_job_reuses_the_layout_of_the_run_that_submitted_it(tmp_path):
    """The parse inside a cluster job does not know the run's job limit: it reads the layout
    its run chose, by the name that run gave it (saved under the digest of its content); another
    run's choice (another job limit) is saved beside it and changes nothing of it. Without one it
    stops with a clear error."""
    neurons, records, tokens = user_job()
    sharding = {**SHARDING, "max_fixed_share": 1.0}  # as many shards as the job limit allows
    args = (neurons, records, tokens, LLAMA_8B, device_rates("h200"), Workload())
    with pytest.raises(InputError, match="shard layout chosen by the run that submitted"):
        resolve_layout(sharding, *args, parallel_jobs=1, saved=tmp_path, reuse_only=True)
    chosen = resolve_layout(sharding, *args, parallel_jobs=32, saved=tmp_path)
    assert len(chosen.layer_blocks) > 1 and chosen.layout_id
    local = resolve_layout(sharding, *args, parallel_jobs=1, saved=tmp_path)
    assert len(local.layer_blocks) == 1 and local.prompt_chunks == (0,)
    assert local.layout_id != chosen.layout_id
    for layout in (chosen, local):
        assert resolve_layout(sharding, *args, parallel_jobs=1, saved=tmp_path, reuse_only=True,
                              layout_id=layout.layout_id) == layout
    with pytest.raises(InputError, match="shard layout chosen by the run that submitted"):
        resolve_layout(sharding, *args, parallel_jobs=1, saved=tmp_path, reuse_only=True,
                       layout_id="0123456789abcdef")
    # a file is named by its content: a third run choosing the first layout again rewrites
    # nothing else, and the files hold what their names say
    again = resolve_layout(sharding, *args, parallel_jobs=32, saved=tmp_path)
    assert again == chosen
    layouts = sorted(path.stem for path in tmp_path.glob("*.json")
                     if not path.name.startswith("previous-"))
    assert layouts == sorted([chosen.layout_id, local.layout_id])
    for name in layouts:
        assert digest(json.loads((tmp_path / f"{name}.json").read_text())) == name


def test_explicit_sizes_are_kept():
    neurons, records, tokens = user_job(n_neurons=100, n_prompts=10)
    sharding = {**SHARDING, "layers_per_shard": 4, "prompts_per_chunk": 25}
    assert resolve_layout(sharding, neurons, records, tokens, LLAMA_8B, device_rates("h200"),
                          Workload(), parallel_jobs=32, saved="unused") == (4, 25, None)


def test_the_plan_table_names_every_model_rule_and_the_fixed_share():
    neurons, records, tokens = user_job(n_neurons=300, n_prompts=10)
    plan = make_plan(neurons, records, 8, 5)
    text = estimate(plan, tokens, LLAMA_8B, device_rates("h200"), Workload()).table()
    for rule in ("cache_clean_runs", "compute_effects", "estimate_attribution",
                 "validate_sample"):
        assert rule in text
    assert "estimated GPU-minutes on h200" in text and "fixed cost" in text
    assert "then aggregate_block, 4 CPU job(s) of one core" in text  # one per layer block


def test_aggregation_estimate_counts_rows_and_mediation_table_rows():
    """Per (prompt, neuron) row of layer l: 22 us, and 1.2 us for each of its 2 (31 - l) + 1
    mediation rows and 2 x top_k mediator rows (Llama: 32 layers); plus 6 s. The cluster's time
    limit is 3x that, at least 15 minutes."""
    records = prompts(4)
    tokens = {record.prompt_id: 50 for record in records}
    picked = [Neuron("L0/N1", 0, 1), Neuron("L31/N2", 31, 2), Neuron("L31/N3", 31, 3)]
    plan = make_plan(picked, records, 8, 3)  # blocks L0-7 and L24-31, chunks of 3 and 1
    rows, table_rows = 3 * 4, 4 * ((63 + 20) + 2 * (1 + 20))
    assert aggregate_seconds(plan, 32, Workload(mediator_top_k=10)) == pytest.approx(
        6 + rows * 22e-6 + table_rows * 1.2e-6)
    assert aggregate_seconds(plan, 32, Workload(mediators=False)) == pytest.approx(
        6 + rows * 22e-6)
    # one job per layer block, each with its own fixed 6 s
    blocks = block_aggregate_seconds(plan, 32, Workload())
    assert list(blocks) == ["L00-07", "L24-31"]
    assert blocks["L00-07"] == pytest.approx(6 + 4 * 22e-6 + 4 * (63 + 20) * 1.2e-6)
    planned = estimate(plan, tokens, LLAMA_8B, device_rates("h200"), Workload())
    assert (planned.aggregate_jobs, planned.aggregate_longest_s) == (2, max(blocks.values()))
    assert planned.aggregate_s == pytest.approx(aggregate_seconds(plan, 32, Workload()) + 6)
    assert aggregate_runtime_minutes(60.0) == 15 and aggregate_runtime_minutes(3_890) == 195


def test_job_timings_split_each_job_at_its_logged_fixed_cost(tmp_path, monkeypatch):
    """Per rule: seconds from the benchmark files, the fixed part from the last 'fixed cost'
    line of each job's log (NaN when a job logged none), the work the rest, beside the plan's
    estimate."""
    from neuron_effects.jobs.report_page import job_timings

    monkeypatch.chdir(tmp_path)
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    jobs = []
    for name, seconds, fixed in (("c000", 10.0, (2.0, 3.5)), ("c001", 12.0, (2.5, 4.5)),
                                 ("c002", 8.0, ())):
        benchmark, log_path = tmp_path / f"benchmarks/cache_clean_runs/{name}.tsv", \
            tmp_path / f"logs/cache_clean_runs/{name}.log"
        benchmark.parent.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        benchmark.write_text(header + f"{seconds}\t0:00:10\t500\t-\t-\t-\t-\t-\t-\t-\n")
        log_path.write_text("".join(f"2026 INFO fixed cost: {value:.2f} s since the job's "
                                    "process started\n" for value in fixed)
                            + f"2026 INFO prompts computed: {len(fixed)}, reused: 2\n")
        jobs.append((f"benchmarks/cache_clean_runs/{name}.tsv", str(log_path)))
    estimate = {"device": "cpu", "fixed_share": 0.5, "aggregate_s": 7.5, "aggregate_jobs": 1,
                "rules": [{"rule": "cache_clean_runs", "jobs": 3, "compute_s": 20.0,
                           "fixed_s": 12.0}]}
    benchmark = tmp_path / "benchmarks/aggregate_block/L00-31.tsv"
    benchmark.parent.mkdir(parents=True)
    benchmark.write_text(header + "9.0\t0:00:09\t700\t-\t-\t-\t-\t-\t-\t-\n")
    jobs.append(("benchmarks/aggregate_block/L00-31.tsv", str(tmp_path / "logs/none.log")))
    table, _ = job_timings(jobs, estimate)
    row = table.set_index("rule").loc["cache_clean_runs"]
    assert row["jobs"] == 3 and row["total_s"] == 30.0
    assert row["fixed_s"] == 8.0 and row["work_s"] == 22.0  # the last line of each log
    assert row["median_fixed_s"] == 4.0 and row["peak_rss_mb"] == 500
    assert row["computed"] == 2 + 2 + 0 and row["reused"] == 3 * 2
    assert (row["planned_jobs"], row["estimated_compute_s"], row["estimated_fixed_s"]) == \
        (3, 20.0, 12.0)
    aggregation = table.set_index("rule").loc["aggregate_block"]
    assert aggregation["total_s"] == 9.0 and aggregation["estimated_compute_s"] == 7.5


# --- a layout that moves little (sharding: auto, kept while the inputs grow) -----------------

CHEAP = {"startup_s": 0.5, "read_bytes_per_s": 1e12}  # cheap jobs: the job limit binds


def test_chunk_starts_cut_the_prompts():
    plan = make_plan(neurons([0]), prompts(12), 1, [0, 5, 10])
    assert [c.prompt_ids for c in plan.chunks] == [
        [f"p{i}" for i in range(5)], [f"p{i}" for i in range(5, 10)], ["p10", "p11"]]
    assert [c.name for c in make_plan(neurons([0]), prompts(4), 1, [0, 5]).chunks] == ["c000"]


@pytest.mark.parametrize("n_prompts, starts", [
    (40, [0, 5, 10, 15, 20, 25, 30, 35]), (41, [0, 5, 10, 15, 20, 25, 30, 35]),
    (44, [0, 5, 10, 15, 20, 25, 30, 35]), (45, [0, 5, 10, 15, 20, 25, 30, 35, 40]),
    (52, [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]), (33, [0, 5, 10, 15, 20, 25, 30]),
])
def test_appended_prompts_fill_the_last_chunk_then_go_to_new_ones(n_prompts, starts):
    from neuron_effects.layout import extend_chunks

    assert extend_chunks(list(range(0, 40, 5)), 5, n_prompts) == starts


def test_appending_prompts_keeps_the_automatic_chunks(tmp_path):
    """Neurons of one layer, 40 prompts, at most 8 jobs: 8 chunks of 5. A 41st prompt used to
    recut them (7 chunks of 6: every chunk changed); now it joins the last chunk, and so do the
    next three; the 45th would need a 9th chunk, beyond the job limit: chosen afresh then."""
    picked = [Neuron(f"L0/N{n}", 0, n) for n in range(2000)]
    rates = device_rates("h200", CHEAP)
    sharding = {**SHARDING, "max_fixed_share": 1.0}

    def layout(n_prompts):
        records = prompts(n_prompts)
        tokens = {record.prompt_id: 150 for record in records}
        chosen = resolve_layout(sharding, picked, records, tokens, LLAMA_8B, rates, Workload(),
                                parallel_jobs=8, saved=tmp_path)
        return chosen, fingerprints(make_plan(picked, records, *chosen[:2])), (records, tokens)

    base, before, _ = layout(40)
    assert base.prompt_chunks == tuple(range(0, 40, 5))
    records, tokens = prompts(41), {f"p{i}": 150 for i in range(41)}
    assert auto_layout(picked, records, tokens, LLAMA_8B, rates, Workload(), 3, 8, 1.0)[1] == 6
    for n_prompts in (41, 42, 43, 44):
        kept, after, _ = layout(n_prompts)
        assert kept.prompt_chunks == base.prompt_chunks
        assert {name for name in after if before.get(name) != after[name]} == {"c007"}
        assert make_plan(picked, prompts(n_prompts), *kept[:2]).chunk("c007").prompt_ids == \
            [f"p{i}" for i in range(35, n_prompts)]
    recut, _, _ = layout(45)
    assert recut.prompt_chunks == tuple(range(0, 45, 6))  # 8 chunks: the job limit holds


def test_adding_a_neuron_keeps_the_automatic_layer_blocks(tmp_path):
    """40 neurons in 8 layer blocks (at most 8 jobs): of 30 random additions of one neuron,
    the cost model alone moves the block boundaries of several (rerunning most shards); the
    kept layout moves none, and only the new neuron's block's shard changes."""
    base_neurons, records, tokens = user_job(n_neurons=40, n_prompts=40)
    rates, work = device_rates("h200", CHEAP), Workload()
    sharding = {**SHARDING, "max_fixed_share": 1.0, "min_compute_ratio": 1}

    def layout(picked):
        return resolve_layout(sharding, picked, records, tokens, LLAMA_8B, rates, work,
                              parallel_jobs=8, saved=tmp_path)

    def tables(picked, chosen):
        return {s.name: s.neuron_table for s in make_plan(picked, records, *chosen[:2]).shards}

    base = layout(base_neurons)
    assert len(base.layer_blocks) == 8 and len(base.prompt_chunks) == 1
    before = tables(base_neurons, base)
    rng, taken, moved = random.Random(3), {(n.layer, n.neuron) for n in base_neurons}, 0
    for _ in range(30):
        layer, index = rng.randrange(32), rng.randrange(14336)
        if (layer, index) in taken:
            continue
        added = [*base_neurons, Neuron(f"L{layer}/N{index}", layer, index)]
        fresh, _ = auto_layout(added, records, tokens, LLAMA_8B, rates, work, 1, 8, 1.0)
        moved += [tuple(block) for block in fresh] != list(base.layer_blocks)
        kept = layout(added)
        assert kept[:2] == base[:2]
        after = tables(added, kept)
        assert len({name for name in after if before.get(name) != after[name]}) == 1
    assert moved >= 3  # what the additions did before


def test_a_kept_layout_gives_way_when_it_no_longer_fits(tmp_path):
    """The previous layout is kept only within auto_layout's bounds and while its longest shard
    is within KEEP_TOLERANCE of a fresh choice's: a lower job limit (too many shards), a higher
    one (more shards pay off) or fewer neurons (shards not worth their fixed cost) choose
    afresh."""
    neurons_, records, tokens = user_job()
    args = (records, tokens, LLAMA_8B, device_rates("h200"), Workload())
    sharding = {**SHARDING, "max_fixed_share": 1.0}

    def blocks(picked, jobs):
        return resolve_layout(sharding, picked, *args, parallel_jobs=jobs,
                              saved=tmp_path).layer_blocks

    spread = blocks(neurons_, 32)
    assert len(spread) == 2
    assert len(blocks(neurons_, 1)) == 1  # fewer jobs than shards
    assert blocks(neurons_, 32) == spread  # one shard of the whole job would be too long
    assert len(blocks(neurons_[::8], 32)) == 1  # two shards of 1,022 neurons: too little each
    for previous in tmp_path.glob("previous-*.json"):  # unreadable: chosen afresh
        previous.write_text("{not json")
    assert blocks(neurons_, 32) == spread
