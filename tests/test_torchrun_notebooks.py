"""Every notebook under ``torchrun --nproc_per_node 2`` on the CPU, under CUDA's device rules (issue 11, item 5).

Fast tests run 2 forked processes over gloo (loopback), each with torchrun's environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_PORT``):

- ``load_or_run``: every rank takes rank 0's reuse decision (their configs differ by device), only rank 0
  writes records, ledgers, direct ``write_results`` and figures, and every rank returns (or reads) rank 0's
  record once it is on disk;
- ``reproduce.main``: rank 0 decides which notebook runs, each notebook gets one port for all ranks and
  another than the previous notebook's, each rank's ``device`` is ``cuda:<LOCAL_RANK>``, rank 1's executed
  copies go to ``executed/<profile>.rank1/`` without stamps.

Slow tests run torchrun itself: a rank that fails stops the other (no hang), and the MSR-VTT dress
rehearsal (``params/msrvtt-rehearsal.yaml``) runs all 8 notebooks on 2 ranks in a copy of the project.
"""
import io
import json
import os
import re
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import papermill as pm
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import LOOPBACK_ENV, free_port
from test_rehearsal import _copy_project
from test_reproduce import FakeNotebooks, make_project

from vidret_lib import plots, profiles, reproduce
from vidret_lib.experiment import ledger_path, load_or_run
from vidret_lib.results import read_results, write_results

WORLD = 2
PROFILE = "msrvtt-rehearsal"


def torchrun_env(rank: int, port: int) -> dict[str, str]:
    """What torchrun exports to worker ``rank`` of a ``WORLD``-process run on this host."""
    return {**LOOPBACK_ENV, "WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "MASTER_PORT": str(port)}


def spawn(fn, *args, timeout: float = 120):
    """Run ``fn(rank, *args)`` in ``WORLD`` forked processes; fail (not hang) if they wait on each other."""
    context = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__}: the ranks did not finish within {timeout} s (one waits for the other)")


def _records_worker(rank, folder, out, port):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.environ.update(torchrun_env(rank, port))
    computed = []
    config = {"device": f"cuda:{rank}"}  # what differs between ranks: rank 1's own device
    got = {name: load_or_run(folder, "nb", name, config, {}, seed=0,
                             compute=lambda name=name: computed.append(name) or {"rank": rank})["metrics"]
           for name in ("old", "new")}
    if rank == 0:
        time.sleep(1)  # rank 1 reaches the cell first: it must wait for rank 0's file, not find nothing
    direct = write_results(Path(folder) / "direct" / "shared.json", "direct", {"rank": rank}, {}, seed=0)
    got["direct"] = read_results(direct)["metrics"]  # what notebook 00 does next
    plots.save(plt.figure(), Path(folder) / "figures", f"rank{rank}")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"computed": computed, **got}))
    if dist.is_initialized():  # load_or_run joined torchrun's group
        dist.destroy_process_group()


def test_records_follow_rank_0s_decision_and_only_rank_0_writes(tmp_path):
    folder, out = tmp_path / "results", tmp_path / "out"
    out.mkdir()
    # "old" was computed earlier by one process with rank 0's config: rank 1's config differs (cuda:1)
    load_or_run(folder, "nb", "old", {"device": "cuda:0"}, {}, seed=0, compute=lambda: {"rank": "single"})
    old_bytes = (folder / "nb" / "old.json").read_bytes()
    spawn(_records_worker, str(folder), str(out), free_port())
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, got in enumerate(ranks):
        assert got["computed"] == ["new"], f"rank {rank} did not follow rank 0's reuse decision"
        assert got["old"] == {"rank": "single"} and got["new"] == got["direct"] == {"rank": 0}, (rank, got)
    assert (folder / "nb" / "old.json").read_bytes() == old_bytes
    record = folder / "nb" / "new.json"
    assert read_results(record)["config"] == {"device": "cuda:0"}
    assert ledger_path(record).is_file()
    assert sorted(p.name for p in (folder / "direct").iterdir()) == ["shared.json"]
    assert sorted(p.name for p in (folder / "figures").iterdir()) == ["rank0.png"]


@pytest.fixture
def cuda_project(tmp_path, monkeypatch):
    """notebooks/01_a (device "cuda", owns records x and y), notebooks/07_summary (reads them), params/."""
    make_project(tmp_path, monkeypatch, 'scale: float = 1.0\ndevice: str = "cuda"\nresults_dir: str = "../results"\n')
    for name in (profiles.SMOKE_ENV, profiles.CUDA_RULES_ENV, "VIDRET_PROGRESS"):  # main() sets them
        monkeypatch.setenv(name, os.environ.get(name, ""))
    return tmp_path


def _reproduce_worker(rank, out, port):
    os.environ.update(torchrun_env(rank, port), TORCHELASTIC_USE_AGENT_STORE="not for the kernels")
    fake, kernels = FakeNotebooks(), []

    def execute(src, dest, parameters, cwd, **kw):
        kernels.append({"stem": Path(src).stem, "dest": dest, "device": parameters.get("device"),
                        "port": os.environ["MASTER_PORT"], "agent": os.environ.get("TORCHELASTIC_USE_AGENT_STORE")})
        fake(src, dest, parameters, cwd, **kw)

    pm.execute_notebook = execute
    printed = io.StringIO()
    with redirect_stdout(printed):
        for _ in range(2):  # the second run finds everything up to date, on both ranks
            reproduce.main(["--profile", "default"])
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"kernels": kernels, "computed": fake.computed, "printed": printed.getvalue()}))


