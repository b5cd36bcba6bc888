"""Which CUDA build of the pinned torch runs on an NVIDIA driver, and the error a job gives when
CUDA is unusable. No torch here: the workflow's parse reads :data:`CUDA_UNUSABLE`, and the
advice is for a torch that may not be the right one."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .inputs import InputError


@dataclass(frozen=True)
class TorchBuild:
    """A CUDA build of the pinned torch on PyTorch's wheel index (``<TORCH_INDEX><name>``): it
    runs on a driver that supports CUDA ``min_driver_cuda`` or newer (CUDA minor-version
    compatibility: a 12.x build needs a 12.0 driver, R525+), per ``source``."""

    name: str
    min_driver_cuda: str
    min_driver: str
    source: str


# THE list of torch 2.13.0's CUDA builds that the advice names, newest first. UNCONFIRMED:
# download.pytorch.org could not be reached from where it was written (2026-12-05); it follows
# PyTorch's release announcements and downstream build matrices of 2026 (cu118 ended with 2.7;
# 2.12 ships cu126, cu130 and cu132, without 12.8 and 12.9; 2.14 is the last with a 12.x build).
# cu132 is left out until confirmed for 2.13 (cu130 runs on the same drivers). How to confirm:
# docs/slurm.md, "A torch build for your GPU's driver".
TORCH_BUILDS_CONFIRMED = False
TORCH_CUDA_BUILDS = (
    TorchBuild("cu130", "13.0", "R580", "PyTorch 2.12 release notes, 2026 (unconfirmed for 2.13)"),
    TorchBuild("cu126", "12.0", "R525", "PyTorch 2.12 release notes, 2026 (unconfirmed for 2.13)"),
)
TORCH_INDEX = "https://download.pytorch.org/whl/"


def nvidia_driver() -> tuple[str | None, str | None]:
    """The NVIDIA driver's version and the newest CUDA version it supports, from the header of
    ``nvidia-smi`` (``None, None`` without it)."""
    try:
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    driver = re.search(r"Driver Version:\s*([\d.]+)", header)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return driver and driver.group(1), cuda and cuda.group(1)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def torch_build_for(driver_cuda: str) -> str | None:
    """The first (newest) of :data:`TORCH_CUDA_BUILDS` that runs on a driver supporting CUDA
    ``driver_cuda`` (``min_driver_cuda <= driver_cuda``), None if none does."""
    for build in TORCH_CUDA_BUILDS:
        if _version(build.min_driver_cuda) <= _version(driver_cuda)[:2]:
            return build.name
    return None


# Left by a model job that found CUDA unusable (relative to the workflow's working directory):
# the message; the workflow resubmits no model job while it exists (workflow/rules/common.smk).
CUDA_UNUSABLE = Path("logs/cuda_unusable.txt")


class CudaUnusableError(InputError):
    """``device: cuda`` where CUDA is unusable: fatal on every retry of the job (a job that
    raises it leaves :data:`CUDA_UNUSABLE` behind, and the workflow resubmits no model job
    after it)."""


def cuda_unusable_message(device: str, torch_version: str, torch_cuda: str | None,
                          driver: str | None, driver_cuda: str | None) -> str:
    """Why ``device`` cannot be used, naming torch's CUDA version and the driver's, and the fix."""
    build = f"torch {torch_version} is built for CUDA {torch_cuda}" if torch_cuda else \
        f"torch {torch_version} is a CPU-only build"
    if driver is None:
        return (f"device {device!r} requested but CUDA is unusable here: {build} and there is no "
                "NVIDIA driver (nvidia-smi not found). Run on a GPU node, or use device: cpu or "
                "auto")
    found = f"{build}; the NVIDIA driver is {driver}, which supports CUDA up to {driver_cuda}"
    wanted = torch_build_for(driver_cuda) if driver_cuda else None
    if torch_cuda is None or (driver_cuda and _version(torch_cuda)[:1] > _version(driver_cuda)[:1]):
        fix = (f"TORCH_INDEX_URL={TORCH_INDEX}{wanted} tools/setup-venv.sh (a torch build for "
               "this driver; docs/slurm.md)" if wanted else
               "update the NVIDIA driver (no PyTorch CUDA build supports this one)")
    else:
        fix = ("the builds match: check that the job was given a GPU (CUDA_VISIBLE_DEVICES, "
               "the Slurm --gpus request)")
    return (f"device {device!r} requested but CUDA is unusable here "
            f"(torch.cuda.is_available() is False): {found}. Fix: {fix}")
