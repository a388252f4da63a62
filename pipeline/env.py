"""Facts about this machine, gathered once: the only place that probes CUDA, bf16 and bitsandbytes.

Importing this module is cheap; ``gather()`` imports torch when called.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import asdict, dataclass
from functools import cache
from importlib import metadata


@dataclass(frozen=True)
class Env:
    """What the training code needs to know about the machine."""

    cuda: bool
    gpu_name: str | None
    gpu_memory_gb: float | None
    num_gpus: int
    bf16: bool
    bitsandbytes: str | None
    torch: str | None
    cpu_count: int
    world_size: int
    platform: str

    def to_dict(self) -> dict[str, object]:
        """Plain dict for plan.json and MLflow."""
        return asdict(self)


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@cache
def gather() -> Env:
    """Probe the machine (imports torch)."""
    cuda = False
    gpu_name = None
    gpu_memory = None
    num_gpus = 0
    bf16 = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            num_gpus = torch.cuda.device_count()
            props = torch.cuda.get_device_properties(0)
            gpu_name = props.name
            gpu_memory = round(props.total_memory / 2**30, 1)
            bf16 = torch.cuda.is_bf16_supported()
    return Env(
        cuda=cuda,
        gpu_name=gpu_name,
        gpu_memory_gb=gpu_memory,
        num_gpus=num_gpus,
        bf16=bf16,
        bitsandbytes=package_version("bitsandbytes"),
        torch=package_version("torch"),
        cpu_count=os.cpu_count() or 1,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        platform=platform.platform(),
    )


def environment_report() -> dict[str, object]:
    """What the run ran on, for ``environment.json`` and MLflow: machine facts, CUDA, and every package version.

    Imports torch (through ``gather``) when it is installed.
    """
    import sys

    env = gather()
    cuda_version = cudnn = driver_gpus = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda_version = torch.version.cuda
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if env.cuda:
            driver_gpus = [
                {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}
                for p in (torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count()))
            ]
    packages = sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]},
        key=str.lower,
    )
    return {
        **env.to_dict(),
        "python": sys.version.split()[0],
        "cuda_version": cuda_version,
        "cudnn_version": cudnn,
        "gpus": driver_gpus or [],
        "packages": packages,
    }


def project_commit() -> str:
    """Git commit of the pipeline code that ran ('+dirty' with uncommitted changes), or 'unknown'."""
    import subprocess
    from pathlib import Path

    where = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
