"""The cost model: FLOPs of each model job's work from the model config, and the fixed cost of a
job (start-up plus loading the weights), so that shards can be sized before anything runs.

FLOPs count multiply-adds as 2. For one treated row of a neuron in layer ``l`` (a prompt of
``T`` tokens), the fast path replays layers ``l+1 .. n_layers-1`` for the last token only,
attending to the ``T`` cached positions, then unembeds the total (``2 * hidden * vocab``, with
full-vocabulary metrics); the mediation split adds one projection of each downstream layer's
output per row (:data:`MEDIATION_FACTOR`, measured on the whole row). A clean forward is a full forward of ``T``
tokens; attribution patching one forward and one backward per estimate method (each ``2 x``
a forward); the validation
one float64 forward per sampled pair.

The rates are documented defaults per device (:data:`DEVICES`), measured where the text says
so; ``sharding.rates`` in the config overrides any of them, and the report sets the estimate
beside the measured benchmark files so that they can be corrected.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

# The mediation split costs x1.167 of the replay (BENCHMARKS.md, measured interleaved on CPU).
MEDIATION_FACTOR = 1.167
# Attribution patching: one forward per prompt and one backward per estimate method (AtP, each
# RelP rule set); a backward is ~2x a forward in FLOPs (AtP alone measured 1.80x a clean forward
# on SmolLM2, BENCHMARKS.md section 7).
BACKWARD_FACTOR = 2.0
# The aggregation, on one CPU core (measured on the demo census and a 3-layer census of it,
# BENCHMARKS.md section 12): a fixed part, a cost per (prompt, neuron) row and one per row of the
# mediation tables (:func:`mediation_table_rows`). Checked at Llama-3.1-8B scale on synthetic
# shards (BENCHMARKS.md section 14, "Aggregation at census scale": 3 layers x 14,336 neurons x
# 107 prompts, 4.6 M rows and 244 M table rows): 394 s of CPU time against 400 s estimated,
# so the constants stay; the wall time on a shared 2-core machine was 1.3x the CPU time.
AGGREGATE_FIXED_S = 6.0
AGGREGATE_ROW_S = 22e-6
AGGREGATE_TABLE_ROW_S = 1.2e-6
# Bytes per parameter of a checkpoint by its config's torch_dtype (a prepared GGUF: float32).
STORAGE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family model that its FLOPs and bytes depend on."""

    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied: bool
    bytes_per_parameter: int = 4

    @property
    def weight_bytes(self) -> float:
        """The checkpoint's size: what a model job reads."""
        return float(self.n_parameters * self.bytes_per_parameter)

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a transformers config or its dict (``config.json``)."""
        get = (config.get if isinstance(config, Mapping)
               else lambda key, default=None: getattr(config, key, default))
        heads = int(get("num_attention_heads"))
        return cls(
            n_layers=int(get("num_hidden_layers")), hidden=int(get("hidden_size")),
            intermediate=int(get("intermediate_size")), vocab=int(get("vocab_size")),
            n_heads=heads, n_kv_heads=int(get("num_key_value_heads", None) or heads),
            head_dim=int(get("head_dim", None) or int(get("hidden_size")) // heads),
            tied=bool(get("tie_word_embeddings", False)),
            bytes_per_parameter=STORAGE_BYTES.get(str(
                get("torch_dtype", None) or get("dtype", None) or "float32").replace("torch.", ""),
                4))

    @property
    def n_parameters(self) -> int:
        """Embedding (+ untied unembedding), per layer the attention and MLP projections and two
        norms, and the final norm."""
        d = self.hidden
        attention = 2 * d * self.n_heads * self.head_dim + 2 * d * self.n_kv_heads * self.head_dim
        per_layer = attention + 3 * d * self.intermediate + 2 * d
        return self.vocab * d * (1 if self.tied else 2) + self.n_layers * per_layer + d

    def layer_flops(self, n_tokens: int) -> float:
        """One decoder layer for one query token attending to ``n_tokens`` positions: the q, k,
        v, o projections, the scores and the weighted values, and the gated MLP."""
        d = self.hidden
        projections = 2 * d * self.n_heads * self.head_dim + 2 * d * self.n_kv_heads * self.head_dim
        attention = 2 * self.n_heads * self.head_dim * n_tokens
        return 2.0 * (projections + 3 * d * self.intermediate + attention)

    def unembed_flops(self) -> float:
        return 2.0 * self.hidden * self.vocab

    def row_flops(self, start_layer: int, n_tokens: int, full_vocab: bool = True,
                  mediators: bool = True, positions: str = "last") -> float:
        """One treated row of a neuron in ``start_layer``: the replay of the later layers for the
        last token (every token with ``positions: all``) plus the total's unembedding, times
        :data:`MEDIATION_FACTOR` with the mediation split."""
        replayed = n_tokens if positions == "all" else 1
        replay = replayed * (self.n_layers - 1 - start_layer) * self.layer_flops(n_tokens)
        flops = replay + (self.unembed_flops() if full_vocab else 0.0)
        return flops * (MEDIATION_FACTOR if mediators else 1.0)

    def forward_flops(self, n_tokens: int) -> float:
        """A full forward of ``n_tokens`` tokens (causal attention: ``T/2`` positions on
        average) and the unembedding of the last position."""
        return n_tokens * self.n_layers * self.layer_flops(n_tokens // 2) + self.unembed_flops()



@dataclass(frozen=True)
class DeviceRates:
    """What a model job costs on a device, besides its FLOPs.

    ``flops_per_s``: the achieved float32 rate of the replay; ``float64_factor``: how much slower
    float64 runs (the validation's reference); ``startup_s``: process start, imports of torch and
    transformers, the workflow's parse in a cluster job, device initialisation;
    ``read_bytes_per_s``: loading the prepared weights (file system to device);
    ``unit_host_s`` and ``row_host_s``: the host work of one saved unit (three parquet files) and
    of each of its rows (the per-prompt, mediation and top-k tables)."""

    name: str
    flops_per_s: float
    float64_factor: float
    startup_s: float
    read_bytes_per_s: float
    unit_host_s: float
    row_host_s: float

    def fixed_s(self, weight_bytes: float) -> float:
        """The fixed cost of one model job: start-up plus loading ``weight_bytes``."""
        return self.startup_s + weight_bytes / self.read_bytes_per_s


# Documented defaults (rates in this model's FLOP count, mediation included). cpu: this
# project's 2-core machines: the fast path with every metric and the mediation split ran
# 2.70 ms per SmolLM2 row of ~187 MFLOP (~69 GFLOP/s) on a quiet machine, 60 with other load;
# start-up and loading of the prepared demo model, and float64 at a third of float32's rate, as
# measured in BENCHMARKS.md section 13.
# h200: 4,904 rows/s measured with the mediation split on (section 0: 38.5 TFLOP/s counted
# without it, x1.167); loading assumes 2 GB/s from a cluster file system (the bf16 checkpoint,
# upcast on the GPU); start-up: Python, torch and transformers, the job's parse of the workflow,
# CUDA initialisation. h100: the same FP32 peak (67 TFLOP/s); not measured, assumed 85 % of the
# H200's achieved rate (less memory for batches). The host work per unit and per row: measured
# on the CPU (BENCHMARKS.md section 13), the same on any device.
DEVICES: dict[str, DeviceRates] = {
    "cpu": DeviceRates("cpu", flops_per_s=60e9, float64_factor=3.0, startup_s=4.0,
                       read_bytes_per_s=1.0e9, unit_host_s=0.015, row_host_s=11e-6),
    "h200": DeviceRates("h200", flops_per_s=44.9e12, float64_factor=2.0, startup_s=12.0,
                        read_bytes_per_s=2.0e9, unit_host_s=0.015, row_host_s=11e-6),
    "h100": DeviceRates("h100", flops_per_s=38.2e12, float64_factor=2.0, startup_s=12.0,
                        read_bytes_per_s=2.0e9, unit_host_s=0.015, row_host_s=11e-6),
}


def mediation_table_rows(n_layers: int, layer: int, top_k: int) -> int:
    """Rows that one (prompt, neuron) of ``layer`` adds to the mediation tables: 2 per
    downstream layer + 1 in the split, and up to ``top_k`` neurons + ``top_k`` heads."""
    return 2 * (n_layers - 1 - layer) + 1 + 2 * top_k


def aggregation_seconds(rows: int, table_rows: int) -> float:
    """The aggregation's time on one CPU core for ``rows`` (prompt, neuron) rows and
    ``table_rows`` rows of the mediation tables."""
    return AGGREGATE_FIXED_S + rows * AGGREGATE_ROW_S + table_rows * AGGREGATE_TABLE_ROW_S


def device_rates(device: str, overrides: Mapping[str, float] | None = None) -> DeviceRates:
    """The rates of ``device`` (a key of :data:`DEVICES`), with ``overrides`` applied."""
    return replace(DEVICES[device], **dict(overrides or {}))


def planning_device(device: str, gpu: str) -> str:
    """The key of :data:`DEVICES` to plan for: ``cpu``, or the configured ``gpu`` model for
    ``cuda``; ``auto`` means ``gpu`` when this machine has an NVIDIA GPU, else ``cpu`` (a login
    node without GPUs that submits to GPU nodes should say ``device: cuda``)."""
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        return gpu
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpu if gpus.is_dir() and any(gpus.iterdir()) else "cpu"
