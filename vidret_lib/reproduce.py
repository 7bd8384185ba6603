"""Run every notebook headless with papermill: ``python -m vidret_lib.reproduce --profile default``.

Executed notebooks go to ``executed/<profile>/`` (git-ignored). Every notebook's profile values
are checked (names and types, :mod:`vidret_lib.profiles`) before any notebook runs. A notebook
is skipped only when everything it depends on or produced is as its last run left it; a stamp
file beside the executed copy records the sha256 of:

- its source, its parameters and the library code (``vidret_lib``, ``data_prep``);
- the executed notebook itself;
- the results records it owns: the files in ``<results_dir>/<notebook stem>/`` (``results_dir``
  is the notebook's parameter, relative to ``notebooks/``);
- for a summary notebook (``SUMMARY_NOTEBOOKS``), the records of every other notebook it reads.

So a record edited, deleted or overwritten (by hand, or by another profile writing to the same
folder) makes its notebook run again; the notebook's ``load_or_run`` then recomputes exactly the
records whose checksum no longer matches its ledger and reuses the rest, so a re-run takes seconds.
A partial run (``--only 01``) that changes 01's records makes the summary notebook stale.

A profile with a ``prepare:`` setting (:func:`vidret_lib.profiles.profile_settings`) has that
module's ``prepare()`` run first; it builds what the profile points at (``msrvtt-rehearsal``: the
mini MSR-VTT and tiny CLIP of :mod:`data_prep.rehearsal`) and returns environment variables
for the kernels. ``--cuda-rules N`` runs every kernel under
:func:`vidret_lib.devicecheck.cuda_rules` with N virtual GPUs (``VIDRET_CUDA_RULES``, read by
``profiles.apply_smoke``), so a profile with ``device: cuda`` runs on the CPU with CUDA's device
rules enforced; the mode is part of the stamp, so a notebook checked without it runs again.

Each notebook prints one line (name, ran / up to date and why, seconds); on a terminal a progress
bar over its cells shows while it runs. Kernels talk over IPC sockets, not TCP, so ipykernel has
no unencrypted-TCP warning to print. A failing notebook stops the run and names the cell.

Several processes, one machine (``torchrun``): every notebook runs on every rank, its training
spread over the ranks (:mod:`vidret_lib.distributed`)::

    torchrun --standalone --nproc_per_node 2 -m vidret_lib.reproduce --profile msrvtt-rehearsal --cuda-rules 2

(``make rehearsal-torchrun``; on GPUs drop ``--cuda-rules``). Then:

- rank 0 prepares (``prepare:``) and decides which notebooks are stale; every rank follows its
  decision, so no rank runs a notebook (and waits in its collectives) alone;
- each kernel inherits ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and gets its own ``MASTER_PORT``
  (a free port rank 0 picks for each notebook), so each notebook's kernels form their own process
  group and a new kernel never meets the previous one's store; ``TORCHELASTIC_USE_AGENT_STORE`` is
  dropped (the kernels' rank 0 hosts their store);
- a notebook whose ``device`` is ``"cuda"`` gets ``"cuda:<LOCAL_RANK>"`` as a parameter, so each
  rank's data and models are on its own GPU from the first cell;
- frames and features are computed by the first rank that asks (the caches lock their folders,
  :mod:`vidret_lib.cache`), the others wait and read them; results records, their ledgers, verdicts
  and figures are written by rank 0 only (:func:`vidret_lib.distributed.is_main_process`), and every
  rank reuses or recomputes a record as rank 0 decides (:func:`vidret_lib.experiment.load_or_run`);
- rank 0's executed notebooks and stamps go to ``executed/<profile>/``; rank N's executed copies
  (no stamps) to ``executed/<profile>.rankN/``, which nothing reads;
- one node only (``--nnodes 1``): rank 0 picks the kernels' ports on its own host. A rank that
  fails ends its process with an error, and torchrun then stops the others (their kernels exit
  with their parent).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import distributed, experiment, profiles

EXECUTED_DIR = profiles.PROJECT_ROOT / "executed"
SUMMARY_NOTEBOOKS = ("07_summary",)  # their tables and figures are drawn from every other notebook's records
# jupyter_client's KernelManager: IPC (unix sockets) instead of TCP on localhost, the sockets named after this
# process (notebooks/kernel-ipc-<pid>-<n>): kernels of two processes in one folder (torchrun ranks) never share one
KERNEL_CONFIG = {"KernelManager": {"transport": "ipc", "ip": f"kernel-ipc-{os.getpid()}"}}


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, or those whose name starts with one of the prefixes ``only``."""
    paths = profiles.notebook_paths()
    if only:
        paths = [p for p in paths if any(p.stem.startswith(o) for o in only)]
        if not paths:
            raise SystemExit(f"no notebook matches {only}; notebooks: {[p.stem for p in profiles.notebook_paths()]}")
    return paths


