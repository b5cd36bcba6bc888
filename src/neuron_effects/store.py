"""Files: atomic writes, streamed parquet concatenation and the clean-run files' prompt records.

Every file is written to a temporary name in its destination folder and renamed into place
(``os.replace``), so a reader never sees a half-written file and a killed job leaves at most a
stray ``.tmp`` file. Results are cached by what they are in :mod:`neuron_effects.cache`.

No torch here: the workflow's parse imports this module (the clean runs' tensors are saved and
loaded by :mod:`neuron_effects.clean`).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import safe_open

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


def load_clean_records(path: str | Path) -> list[dict[str, Any]]:
    """Only the prompt records of a clean-run file (:func:`neuron_effects.clean.save_clean_runs`;
    its JSON metadata ``records``): no tensor is read, and torch is not needed."""
    with safe_open(str(path), framework="numpy") as handle:
        return json.loads(handle.metadata()["records"])
