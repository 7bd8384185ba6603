"""Profiles, the notebooks' parameters cells, and committed notebooks without outputs.

Bad profiles are built here, in a temporary params folder, against tiny notebooks made with
nbformat (``profiles.PARAMS_DIR`` / ``profiles.NOTEBOOKS_DIR`` monkeypatched).
"""
import json
import os
import re

import nbformat
import pytest
import yaml

from vidret_lib import profiles, reproduce

NOTEBOOKS = profiles.notebook_paths()


def make_notebook(folder, stem, parameters):
    """A notebook ``folder/stem.ipynb`` whose tagged parameters cell is ``parameters`` (source)."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("print('ran')")]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / f"{stem}.ipynb")
    return folder / f"{stem}.ipynb"


TRAINING = """lr: float = 0.0005
epochs: int = 20
seeds: list[int] = [0, 1, 2]
title: str = "title"
shuffle: bool = False
sizes: list = [1, "a"]
msrvtt_source: str = ""
results_dir: str = "../results"
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A params folder and two tiny notebooks: 02_vsepp (trains) and 07_summary (results_dir only)."""
    make_notebook(tmp_path / "notebooks", "02_vsepp", TRAINING)
    make_notebook(tmp_path / "notebooks", "07_summary", 'results_dir: str = "../results"\n')
    (tmp_path / "params").mkdir()
    monkeypatch.setattr(profiles, "NOTEBOOKS_DIR", tmp_path / "notebooks")
    monkeypatch.setattr(profiles, "PARAMS_DIR", tmp_path / "params")
    # reproduce.main changes the environment its kernels inherit (drops VIDRET_SMOKE): setenv makes
    # monkeypatch restore both variables, or every later nbval notebook would run at full size
    monkeypatch.setenv(profiles.SMOKE_ENV, os.environ.get(profiles.SMOKE_ENV, "1"))
    monkeypatch.setenv("VIDRET_PROGRESS", os.environ.get("VIDRET_PROGRESS", "0"))
    return tmp_path / "params"


def _cells(path):
    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    dirty = [i for i, c in enumerate(_cells(path)) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name} carries outputs in cells {dirty}: clear them before committing"


def test_parameters_cells_read_as_papermill_reads_them():
    import ast

    import papermill as pm

    for path in NOTEBOOKS:
        ours = profiles.notebook_parameters(path)
        theirs = pm.inspect_notebook(str(path))
        assert ours == {n: {"annotation": p["inferred_type_name"], "default": ast.literal_eval(p["default"])}
                        for n, p in theirs.items()}, path.name


def test_every_parameter_is_annotated_and_its_default_fits(tmp_path, monkeypatch):
    # a profile that sets every parameter of every notebook to its own default must pass the check
    notebooks = {p.stem: profiles.notebook_parameters(p) for p in NOTEBOOKS}
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(
        {stem: {n: p["default"] for n, p in params.items()} for stem, params in notebooks.items()}))
    monkeypatch.setattr(profiles, "PARAMS_DIR", tmp_path)
    got = profiles.profile_overrides("all", notebooks)
    assert got == {stem: {n: p["default"] for n, p in params.items()} for stem, params in notebooks.items()}
    lists = {p["annotation"] for params in notebooks.values() for p in params.values() if isinstance(p["default"], list)}
    assert lists <= {"list[int]", "list[float]"}, "list parameters name their element type"


@pytest.mark.parametrize("profile", profiles.profile_names())
def test_committed_profiles_pass_the_check(profile):
    overrides = profiles.profile_overrides(profile)
    assert set(overrides) == {p.stem for p in NOTEBOOKS}
    if profile == "msrvtt-frozen":  # OpenAI weights need the QuickGELU model; the source is set once
        assert {o["encoder"] for s, o in overrides.items() if "encoder" in o} == {"ViT-B-32-quickgelu"}
        assert "msrvtt_source" in yaml.safe_load(profiles.read_profile(profile)[0].read_text())["common"]


def test_msrvtt_gpu_is_an_alias_of_msrvtt_e2e_and_the_rehearsal_changes_only_sizes_and_places():
    e2e = profiles.profile_overrides("msrvtt-e2e")
    assert profiles.profile_overrides("msrvtt-gpu") == e2e
    rehearsal = profiles.profile_overrides("msrvtt-rehearsal")
    assert profiles.profile_settings("msrvtt-rehearsal") == {"prepare": "data_prep.rehearsal"}
    same = ("dataset", "device", "train_split", "val_split", "test_split", "title_source", "lr", "mode", "precision",
            "freeze_layer_num", "sampling", "false_negatives", "learned_logit_scale", "context_length")
    for stem, values in e2e.items():
        assert {k: v for k, v in rehearsal[stem].items() if k in same} == {k: v for k, v in values.items() if k in same}
        assert all(str(v).startswith("../runs/msrvtt-rehearsal/") for k, v in rehearsal[stem].items()
                   if k in ("msrvtt_source", "data_dir", "cache_dir", "results_dir", "figures_dir", "pretrained")), \
            rehearsal[stem]


def test_extends_merges_sections_key_by_key_and_inherits_settings(tiny):
    (tiny / "base.yaml").write_text("prepare: some.module\ncommon:\n  results_dir: ../base\n"
                                    "02_vsepp:\n  lr: 0.5\n  epochs: 3\n")
    (tiny / "mid.yaml").write_text("extends: base\n02_vsepp:\n  epochs: 1\n")
    (tiny / "top.yaml").write_text("extends: mid\ncommon:\n  msrvtt_source: /m\n")
    assert profiles.profile_overrides("top") == {
        "02_vsepp": {"results_dir": "../base", "msrvtt_source": "/m", "lr": 0.5, "epochs": 1},
        "07_summary": {"results_dir": "../base"},
    }
    assert profiles.profile_settings("top") == profiles.profile_settings("base") == {"prepare": "some.module"}
    assert profiles.profile_settings("mid") == {"prepare": "some.module"}


BAD_EXTENDS = {  # files -> what the one-line error must say
    (("a.yaml", "extends: b\n"), ("b.yaml", "extends: a\n")): r"b\.yaml: extends 'a', which extends back to 'b' \(a -> b -> a\)",
    (("a.yaml", "extends: a\n"),): r"extends 'a', which extends back to 'a'",
    (("a.yaml", "extends: nope\n"),): r"a\.yaml: extends 'nope', but .*nope\.yaml is absent",
    (("a.yaml", "extends: [b]\n"),): r"a\.yaml: extends must name a profile, not \['b'\]",
    (("a.yaml", "prepare:\n"),): r"a\.yaml: prepare must name a module, not None",
}


@pytest.mark.parametrize("files", BAD_EXTENDS, ids=lambda f: "|".join(t.strip() for _, t in f))
def test_bad_extends_or_prepare_is_a_one_line_error(tiny, files):
    for name, text in files:
        (tiny / name).write_text(text)
    with pytest.raises(profiles.ProfileError, match=BAD_EXTENDS[files]) as err:
        profiles.profile_overrides("a")
    assert "\n" not in str(err.value)


def _kernel_env(code, **env):
    """Run ``code`` after ``apply_smoke`` in a fresh Python (as a notebook kernel would), with ``env`` set."""
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k not in (profiles.CUDA_RULES_ENV, profiles.OPEN_CLIP_CONFIGS_ENV)}
    script = f"from vidret_lib import profiles\nprofiles.apply_smoke({{}}, '07_summary')\n{code}"
    return subprocess.run([sys.executable, "-c", script], env={**environment, "VIDRET_SMOKE": "0", **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_kernel_environment_enters_cuda_rules_and_registers_model_configs(tmp_path):
    code = ("import torch\nx = torch.ones(2).to('cuda')\nprint(x.device, torch.cuda.is_available())\n"
            "import open_clip\nprint('Tiny-X' in open_clip.list_models())\ntorch.ones(2) + x\n")
    (tmp_path / "Tiny-X.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}))
    run = _kernel_env(code, VIDRET_CUDA_RULES="1", VIDRET_OPEN_CLIP_CONFIGS=str(tmp_path / "Tiny-X.json"))
    assert run.stdout.splitlines() == ["cuda:0 True", "True"], run.stderr
    assert "RuntimeError: Expected all tensors to be on the same device" in run.stderr
    modes = "import torch\nprint(len(torch.overrides._get_current_function_mode_stack()))\n"
    assert _kernel_env(modes, VIDRET_CUDA_RULES="0").stdout == "0\n"  # 0 or unset: no rules
    assert _kernel_env(modes, VIDRET_CUDA_RULES="2").stdout == "1\n"


@pytest.mark.parametrize("env, error", [
    ({"VIDRET_CUDA_RULES": "yes"}, r"VIDRET_CUDA_RULES='yes': give the number of virtual GPUs"),
    ({"VIDRET_OPEN_CLIP_CONFIGS": "/nowhere/Tiny.json"}, r"VIDRET_OPEN_CLIP_CONFIGS: /nowhere/Tiny\.json does not exist"),
])
def test_bad_kernel_environment_is_named(monkeypatch, env, error):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        profiles.apply_smoke({}, "07_summary")


def test_common_applies_where_defined_and_anchor_sections_are_not_notebooks(tiny):
    (tiny / "p.yaml").write_text(
        "common:\n  msrvtt_source: /data/msrvtt\n  results_dir: ../r\n"
        "x-training: &training\n  lr: 1\n  seeds: [7]\n"
        "02_vsepp:\n  <<: *training\n  shuffle: true\n  sizes: [2, b]\n")
    assert profiles.profile_overrides("p") == {
        "02_vsepp": {"msrvtt_source": "/data/msrvtt", "results_dir": "../r", "lr": 1, "seeds": [7],
                     "shuffle": True, "sizes": [2, "b"]},
        "07_summary": {"results_dir": "../r"},  # 07 defines no msrvtt_source: common skips it there
    }


BAD_PROFILES = {  # YAML text -> what the one-line error must say (after naming the file)
    "02_vsepp:\n  lr: 1e-4\n": r"02_vsepp\.lr = '1e-4' .*`lr: float`.*YAML 1\.1 reads 1e-4 as text: write 1\.0e-4",
    "02_vsepp:\n  lr: 3.0e4\n": r"write 3\.0e\+4",
    "02_vsepp:\n  lr: '0.001'\n": r"02_vsepp\.lr = '0\.001'.*remove the quotes: write 0\.001",
    "02_vsepp:\n  lr: fast\n": r"lr = 'fast'.*write a number",
    "02_vsepp:\n  lr: true\n": r"YAML read a boolean, not a number",
    "02_vsepp:\n  lr:\n": r"lr = None.*give it a value",
    "02_vsepp:\n  epochs: '2'\n": r"epochs = '2' .*`epochs: int`.*remove the quotes: write 2",
    "02_vsepp:\n  epochs: 2.0\n": r"epochs = 2\.0 .*write 2$",
    "02_vsepp:\n  seeds: []\n": r"seeds = \[\] .*`seeds: list\[int\]`.*empty; give at least one value",
    "02_vsepp:\n  seeds: 0\n": r"seeds = 0 .*not a list; write \[0\]",
    "02_vsepp:\n  seeds: [0, 1.5]\n": r"seeds = \[0, 1\.5\] .*item 1: YAML read a float, not int",
    "02_vsepp:\n  sizes: []\n": r"sizes = \[\] .*empty",
    "02_vsepp:\n  title: no\n": r"title = False .*YAML 1\.1 reads yes/no/on/off/true/false as booleans: quote",
    "02_vsepp:\n  title: 3\n": r"title = 3 .*quote it: '3'",
    "02_vsepp:\n  shuffle: 'yes'\n": r"shuffle = 'yes' .*write true or false",
    "common:\n  epochs: '2'\n": r"common\.epochs = '2' .*notebook 02_vsepp",
    "02_vsepp:\n  lr: [1.0\n": r"invalid YAML at line 3, column 1: .*fix the syntax there",
    "- 02_vsepp\n": r"the top level must map sections .*not a list",
    "common: [1, 2]\n": r"section 'common' must map parameter names to values, not a list \(\[1, 2\]\)",
    "02_vsepp: 5\n": r"section '02_vsepp' must map parameter names",
    "02_vsep:\n  lr: 0.1\n": r"unknown section '02_vsep': did you mean '02_vsepp'\? sections are the notebooks",
    "features:\n  lr: 0.1\n": r"unknown section 'features': sections are .*'x-<name>' for YAML anchors",
    "7: {}\n": r"section 7 is not a name",
    "common:\n  lrr: 0.1\n": r"common sets \['lrr'\], which no notebook defines",
    "02_vsepp:\n  typo_lr: 1.0\n": r"unknown parameter\(s\) \['typo_lr'\] for notebook 02_vsepp",
}


@pytest.mark.parametrize("text", BAD_PROFILES, ids=lambda t: t.replace("\n", "|"))
def test_bad_profile_is_a_one_line_error_naming_file_and_key_before_anything_runs(tiny, text, monkeypatch, capsys):
    (tiny / "bad.yaml").write_text(text)
    ran = []
    monkeypatch.setattr(reproduce, "run_notebook", lambda path, *a: ran.append(path) or "ran")
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--profile", "bad"])
    message = str(exit_info.value.code)
    assert message.startswith(f"reproduce: {tiny / 'bad.yaml'}: ") and "\n" not in message, message
    assert re.search(BAD_PROFILES[text], message), message
    assert ran == [], "a bad value in any notebook's section must stop the run before the first notebook"


def test_smoke_values_are_checked_in_the_notebook_too(tiny, monkeypatch):
    monkeypatch.setenv(profiles.SMOKE_ENV, "1")
    (tiny / "smoke.yaml").write_text("02_vsepp:\n  lr: 1e-4\n")
    ns = {"lr": 0.0005, "epochs": 20}
    with pytest.raises(profiles.ProfileError, match=r"smoke\.yaml: 02_vsepp\.lr = '1e-4' .*write 1\.0e-4"):
        profiles.apply_smoke(ns, "02_vsepp")
    assert ns == {"lr": 0.0005, "epochs": 20}, "nothing may be applied when a value is wrong"
    (tiny / "smoke.yaml").write_text("02_vsepp:\n  typo_lr: 1.0\n")
    with pytest.raises(profiles.ProfileError, match=r"unknown parameter\(s\) \['typo_lr'\]"):
        profiles.apply_smoke(ns, "02_vsepp")
    (tiny / "smoke.yaml").write_text("common:\n  results_dir: ../r\n02_vsepp:\n  epochs: 1\n")
    assert profiles.apply_smoke(ns, "02_vsepp") and ns == {"lr": 0.0005, "epochs": 1, "results_dir": "../r"}
    monkeypatch.setenv(profiles.SMOKE_ENV, "0")
    assert not profiles.apply_smoke(ns, "07_summary")


def test_missing_profile_is_named():
    with pytest.raises(FileNotFoundError, match="no profile 'nope'"):
        profiles.profile_params("nope", "01_x")


def test_parameters_cell_must_hold_literals(tiny):
    bad = make_notebook(profiles.NOTEBOOKS_DIR, "03_x", "import os\nlr: float = 0.1\n")
    with pytest.raises(profiles.ProfileError, match=r"03_x\.ipynb: the parameters cell may only hold .*`import os`"):
        profiles.notebook_parameters(bad)
    bad = make_notebook(profiles.NOTEBOOKS_DIR, "03_x", "lr: float = 1 / 10\n")
    with pytest.raises(profiles.ProfileError, match=r"lr = 1 / 10 is not a literal"):
        profiles.notebook_parameters(bad)


def test_the_test_session_stays_on_the_smoke_profile():
    # reproduce.main drops VIDRET_SMOKE from the environment; nbval's notebooks read it
    assert os.environ.get(profiles.SMOKE_ENV) == "1"
