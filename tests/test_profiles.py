"""Profiles, the notebooks' parameters cells, and committed notebooks without outputs."""
import ast
import json
import os
from pathlib import Path

import pytest
import yaml

from vidret_lib import profiles
from vidret_lib.reproduce import notebook_paths

NOTEBOOKS = notebook_paths()


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _parameters_cell(path):
    tagged = [c for c in _cells(path) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    return "".join(tagged[0]["source"])


def _parameter_values(path):
    values = {}
    for node in ast.parse(_parameters_cell(path)).body:
        assert isinstance(node, (ast.Assign, ast.AnnAssign)), f"{path.name}: only assignments in parameters"
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        values[target.id] = ast.literal_eval(node.value)  # raises unless a literal
    return values


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    dirty = [i for i, c in enumerate(_cells(path)) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name} carries outputs in cells {dirty}: clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_is_typed_literals(path):
    assert _parameter_values(path)


@pytest.mark.parametrize("profile", profiles.profile_names())
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_profiles_name_only_known_parameters_with_matching_types(profile, path):
    known = _parameter_values(path)
    overrides = profiles.profile_params(profile, path.stem)
    profiles.check_names(overrides, set(known), path.name)
    for name, value in overrides.items():
        assert type(value) is type(known[name]), f"{profile}.yaml sets {path.stem}.{name} to a {type(value).__name__}"


def test_unknown_parameter_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump({"common": {"epochs": 1}, "nb": {"typo_lr": 1.0}}))
    monkeypatch.setattr(profiles, "PARAMS_DIR", tmp_path)
    monkeypatch.setenv(profiles.SMOKE_ENV, "1")
    ns = {"epochs": 5, "lr": 1e-4}
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['typo_lr'\]"):
        profiles.apply_smoke(ns, "nb")
    assert ns == {"epochs": 5, "lr": 1e-4}, "nothing may be applied when a name is wrong"
    ns = {"epochs": 5, "typo_lr": 0.0}
    assert profiles.apply_smoke(ns, "nb") and ns == {"epochs": 1, "typo_lr": 1.0}
    monkeypatch.setenv(profiles.SMOKE_ENV, "0")
    assert not profiles.apply_smoke(ns, "other")


def test_missing_profile_is_named():
    with pytest.raises(FileNotFoundError, match="no profile 'nope'"):
        profiles.profile_params("nope", "01_x")


def test_reproduce_checks_every_notebook_before_running_any(tmp_path, monkeypatch):
    from vidret_lib import reproduce

    # main() sets the environment its notebook kernels inherit (it drops VIDRET_SMOKE): setenv makes
    # monkeypatch restore both variables, or every later nbval notebook would run at full size
    monkeypatch.setenv(profiles.SMOKE_ENV, os.environ.get(profiles.SMOKE_ENV, "1"))
    monkeypatch.setenv("VIDRET_PROGRESS", os.environ.get("VIDRET_PROGRESS", "0"))
    last = NOTEBOOKS[-1].stem
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({last: {"typo_lr": 1.0}}))
    monkeypatch.setattr(profiles, "PARAMS_DIR", tmp_path)
    ran = []
    monkeypatch.setattr(reproduce, "run_notebook", lambda path, *a: ran.append(path) or "ran")
    with pytest.raises(SystemExit, match=rf"unknown parameter\(s\) \['typo_lr'\] for notebook {last}"):
        reproduce.main(["--profile", "bad"])
    assert ran == [], "a typo in the last notebook's parameters must stop the run before the first notebook"
    (tmp_path / "good.yaml").write_text(yaml.safe_dump({}))
    assert reproduce.main(["--profile", "good"]) == 0 and ran == NOTEBOOKS


def test_run_notebook_skips_up_to_date_work_and_names_the_failing_cell(tmp_path, monkeypatch):
    import papermill as pm

    from vidret_lib import reproduce

    monkeypatch.setattr(reproduce, "EXECUTED_DIR", tmp_path)
    calls = []

    def execute(src, out, **kw):
        calls.append(kw["parameters"])
        Path(out).write_text("{}")

    monkeypatch.setattr(pm, "execute_notebook", execute)
    nb = NOTEBOOKS[-1]
    assert reproduce.run_notebook(nb, "default") == "ran"
    assert reproduce.run_notebook(nb, "default") == "up to date" and len(calls) == 1
    assert reproduce.run_notebook(nb, "smoke") == "ran" and len(calls) == 2, "another profile is other work"
    stamp = tmp_path / "default" / nb.with_suffix(".stamp").name
    stamp.write_text("stale")  # as after an edit of the notebook or the library
    assert reproduce.run_notebook(nb, "default") == "ran" and len(calls) == 3
    assert reproduce.run_notebook(nb, "default", force=True) == "ran" and len(calls) == 4

    def fail(src, out, **kw):
        raise pm.PapermillExecutionError(5, 7, "x = 1 / 0", "ZeroDivisionError", "division by zero", [])

    monkeypatch.setattr(pm, "execute_notebook", fail)
    stamp.write_text("stale")
    with pytest.raises(SystemExit, match=r"failed in cell 5 \(execution count 7\): ZeroDivisionError: division by zero"):
        reproduce.run_notebook(nb, "default")
    assert not stamp.exists(), "a failed notebook must not look up to date"


def test_the_test_session_stays_on_the_smoke_profile():
    # runs after the reproduce tests above: nbval's notebooks read this variable from the environment
    assert os.environ.get(profiles.SMOKE_ENV) == "1"
