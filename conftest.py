"""pytest set-up for the whole project (unit tests, doctests, nbval).

Notebooks validated by nbval run at smoke size (VIDRET_SMOKE=1 makes each notebook apply
params/smoke.yaml) with progress bars off. The kernels inherit this environment.
"""
import os

os.environ["VIDRET_SMOKE"] = "1"
os.environ["VIDRET_PROGRESS"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
