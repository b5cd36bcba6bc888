"""Files: atomic writes, the clean-run cache format, and resumable shard progress.

Every file is written to a temporary name in its destination folder and renamed into place
(``os.replace``), so a reader never sees a half-written file and a killed job leaves at most a
stray ``.tmp`` file. A shard saves its progress one unit at a time in a partial folder OUTSIDE its
declared output (Snakemake deletes the declared outputs of a failed job); the folder's name holds
a fingerprint of everything the shard's results depend on, so stale progress is never reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .clean import CleanRun


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | Path, value: Any) -> None:
    """Write JSON (indented, UTF-8) atomically."""
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_parquet(path: str | Path, frame: pd.DataFrame) -> None:
    """Write a parquet file atomically."""
    with atomic_path(path) as temporary:
        frame.to_parquet(temporary, index=False)


_RUN_TENSORS = [f.name for f in fields(CleanRun) if f.name not in
                ("prompt_id", "full_layer_outputs", "full_activations")]


def save_clean_runs(path: str | Path, runs: list[CleanRun], records: list[dict[str, Any]]) -> None:
    """One safetensors file for a chunk of prompts: each run's tensors under ``<i>.<name>`` and
    the prepared prompt records (ids, targets, clean prediction) as JSON metadata."""
    tensors = {f"{index}.{name}": getattr(run, name).contiguous().cpu()
               for index, run in enumerate(runs) for name in _RUN_TENSORS}
    metadata = {"records": json.dumps(records, ensure_ascii=False)}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def load_clean_records(path: str | Path) -> list[dict[str, Any]]:
    """Only the prompt records of a clean-run file (no tensors are read)."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["records"])


def load_clean_runs(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[list[CleanRun], list[dict[str, Any]]]:
    """The runs and prompt records saved by :func:`save_clean_runs`."""
    records = load_clean_records(path)
    tensors = load_file(str(path), device=str(device))
    runs = [CleanRun(prompt_id=record["prompt_id"],
                     **{name: tensors[f"{index}.{name}"] for name in _RUN_TENSORS})
            for index, record in enumerate(records)]
    return runs, records


class ShardProgress:
    """Completed units of one shard, each a parquet file ``<unit>.parquet`` in
    ``<partial_root>/<fingerprint>/``; other fingerprints' folders are stale and removed."""

    def __init__(self, partial_root: str | Path, fingerprint: str):
        self.root = Path(partial_root)
        self.folder = self.root / fingerprint
        if self.root.exists():
            for stale in self.root.iterdir():
                if stale.name != fingerprint:
                    shutil.rmtree(stale, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, unit: str) -> Path:
        return self.folder / f"{unit}.parquet"

    def is_done(self, unit: str) -> bool:
        return self.path(unit).exists()

    def done_units(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.parquet"))

    def save(self, unit: str, frame: pd.DataFrame) -> None:
        write_parquet(self.path(unit), frame)

    def assemble(self, units: list[str], output: str | Path) -> pd.DataFrame:
        """Concatenate the units in the given order into ``output`` (atomically), then remove the
        partial folder."""
        missing = [unit for unit in units if not self.is_done(unit)]
        if missing:
            raise RuntimeError(f"cannot assemble {output}: units not done: {missing}")
        frame = pd.concat([pd.read_parquet(self.path(unit)) for unit in units],
                          ignore_index=True)
        write_parquet(output, frame)
        shutil.rmtree(self.root, ignore_errors=True)
        return frame
