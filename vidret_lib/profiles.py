"""Parameter profiles for the notebooks: ``params/<profile>.yaml``.

A profile file maps a notebook stem (``01_clip4clip``) to parameter overrides; the
``common`` section applies to every notebook. The ``default`` profile is the notebooks'
own parameters cells (its file is empty), ``smoke`` makes everything tiny for tests,
``msrvtt-gpu`` is the papers' setting.

Parameter names are checked: papermill only warns about an unknown name, we raise.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = PROJECT_ROOT / "params"
SMOKE_ENV = "VIDRET_SMOKE"


def profile_names() -> list[str]:
    return sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def profile_params(profile: str, notebook: str) -> dict[str, Any]:
    """The overrides that ``profile`` sets for ``notebook`` (common section first).

    Example:
        >>> profile_params("default", "01_clip4clip")
        {}
    """
    path = PARAMS_DIR / f"{profile}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no profile {profile!r} ({path} is absent); profiles: {profile_names()}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must map notebook names to parameter dicts")
    return {**(data.get("common") or {}), **(data.get(notebook) or {})}


def check_names(params: dict[str, Any], known: set[str], where: str) -> None:
    """Raise ``ValueError`` naming every parameter in ``params`` that ``known`` lacks."""
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for {where}; its parameters are {sorted(known)}"
        )


def apply_smoke(namespace: dict[str, Any], notebook: str) -> bool:
    """If ``VIDRET_SMOKE=1``, overwrite ``namespace`` with the smoke profile; return whether it did.

    Called in the cell after a notebook's parameters cell, so that nbval (which injects no
    parameters) runs the notebook at smoke size. A smoke name the notebook does not define
    is an error.
    """
    if os.environ.get(SMOKE_ENV, "0") != "1":
        return False
    overrides = profile_params("smoke", notebook)
    check_names(overrides, {k for k in namespace if not k.startswith("_")}, f"notebook {notebook}")
    namespace.update(overrides)
    return True
