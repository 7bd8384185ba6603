"""``make reproduce``: what counts as up to date, what it prints, how it starts kernels.

Tiny notebooks made with nbformat stand in for the real ones; papermill's ``execute_notebook``
is replaced by a fake that does what a notebook does to its records (``experiment.load_or_run``
with the real ledger), so no kernel starts except in the one test marked slow.
"""
import hashlib
import json
import os
import re
from pathlib import Path

import papermill as pm
import pytest

from test_profiles import make_notebook
from vidret_lib import profiles, reproduce
from vidret_lib.experiment import ledger_path, load_or_run
from vidret_lib.results import read_results, write_results


def make_project(root, monkeypatch, parameters: str):
    """notebooks/01_a (a parameters cell of ``parameters``), notebooks/07_summary, params/default.yaml (empty),
    executed/, all under ``root``, which ``profiles`` and ``reproduce`` then use."""
    make_notebook(root / "notebooks", "01_a", parameters)
    make_notebook(root / "notebooks", "07_summary", 'results_dir: str = "../results"\n')
    (root / "params").mkdir()
    (root / "params" / "default.yaml").write_text("{}\n")
    monkeypatch.setattr(profiles, "NOTEBOOKS_DIR", root / "notebooks")
    monkeypatch.setattr(profiles, "PARAMS_DIR", root / "params")
    monkeypatch.setattr(reproduce, "EXECUTED_DIR", root / "executed")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """notebooks/01_a (owns two records), notebooks/07_summary (reads them), params/, executed/."""
    make_project(tmp_path, monkeypatch, 'scale: float = 1.0\nresults_dir: str = "../results"\n')
    # main() changes the environment its kernels inherit: setenv makes monkeypatch restore it
    monkeypatch.setenv(profiles.SMOKE_ENV, os.environ.get(profiles.SMOKE_ENV, "1"))
    monkeypatch.setenv("VIDRET_PROGRESS", os.environ.get("VIDRET_PROGRESS", "0"))
    return tmp_path


class FakeNotebooks:
    """``papermill.execute_notebook`` stand-in: 01_a computes records x and y with ``load_or_run``
    (``computed`` counts each computation), 07_summary reads them; both write an executed copy."""

    def __init__(self, names=("x", "y")):
        self.executed, self.computed, self.table, self.names = [], [], {}, names

    def __call__(self, src, out, parameters, cwd, **kw):
        stem = Path(src).stem
        self.executed.append(stem)
        self.kwargs = kw
        results = Path(cwd) / parameters.get("results_dir", "../results")
        if stem == "01_a":
            scale = parameters.get("scale", 1.0)
            for name in self.names:
                load_or_run(results, stem, name, {"scale": scale}, {}, seed=0,
                            compute=lambda name=name: self.computed.append(name) or {"R1": 10.0 * scale})
        else:
            self.table = {p.stem: read_results(p)["metrics"]["R1"] for p in sorted((results / "01_a").glob("*.json"))}
        Path(out).write_text(json.dumps({"cells": [], "stem": stem, "padding": "." * 2000}))


