"""The result cache: results stored by what they are, found again whatever the job layout.

A cached result is an *entry*: one or more files and a manifest ``<name>.json`` written last
(the entry exists once its manifest does), which records each file's size and SHA-256. Entries
are verified when they are looked up: a missing, truncated or altered file (a storage fault, a
kill between two writes) makes the entry *damaged*; it is logged by name, moved aside under
``<root>/damaged/`` and treated as absent, so that the job recomputes it.

Three caches use it, each keyed by :func:`key` of everything its numbers depend on:

* clean runs (``<root>/clean/<prompt key>``): one prompt's clean forward;
* attribution estimates (``<root>/attribution/<prompt key>``): one prompt's estimates of every
  neuron;
* effect rows (``<root>/effects/<prompt key>/``, :class:`RowCache`): per prompt, entries of
  rows of neurons computed together (a unit), named by their layer range and a digest of their
  rows (``L<first>-<last>_<digest>``), each row found by its neuron's :func:`row_key`. The per-prompt rows, mediation, top-k mediator and edge tables are stored
  with canonical neuron ids (``L<layer>/N<neuron>``) and without the prompt's own columns;
  :meth:`RowCache.read` relabels them for the job reading them.

The prompt key covers the model's weights digest (:func:`neuron_effects.prepare.model_digest`),
the prompt's token ids, target and distractor ids and format, the settings and
:data:`ENGINE_VERSION`; a row key adds the neuron and its listed edge targets. No entry of
other settings is ever served: a different key is a different folder or name.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd

from .inputs import digest
from .prepare import file_sha256
from .store import atomic_path, write_json

log = logging.getLogger("neuron_effects")

# Bump whenever a change alters the numbers a cached entry holds (the engine, the clean run,
# the estimates or the tables' columns): every entry of an older version is then recomputed.
ENGINE_VERSION = 1
# The effect tables of a unit; ``per_prompt`` is written last.
EFFECT_TABLES = ("mediation", "mediators", "edges", "per_prompt")
MANIFEST = ".json"


def key(kind: str, *parts: Any) -> str:
    """The key of a cached result of ``kind`` (clean, attribution, effects): a digest of
    :data:`ENGINE_VERSION` and every part (JSON-able)."""
    return digest([ENGINE_VERSION, kind, *parts])


def canonical_id(layer: int, neuron: int) -> str:
    """The neuron id the cached tables hold (the job's own ids replace it when read)."""
    return f"L{layer}/N{neuron}"


def row_key(layer: int, neuron: int, edge_targets: Iterable[Sequence[int]] = ()) -> str:
    """A row's key within its prompt's entries: the neuron and its listed edge targets."""
    targets = sorted({(int(t[0]), int(t[1])) for t in edge_targets})
    return f"{layer}:{neuron}:{digest(targets) if targets else '-'}"


def write_entry(folder: str | Path, name: str, writers: Mapping[str, Callable[[Path], None]],
                meta: Mapping[str, Any]) -> None:
    """Write an entry: each file ``<name>.<suffix>`` by its writer (given a temporary path,
    renamed into place), then the manifest with the files' sizes and SHA-256 and ``meta``."""
    folder = Path(folder)
    files = {}
    for suffix, write in writers.items():
        path = folder / f"{name}.{suffix}"
        with atomic_path(path) as temporary:
            write(temporary)
        files[suffix] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    write_json(folder / f"{name}{MANIFEST}", {**meta, "files": files})


def _damage(folder: Path, name: str) -> str | None:
    """Why the entry ``name`` of ``folder`` is damaged, or None when every file verifies."""
    try:
        manifest = json.loads((folder / f"{name}{MANIFEST}").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest ({error})"
    for suffix, expected in files.items():
        path = folder / f"{name}.{suffix}"
        if not path.exists():
            return f"{path.name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path.name} has {path.stat().st_size} bytes, {expected['bytes']} recorded"
        if file_sha256(path) != expected["sha256"]:
            return f"{path.name} does not match its recorded SHA-256"
    return None


def _move_aside(folder: Path, name: str, root: Path, reason: str) -> None:
    aside = root / "damaged" / folder.relative_to(root)
    aside.mkdir(parents=True, exist_ok=True)
    for path in folder.glob(f"{name}.*"):
        os.replace(path, aside / path.name)
    log.warning("cache entry %s is damaged (%s): moved to %s; its results are recomputed",
                folder / name, reason, aside)


def verified_manifest(root: str | Path, folder: str | Path, name: str) -> dict[str, Any] | None:
    """The manifest of entry ``name`` in ``folder`` (under the cache ``root``) if it exists and
    verifies; None if absent; a damaged entry is moved aside (logged) and None returned."""
    root, folder = Path(root), Path(folder)
    if not (folder / f"{name}{MANIFEST}").exists():
        leftovers = list(folder.glob(f"{name}.*")) if folder.exists() else []
        if leftovers:  # files of an entry killed before its manifest: never served
            _move_aside(folder, name, root, "no manifest: its writer stopped")
        return None
    reason = _damage(folder, name)
    if reason is not None:
        _move_aside(folder, name, root, reason)
        return None
    return json.loads((folder / f"{name}{MANIFEST}").read_text())


class RowCache:
    """The effect rows of one prompt key: ``<root>/effects/<prompt key>/<entry>.*``, each entry
    the tables of :data:`EFFECT_TABLES` for the rows its manifest lists (``rows``: row keys, in
    the tables' order of neurons)."""

    def __init__(self, root: str | Path, prompt_key: str):
        self.root = Path(root)
        self.folder = self.root / "effects" / prompt_key

    def find(self, wanted: set[str]) -> dict[str, str]:
        """Row key -> entry name for the ``wanted`` rows held by verified entries (the first
        entry that holds a row wins). Only the entries whose layer range (in their names) meets
        a wanted row's layer are opened and verified; damaged ones are moved aside."""
        found: dict[str, str] = {}
        layers = {int(row.split(":", 1)[0]) for row in wanted}
        if not self.folder.exists() or not layers:
            return found
        names = sorted({path.name.split(".", 1)[0] for path in self.folder.iterdir()
                        if not path.name.startswith(".")})
        for name in names:
            first, last = (int(value) for value in name[1:].split("_", 1)[0].split("-"))
            if not any(first <= layer <= last for layer in layers):
                continue
            manifest = verified_manifest(self.root, self.folder, name)
            for row in (manifest or {}).get("rows", []):
                if row in wanted:
                    found.setdefault(row, name)
        return found

    def save(self, rows: Sequence[str], tables: Mapping[str, pd.DataFrame],
             made_by: str = "") -> str:
        """Save one unit's tables (:data:`EFFECT_TABLES`, canonical neuron ids, no prompt
        columns) for the row keys ``rows``; returns the entry's name. ``made_by``: the job and
        unit, for the reader of the manifest only (not part of any key)."""
        layers = [int(row.split(":", 1)[0]) for row in rows]
        name = f"L{min(layers)}-{max(layers)}_{digest(list(rows))}"
        write_entry(self.folder, name, {
            f"{table}.parquet": (lambda path, frame=tables[table]: frame.to_parquet(
                path, index=False)) for table in EFFECT_TABLES}, {"rows": list(rows),
                                                                   "made_by": made_by})
        return name

    def read(self, name: str, table: str, ids: Mapping[str, str]) -> pd.DataFrame:
        """Table ``table`` of entry ``name``, only the rows of the neurons in ``ids``
        (canonical id -> the job's neuron id), relabelled with the job's ids."""
        frame = pd.read_parquet(self.folder / f"{name}.{table}.parquet")
        canonical = frame["neuron_id"].astype(str)
        frame = frame[canonical.isin(ids).to_numpy()].reset_index(drop=True)
        if isinstance(frame["neuron_id"].dtype, pd.CategoricalDtype):
            column = frame["neuron_id"].cat.remove_unused_categories()
            frame["neuron_id"] = column.cat.rename_categories(
                [ids[name] for name in column.cat.categories])
        else:
            frame["neuron_id"] = frame["neuron_id"].map(ids)
        return frame
