"""Seeding and the environment report stored with every result."""
from __future__ import annotations

import os
import platform
import random
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

_PACKAGES = ("torch", "open_clip_torch", "timm", "transformers", "decord", "av", "numpy")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a seeded torch generator.

    Example:
        >>> g = seed_everything(0); a = torch.rand(2, generator=g)
        >>> g = seed_everything(0); torch.equal(a, torch.rand(2, generator=g))
        True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def git_revision(path: str | os.PathLike | None = None) -> str | None:
    """The git commit of the project (with ``-dirty`` if the tree has changes), or None."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("-dirty" if dirty else "")


def device_name(device: str | torch.device) -> str:
    """A human-readable device: the GPU model for CUDA, the CPU architecture otherwise."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def package_versions(*dists: str) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent).

    Example:
        >>> package_versions("numpy", "no-such-dist")["no-such-dist"] is None
        True
    """
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def environment_report(device: str | torch.device = "cpu") -> dict:
    """Device, package versions, Python, platform and git revision, as a JSON-ready dict.

    Example:
        >>> r = environment_report("cpu")
        >>> sorted(r) == ['device', 'git_revision', 'packages', 'platform', 'python']
        True
    """
    return {
        "device": device_name(device),
        "packages": package_versions(*_PACKAGES),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_revision": git_revision(),
    }
