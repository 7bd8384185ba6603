"""`make lab` for real: start JupyterLab as the Makefile does, list the notebooks through the REST
API, run a cell on the project's kernel through the kernel websocket, stop the server.

Only 127.0.0.1 is contacted. The server gets its own runtime/config/settings folders under
tmp_path so that the user's Jupyter set-up neither changes the result nor is written to.
"""
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sys
import uuid
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.websocket import websocket_connect

ROOT = Path(__file__).resolve().parents[1]
STAMP = Path(sys.prefix) / ".vidret-installed"  # the Makefile's $(STAMP) when VENV is this environment

pytestmark = [pytest.mark.slow,  # a server and a kernel start: ~10 s of CPU
              pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_lab(tmp_path: Path, port: int) -> tuple[asyncio.subprocess.Process, list[str], str]:
    """``make lab`` on a fixed port with no browser; return (process, log lines, printed URL).

    ``-o STAMP`` keeps make from re-installing the environment the test is running in. The URL
    with its generated token is the one the user opens; the call fails (showing the server's log)
    when none is printed within 90 s.
    """
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    lab_args = f"--port={port} --ServerApp.port_retries=0 --no-browser"
    proc = await asyncio.create_subprocess_exec(
        "make", "--no-print-directory", "-o", str(STAMP), "lab", f"VENV={sys.prefix}", f"LAB_ARGS={lab_args}",
        cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group: make, its shell and the server stop together
    )
    log: list[str] = []
    url = re.compile(rf"http://127\.0\.0\.1:{port}/lab\?token=[0-9a-f]{{32,}}")

    async def read_until_url() -> str | None:
        while line := (await proc.stdout.readline()).decode():
            log.append(line)
            if found := url.search(line):
                return found.group(0)
        return None

    try:
        printed = await asyncio.wait_for(read_until_url(), timeout=90)
    except TimeoutError:
        printed = None
    if printed is None:
        await stop_group(proc)
        raise AssertionError("make lab printed no URL with a token (it stopped, or 90 s passed):\n" + "".join(log))
    asyncio.get_running_loop().create_task(drain(proc, log))  # keep the pipe from filling up
    return proc, log, printed


async def drain(proc: asyncio.subprocess.Process, log: list[str]) -> None:
    while line := await proc.stdout.readline():
        log.append(line.decode())


async def stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the process group the test started (if still running), then reap it."""
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGTERM)
        await proc.wait()


async def execute(ws_url: str, code: str) -> tuple[str, dict]:
    """Run ``code`` over the kernel's websocket channels; return (stdout text, execute_reply content)."""
    ws = await websocket_connect(ws_url)
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                   "session": uuid.uuid4().hex, "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    stdout, reply, idle = "", None, False
    while reply is None or not idle:  # the reply (shell) and the idle status (iopub) come in either order
        raw = await asyncio.wait_for(ws.read_message(), timeout=60)
        assert raw is not None, "the server closed the kernel websocket"
        msg = json.loads(raw)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["header"]["msg_type"], msg["content"]
        if kind == "stream" and content["name"] == "stdout":
            stdout += content["text"]
        elif kind == "execute_reply":
            reply = content
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
    ws.close()
    return stdout, reply


async def lab_session(tmp_path: Path) -> None:
    port = free_port()
    proc, log, printed = await start_lab(tmp_path, port)
    base = f"http://127.0.0.1:{port}"
    token = printed.split("token=")[1]
    http = AsyncHTTPClient()
    headers = {"Authorization": f"token {token}"}

    async def api(method: str, path: str, body: dict | None = None) -> dict:
        response = await http.fetch(base + path, method=method, headers=headers,
                                     body=None if body is None else json.dumps(body))
        return json.loads(response.body) if response.body else {}

    try:
        for _ in range(120):  # the URL is printed just before the server binds its port
            try:
                await api("GET", "/api/status")
                break
            except ConnectionRefusedError:
                await asyncio.sleep(0.25)
        else:
            raise AssertionError(f"nothing listens on {base} 30 s after the URL was printed")
        with pytest.raises(HTTPClientError, match="403"):  # the token is required
            await http.fetch(base + "/api/contents")
        listing = await api("GET", "/api/contents")
        served = sorted(item["name"] for item in listing["content"] if item["type"] == "notebook")
        assert served == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
        specs = await api("GET", "/api/kernelspecs")
        assert specs["default"] == "python3"
        # the page JupyterLab serves loads the ipywidgets manager, which draws tqdm.auto's bars
        lab_page = (await http.fetch(printed)).body.decode()
        assert '"name": "@jupyter-widgets/jupyterlab-manager"' in lab_page

        # what opening a notebook in JupyterLab does: a session for its path on the python3 kernel
        session = await api("POST", "/api/sessions", {"path": "07_summary.ipynb", "type": "notebook",
                                                      "name": "", "kernel": {"name": "python3"}})
        stdout, reply = await execute(
            f"ws://127.0.0.1:{port}/api/kernels/{session['kernel']['id']}/channels?token={token}",
            "import os, sys, vidret_lib; print(vidret_lib.__file__); print(sys.prefix); print(os.getcwd())",
        )
        assert reply["status"] == "ok", reply
        module_file, prefix, cwd = stdout.split("\n")[:3]
        assert Path(module_file) == ROOT / "vidret_lib" / "__init__.py"  # this checkout's library
        assert Path(prefix) == Path(sys.prefix)  # the project's environment, not another python3
        assert Path(cwd) == ROOT / "notebooks"  # the notebooks' relative paths (../results) hold

        await api("DELETE", f"/api/sessions/{session['id']}")
        await api("POST", "/api/shutdown", {})
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    except BaseException as err:
        err.add_note("--- make lab's output:\n" + "".join(log))
        raise
    finally:
        await stop_group(proc)
        http.close()


def test_make_lab_serves_notebooks_on_the_project_kernel(tmp_path):
    asyncio.run(lab_session(tmp_path))
