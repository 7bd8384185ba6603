"""Keyed, atomic, resumable caches: "load if present, else compute".

Every expensive artefact (decoded frames, features, trained heads) is stored under a key
that names what produced it, so a changed parameter never silently reuses stale data.
Writes go to a temporary file in the same folder, are flushed to disk and renamed into place,
so a killed run (or a power cut) never leaves a half-written file that a later run would read
as valid. A temporary file names its writer (host and process id): only temporaries whose writer
is gone are ever deleted, so two processes can fill one cache folder at once. A folder that must
be built by one process at a time (a generated dataset) is guarded with :func:`folder_lock`.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


def cache_key(name: str, **parts: Any) -> str:
    """A readable, stable key: ``name`` plus a short hash of the producing parameters.

    ``parts`` must be JSON-serialisable; their order does not matter.

    Example:
        >>> cache_key("frames", dataset="synthetic-smoke", max_frames=12, sample_fps=1)
        'frames-...'
        >>> cache_key("f", a=1, b=2) == cache_key("f", b=2, a=1)
        True
        >>> cache_key("f", a=1) == cache_key("f", a=2)
        False
    """
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# A temporary file is ".<target name>~<host>~<pid>~<random>.tmp": its writer is known, so that a
# cleanup never deletes the file another live process is writing (hostnames hold no "~").
_TMP_OWNER = re.compile(r"~(?P<host>[^~]+)~(?P<pid>[0-9]+)~[^~]*\.tmp$")
STALE_TMP_SECONDS = 24 * 3600  # a temporary this old is litter even if its pid is alive again (pid reuse)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}~{socket.gethostname()}~{os.getpid()}~"


def _writer_gone(tmp: Path) -> bool:
    """Whether the process that created temporary file ``tmp`` can no longer be writing it."""
    owner = _TMP_OWNER.search(tmp.name)
    if owner is None:  # no owner in the name: left by an older version of this module
        return True
    try:
        if time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS:
            return True
    except FileNotFoundError:  # its writer renamed or removed it meanwhile
        return False
    if owner["host"] != socket.gethostname():  # another machine on a shared disk: only age tells
        return False
    try:
        os.kill(int(owner["pid"]), 0)  # signal 0: existence check only
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = ".*.tmp") -> list[Path]:
    """Delete the temporary files in ``folder`` (matching ``pattern``) whose writer is gone.

    A writer is gone when its process (same host) no longer exists, when the file is older than
    ``STALE_TMP_SECONDS``, or when the file name carries no writer (an older version made it).
    Temporaries of live writers are left alone. Returns the deleted paths.
    """
    removed = []
    for tmp in Path(folder).glob(pattern):
        if _writer_gone(tmp):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file too large, quota


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path`` atomically.

    The temporary file lives in the destination folder (same filesystem), is named after this
    process, and is removed if ``write`` raises, so ``path`` is either absent, old or complete.
    Its data is fsync-ed before the rename and the folder after it, so a power cut cannot leave
    an empty file under ``path``. Temporaries of ``path`` left by killed writers are deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, f".{glob.escape(path.name)}~*.tmp")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)  # read the process umask (there is no getter) and put it back
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())  # the data is on disk before the name points at it
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)  # ... and the rename itself is on disk
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}; free disk space (or raise the file size "
                      "limit) or point the cache/results folder elsewhere, then run again") from err
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (``fcntl.flock`` on ``folder/.vidret.lock``).

    Use it around work that must not run twice at once in one folder (generating a dataset):
    a second process waits, saying so on stderr, and then finds the work done. The lock is
    released when the block exits or the process dies. POSIX only (``fcntl``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".vidret.lock"
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that holds {lock} ...", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield lock
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# a JSON array of numbers / booleans / nulls only, as json.dumps(indent=2) lays it out (one item per
# line); a JSON string cannot hold a raw newline, so a match is never inside a string
_SCALAR = r"(?:-?[0-9][0-9.eE+-]*|-?Infinity|NaN|true|false|null)"
_SCALAR_ARRAY = re.compile(rf"\[\n *(?:{_SCALAR},\n *)*{_SCALAR}\n *\]")


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically; arrays of numbers stay on one line.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a" / "x.json"
        >>> _ = save_json(p, {"r1": 1.5, "hits": [1, 0, -2.5e-05], "names": ["a", "[1,  2]"]})
        >>> print(p.read_text().strip())
        {
          "r1": 1.5,
          "hits": [1, 0, -2.5e-05],
          "names": [
            "a",
            "[1,  2]"
          ]
        }
        >>> load_json(p)["hits"]
        [1, 0, -2.5e-05]
    """
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
    text = _SCALAR_ARRAY.sub(lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def load_json(path: str | os.PathLike, fix: str = "delete it to recompute") -> Any:
    """Read a JSON file, naming the file in the error if it is unreadable.

    Raises ``FileNotFoundError`` if ``path`` is absent, ``ValueError`` if it is not valid JSON;
    ``fix`` is the advice that error gives (what actually rebuilds the file: for a cache
    entry, deleting it; for a file that is part of a bigger whole, say what rebuilds the whole).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from None


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Write arrays to an ``.npz`` file atomically (uncompressed, fast to reload)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` file into memory, naming the file if it is damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is unreadable ({err}); delete it to recompute") from None


def load_or_compute(
    path: str | os.PathLike,
    compute: Callable[[], T],
    save: Callable[[Path, T], Any],
    load: Callable[[Path], T],
) -> T:
    """Return ``load(path)`` if ``path`` exists, else ``compute()``, saved with ``save``.

    ``save`` must write atomically (``save_json``/``save_npz`` do).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "sq.json"
        >>> calls = []
        >>> f = lambda: calls.append(1) or {"v": 4}
        >>> load_or_compute(p, f, save_json, load_json)
        {'v': 4}
        >>> load_or_compute(p, f, save_json, load_json), len(calls)
        ({'v': 4}, 1)
    """
    path = Path(path)
    if path.exists():
        return load(path)
    value = compute()
    save(path, value)
    return value


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
