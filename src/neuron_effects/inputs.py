"""Reading and validating the user's inputs: the neuron profile file and the prompt file.

Nothing here imports torch: the workflow calls these functions while it parses the Snakefile,
so that a malformed file stops the run before any job is submitted. Checks that need the model
(layer range, intermediate size, tokenization) live in :mod:`neuron_effects.prompts` and
:mod:`neuron_effects.model`.

Every error is an :class:`InputError` whose message names the file, the line or record, and the
offending neuron id or prompt id.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

NEURON_ID_PATTERN = re.compile(r"^L(\d+)/N(\d+)$")
# The fields of a prompt record the workflow reads; any other field is the user's own, carried
# through into results/summary/prompts.parquet and the report.
PROMPT_FIELDS = ("prompt_id", "prompt", "target", "distractor")
# Columns the workflow writes into the prompt tables; a user field may not take one of these names.
PROMPT_TABLE_COLUMNS = ("text", "n_tokens", "input_ids", "target_id", "distractor_id", "warnings",
                        "target_token", "target_source", "distractor_token", "clean_top_token",
                        "clean_top_prob", "clean_target_prob", "clean_target_rank",
                        "target_low_rank")


class InputError(ValueError):
    """A problem with the user's input files or settings; the message says where and what."""


@dataclass(frozen=True)
class Neuron:
    """One MLP neuron: entry ``neuron`` of the input of ``model.layers[layer].mlp.down_proj``."""

    neuron_id: str
    layer: int
    neuron: int


@dataclass(frozen=True)
class PromptRecord:
    """One prompt as the user wrote it; ``line`` is its 1-based line in the source file."""

    prompt_id: str
    prompt: str
    target: str | None
    distractor: str | None
    line: int
    extra: dict[str, Any] = dataclass_field(default_factory=dict)  # the user's own fields, in file order


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} path is not a file: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark is dropped
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{what} file {path} cannot be read: {error}") from error


def _as_int(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise InputError(f"{where}: field '{field}' must be an integer, got {value!r}")
    return value


def load_profile_document(path: str | Path) -> Any:
    """The parsed JSON of a neuron profile file (an object with ``profiles`` or a bare list)."""
    path = Path(path)
    text = _read_text(path, "neuron profile")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{path}: line {error.lineno}, column {error.colno}: invalid JSON ({error.msg})"
        ) from error


def profile_list(document: Any, path: str | Path) -> list[Any]:
    """The list of profile records inside a profile document."""
    if isinstance(document, dict):
        if "profiles" not in document:
            raise InputError(f"{path}: a JSON object needs a 'profiles' list")
        records = document["profiles"]
    else:
        records = document
    if not isinstance(records, list):
        raise InputError(f"{path}: 'profiles' must be a list of neuron records")
    return records


def read_neurons(path: str | Path) -> list[Neuron]:
    """The neurons of a profile file, in file order, validated without the model.

    Checks: JSON syntax (with line), ``layer``/``neuron`` present and non-negative integers,
    ``neuron_id`` (default ``L{layer}/N{neuron}``) agreeing with them when it has the ``L../N..``
    form, no duplicate ids and no neuron listed twice.
    """
    document = load_profile_document(path)
    records = profile_list(document, path)
    if not records:
        raise InputError(f"{path}: the profile file lists no neurons")
    neurons: list[Neuron] = []
    seen_ids: dict[str, int] = {}
    seen_units: dict[tuple[int, int], int] = {}
    for index, record in enumerate(records):
        where = f"{path}: profile #{index}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: must be a JSON object, got {type(record).__name__}")
        if "neuron_id" in record:
            where = f"{where} (neuron_id {record['neuron_id']!r})"
        for field in ("layer", "neuron"):
            if field not in record:
                raise InputError(f"{where}: missing required field '{field}'")
        layer = _as_int(record["layer"], "layer", where)
        unit = _as_int(record["neuron"], "neuron", where)
        if layer < 0 or unit < 0:
            raise InputError(f"{where}: layer and neuron must be >= 0, got {layer}, {unit}")
        neuron_id = record.get("neuron_id", f"L{layer}/N{unit}")
        if not isinstance(neuron_id, str) or not neuron_id:
            raise InputError(f"{where}: neuron_id must be a non-empty string")
        match = NEURON_ID_PATTERN.match(neuron_id)
        if match and (int(match.group(1)), int(match.group(2))) != (layer, unit):
            raise InputError(
                f"{where}: neuron_id {neuron_id!r} disagrees with layer={layer}, neuron={unit}"
            )
        if neuron_id in seen_ids:
            raise InputError(
                f"{where}: duplicate neuron_id {neuron_id!r} (first at profile #{seen_ids[neuron_id]})"
            )
        if (layer, unit) in seen_units:
            raise InputError(
                f"{where}: layer {layer} neuron {unit} is listed twice "
                f"(first at profile #{seen_units[(layer, unit)]})"
            )
        seen_ids[neuron_id] = index
        seen_units[(layer, unit)] = index
        neurons.append(Neuron(neuron_id=neuron_id, layer=layer, neuron=unit))
    return neurons