def test_reproduce_under_torchrun_shares_rank_0s_decisions_ports_and_writes_once(cuda_project):
    out = cuda_project / "out"
    out.mkdir()
    port = free_port()
    spawn(_reproduce_worker, str(out), port)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, got in enumerate(ranks):
        assert [k["stem"] for k in got["kernels"]] == ["01_a", "07_summary"], (rank, got["printed"])
        assert got["kernels"][0]["device"] == f"cuda:{rank}"
        assert all(k["agent"] is None for k in got["kernels"]), "the kernels host their own store"
        folder = cuda_project / "executed" / ("default" if rank == 0 else "default.rank1")
        assert [Path(k["dest"]).parent for k in got["kernels"]] == [folder, folder]
        assert got["computed"] == ["x", "y"]  # every rank computes (training needs all), rank 0 writes
        tag = "[default]" if rank == 0 else "[default rank 1]"
        assert got["printed"].count(f"{tag} 01_a: ran (never ran)") == 1
        assert got["printed"].count(f"{tag} 01_a: up to date") == 1, got["printed"]
    ports = [[k["port"] for k in got["kernels"]] for got in ranks]
    assert ports[0] == ports[1] and len({*ports[0], str(port)}) == 3, ports
    assert sorted(p.name for p in (cuda_project / "executed" / "default.rank1").iterdir()) == [
        "01_a.ipynb", "07_summary.ipynb"]  # no stamps: rank 1's copies decide nothing
    assert sorted(p.name for p in (cuda_project / "executed" / "default").glob("*.stamp")) == [
        "01_a.stamp", "07_summary.stamp"]
    assert json.loads((cuda_project / "executed" / "default" / "01_a.stamp").read_text())["owns"].keys() == {
        "01_a/x.json", "01_a/y.json"}


FAILING_RANK = """
import os, torch.distributed as dist
from vidret_lib.experiment import load_or_run

def compute():
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails in its computation")
    dist.barrier()  # rank 0 waits for rank 1 in a collective, as in a training step
    return {{}}

load_or_run({folder!r}, "nb", "r", {{}}, {{}}, compute=compute, seed=0)
"""


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), *args]


@pytest.mark.slow
def test_a_failing_rank_stops_the_other_instead_of_hanging(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANK.format(folder=str(tmp_path / "results")))
    env = {**os.environ, **LOOPBACK_ENV, "VIDRET_PROGRESS": "0"}
    start = time.monotonic()
    run = subprocess.run(torchrun(str(script)), env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode != 0 and "rank 1 fails in its computation" in run.stderr, run.stderr[-3000:]
    assert time.monotonic() - start < 120
    assert not (tmp_path / "results" / "nb" / "r.json").exists()


def _outputs(notebook: Path) -> str:
    """The text every code cell of an executed notebook printed."""
    cells = json.loads(notebook.read_text())["cells"]
    return "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))


def _injected(notebook: Path) -> str:
    """The source of the parameters papermill injected into an executed notebook."""
    cells = json.loads(notebook.read_text())["cells"]
    return "".join("".join(c["source"]) for c in cells if "injected-parameters" in c["metadata"].get("tags", []))


@pytest.mark.slow
def test_msrvtt_rehearsal_on_two_ranks_under_cuda_device_rules(tmp_path):
    root = _copy_project(tmp_path)
    env = {**os.environ, **LOOPBACK_ENV, "PYTHONPATH": str(root), "VIDRET_PROGRESS": "0"}
    env.pop(profiles.CUDA_RULES_ENV, None)
    run = subprocess.run(torchrun("-m", "vidret_lib.reproduce", "--profile", PROFILE, "--cuda-rules", str(WORLD)),
                         cwd=root, env=env, capture_output=True, text=True, timeout=2400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    stems = [p.stem for p in profiles.notebook_paths()]
    executed, scratch = root / "executed" / PROFILE, root / "executed" / f"{PROFILE}.rank1"
    for stem in stems:
        for tag in (f"[{PROFILE}]", f"[{PROFILE} rank 1]"):
            assert f"{tag} {stem}: ran (never ran)" in run.stdout, run.stdout
        assert (executed / f"{stem}.ipynb").is_file() and (executed / f"{stem}.stamp").is_file()
        assert (scratch / f"{stem}.ipynb").is_file()
        # each rank's data and models were on its own device from the first cell (papermill's injected cell)
        for folder, rank in ((executed, 0), (scratch, 1)):
            if "device" in profiles.notebook_parameters(root / "notebooks" / f"{stem}.ipynb"):
                assert f'device = "cuda:{rank}"' in _injected(folder / f"{stem}.ipynb"), (stem, rank)
    assert not list(scratch.glob("*.stamp"))
    results = root / "runs" / PROFILE / "results"
    for stem in stems[:-1]:  # 07_summary writes figures only
        records = sorted((results / stem).glob("*.json"))
        assert records, f"{stem} wrote no results under {results / stem}"
        for path in records:  # written by rank 0 alone: rank 0's device (or the CPU that cell chose)
            device = json.loads(path.read_text())["config"].get("device", "cuda:0")
            assert device in ("cuda:0", "cpu"), (path, device)
    assert sorted((root / "runs" / PROFILE / "figures").glob("07_*.png"))
    # frames and features produced once: one rank's log says it filled each cache folder, the other's does not
    # (a split's line: its counts and folder; the splits of one encoder share a video-features folder)
    filled = re.compile(r"(?:features: encoding \d+ of \d+ \w+|frame cache \S+: decoding \d+ new videos) into \S+")
    logs = {rank: "".join(_outputs(p) for p in sorted(folder.glob("*.ipynb")))
            for rank, folder in ((0, executed), (1, scratch))}
    fills = [m for log in logs.values() for m in filled.findall(log)]
    assert fills and len(fills) == len(set(fills)), sorted(fills)
