"""vidret_lib: the library behind the vidret notebooks (losses, metrics, frames, encoders, training)."""
__version__ = "0.1.0"