def code_stamp(notebook: Path, params: dict, profile: str) -> str:
    """Hash of what an executed notebook depends on: its source, parameters, the library and the
    device-rules mode (``VIDRET_CUDA_RULES``)."""
    h = hashlib.sha256()
    h.update(notebook.read_bytes())
    cuda_rules = os.environ.get(profiles.CUDA_RULES_ENV, "")  # a run under the device rules is another check
    h.update(json.dumps({"profile": profile, "params": params, "cuda_rules": cuda_rules}, sort_keys=True).encode())
    for pkg in ("vidret_lib", "data_prep"):
        for src in sorted((profiles.PROJECT_ROOT / pkg).rglob("*.py")):
            h.update(src.relative_to(profiles.PROJECT_ROOT).as_posix().encode())
            h.update(src.read_bytes())
    return h.hexdigest()


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _records(results: Path, stem: str) -> dict[str, str]:
    """sha256 of each results file of notebook ``stem``: ``results/<stem>/*`` (the git-ignored
    ``.local/`` ledgers and hidden files excluded), keyed ``"<stem>/<file name>"``."""
    folder = results / stem
    files = sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else []
    return {f"{stem}/{p.name}": _sha256(p) for p in files}


def notebook_state(path: Path, profile: str, params: dict[str, Any], declared: dict[str, dict[str, Any]],
                   stems: list[str]) -> dict[str, Any]:
    """What the stamp of notebook ``path`` records (see the module docstring), as of now.

    ``params`` are the profile's overrides, ``declared`` the notebook's parameters cell
    (:func:`vidret_lib.profiles.notebook_parameters`), ``stems`` every notebook's stem.
    """
    results = _results_folder(path, params, declared)
    reads = [s for s in stems if s != path.stem] if path.stem in SUMMARY_NOTEBOOKS else []
    return {
        "code": code_stamp(path, params, profile),
        "executed": _sha256(EXECUTED_DIR / profile / path.name),
        "owns": _records(results, path.stem) if results else {},
        "reads": {k: v for s in reads for k, v in _records(results, s).items()} if results else {},
    }


