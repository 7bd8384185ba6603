"""Keyed, atomic, resumable caches: "load if present, else compute".

Every expensive artefact (decoded frames, features, trained heads) is stored under a key
that names what produced it, so a changed parameter never silently reuses stale data.
Writes go to a temporary file in the same folder and are renamed into place, so a killed
run never leaves a half-written file that a later run would read as valid.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, TypeVar

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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path`` atomically.

    The temporary file lives in the destination folder (same filesystem) and is removed
    if ``write`` raises, so ``path`` is either absent or complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)  # read the process umask (there is no getter) and put it back
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


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


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error if it is unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it to recompute") from None


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