def run(capsys, *args):
    """``reproduce.main(args)``; returns {notebook: status} from its one line per notebook."""
    assert reproduce.main(["--profile", "default", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    status = dict(re.fullmatch(r"\[default\] (\S+): (.+), \d+ s", line).groups() for line in lines[:-1])
    assert len(status) == len(lines) - 1 and re.fullmatch(r"\[default\] \d+ notebooks done in \d+ s", lines[-1])
    return status


def test_any_changed_output_or_input_makes_its_notebook_run_again(project, monkeypatch, capsys):
    fake = FakeNotebooks()
    monkeypatch.setattr(pm, "execute_notebook", fake)
    record = project / "results" / "01_a" / "x.json"
    assert run(capsys) == {"01_a": "ran (never ran)", "07_summary": "ran (never ran)"}
    assert fake.computed == ["x", "y"] and fake.table == {"x": 10.0, "y": 10.0}
    assert run(capsys) == {"01_a": "up to date", "07_summary": "up to date"} and len(fake.executed) == 2

    # a results record edited by hand: the owner runs, recomputes that record only, and the table is right
    forged = read_results(record)
    forged["metrics"]["R1"] = 99.9
    record.write_text(json.dumps(forged))
    status = run(capsys)
    assert status["01_a"] == "ran (its record 01_a/x.json changed)" and fake.computed[2:] == ["x"]
    assert fake.table == {"x": 10.0, "y": 10.0} and read_results(record)["metrics"]["R1"] == 10.0

    # a deleted record
    (project / "results" / "01_a" / "y.json").unlink()
    status = run(capsys)
    assert status["01_a"] == "ran (its record 01_a/y.json missing)" and fake.computed[3:] == ["y"]
    assert fake.table == {"x": 10.0, "y": 10.0}

    # the executed notebook truncated
    executed = project / "executed" / "default" / "01_a.ipynb"
    executed.write_bytes(executed.read_bytes()[:1000])
    assert run(capsys)["01_a"] == "ran (executed notebook changed)" and len(fake.computed) == 4, "records reused"

    # another profile writes its own (NaN) record with its own ledger into the same folder
    write_results(record, "x", {"R1": float("nan")}, {"scale": 5.0}, seed=0)
    ledger_path(record).write_text(hashlib.sha256(record.read_bytes()).hexdigest())
    assert run(capsys)["01_a"] == "ran (its record 01_a/x.json changed)" and fake.computed[4:] == ["x"]
    assert fake.table == {"x": 10.0, "y": 10.0}
    assert run(capsys) == {"01_a": "up to date", "07_summary": "up to date"}

    # a partial run changes 01's records: the summary notebook is stale, then runs
    (project / "params" / "default.yaml").write_text("01_a:\n  scale: 2\n")
    assert run(capsys, "--only", "01") == {"01_a": "ran (notebook, parameters or library changed)"}
    assert fake.table == {"x": 10.0, "y": 10.0}, "07 did not run yet"
    assert run(capsys) == {"01_a": "up to date", "07_summary": "ran (input record 01_a/x.json changed)"}
    assert fake.table == {"x": 20.0, "y": 20.0}
    assert run(capsys, "--force") == {"01_a": "ran (forced)", "07_summary": "ran (forced)"}


def test_a_record_the_notebook_no_longer_makes_is_removed_and_not_summarised(project, monkeypatch, capsys):
    fake = FakeNotebooks()
    monkeypatch.setattr(pm, "execute_notebook", fake)
    run(capsys)
    assert fake.table == {"x": 10.0, "y": 10.0}
    fake.names = ("x",)  # the notebook's new version drops variant y
    assert reproduce.main(["--profile", "default", "--force"]) == 0
    out = capsys.readouterr().out
    assert "01_a: removed 1 results file(s) this run neither wrote nor reused" in out and out.count("y.json") == 1
    records = project / "results" / "01_a"
    assert sorted(p.name for p in records.glob("*.json")) == ["x.json"] and not ledger_path(records / "y.json").exists()
    assert fake.computed == ["x", "y"], "x was reused, not recomputed"
    assert fake.table == {"x": 10.0}, "07 reads only what 01_a's last run made"
    assert run(capsys) == {"01_a": "up to date", "07_summary": "up to date"}


def test_kernels_use_ipc_and_a_failing_cell_is_named(project, monkeypatch, capsys):
    fake = FakeNotebooks()
    monkeypatch.setattr(pm, "execute_notebook", fake)
    run(capsys)
    assert fake.kwargs["config"]["KernelManager"]["transport"] == "ipc"
    assert fake.kwargs["progress_bar"]["disable"] is True, "no progress bar when stderr is not a terminal"

    def fail(src, out, **kw):
        raise pm.PapermillExecutionError(5, 7, "x = 1 / 0", "ZeroDivisionError", "division by zero", [])

    monkeypatch.setattr(pm, "execute_notebook", fail)
    (project / "params" / "default.yaml").write_text("01_a:\n  scale: 3.0\n")
    with pytest.raises(SystemExit, match=r"01_a\.ipynb failed in cell 5 \(execution count 7\): ZeroDivisionError"):
        reproduce.main(["--profile", "default"])
    assert not (project / "executed" / "default" / "01_a.stamp").exists(), "a failed notebook must not look up to date"


def test_cuda_rules_reach_the_kernels_and_a_run_under_them_is_another_check(project, monkeypatch, capsys):
    fake = FakeNotebooks()
    seen = []
    monkeypatch.setattr(pm, "execute_notebook", lambda *a, **kw: seen.append(os.environ.get(profiles.CUDA_RULES_ENV))
                        or fake(*a, **kw))
    monkeypatch.delenv(profiles.CUDA_RULES_ENV, raising=False)
    assert run(capsys) == {"01_a": "ran (never ran)", "07_summary": "ran (never ran)"} and seen == [None, None]
    monkeypatch.setenv(profiles.CUDA_RULES_ENV, "")  # main() sets it: monkeypatch restores it after the test
    changed = "ran (notebook, parameters or library changed)"
    assert run(capsys, "--cuda-rules", "1") == {"01_a": changed, "07_summary": changed} and seen[2:] == ["1", "1"]
    assert run(capsys, "--cuda-rules", "1") == {"01_a": "up to date", "07_summary": "up to date"}
    with pytest.raises(SystemExit):
        reproduce.main(["--profile", "default", "--cuda-rules", "-1"])


def test_prepare_runs_before_any_notebook_and_its_environment_reaches_the_kernels(project, monkeypatch, capsys):
    (project / "prep_for_test.py").write_text(
        "import os\nCALLS = []\n\ndef prepare():\n    CALLS.append(os.environ.get('SEEN_BY_KERNEL'))\n"
        "    return {'SEEN_BY_KERNEL': 'prepared'}\n")
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.setenv("SEEN_BY_KERNEL", "")
    (project / "params" / "default.yaml").write_text("prepare: prep_for_test\n")
    seen = []
    monkeypatch.setattr(pm, "execute_notebook", lambda src, out, **kw: seen.append(os.environ["SEEN_BY_KERNEL"])
                        or Path(out).write_text("{}"))
    assert reproduce.main(["--profile", "default"]) == 0
    import prep_for_test

    assert prep_for_test.CALLS == [""] and seen == ["prepared", "prepared"]
    assert capsys.readouterr().out.startswith("[default] prepared by prep_for_test: {'SEEN_BY_KERNEL': 'prepared'}")
    (project / "params" / "default.yaml").write_text("prepare: no_such_module_here\n")
    with pytest.raises(SystemExit, match=r"prepare: no_such_module_here, which cannot be imported .*params/default\.yaml"):
        reproduce.main(["--profile", "default"])


@pytest.mark.slow
def test_a_real_kernel_prints_no_transport_warning(project, capfd):
    (project / "params" / "default.yaml").write_text("01_a:\n  scale: 2.5\n")
    assert reproduce.run_notebook(profiles.NOTEBOOKS_DIR / "07_summary.ipynb", "default").startswith("ran")
    captured = capfd.readouterr()
    assert "without encryption" not in captured.out + captured.err, captured.err
    cells = json.loads((project / "executed" / "default" / "07_summary.ipynb").read_text())["cells"]
    assert "".join(cells[-1]["outputs"][0]["text"]) == "ran\n"


def test_the_test_session_stays_on_the_smoke_profile():
    # runs after the reproduce tests above: nbval's notebooks read this variable from the environment
    assert os.environ.get(profiles.SMOKE_ENV) == "1"
