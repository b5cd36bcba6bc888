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
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
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
    try:
        yield Path(temporary)
        # mkstemp makes 0600, and writers that recreate the file (safetensors) keep that: give
        # the usual permissions to what is renamed into place
        os.chmod(temporary, 0o666 & ~_UMASK)
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


def concat_parquet(paths: Sequence[str | Path], output: str | Path) -> int:
    """Stream parquet files with the same columns into one (zstd; parquet's dictionary encoding
    of repeated ids), one row group at a time, atomically: the output keeps the inputs' row
    groups. The schemas are unified first (a column that is all null in one file takes the type
    it has in the others). Empty files only give the schema when every file is empty. Returns
    the number of rows written."""
    filled = [path for path in paths if pq.ParquetFile(path).metadata.num_rows]
    if filled:
        schema = pa.unify_schemas([_wide_dictionaries(pq.read_schema(path)) for path in filled],
                                  promote_options="permissive")
    else:
        schema = pq.read_schema(paths[0]) if paths else pa.schema([])
    rows = 0
    with atomic_path(output) as temporary:
        with pq.ParquetWriter(temporary, schema, compression="zstd") as writer:
            for path in filled:
                source = pq.ParquetFile(path)
                for group in range(source.num_row_groups):
                    table = source.read_row_group(group)
                    if table.num_rows:
                        writer.write_table(table.select(schema.names).cast(schema))
                        rows += table.num_rows
    return rows


def read_rows(path: str | Path, rows: Sequence[int]) -> pd.DataFrame:
    """Rows ``rows`` (0-based positions in the file, in this order, indexed by them) of a
    parquet file, reading only the row groups that hold them."""
    source = pq.ParquetFile(path)
    wanted = pd.Series(np.asarray(rows, dtype=np.int64))
    starts = np.cumsum([0] + [source.metadata.row_group(g).num_rows
                              for g in range(source.num_row_groups)])
    groups = np.searchsorted(starts, wanted.to_numpy(), side="right") - 1
    parts = [source.read_row_group(int(group)).to_pandas().iloc[
        wanted[groups == group].to_numpy() - starts[group]].set_axis(
            wanted[groups == group].to_numpy()) for group in np.unique(groups)]
    if not parts:
        return source.schema_arrow.empty_table().to_pandas()
    return pd.concat(parts).loc[wanted.to_numpy()]


def _wide_dictionaries(schema: pa.Schema) -> pa.Schema:
    """``schema`` with every dictionary column's indices int32: pandas writes a categorical's
    codes as int8 below 128 categories and int16 above, so the files of one table differ."""
    return pa.schema([field.with_type(pa.dictionary(pa.int32(), field.type.value_type))
                      if pa.types.is_dictionary(field.type) else field for field in schema],
                     metadata=schema.metadata)


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
    """Completed units of one shard in ``<partial_root>/<fingerprint>/``: per unit a main table
    ``<unit>.parquet`` and optional named tables ``<unit>.<name>.parquet``, the main one written
    last (a unit is done when its main table exists); other fingerprints' folders are stale and
    removed."""

    def __init__(self, partial_root: str | Path, fingerprint: str):
        self.root = Path(partial_root)
        self.folder = self.root / fingerprint
        if self.root.exists():
            for stale in self.root.iterdir():
                if stale.name != fingerprint:
                    shutil.rmtree(stale, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, unit: str, table: str | None = None) -> Path:
        return self.folder / (f"{unit}.parquet" if table is None else f"{unit}.{table}.parquet")

    def is_done(self, unit: str) -> bool:
        return self.path(unit).exists()

    def done_units(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.parquet") if "." not in p.stem)

    def save(self, unit: str, frame: pd.DataFrame,
             tables: Mapping[str, pd.DataFrame] | None = None) -> None:
        """Save a unit's named ``tables``, then its main ``frame`` (each atomically)."""
        for name, table in (tables or {}).items():
            write_parquet(self.path(unit, name), table)
        write_parquet(self.path(unit), frame)

    def assemble(self, units: list[str], output: str | Path,
                 table_outputs: Mapping[str, str | Path] | None = None) -> int:
        """Concatenate the units in the given order into ``output`` and each named table into
        its ``table_outputs`` file (streamed, a row group per unit: :func:`concat_parquet`; all
        atomically), then remove the partial folder. Returns the main table's number of rows."""
        missing = [unit for unit in units if not self.is_done(unit)]
        if missing:
            raise RuntimeError(f"cannot assemble {output}: units not done: {missing}")
        for name, path in (table_outputs or {}).items():
            concat_parquet([self.path(unit, name) for unit in units], path)
        rows = concat_parquet([self.path(unit) for unit in units], output)
        shutil.rmtree(self.root, ignore_errors=True)
        return rows
