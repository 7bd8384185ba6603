"""Results files: one JSON per run with metrics, the config it ran with, seed and environment.

Figures and tables are drawn from these files only, never from a notebook's memory.
"""
from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .cache import load_json, save_json
from . import distributed
from .runinfo import environment_report

RESULTS_SCHEMA = 1
_REQUIRED = ("schema", "name", "metrics", "config", "seed", "environment")


def write_results(
    path: str | os.PathLike,
    name: str,
    metrics: dict[str, Any],
    config: Any,
    seed: int,
    device: str = "cpu",
    protocol: dict[str, Any] | None = None,
) -> Path:
    """Write a results JSON atomically and return its path.

    ``config`` is a dict or a dataclass (stored whole); ``protocol`` records the protocol
    switches that were on (e.g. ``{"checkpoint": "val", "rerank": "none"}``). Under torchrun every
    rank calls it (a notebook cell runs on every rank), only rank 0 writes
    (:func:`vidret_lib.distributed.is_main_process`), and every rank returns once the file is on
    disk (a barrier), so a rank may read it next.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.json"
        >>> _ = write_results(p, "demo", {"t2v_R1": 12.5}, {"lr": 1e-4}, seed=0)
        >>> r = read_results(p); r["metrics"], r["config"], r["seed"]
        ({'t2v_R1': 12.5}, {'lr': 0.0001}, 0)
    """
    path = Path(path)
    distributed.init_from_env(device)  # torchrun: join the group (if no training did) for the barrier below
    if distributed.is_main_process():  # every rank computed the same record: rank 0 keeps it
        _save(path, name, metrics, config, seed, device, protocol)
    distributed.barrier()
    return path


def _save(path: Path, name: str, metrics: dict[str, Any], config: Any, seed: int, device: str,
          protocol: dict[str, Any] | None) -> None:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    record = {
        "schema": RESULTS_SCHEMA,
        "name": name,
        "metrics": metrics,
        "config": config,
        "seed": seed,
        "protocol": protocol or {},
        "environment": environment_report(device),
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_json(path, record)


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results JSON, checking it has every field a figure or table relies on."""
    record = load_json(path)
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise ValueError(f"{path} is not a vidret results file (missing {missing}); re-run its notebook")
    return record