def _why_stale(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """A short reason why state ``new`` differs from the stamped ``old``, or None if it does not."""
    if old is None:
        return "never ran"
    if old.get("code") != new["code"]:
        return "notebook, parameters or library changed"
    if old.get("executed") != new["executed"]:
        return "executed notebook changed" if new["executed"] else "executed notebook missing"
    for kind in ("owns", "reads"):
        was, now = old.get(kind, {}), new[kind]
        for name in sorted(set(was) | set(now)):
            if was.get(name) != now.get(name):
                change = "missing" if name not in now else "new" if name not in was else "changed"
                return f"{'its' if kind == 'owns' else 'input'} record {name} {change}"
    return None


def _read_stamp(stamp_file: Path) -> dict[str, Any] | None:
    try:
        return json.loads(stamp_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # absent, or the hash-only stamp of older versions
        return None


def executed_path(path: Path, profile: str, rank: int = 0) -> Path:
    """Where rank ``rank``'s executed copy of notebook ``path`` goes: ``executed/<profile>/`` for rank 0,
    ``executed/<profile>.rank<rank>/`` for the others (see the module docstring).

    Example:
        >>> executed_path(Path("01_clip4clip.ipynb"), "smoke", 1).relative_to(EXECUTED_DIR).as_posix()
        'smoke.rank1/01_clip4clip.ipynb'
    """
    return EXECUTED_DIR / (profile if rank == 0 else f"{profile}.rank{rank}") / path.name


def rank_parameters(params: dict[str, Any], declared: dict[str, dict[str, Any]], local_rank: int) -> dict[str, Any]:
    """``params`` with ``device: "cuda"`` (given, or the notebook's default) made ``"cuda:<local_rank>"``.

    Example:
        >>> rank_parameters({"device": "cuda", "epochs": 2}, {"device": {"default": "cpu"}}, 1)
        {'device': 'cuda:1', 'epochs': 2}
        >>> rank_parameters({}, {"device": {"default": "cpu"}}, 1)
        {}
    """
    device = params.get("device", declared.get("device", {}).get("default"))
    return {**params, "device": f"cuda:{local_rank}"} if device == "cuda" else params


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run_notebook(path: Path, profile: str, force: bool = False,
                 overrides: dict[str, dict[str, Any]] | None = None) -> str:
    """Execute one notebook unless it is up to date; return ``"ran (<why>)"`` or ``"up to date"``.

    ``overrides`` are every notebook's checked profile values (:func:`profiles.profile_overrides`,
    computed when not given). Raises SystemExit naming the cell when the notebook fails.
    Under torchrun (a process group joined by :func:`main`) every rank calls it, rank 0 decides,
    and the kernel gets this rank's device and the notebook's port (see the module docstring).
    """
    import papermill as pm
    from traitlets.config import Config

    notebooks = {p.stem: profiles.notebook_parameters(p) for p in profiles.notebook_paths()}
    overrides = profiles.profile_overrides(profile, notebooks) if overrides is None else overrides
    params, declared = overrides[path.stem], notebooks[path.stem]
    rank, world = distributed.rank_and_world()
    if world > 1:
        params = rank_parameters(params, declared, int(os.environ.get("LOCAL_RANK", "0")))
    out = executed_path(path, profile, rank)
    stamp_file = out.with_suffix(".stamp")
    why = None
    if rank == 0:
        why = "forced" if force else _why_stale(_read_stamp(stamp_file), notebook_state(
            path, profile, params, declared, list(notebooks)))
    why = distributed.from_main_process(why)  # every rank runs it, or none (its collectives need all)
    if why is None:
        return "up to date"
    if world > 1:  # this notebook's kernels form their own group, on a store of their own
        os.environ["MASTER_PORT"] = str(distributed.from_main_process(_free_port() if rank == 0 else None))
        os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)
    results = _results_folder(path, params, declared)
    started = _mark_run_start(results / path.stem) if rank == 0 and results else None
    try:
        pm.execute_notebook(
            str(path), str(out), parameters=params, cwd=str(path.parent), kernel_name="python3",
            progress_bar={"desc": path.stem, "leave": False, "disable": not sys.stderr.isatty()},
            config=Config(KERNEL_CONFIG),
        )
    except pm.PapermillExecutionError as err:
        raise SystemExit(
            f"{path.name} failed in cell {err.cell_index} (execution count {err.exec_count}){_on_rank(rank, world)}: "
            f"{err.ename}: {err.evalue}\n--- cell source ---\n{err.source}\n"
            f"--- the executed notebook with the traceback: {out}"
        ) from None
    if started is not None:
        removed = remove_stale_records(results / path.stem, started)
        if removed:
            print(f"[{profile}] {path.stem}: removed {len(removed)} results file(s) this run neither wrote nor reused "
                  f"(left by an older version of the notebook): {', '.join(removed)}", flush=True)
    if rank == 0:
        stamp_file.write_text(json.dumps(notebook_state(path, profile, params, declared, list(notebooks)), indent=1))
    return f"ran ({why})"


def _results_folder(path: Path, params: dict[str, Any], declared: dict[str, dict[str, Any]]) -> Path | None:
    """The notebook's ``results_dir`` parameter (relative to ``notebooks/``) as a path, or None without one."""
    results_dir = params.get("results_dir", declared.get("results_dir", {}).get("default"))
    return path.parent / results_dir if results_dir else None


def _mark_run_start(folder: Path) -> float:
    """Touch ``folder/.local/run-started`` and return its mtime: the run's start on the filesystem's own clock."""
    marker = folder / ".local" / "run-started"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return marker.stat().st_mtime


def remove_stale_records(folder: Path, started: float) -> list[str]:
    """Delete the results files in ``folder`` (``<results_dir>/<notebook>/``) that the notebook's run, begun at
    ``started`` (a filesystem mtime, :func:`_mark_run_start`), neither wrote nor reused, with their ledgers;
    return their names, sorted.

    Every record a run produces is written (:func:`vidret_lib.results.write_results`) or, when reused,
    touched (:func:`vidret_lib.experiment.load_or_run`), so a file older than the run is what an older
    version of the notebook left (a renamed or dropped variant). Left in place it would still be read by
    :func:`vidret_lib.tables.results_frame` (notebook 07's tables) as if current. Hidden files and
    ``.local/`` are not results files and are kept.
    """
    stale = sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith(".") and p.stat().st_mtime < started)
    for p in stale:
        p.unlink()
        experiment.ledger_path(p).unlink(missing_ok=True)
    return [p.name for p in stale]