def _score_value(record: dict[str, Any], field: str) -> Any:
    """The value of ``field`` in a profile record: a top-level key, else a dotted path into
    nested objects (``stats.attribution``); ``None`` when absent."""
    if field in record:
        return record[field]
    value: Any = record
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def profile_neuron_id(record: Mapping[str, Any]) -> Any:
    """A raw profile record's ``neuron_id``: its own, else ``L{layer}/N{neuron}``."""
    return record.get("neuron_id", f"L{record.get('layer')}/N{record.get('neuron')}")


def read_profile_scores(path: str | Path, fields: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per field of ``fields``: ``{neuron_id: value}`` of the profiles that give it (a key of the
    record or a dotted path; absent or null: the neuron is left out). Any other value than a
    finite number (a string, a boolean, a list, NaN, infinity) raises :class:`InputError` naming
    the file, the profile and the field. Assumes :func:`read_neurons` accepted the file."""
    path = Path(path)
    scores: dict[str, dict[str, float]] = {field: {} for field in fields}
    if not fields:
        return scores
    for index, record in enumerate(profile_list(load_profile_document(path), path)):
        neuron_id = profile_neuron_id(record)
        for field in fields:
            value = _score_value(record, field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise InputError(f"{path}: profile #{index} (neuron_id {neuron_id!r}): "
                                 f"profile score {field!r} must be a finite number, got "
                                 f"{value!r}")
            scores[field][str(neuron_id)] = float(value)
    return scores


def _optional_text(value: Any, field: str, where: str, empty_is_missing: bool) -> str | None:
    if value is None or (value == "" and empty_is_missing):  # an empty CSV cell: not given
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{field}' must be a string, got {value!r}")
    return value


def _prompt_from_fields(
    fields: dict[str, Any], index: int, line: int, where: str, empty_is_missing: bool
) -> PromptRecord:
    extra = {name: None if value == "" and empty_is_missing else value
             for name, value in fields.items() if name not in PROMPT_FIELDS}
    for name in extra:
        if name in PROMPT_TABLE_COLUMNS:
            raise InputError(f"{where}: field {name!r} is a column the workflow writes; "
                             "rename it")
        near = difflib.get_close_matches(name.lower(), PROMPT_FIELDS, n=1, cutoff=0.8)
        if near:
            raise InputError(f"{where}: unknown field {name!r}: did you mean {near[0]!r}?")
    prompt_id = fields.get("prompt_id")
    if prompt_id is None or prompt_id == "":
        prompt_id = str(index)
    elif isinstance(prompt_id, (int, str)) and not isinstance(prompt_id, bool):
        prompt_id = str(prompt_id)
    else:
        raise InputError(f"{where}: prompt_id must be a string, got {prompt_id!r}")
    where = f"{where} (prompt_id {prompt_id!r})"
    prompt = fields.get("prompt")
    if not isinstance(prompt, str):
        raise InputError(f"{where}: missing or non-string field 'prompt'")
    if not prompt.strip():
        raise InputError(f"{where}: empty prompt")
    target = _optional_text(fields.get("target"), "target", where, empty_is_missing)
    distractor = _optional_text(fields.get("distractor"), "distractor", where, empty_is_missing)
    if distractor is not None and target is None:
        raise InputError(f"{where}: a distractor needs a target")
    if distractor is not None and distractor == target:
        raise InputError(f"{where}: distractor equals target ({target!r})")
    return PromptRecord(prompt_id, prompt, target, distractor, line, extra)


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """The prompts of a JSONL, CSV or TSV file, validated without the tokenizer.

    Each record has ``prompt`` and optionally ``prompt_id`` (default: its 0-based index as a
    string), ``target`` and ``distractor``; any other field is kept in ``extra``. Checks: syntax
    (with line), non-empty prompt, near-misses of the known field names ("targt"), user fields
    named like a column the workflow writes, unique prompt ids, distractor different from target.
    A UTF-8 byte-order mark at the start of the file is accepted.
    """
    path = Path(path)
    text = _read_text(path, "prompt")
    suffix = path.suffix.lower()
    records: list[PromptRecord] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        index = 0
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{where}, column {error.colno}: invalid JSON ({error.msg})"
                ) from error
            if not isinstance(fields, dict):
                raise InputError(f"{where}: each line must be a JSON object")
            records.append(_prompt_from_fields(fields, index, line_number, where, False))
            index += 1
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            raise InputError(f"{path}: line 1: the header needs a 'prompt' column")
        for index, row in enumerate(reader):
            line_number = reader.line_num
            where = f"{path}: line {line_number}"
            if None in row:
                raise InputError(f"{where}: more cells than header columns")
            records.append(_prompt_from_fields(dict(row), index, line_number, where, True))
    else:
        raise InputError(f"{path}: unknown prompt file type {suffix!r} (use .jsonl, .csv or .tsv)")
    if not records:
        raise InputError(f"{path}: no prompts")
    seen: dict[str, int] = {}
    for record in records:
        if record.prompt_id in seen:
            raise InputError(
                f"{path}: line {record.line}: duplicate prompt_id {record.prompt_id!r} "
                f"(first on line {seen[record.prompt_id]})"
            )
        seen[record.prompt_id] = record.line
    return records


def model_location(location: str) -> tuple[str, dict[str, str]]:
    """``(from_pretrained location, extra kwargs)`` for a ``.gguf`` file (its folder and
    ``gguf_file``), a local folder, or a Hugging Face hub id (``org/name``). A path that does
    not exist is an error."""
    path = Path(location).expanduser()
    if location.lower().endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"model file not found: {location}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not path.is_dir():
            raise InputError(f"model path {location} is neither a folder nor a .gguf file")
        return str(path), {}
    if location.startswith((".", "/", "~")) or location.count("/") != 1:
        raise InputError(f"model path not found: {location}")
    return location, {}


def chunk(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Consecutive slices of ``size`` items; appending items only touches the last slice."""
    if size < 1:
        raise InputError(f"chunk size must be >= 1, got {size}")
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def digest(value: Any) -> str:
    """A short stable hash of JSON-able data (sorted keys), for rerun detection."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """A dataclass as the dict of its fields, one level (json encodes what they hold, nested
    dataclasses through this again): the JSON of ``asdict`` without its deep copies, which cost
    seconds at parse time for a profile's ~50,000 edges."""
    if hasattr(value, "__dataclass_fields__"):
        return {field.name: getattr(value, field.name) for field in fields(value)}
    raise TypeError(f"not JSON-able: {value!r}")


def prompt_fields(records: Iterable[PromptRecord]) -> list[dict[str, Any]]:
    """The records as plain dicts without their line numbers and the user's own fields (what
    the computation depends on)."""
    return [
        {k: v for k, v in asdict(record).items() if k not in ("line", "extra")}
        for record in records
    ]


def extra_columns(records: Sequence[PromptRecord]) -> dict[str, list[Any]]:
    """The user's own prompt fields as table columns (first-seen order, ``None`` where a record
    lacks one). Strings, numbers and booleans are kept; lists and objects, and every value of a
    column that mixes types, become JSON text so that the column has one type."""
    names = list(dict.fromkeys(name for record in records for name in record.extra))
    columns = {}
    for name in names:
        values = [record.extra.get(name) for record in records]
        kinds = {float if type(value) is int else type(value)
                 for value in values if value is not None}
        if len(kinds) > 1 or kinds & {list, dict}:
            values = [None if value is None else value if isinstance(value, str)
                      else json.dumps(value, ensure_ascii=False) for value in values]
        columns[name] = values
    return columns
