"""Rule render_report: the run's tables read and the HTML report written, with the time each rule
took (from the jobs' benchmark files and logs) beside the plan's estimate.

Reads: ``results/effects/per_prompt.parquet``, ``results/summary/``, ``results/validation/``,
``results/activations/neuron_stats.parquet``, ``results/atp/candidates.parquet``,
``benchmarks/<rule>/`` and ``logs/``. Writes: ``results/report/report.html`` and its figures
(``results/report/figures/<name>.png``).
"""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import transformers

from .. import __version__, store
from ..report import render_report as render
from ..report import report_figures
from ..report_html import png_bytes
from .setup import FIXED_COST

# The long table's columns that the report reads (with every estimate's total_<method>).
REPORT_COLUMNS = ("prompt_id", "neuron_id", "layer", "direct", "indirect", "total",
                  "direct_ratio", "ratio_defined")


# The line each model job logs once it knows what the cache holds (rows or prompts).
COMPUTED = re.compile(r"(?:rows|prompts) computed: (\d+), reused: (\d+)")


def _logged(log_path: str | Path) -> tuple[float, float, float]:
    """The last fixed cost a job logged (:func:`.setup.log_fixed_cost`) and the last counts of
    what it computed and reused (rows or prompts); NaN for what it did not log."""
    path = Path(log_path)
    text = path.read_text(errors="replace") if path.exists() else ""
    fixed, counts = FIXED_COST.findall(text), COMPUTED.findall(text)
    computed, reused = (float(value) for value in counts[-1]) if counts else (np.nan, np.nan)
    return float(fixed[-1]) if fixed else float("nan"), computed, reused


def job_timings(jobs: Sequence[tuple[str, str]],
                estimate: Mapping[str, Any] | None = None) -> tuple[pd.DataFrame, float]:
    """Per rule, from each job's benchmark file and log (``jobs``: ``(benchmark, log)`` paths,
    benchmarks under ``benchmarks/<rule>/``): jobs, seconds in all, the fixed part (start-up and
    loading, as logged) and the rest (the job's own work), the median seconds a job spent outside
    its work, the longest job, the peak memory, and what the model jobs computed and reused from the
    cache (rows of effects, or prompts: their logged counts); with the plan's ``estimate``
    (:meth:`neuron_effects.plan_cost.PlanEstimate.as_dict`), its compute and fixed seconds beside them.
    Also the seconds from the first benchmarked job's start until now."""
    rows, first_start = [], time.time()
    for benchmark, log_path in jobs:
        if not Path(benchmark).exists():
            continue
        values = pd.read_csv(benchmark, sep="\t").iloc[0]
        rule = Path(benchmark).relative_to("benchmarks").parts[0]
        fixed, computed, reused = _logged(log_path)
        rows.append({"rule": rule, "s": float(values["s"]), "fixed": fixed,
                     "computed": computed, "reused": reused, "max_rss_mb": values["max_rss"]})
        first_start = min(first_start, Path(benchmark).stat().st_mtime - float(values["s"]))
    if not rows:
        return pd.DataFrame(), 0.0
    frame = pd.DataFrame(rows).replace("-", np.nan)
    frame["max_rss_mb"] = pd.to_numeric(frame["max_rss_mb"])
    frame["fixed"] = frame["fixed"].clip(upper=frame["s"])  # NaN: the job logged none
    table = frame.groupby("rule", sort=False).agg(
        jobs=("s", "size"), total_s=("s", "sum"),
        fixed_s=("fixed", lambda values: values.sum(min_count=1)),
        median_fixed_s=("fixed", "median"), max_job_s=("s", "max"),
        peak_rss_mb=("max_rss_mb", "max"),
        computed=("computed", lambda values: values.sum(min_count=1)),
        reused=("reused", lambda values: values.sum(min_count=1))).reset_index()
    table.insert(4, "work_s", table["total_s"] - table["fixed_s"])
    if estimate is not None:
        aggregation = {"rule": "aggregate_block", "jobs": estimate["aggregate_jobs"],
                       "compute_s": estimate["aggregate_s"], "fixed_s": None}
        planned = pd.DataFrame([*estimate["rules"], aggregation]).rename(columns={
            "jobs": "planned_jobs", "compute_s": "estimated_compute_s",
            "fixed_s": "estimated_fixed_s"})
        table = table.merge(planned, on="rule", how="left")
    return table, time.time() - first_start


def render_report(
    settings: dict[str, Any], per_prompt_path: str, neurons_path: str, layers_path: str,
    prompts_path: str, activation_stats_path: str, validation_table: str,
    validation_summary: str, jobs: Sequence[tuple[str, str]], top_n: int, output: str,
    figures_dir: str | None = None,
    mediation_layers_path: str | None = None,
    atp_candidates: str | None = None, edges_path: str | None = None,
    plan_estimate: Mapping[str, Any] | None = None, census_table_top: int = 200,
    profile_scores: str | None = None, census: bool = False,
) -> None:
    """Write the self-contained HTML report (with the attribution-patching section when
    ``atp_candidates`` is given, the profile scores' table when ``profile_scores`` is) and, into
    ``figures_dir``, its figures as ``<name>.png`` (for Snakemake's report). Outside a
    ``census``, the neurons outside the profile are the verified candidates: the report's
    analysis is the profile's, and they have a section of their own."""
    validation = json.loads(Path(validation_summary).read_text())
    timings, wall = job_timings(jobs, plan_estimate)
    metadata = {
        **settings, "dtype": validation["dtype"], "device": validation["device"],
        "wall time (first heavy job to report)": f"{wall:.0f} s",
        "versions": f"neuron_effects {__version__}, torch {torch.__version__}, transformers "
                    f"{transformers.__version__}, Python {platform.python_version()}",
    }
    stats = pd.read_parquet(activation_stats_path, columns=["layer", "neuron", "frac_active"])
    neurons = pd.read_parquet(neurons_path).merge(stats, on=["layer", "neuron"], how="left")
    names = pq.read_schema(per_prompt_path).names
    per_prompt = pd.read_parquet(per_prompt_path, columns=[  # what the report shows, no more
        name for name in names if name in REPORT_COLUMNS or name.startswith("total_")
        or name == "in_profile"])
    outside = None
    if not census:
        outside = neurons[~neurons["in_profile"]]
        neurons = neurons[neurons["in_profile"]].drop(columns="in_profile")
        per_prompt = per_prompt[per_prompt["in_profile"].to_numpy()].reset_index(drop=True)
    per_prompt = per_prompt.drop(columns="in_profile")
    layers = pd.read_parquet(layers_path)
    figures = report_figures(per_prompt, layers)
    page = render(
        metadata, per_prompt, neurons, layers, pd.read_parquet(prompts_path), validation,
        pd.read_parquet(validation_table), timings, top_n, figures=figures,
        mediation_layers=(pd.read_parquet(mediation_layers_path) if mediation_layers_path
                          else None),
        atp_candidates=None if atp_candidates is None else pd.read_parquet(atp_candidates),
        edges=None if edges_path is None else pd.read_parquet(edges_path),
        edge_min_relative_delta=settings.get("edge_min_relative_delta", 0.01),
        census_table_top=census_table_top, verified=outside,
        profile_scores=None if profile_scores is None else pd.read_parquet(profile_scores))
    if figures_dir is not None:
        for name, uri in figures.items():
            with store.atomic_path(Path(figures_dir) / f"{name}.png") as temporary:
                temporary.write_bytes(png_bytes(uri))
    store.write_text(output, page)
