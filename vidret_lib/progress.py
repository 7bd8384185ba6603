"""Progress bars for long steps: on a terminal only, never under ``VIDRET_PROGRESS=0``.

``make reproduce`` and nbval set ``VIDRET_PROGRESS=0`` so executed notebooks stay clean.
"""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_disabled() -> bool:
    """True when bars must stay quiet (stderr is not a terminal, or ``VIDRET_PROGRESS=0``).

    Example:
        >>> import os; os.environ["VIDRET_PROGRESS"] = "0"; progress_disabled()
        True
    """
    return os.environ.get("VIDRET_PROGRESS") == "0" or not sys.stderr.isatty()


def progress(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled per :func:`progress_disabled`."""
    return tqdm(iterable, disable=progress_disabled(), **kwargs)
