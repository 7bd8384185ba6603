"""Fetch public archives with pooch and unpack them resumably (used on a user's machine only).

What happens when a run is interrupted (pooch 1.9, ``pooch.retrieve``):

- A download is streamed into a temporary file (``tmp*``) in the cache folder and renamed
  to its final name only once it is complete and its hash matches ``Archive.sha256``.
  A killed download therefore never leaves a file under the final name; the next run
  starts that download again **from byte 0** (pooch has no HTTP range resume). A
  ``tmp*`` file left behind by a hard kill is never read and can be deleted.
- A file already present under its final name is reused without downloading. With a
  known sha256 it is checked first and downloaded again if it differs ("update"); with
  ``sha256=None`` only :func:`fetch_and_extract`'s check below applies.
- :func:`extract` writes every member atomically and skips members already present with
  the right size, so an interrupted unpacking continues where it stopped.
- :func:`fetch_and_extract` deletes a file that does not unpack as a zip (an error page
  saved under the archive's name, a truncated copy, a member failing its CRC), warns with
  its path and fetches it once more; a second bad file is deleted too and refused with a
  ValueError, so a bad file is never reused by the next run.

Checksums: the real sha256 of the public archives was not available when this was
written (no network here), so :data:`data_prep.msrvtt.ARCHIVES` leaves ``sha256=None``
rather than invent one; the hash of what was downloaded is computed by :func:`fetch` and
recorded in the dataset's ``manifest.json`` so a later download can be compared with it.
"""
from __future__ import annotations

import os
import shutil
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pooch
import requests

from vidret_lib.cache import atomic_write
from vidret_lib.progress import progress, progress_disabled

Downloader = Callable[[str, str, object], None]  # pooch's downloader protocol: (url, output_file, pooch)
DAMAGED_ZIP = (zipfile.BadZipFile, zlib.error, EOFError)  # what zipfile raises on a damaged or non-zip file


@dataclass(frozen=True)
class Archive:
    """A public archive: where it lives and, when known, its sha256 (hex digest)."""

    url: str
    sha256: str | None = None

    @property
    def fname(self) -> str:
        """The file name in the cache: the URL's last path component."""
        return self.url.rsplit("/", 1)[-1]


def fetch(archive: Archive, cache_dir: str | os.PathLike, downloader: Downloader | None = None) -> dict:
    """Download ``archive`` into ``cache_dir`` unless already there; see the module docstring.

    ``downloader`` follows pooch's protocol (``pooch.HTTPDownloader`` by default, with a
    progress bar on a terminal). Returns ``{"url", "file", "sha256"}``, the sha256 being
    computed from the file on disk. Raises ``ConnectionError`` naming the URL when the download
    fails (no network, proxy, HTTP error), with no partial file left (pooch downloads to a
    temporary file).
    """
    if downloader is None:
        downloader = pooch.HTTPDownloader(progressbar=not progress_disabled())
    known = None if archive.sha256 is None else f"sha256:{archive.sha256}"
    try:
        path = pooch.retrieve(archive.url, known_hash=known, fname=archive.fname, path=cache_dir, downloader=downloader)
    except requests.exceptions.RequestException as err:  # no network, proxy, DNS, HTTP error
        raise ConnectionError(
            f"cannot download {archive.url} ({type(err).__name__}: {err}); check the network or proxy, "
            f"or download it by hand and pass the folder with --from DIR (msrvtt_source in a profile)"
        ) from None
    return {"url": archive.url, "file": path, "sha256": pooch.file_hash(path, alg="sha256")}


def extract(zip_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack a zip into ``dest``, skipping members already unpacked with the right size.

    Each member is written to a temporary file and renamed, so a killed run leaves only
    complete files; re-running finishes the rest. A member whose path would leave
    ``dest`` is refused.

    Example:
        >>> import tempfile, pathlib, zipfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with zipfile.ZipFile(d / "a.zip", "w") as z:
        ...     z.writestr("x/y.txt", "hello")
        >>> (extract(d / "a.zip", d / "out") / "x" / "y.txt").read_text()
        'hello'
    """
    dest = Path(dest)
    root = dest.resolve()
    with zipfile.ZipFile(zip_path) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        for member in progress(members, desc=f"unzip {Path(zip_path).name}"):
            target = dest / member.filename
            if not target.resolve().is_relative_to(root):
                raise ValueError(f"{zip_path}: member {member.filename!r} would be written outside {dest}")
            if target.exists() and target.stat().st_size == member.file_size:
                continue

            def write(tmp: Path, member: zipfile.ZipInfo = member) -> None:
                with zf.open(member) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)

            atomic_write(target, write)
    return dest


def _unpack_or_delete(zip_path: str | os.PathLike, dest: Path) -> str | None:
    """:func:`extract` ``zip_path`` into ``dest``; None when it unpacked, else delete it and say why."""
    zip_path = Path(zip_path)
    try:
        extract(zip_path, dest)
    except DAMAGED_ZIP as err:
        size = zip_path.stat().st_size
        zip_path.unlink()
        return f"{zip_path} ({size} bytes) is not a readable zip ({type(err).__name__}: {err})"
    return None


def fetch_and_extract(
    archive: Archive, cache_dir: str | os.PathLike, dest: str | os.PathLike, downloader: Downloader | None = None
) -> dict:
    """:func:`fetch` ``archive`` into ``cache_dir`` and :func:`extract` it into ``dest``; returns fetch's record.

    A cached or downloaded file that does not unpack as a zip is deleted and fetched once
    more (with a warning naming its path); if that one is bad too it is deleted and a
    ValueError names the path and URL. Members unpacked before the damage was found are
    kept: each was written only after zipfile checked its CRC.
    """
    record = fetch(archive, cache_dir, downloader)
    problem = _unpack_or_delete(record["file"], Path(dest))
    if problem is None:
        return record
    warnings.warn(f"{problem}: deleted it, downloading {archive.url} again", stacklevel=2)
    record = fetch(archive, cache_dir, downloader)
    problem = _unpack_or_delete(record["file"], Path(dest))
    if problem is not None:
        raise ValueError(
            f"{problem}, after downloading {archive.url} again; deleted it. The server may be sending something "
            "else (an error page?): download the archive by hand, unpack it and use --from DIR"
        )
    return record
