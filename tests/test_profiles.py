"""Profiles, the notebooks' parameters cells, and committed notebooks without outputs."""
import ast
import json

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
