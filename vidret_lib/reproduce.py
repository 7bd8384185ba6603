"""Run every notebook headless with papermill: ``python -m vidret_lib.reproduce --profile default``.

Executed notebooks go to ``executed/<profile>/`` (git-ignored). A notebook is skipped when
its executed copy is up to date: same notebook source, same parameters, same library code
(a stamp file records their hash). A failing notebook stops the run and names the cell.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from .profiles import PROJECT_ROOT, check_names, profile_params

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
EXECUTED_DIR = PROJECT_ROOT / "executed"


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.stem.startswith(o) for o in only)]
        if not paths:
            raise SystemExit(f"no notebook matches {only}; notebooks: {[p.stem for p in notebook_paths()]}")
    return paths


def code_stamp(notebook: Path, params: dict, profile: str) -> str:
    """Hash of what an executed notebook depends on: its source, parameters and the library."""
    h = hashlib.sha256()
    h.update(notebook.read_bytes())
    h.update(json.dumps({"profile": profile, "params": params}, sort_keys=True).encode())
    for pkg in ("vidret_lib", "data_prep"):
        for src in sorted((PROJECT_ROOT / pkg).rglob("*.py")):
            h.update(src.relative_to(PROJECT_ROOT).as_posix().encode())
            h.update(src.read_bytes())
    return h.hexdigest()


def checked_params(path: Path, profile: str) -> dict:
    """The profile's parameters for one notebook; a name the notebook does not define is an error."""
    import papermill as pm

    params = profile_params(profile, path.stem)
    check_names(params, set(pm.inspect_notebook(str(path))), f"notebook {path.name}")
    return params


def run_notebook(path: Path, profile: str, force: bool = False) -> str:
    """Execute one notebook; return "ran" or "up to date". Raises SystemExit on failure."""
    import papermill as pm

    params = checked_params(path, profile)
    out = EXECUTED_DIR / profile / path.name
    stamp_file = out.with_suffix(".stamp")
    stamp = code_stamp(path, params, profile)
    if not force and out.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return "up to date"
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)
    try:
        pm.execute_notebook(
            str(path), str(out), parameters=params, cwd=str(path.parent),
            kernel_name="python3", progress_bar=False,
        )
    except pm.PapermillExecutionError as err:
        raise SystemExit(
            f"{path.name} failed in cell {err.cell_index} (execution count {err.exec_count}): "
            f"{err.ename}: {err.evalue}\n--- cell source ---\n{err.source}\n"
            f"--- the executed notebook with the traceback: {out}"
        ) from None
    stamp_file.write_text(stamp)
    return "ran"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="params/<profile>.yaml (default: default)")
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 03")
    parser.add_argument("--force", action="store_true", help="re-run even up-to-date notebooks")
    args = parser.parse_args(argv)
    os.environ.setdefault("VIDRET_PROGRESS", "0")
    os.environ.pop("VIDRET_SMOKE", None)  # the profile decides sizes here, not the environment
    paths = notebook_paths(args.only)
    try:  # every notebook's parameters are checked before any runs: a typo costs no computed work
        for path in paths:
            checked_params(path, args.profile)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"reproduce: {err}") from None
    total = time.perf_counter()
    for path in paths:
        start = time.perf_counter()
        print(f"[{args.profile}] {path.name} ...", flush=True)
        status = run_notebook(path, args.profile, args.force)
        print(f"[{args.profile}] {path.name}: {status} in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"[{args.profile}] all notebooks done in {time.perf_counter() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
