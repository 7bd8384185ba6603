"""Progress bars for long steps: a text bar on a terminal, a widget bar in JupyterLab.

``tqdm.auto`` picks the bar: inside a Jupyter kernel with ipywidgets installed it is
``tqdm.notebook`` (an ipywidgets progress bar that JupyterLab draws in the cell's output),
elsewhere the terminal bar of ``tqdm.std``. Bars stay quiet under ``VIDRET_PROGRESS=0``, which
``make reproduce`` and the tests' conftest set so that executed notebooks stay clean, and when
a script's stderr is not a terminal (a log file, CI).
"""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

# tqdm.auto chose the widget bar (this process is a Jupyter kernel and ipywidgets imports)
# exactly when its class derives from tqdm.notebook's; elsewhere it derives from tqdm.std's only.
WIDGET_BARS = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)


def progress_disabled() -> bool:
    """True when bars must stay quiet.

    Quiet under ``VIDRET_PROGRESS=0``; otherwise shown in a Jupyter kernel (widget bar) or
    when stderr is a terminal (text bar), and quiet elsewhere (stderr redirected to a file).

    Example:
        >>> import os; os.environ["VIDRET_PROGRESS"] = "0"; progress_disabled()
        True
    """
    if os.environ.get("VIDRET_PROGRESS") == "0":
        return True
    return not (WIDGET_BARS or sys.stderr.isatty())


def progress(iterable=None, **kwargs) -> tqdm:
    """``tqdm.auto.tqdm(iterable, **kwargs)``, disabled per :func:`progress_disabled`."""
    return tqdm(iterable, disable=progress_disabled(), **kwargs)
