"""Parameter profiles for the notebooks: ``params/<profile>.yaml``.

A profile file is a YAML mapping of sections to parameter overrides:

- a notebook stem (``01_clip4clip``): overrides for that notebook;
- ``common``: overrides for every notebook that defines the parameter (``msrvtt_source`` is set
  once for the whole profile); a ``common`` name that *no* notebook defines is an error;
- ``x-<name>``: not a notebook, a holder of YAML anchors (``x-training: &training``) that notebook
  sections merge (``<<: *training``), like docker-compose's extension fields.

Two top-level keys are settings of the profile, not sections (:data:`SETTINGS`):

- ``extends: <profile>``: start from that profile's sections and settings; a section here
  replaces the values it names and keeps the others (``msrvtt-gpu`` is ``extends: msrvtt-frozen``
  and nothing else: an alias). Chains are followed; a cycle is an error;
- ``prepare: <module>``: ``reproduce`` imports it and calls its ``prepare()`` before any notebook
  runs; it builds what the profile's paths point at and returns environment variables for the
  notebook kernels (``data_prep.rehearsal`` for ``msrvtt-rehearsal``).

The ``default`` profile is the notebooks' own parameters cells (its file is empty), ``smoke``
makes everything tiny for tests, ``msrvtt-frozen`` is MSR-VTT with CLIP ViT-B/32 on cached
features (``msrvtt-gpu`` is its alias), ``msrvtt-rehearsal`` is ``msrvtt-frozen`` at tiny size on a
mini MSR-VTT and a tiny CLIP, for a CPU dress rehearsal under CUDA's device rules.

Every override is checked before any notebook runs (:func:`profile_overrides`): its name must be a
parameter of the notebook (papermill only warns), and its YAML value must have the type the
notebook's parameters cell annotates (``lr: float = 0.0005``; read with
``papermill.inspect_notebook``). Supported annotations: ``str``, ``int``, ``float`` (an int is
fine), ``bool``, ``list`` and ``list[<one of those>]`` (non-empty). PyYAML reads YAML 1.1, where
``1e-4`` is a *string* (write ``1.0e-4``) and ``yes``/``no``/``on``/``off`` are booleans; such a
value gets an error that names the profile file, section, parameter and notebook and says the fix.
Every error here is a :class:`ProfileError` with a one-line message.
"""
from __future__ import annotations

import ast
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = PROJECT_ROOT / "params"
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
SMOKE_ENV = "VIDRET_SMOKE"
CUDA_RULES_ENV = "VIDRET_CUDA_RULES"  # N >= 1: kernels run under devicecheck.cuda_rules(N)
OPEN_CLIP_CONFIGS_ENV = "VIDRET_OPEN_CLIP_CONFIGS"  # os.pathsep-separated open_clip model configs to register
SETTINGS = ("extends", "prepare")  # top-level keys that are settings of the profile, not sections
ANCHOR_PREFIX = "x-"  # sections that only hold YAML anchors
_SCALAR_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
_LIST = re.compile(r"list(?:\[(?P<item>\w+)\])?")
_EXPONENT = re.compile(r"(?P<mantissa>[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))[eE](?P<sign>[-+]?)(?P<exp>[0-9]+)")


class ProfileError(ValueError):
    """A profile that cannot be applied; the one-line message names the file, key and fix."""


