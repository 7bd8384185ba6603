# vidret: `make test` and `make reproduce` are the two commands. Both create the
# project's virtual environment (.venv) from requirements.txt on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
STAMP := $(VENV)/.vidret-installed

.DEFAULT_GOAL := help
.PHONY: help env test test-fast reproduce rehearsal rehearsal-torchrun lab site benchmarks clean-executed

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=$(PROFILE) (smoke | default | msrvtt-e2e = msrvtt-gpu | msrvtt-frozen | msrvtt-rehearsal), PYTHON=$(PYTHON), VENV=$(VENV)"

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (vidret .venv)" >/dev/null
	@touch $@

env: $(STAMP)  ## create or update the virtual environment (.venv) from requirements.txt

test: $(STAMP)  ## run every test: unit, real-file (../shared/data when present), doctests, nbval
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## unit tests only (no notebooks, no slow tests)
	$(PY) -m pytest -q -m "not slow" tests vidret_lib data_prep

benchmarks: $(STAMP)  ## print speed and memory figures (not tests)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

reproduce: $(STAMP)  ## run every notebook headless (PROFILE=default|smoke|msrvtt-frozen|...), write results/ and figures/
	$(PY) -m vidret_lib.reproduce --profile $(PROFILE)

rehearsal: $(STAMP)  ## CPU dress rehearsal of the MSR-VTT profile: every notebook on "cuda" under CUDA's device rules
	$(PY) -m vidret_lib.reproduce --profile msrvtt-rehearsal --cuda-rules 1

rehearsal-torchrun: $(STAMP)  ## the dress rehearsal on 2 ranks (torchrun, gloo), each on its own virtual GPU
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 -m vidret_lib.reproduce --profile msrvtt-rehearsal --cuda-rules 2

# JupyterLab serves notebooks/ on 127.0.0.1 only; new notebooks get the project's kernel (python3,
# installed into .venv above, so kernels run .venv's python with vidret_lib). allow_root: CI and
# containers run as root, where jupyter_server refuses to start without it. LAB_ARGS adds options
# (tests/test_lab.py passes --port and --no-browser, and reads the printed URL and its token).
lab: $(STAMP)  ## JupyterLab on the project's kernel in notebooks/; prints the URL to open (Ctrl-C stops it)
	$(PY) -m jupyterlab --ServerApp.root_dir=notebooks --ServerApp.ip=127.0.0.1 --ServerApp.allow_root=True \
	  --MappingKernelManager.default_kernel_name=python3 $(LAB_ARGS)

site: $(STAMP)  ## static HTML site (_site/PROFILE/index.html) of the notebooks `make reproduce` executed; no re-execution
	$(PY) tools/build_site.py --profile $(PROFILE)

clean-executed:  ## forget executed notebooks (the next reproduce re-runs them; caches are kept)
	rm -rf executed/
