import pytest
from jupyter_client.manager import start_new_kernel

from vidret_lib.progress import progress, progress_disabled

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def test_bars_only_on_a_terminal_and_never_with_vidret_progress_0(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    monkeypatch.delenv("VIDRET_PROGRESS", raising=False)
    assert not progress_disabled()
    monkeypatch.setenv("VIDRET_PROGRESS", "0")
    assert progress_disabled()
    assert progress(range(3)).disable
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    monkeypatch.delenv("VIDRET_PROGRESS")
    assert progress_disabled()


@pytest.fixture(scope="module")
def kernel():
    """A real IPython kernel of the project's kernelspec (the one JupyterLab and papermill start)."""
    manager, client = start_new_kernel(kernel_name="python3")
    yield client
    client.stop_channels()
    manager.shutdown_kernel(now=True)


def run_cell(client, code: str) -> list[dict]:
    """Execute ``code``; return the iopub output messages (stream, display_data, error)."""
    outputs = []

    def keep(msg):
        if msg["msg_type"] in ("stream", "display_data", "update_display_data", "error"):
            outputs.append(msg)

    reply = client.execute_interactive(code, output_hook=keep, timeout=60)
    assert reply["content"]["status"] == "ok", outputs
    return outputs


LOOP = "from vidret_lib.progress import progress\nfor _ in progress(range(3), desc='steps'): pass"


def test_jupyterlab_kernel_draws_a_widget_bar(kernel):
    """In a kernel (stderr is no terminal there) the bar is an ipywidgets bar, with no warning."""
    out = run_cell(kernel, "import os; os.environ.pop('VIDRET_PROGRESS', None)\n" + LOOP)
    widgets = [m for m in out if m["msg_type"] == "display_data" and WIDGET_MIME in m["content"]["data"]]
    assert len(widgets) == 1, out
    assert not [m for m in out if m["msg_type"] in ("stream", "error")], out  # e.g. "IProgress not found"


def test_kernel_stays_quiet_under_vidret_progress_0(kernel):
    """What papermill runs (``make reproduce`` sets VIDRET_PROGRESS=0) prints no bar at all."""
    assert run_cell(kernel, "import os; os.environ['VIDRET_PROGRESS'] = '0'\n" + LOOP) == []