def _on_rank(rank: int, world: int) -> str:
    return f" on rank {rank} of {world}" if world > 1 else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Several processes: torchrun --standalone --nproc_per_node 2 -m vidret_lib.reproduce --profile "
               "msrvtt-rehearsal --cuda-rules 2 (every notebook on every rank; rank 0 writes; see the module docstring)")
    parser.add_argument("--profile", default="default", help="params/<profile>.yaml (default: default)")
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 03")
    parser.add_argument("--force", action="store_true", help="re-run even up-to-date notebooks")
    parser.add_argument("--cuda-rules", type=int, metavar="N",
                        help="run the kernels on the CPU under CUDA's device rules with N virtual GPUs "
                             "(vidret_lib.devicecheck; for profiles with device: cuda)")
    args = parser.parse_args(argv)
    if args.cuda_rules is not None and args.cuda_rules < 0:
        parser.error(f"--cuda-rules {args.cuda_rules}: give the number of virtual GPUs (>= 1), or 0 for none")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.cuda_rules and args.cuda_rules < world:
        parser.error(f"--cuda-rules {args.cuda_rules} under torchrun with {world} processes: give each process "
                     f"its own virtual GPU (--cuda-rules {world})")
    if world > 1:  # torchrun: the reproduce processes share decisions over gloo (their kernels join their own groups)
        dist.init_process_group("gloo")
    rank = distributed.rank_and_world()[0]
    tag = f"[{args.profile}]" if rank == 0 else f"[{args.profile} rank {rank}]"
    os.environ.setdefault("VIDRET_PROGRESS", "0")
    os.environ.pop(profiles.SMOKE_ENV, None)  # the profile decides sizes here, not the environment
    if args.cuda_rules is not None:
        os.environ[profiles.CUDA_RULES_ENV] = str(args.cuda_rules)
    paths = notebook_paths(args.only)
    try:  # every notebook's parameters are checked before any runs: a typo costs no computed work
        overrides = profiles.profile_overrides(args.profile)
        settings = profiles.profile_settings(args.profile)
    except (FileNotFoundError, profiles.ProfileError) as err:
        raise SystemExit(f"reproduce: {err}") from None
    if "prepare" in settings:
        start = time.perf_counter()
        kernel_env = distributed.from_main_process(_prepare(args.profile, settings["prepare"]) if rank == 0 else None)
        os.environ.update(kernel_env)
        print(f"{tag} prepared by {settings['prepare']}: {kernel_env}, {time.perf_counter() - start:.0f} s", flush=True)
    total = time.perf_counter()
    for path in paths:
        start = time.perf_counter()
        status = run_notebook(path, args.profile, args.force, overrides)
        print(f"{tag} {path.stem}: {status}, {time.perf_counter() - start:.0f} s", flush=True)
    print(f"{tag} {len(paths)} notebooks done in {time.perf_counter() - total:.0f} s")
    if world > 1:
        dist.destroy_process_group()
    return 0


def _prepare(profile: str, module_name: str) -> dict[str, str]:
    """Run the ``prepare()`` of the profile's ``prepare:`` module; return the kernels' environment variables."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SystemExit(f"reproduce: profile {profile!r} sets prepare: {module_name}, which cannot "
                         f"be imported ({err}); fix the module name in params/{profile}.yaml") from None
    return module.prepare()


if __name__ == "__main__":
    sys.exit(main())
