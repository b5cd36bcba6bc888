"""What every job shares: its logging and threads, the fixed-cost line in its log, the peak GPU
memory when it ends, an unusable CUDA recorded
(:data:`neuron_effects.torch_builds.CUDA_UNUSABLE`), the model loaded with the fixed cost logged,
the model part of the cache keys, and ``mean_ablate``'s means.

Reads: the model's files (:func:`load_model_logged`), the activation statistics
(``results/activations/neuron_stats.parquet``, :func:`treatment_means`). Writes: the job's log
(stderr) and, when CUDA is unusable, ``CUDA_UNUSABLE``.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch

from ..inputs import InputError
from ..model import ModelSpec, load_model, resolve_dtype
from ..prepare import model_digest
from ..torch_builds import CUDA_UNUSABLE, CudaUnusableError

log = logging.getLogger("neuron_effects")

# Progress bars go to the job's log (stderr); update them at most every few seconds there.
PROGRESS = {"mininterval": 5.0, "dynamic_ncols": False, "ncols": 100}


def _log_peak_gpu_memory() -> None:
    if torch.cuda.is_initialized():
        log.info("peak GPU memory %.3f GiB allocated, %.3f GiB reserved",
                 torch.cuda.max_memory_allocated() / 2**30,
                 torch.cuda.max_memory_reserved() / 2**30)


def _record_cuda_unusable(kind: type, error: BaseException, trace: Any) -> None:
    """The job's excepthook: a :class:`CudaUnusableError` is written to :data:`CUDA_UNUSABLE`
    before the usual traceback."""
    if isinstance(error, CudaUnusableError):
        CUDA_UNUSABLE.parent.mkdir(parents=True, exist_ok=True)
        staging = CUDA_UNUSABLE.with_suffix(".tmp")
        staging.write_text(f"{error}\n")
        staging.replace(CUDA_UNUSABLE)
    sys.__excepthook__(kind, error, trace)


def configure_job(threads: int) -> None:
    """Log INFO and warnings to stderr (the job's log), use ``threads`` CPU threads, log the
    job's fixed cost so far (its start-up: Python and the imports), and log the peak GPU memory
    allocated and reserved when the job ends (if it used CUDA); an unusable CUDA is recorded
    in :data:`CUDA_UNUSABLE`, so that the job is not retried."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.captureWarnings(True)
    torch.set_num_threads(max(1, threads))
    atexit.register(_log_peak_gpu_memory)
    sys.excepthook = _record_cuda_unusable
    log_fixed_cost()


# The line each job logs when its own work starts (the report reads the last one of each log).
FIXED_COST = re.compile(r"fixed cost: ([0-9.]+) s since the job's process started")


def log_fixed_cost() -> None:
    """Log the seconds since this process started: what the job spent before its own work
    (start-up; in a model job, also loading the model, logged again after the load)."""
    started = psutil.Process().create_time()
    log.info("fixed cost: %.2f s since the job's process started", time.time() - started)


def load_model_logged(spec: ModelSpec, compute_dtype: torch.dtype | None = None) -> Any:
    """:func:`~neuron_effects.model.load_model`, then the job's fixed cost logged."""
    model = load_model(spec, compute_dtype=compute_dtype)
    log_fixed_cost()
    return model


def model_cache_key(spec: ModelSpec, cache_root: str | None) -> list[str]:
    """The model part of every cache key: its weights digest (recorded when it was prepared;
    a local folder's files hashed once, the digests kept in ``<cache_root>/model-digests``) and
    the dtype it runs in."""
    cache_dir = None if cache_root is None else Path(cache_root) / "model-digests"
    return [model_digest(spec.model, cache_dir), str(resolve_dtype(spec.dtype))]


def treatment_means(stats_path: str | None, treatment: str, positions: str
                      ) -> tuple[torch.Tensor | None, str | None]:
    """``mean_ablate``'s prompt-set means [n_layers, intermediate] (over the last positions, or
    all positions with ``positions: all``) and their digest (a part of the cache keys); None
    and None for the other treatments."""
    if treatment != "mean_ablate":
        return None, None
    if stats_path is None:
        raise InputError("treatment mean_ablate needs the activation statistics")
    stats = pd.read_parquet(stats_path).sort_values(["layer", "neuron"])
    column = "mean" if positions == "last" else "mean_all_positions"
    values = stats[column].to_numpy(np.float32)
    means = torch.from_numpy(values.copy()).reshape(int(stats["layer"].max()) + 1, -1)
    return means, hashlib.sha256(values.tobytes()).hexdigest()
