"""vidret_lib: the library behind the vidret notebooks (losses, metrics, frames, encoders, training).

``vidret_lib.EMCL`` is resolved lazily, so that ``import vidret_lib.metrics`` alone does not
load torch (a process that only scores a saved matrix stays small).
"""
__version__ = "0.1.0"
__all__ = ["EMCL"]


def __getattr__(name: str):
    if name == "EMCL":
        from .emcl import EMCL

        return EMCL
    raise AttributeError(f"module 'vidret_lib' has no attribute {name!r}")
