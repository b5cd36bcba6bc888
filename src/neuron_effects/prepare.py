"""The model, prepared once: a local folder that every model job loads in seconds.

Whatever ``model:`` names becomes one local Hugging Face folder (config, tokenizer files and
safetensors weights), made by the ``prepare_model`` rule before any model job runs:

* a ``.gguf`` file is loaded once (its config parsed, its tensors converted and de-quantized to
  float32, exactly as ``from_pretrained(gguf_file=...)`` gives them) and saved as safetensors
  with its config and tokenizer, in ``<root>/<stem>-<sha256[:12]>``: a changed file (a new
  digest) is a new folder, and the jobs that load it see new params and rerun;
* a Hugging Face hub id is downloaded once as a snapshot into the hub cache (``HF_HOME`` is
  honoured; a snapshot already there is not downloaded again), and ``<root>/<org>--<name>`` holds
  symbolic links to the snapshot's files (no copy of the weights);
* a local folder is used as it is: nothing is prepared or copied.

Parse time needs only :func:`prepared_location` (no torch, no model): the folder's path is known
before the rule runs, so every job's params name it. The GGUF digest is cached by the file's
path, size and modification time (parsing is repeated by every cluster job).
:func:`place_in_hub_cache` puts a local folder into the hub cache as a download would
(tools/gpu-check.sh and the tests read it offline).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .inputs import InputError, digest, model_location
from .store import write_text

# The folder's manifest: the rule's output, written last (a folder without it is incomplete).
MANIFEST = "prepared.json"
# What a hub snapshot needs for config, tokenizer and safetensors weights (no .bin, no .gguf).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class PreparedModel:
    """Where the jobs load the model from (``folder``) and what makes it (``kind``: gguf, hub or
    folder; ``source``: the configured location; ``manifest``: the preparation's output file, or
    ``None`` when a local folder is used as it is)."""

    kind: str
    source: str
    folder: str
    manifest: str | None
    sha256: str | None = None


def file_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """SHA-256 of a file, cached in ``cache_dir`` by its resolved path, size and mtime."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = digest([str(path), stat.st_size, stat.st_mtime_ns])
    cached = None if cache_dir is None else Path(cache_dir) / f"{key}.sha256"
    if cached is not None and cached.exists():
        return cached.read_text().strip()
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)
    value = sha.hexdigest()
    if cached is not None:
        write_text(cached, value)
    return value


def prepared_location(
    model: str, root: str | Path = "resources/prepared", cache_dir: str | Path | None = None
) -> PreparedModel:
    """The prepared folder of ``model`` (a ``.gguf`` file, a hub id or a local folder), without
    preparing anything; an unknown path is an :class:`InputError`."""
    location, extra = model_location(model)
    if "gguf_file" in extra:
        path = Path(location) / extra["gguf_file"]
        sha = file_sha256(path, cache_dir)
        folder = Path(root) / f"{path.stem}-{sha[:12]}"
        return PreparedModel("gguf", model, str(folder), str(folder / MANIFEST), sha)
    if Path(location).exists():
        return PreparedModel("folder", model, location, None)
    folder = Path(root) / location.replace("/", "--")
    return PreparedModel("hub", model, str(folder), str(folder / MANIFEST))


def prepare_model(prepared: PreparedModel, trust_remote_code: bool = False) -> None:
    """Make ``prepared.folder`` (see the module docstring) and write its manifest last. A folder
    is assembled under a temporary name and renamed into place, so a killed preparation leaves
    no half folder behind."""
    if prepared.manifest is None:
        return
    folder = Path(prepared.folder)
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    try:
        if prepared.kind == "gguf":
            _convert_gguf(prepared.source, staging, trust_remote_code)
            details = {"sha256": prepared.sha256,
                       "weights_digest": digest(["gguf", prepared.sha256])}
        else:
            details = _link_snapshot(prepared.source, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = {"kind": prepared.kind, "source": prepared.source, **details,
                "seconds": round(time.perf_counter() - started, 2)}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in staging.iterdir():  # safetensors writes 0600: readable by whoever reads the rest
        if not path.is_symlink():
            path.chmod(0o644 if path.is_file() else 0o755)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def _convert_gguf(source: str, staging: Path, trust_remote_code: bool) -> None:
    """Load the GGUF once (float32: its de-quantized values exactly) and save it as safetensors
    with its config and tokenizer."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location, extra = model_location(source)
    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    model = AutoModelForCausalLM.from_pretrained(
        location, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code,
        **extra)
    # save_pretrained refuses a model loaded from a GGUF (it counts as quantized), although its
    # weights are plain float32 now: save the tensors (shared ones once) and the config.
    save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(staging)
    AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code,
                                  **extra).save_pretrained(staging)


def _link_snapshot(repo_id: str, staging: Path) -> dict[str, str]:
    """Download (or find in the hub cache) the snapshot of ``repo_id`` and link its files."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # offline, gated, unknown id: say which and what to do
        raise InputError(
            f"cannot download the model {repo_id} from the Hugging Face hub: {error}. Log in "
            "(`hf auth login`) for a gated model, or download it elsewhere and set model: to "
            "the local folder") from error
    blobs = {}
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():
            target = staging / path.relative_to(snapshot)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
            blobs[str(path.relative_to(snapshot))] = path.resolve().name
    # the hub cache names each blob by its content's hash (SHA-256 for LFS files such as the
    # weights): a digest of the weights without reading them
    return {"snapshot": str(snapshot), "weights_digest": digest(["hub", blobs])}


def place_in_hub_cache(folder: str | Path, hf_home: str | Path, repo_id: str) -> Path:
    """The files of the local ``folder`` placed in the Hugging Face hub cache under ``hf_home``
    as a download of ``repo_id`` leaves them, so that an offline ``snapshot_download`` finds
    them: ``hub/models--<org>--<name>/blobs/<SHA-256 of the content>`` (hard links to the files,
    copies across file systems), ``snapshots/<revision>/<file>`` (relative links to the blobs)
    and ``refs/main`` naming the revision, the SHA-1 of the files' names and blobs (the same
    files: the same revision). Returns the snapshot folder."""
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    files = sorted(path for path in Path(folder).rglob("*") if path.is_file())
    blobs = {path.relative_to(folder): file_sha256(path) for path in files}
    revision = hashlib.sha1(json.dumps(sorted(
        (str(name), blob) for name, blob in blobs.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path, (name, blob) in zip(files, blobs.items()):
        stored = repo / "blobs" / blob
        if not stored.exists():
            try:
                os.link(path, stored)
            except OSError:  # another file system
                shutil.copyfile(path, stored)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).unlink(missing_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(stored, (snapshot / name).parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


# The weight files whose bytes a local folder's digest covers.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def model_digest(folder: str | Path, cache_dir: str | Path | None = None) -> str:
    """A digest of the model's weights (and config), the model part of every cache key: the
    ``weights_digest`` its preparation recorded in the manifest, or, for a local folder used as
    it is (or prepared before digests were recorded), the SHA-256 of each weight file and of
    ``config.json`` (:func:`file_sha256`, cached by path, size and mtime in ``cache_dir``: each
    file version is read once)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.exists():
        recorded = json.loads(manifest.read_text()).get("weights_digest")
        if recorded:
            return recorded
    files = sorted({path for pattern in (*WEIGHT_PATTERNS, "config.json")
                    for path in folder.glob(pattern)})
    if not files:
        raise InputError(f"no model weights found in {folder}")
    return digest(["files", {path.name: file_sha256(path, cache_dir) for path in files}])