def profile_names() -> list[str]:
    return sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def notebook_paths() -> list[Path]:
    """The numbered notebooks ``NOTEBOOKS_DIR/NN_*.ipynb``, in order."""
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def notebook_parameters(path: Path) -> dict[str, dict[str, Any]]:
    """The parameters cell of notebook ``path``: name -> ``{"annotation": str, "default": value}``.

    ``annotation`` is the annotation's source text (``"float"``, ``"list[int]"``; ``"None"`` when
    unannotated, as ``papermill.inspect_notebook`` names it), ``default`` the literal in the cell.
    Parsed with ``ast`` rather than papermill, whose import takes seconds in every notebook kernel
    (``apply_smoke``); a test checks both agree. Raises :class:`ProfileError` unless the notebook
    has one cell tagged ``parameters`` holding only ``name: type = literal`` assignments.
    """
    cells = [c for c in json.loads(path.read_text())["cells"]
             if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ProfileError(f"{path}: {len(cells)} cells are tagged 'parameters'; tag exactly one")
    params = {}
    for node in ast.parse("".join(cells[0]["source"])).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, annotation = node.target.id, ast.unparse(node.annotation)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, annotation = node.targets[0].id, "None"
        else:
            raise ProfileError(f"{path}: the parameters cell may only hold `name: type = literal` lines, "
                               f"not `{ast.unparse(node)}`")
        try:
            default = ast.literal_eval(node.value)
        except ValueError:
            raise ProfileError(f"{path}: parameter {name} = {ast.unparse(node.value)} is not a literal; "
                               "derive it in the next cell") from None
        params[name] = {"annotation": annotation, "default": default}
    return params


def read_profile(profile: str) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The file of ``profile`` and its sections (``x-`` anchor holders dropped, ``extends`` resolved).

    Raises ``FileNotFoundError`` for an absent profile, :class:`ProfileError` for invalid YAML,
    a top level or section that is not a mapping, a non-text key, a setting that is not a name,
    an ``extends`` of an absent profile, or a cycle of ``extends``.
    """
    path, _, sections = _resolve(profile, ())
    return path, sections


def profile_settings(profile: str) -> dict[str, str]:
    """The settings of ``profile`` other than ``extends`` (``prepare``), inherited through ``extends``.

    Example:
        >>> profile_settings("msrvtt-rehearsal")
        {'prepare': 'data_prep.rehearsal'}
    """
    return _resolve(profile, ())[1]


def _resolve(profile: str, chain: tuple[str, ...]) -> tuple[Path, dict[str, str], dict[str, dict[str, Any]]]:
    """(file, settings, sections) of ``profile`` with its ``extends`` chain merged in; ``chain``: the profiles
    that extend it (a cycle check)."""
    path, settings, sections = _read_file(profile)
    base = settings.pop("extends", None)
    if base is None:
        return path, settings, sections
    if base in (*chain, profile):
        raise ProfileError(f"{path}: extends {base!r}, which extends back to {profile!r} "
                           f"({' -> '.join((*chain, profile, base))}); remove one 'extends'")
    try:
        _, base_settings, merged = _resolve(base, (*chain, profile))
    except FileNotFoundError:
        raise ProfileError(f"{path}: extends {base!r}, but {PARAMS_DIR / f'{base}.yaml'} is absent; "
                           f"profiles: {profile_names()}") from None
    for section, params in sections.items():  # a section here replaces the values it names
        merged[section] = {**merged.get(section, {}), **params}
    return path, {**base_settings, **settings}, merged


def _read_file(profile: str) -> tuple[Path, dict[str, str], dict[str, dict[str, Any]]]:
    """(file, settings, sections) of one profile file, structure checked (see :func:`read_profile`)."""
    path = PARAMS_DIR / f"{profile}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no profile {profile!r} ({path} is absent); profiles: {profile_names()}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ProfileError(f"{path}: invalid YAML{where}: {problem}; fix the syntax there") from None
    if data is None:
        return path, {}, {}
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: the top level must map sections (notebook names, 'common', "
                           f"'{ANCHOR_PREFIX}...') to parameters, not a {type(data).__name__}")
    settings, sections = {}, {}
    for section, params in data.items():
        if not isinstance(section, str):
            raise ProfileError(f"{path}: section {section!r} is not a name; write it as text ('{section}')")
        if section.startswith(ANCHOR_PREFIX):
            continue
        if section in SETTINGS:
            if not isinstance(params, str) or not params:
                raise ProfileError(f"{path}: {section} must name a {'profile' if section == 'extends' else 'module'}"
                                   f", not {params!r}")
            settings[section] = params
            continue
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise ProfileError(f"{path}: section {section!r} must map parameter names to values, "
                               f"not a {type(params).__name__} ({params!r})")
        bad = [k for k in params if not isinstance(k, str)]
        if bad:
            raise ProfileError(f"{path}: section {section!r} has key {bad[0]!r}, which is not a parameter name")
        sections[section] = params
    return path, settings, sections


def profile_overrides(
    profile: str, notebooks: dict[str, dict[str, dict[str, Any]]] | None = None
) -> dict[str, dict[str, Any]]:
    """Every notebook's checked overrides from ``profile``: notebook stem -> {name: value}.

    ``notebooks`` maps each notebook stem to :func:`notebook_parameters` (default: the notebooks
    in ``NOTEBOOKS_DIR``). A notebook's overrides are the ``common`` values of the parameters it
    defines, then its own section. Raises :class:`ProfileError` for an unknown section, a
    ``common`` name no notebook defines, a section name the notebook does not define, or a value
    whose type is not the annotated one (see the module docstring); ``FileNotFoundError`` for an
    absent profile.
    """
    path, sections = read_profile(profile)
    if notebooks is None:
        notebooks = {p.stem: notebook_parameters(p) for p in notebook_paths()}
    allowed = [*notebooks, "common"]
    for section in sections:
        if section not in allowed:
            close = difflib.get_close_matches(section, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ProfileError(f"{path}: unknown section {section!r}: {hint}sections are the notebooks "
                               f"{list(notebooks)}, 'common', or '{ANCHOR_PREFIX}<name>' for YAML anchors")
    common = sections.get("common", {})
    undefined = sorted(set(common) - {name for params in notebooks.values() for name in params})
    if undefined:
        raise ProfileError(f"{path}: common sets {undefined}, which no notebook defines; fix the name(s) "
                           f"or remove them")
    out = {}
    for stem, declared in notebooks.items():
        unknown = sorted(set(sections.get(stem, {})) - set(declared))
        if unknown:
            raise ProfileError(f"{path}: unknown parameter(s) {unknown} for notebook {stem}; "
                               f"its parameters are {sorted(declared)}")
        out[stem] = {}
        for section in ("common", stem):
            for name, value in sections.get(section, {}).items():
                if name not in declared:  # a common name that this notebook does not define
                    continue
                annotation = declared[name]["annotation"]
                problem = _type_problem(value, annotation)
                if problem:
                    raise ProfileError(f"{path}: {section}.{name} = {value!r} does not fit notebook {stem}'s "
                                       f"`{name}: {annotation}`: {problem}")
                out[stem][name] = value
    return out


def profile_params(profile: str, notebook: str) -> dict[str, Any]:
    """The checked overrides that ``profile`` sets for ``notebook`` (see :func:`profile_overrides`).

    Example:
        >>> profile_params("default", "01_clip4clip")
        {}
    """
    return profile_overrides(profile)[notebook]


def _type_problem(value: Any, annotation: str) -> str | None:
    """Why YAML ``value`` does not fit ``annotation`` (with the fix), or None if it does."""
    listed = _LIST.fullmatch(annotation)
    if listed:
        if not isinstance(value, list):
            return f"it is a {_yaml_type(value)}, not a list; write [{_yaml_text(value)}]"
        if not value:
            return "the list is empty; give at least one value"
        for i, item in enumerate(value):
            problem = listed["item"] and _type_problem(item, listed["item"])
            if problem:
                return f"item {i}: {problem}"
        return None
    if annotation not in _SCALAR_TYPES:
        return (f"profiles cannot check the annotation {annotation!r}; annotate the parameter in the "
                f"notebook's parameters cell with one of {[*_SCALAR_TYPES, 'list', 'list[int]']}")
    if isinstance(value, _SCALAR_TYPES[annotation]) and (annotation == "bool") == isinstance(value, bool):
        return None
    problem = f"YAML read a {_yaml_type(value)}, not {'a number' if annotation == 'float' else annotation}"
    return f"{problem}; {_fix(value, annotation)}"


def _fix(value: Any, annotation: str) -> str:
    """The advice for a scalar ``value`` that YAML did not read as ``annotation``."""
    if value is None:
        return "a key with nothing after the colon is null: give it a value"
    if isinstance(value, bool) and annotation == "str":
        return "YAML 1.1 reads yes/no/on/off/true/false as booleans: quote the text ('no')"
    if isinstance(value, str) and annotation in ("int", "float"):
        exponent = _EXPONENT.fullmatch(value.strip())
        if exponent and annotation == "float":  # PyYAML's float needs a dot in the mantissa and a sign in the exponent
            mantissa = exponent["mantissa"] if "." in exponent["mantissa"] else exponent["mantissa"] + ".0"
            mantissa = mantissa + "0" if mantissa.endswith(".") else mantissa
            return (f"YAML 1.1 reads {value} as text: write {mantissa}e{exponent['sign'] or '+'}"
                    f"{exponent['exp']}")
        try:
            number = float(value) if annotation == "float" else int(value)
        except ValueError:
            return f"write a number ({annotation})"
        return f"remove the quotes: write {number}"
    if isinstance(value, float) and annotation == "int" and value.is_integer():
        return f"write {int(value)}"
    if annotation == "str":
        return f"quote it: '{value}'"
    if annotation == "bool":
        return "write true or false"
    return f"write a value of type {annotation}"


def _yaml_type(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "int", float: "float", str: "string",
            list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


def _yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def apply_smoke(namespace: dict[str, Any], notebook: str) -> bool:
    """Apply a test run's environment to the notebook kernel; return whether the smoke profile was applied.

    Called in the cell after each notebook's parameters cell, before any other work, so these
    environment variables (set by ``reproduce`` or by the tests; the kernels inherit them) act in
    every kernel:

    - ``VIDRET_OPEN_CLIP_CONFIGS`` (paths joined by ``os.pathsep``): open_clip model configs
      (``<name>.json`` files or folders of them) registered with ``open_clip.add_model_config``,
      so that a profile may name an architecture open_clip does not ship (the rehearsal's tiny CLIP);
    - ``VIDRET_CUDA_RULES=N``: the kernel runs under :func:`vidret_lib.devicecheck.cuda_rules` with
      N virtual GPUs from here on (:func:`vidret_lib.devicecheck.enable_for_process`), so device
      ``"cuda"`` works on the CPU with CUDA's device rules enforced;
    - ``VIDRET_SMOKE=1``: ``namespace`` is overwritten with the smoke profile, so that nbval (which
      injects no parameters) runs the notebook at smoke size. The smoke profile is checked as
      ``reproduce`` checks a profile (:func:`profile_overrides`: names and types); a
      :class:`ProfileError` leaves ``namespace`` unchanged.

    Raises ``FileNotFoundError`` naming a config path that does not exist, and ``ValueError``
    for a ``VIDRET_CUDA_RULES`` that is not a whole number.
    """
    configs = [c for c in os.environ.get(OPEN_CLIP_CONFIGS_ENV, "").split(os.pathsep) if c]
    if configs:
        import open_clip

        for config in configs:
            if not Path(config).exists():
                raise FileNotFoundError(f"{OPEN_CLIP_CONFIGS_ENV}: {config} does not exist; fix or unset the "
                                        "variable (the rehearsal builds its config with `python -m data_prep.rehearsal`)")
            open_clip.add_model_config(config)
    rules = os.environ.get(CUDA_RULES_ENV, "").strip()
    if rules not in ("", "0"):
        if not rules.isdecimal():
            raise ValueError(f"{CUDA_RULES_ENV}={rules!r}: give the number of virtual GPUs (e.g. 1), or 0 / unset for none")
        from .devicecheck import enable_for_process

        enable_for_process(int(rules))
    if os.environ.get(SMOKE_ENV, "0") != "1":
        return False
    namespace.update(profile_params("smoke", notebook))
    return True
