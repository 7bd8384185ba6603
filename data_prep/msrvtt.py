"""MSR-VTT retrieval splits in the shared dataset layout (``vidret_lib.datasets``).

Usage::

    python -m data_prep.msrvtt --from DIR --out OUT      # a local folder (tests, CI, offline)
    python -m data_prep.msrvtt --download --out OUT [--cache DIR]

Sources. ``--from DIR`` searches DIR recursively for files by name:

- captions: the official 2016 release, ``train_val_videodatainfo.json`` and
  ``test_videodatainfo.json`` (read straight from ``train_val_annotation.zip`` /
  ``test_videodatainfo.json.zip`` when not unpacked); when those are absent, CLIP4Clip's
  ``MSRVTT_data.json`` (their merge, same schema; a few captions differ in whitespace and
  punctuation). ``dataset.json`` says which was used (``caption_source``).
- ``MSRVTT_train.9k.csv``, ``MSRVTT_train.7k.csv`` (column ``video_id``) and
  ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,sentence``): the retrieval splits of
  CLIP4Clip and EMCL (ArrowLuo/CLIP4Clip release v0.0 ``msrvtt_data.zip``).
- ``category.txt`` (``name<TAB>index``, also inside ``train_val_annotation.zip``): category
  names. A folder without one (the ``--download`` archives have none) gets the shipped
  ``data_prep/msrvtt_category.txt``, a byte-for-byte copy of ``category.txt`` from the 2016
  release's ``train_val_annotation.zip`` (20 lines, ``music 0`` to ``advertisement 19``,
  CRLF line ends; sha256
  9e5c31c2e439723c7e56a61c6042d9021e1a69e6128c636140e807145c20b1ed). The manifest
  records which file named the categories (``annotations.category_names_from``).
- videos: every file named ``video<N>.mp4`` anywhere under DIR (the first in sorted path
  order wins if one appears twice).

``--download`` fetches, with pooch (see :mod:`data_prep.download` for what an interrupted
download does), the Frozen-in-Time mirror ``MSRVTT.zip`` (videos under ``videos/all/``;
its own ``annotation/MSR_VTT.json`` is not used) and ``msrvtt_data.zip`` (the CSVs and
``MSRVTT_data.json``), unpacks both under ``--cache`` (default ``~/.cache/vidret/msrvtt``)
and prepares from there. The layout of ``MSRVTT.zip`` is taken from the paths its authors'
loader reads (m-bain/frozen-in-time ``data_loader/MSRVTT_dataset.py``), not checked here.

Splits written (caption rows ``{"video_id", "sentence"}``):

============== =================================================== ====== ========
split          what                                                videos captions
============== =================================================== ====== ========
train_9k       ``MSRVTT_train.9k.csv``, all 20 captions per video   9,000  180,000
train_7k       ``MSRVTT_train.7k.csv`` (= official train + val)     7,010  140,200
val            official validation videos 6513-7009, all captions     497    9,940
train_9k_noval train_9k without the val videos                      8,503  170,060
train_7k_noval train_7k without the val videos (= official train)   6,513  130,260
test_1ka       ``MSRVTT_JSFUSION_test.csv``: one query per video     1,000    1,000
test_full      official test videos 7010-9999, all captions         2,990   59,800
============== =================================================== ====== ========

Train splits list videos in CSV order, val/test_full in video-number order, each video's
captions in the JSON's order (``sen_id``), verbatim. test_1ka keeps the CSV's rows, order
and sentence text (a lower-cased, punctuation-stripped form; 995 distinct sentences, so
video-to-text has real ties). The official split ranges come from the release's
``readme.txt``.

Overlaps (``manifest.json`` counts them all): the val videos are part of both train_9k and
train_7k, so a model selected on ``val`` must be trained on ``train_9k_noval`` or
``train_7k_noval`` (papers select on the test set instead: papers.md pitfall 1); train_9k
also holds 1,990 of the test_full videos (use train_7k with test_full); no test_1ka video
is in train_9k.

Annotation checks (the official files pass them all and lose nothing):

- Refused, with a ValueError naming the file and the line (or JSON index) and what to do:
  a file that is not UTF-8 text (a leading BOM is allowed; the byte offset is named); a
  CSV row with the wrong number of fields, a ``video_id`` not ``video0`` ... ``video9999``
  (no leading zeros), a ``video_id`` already on an earlier row of the same CSV (the
  official CSVs repeat none), an empty or blank 1k-A ``sentence``; a JSON ``videos[i]`` or
  ``sentences[i]`` that is not an object or has a bad ``video_id``, a video listed twice
  (in either JSON file), a ``category`` that is not an index in the category names, a
  ``caption`` that is absent, null, a number or anything but a string, a sentence whose
  video is in no ``videos`` list, a ``sen_id`` that is not an integer or repeats an
  earlier one (a doubled entry); a ``category.txt`` line that is not ``name<TAB>index``,
  or repeats an index. Split files and category names are small and hand-checked, so any
  fault there means a wrong or damaged file.
- Dropped and counted: a JSON caption that is empty or blank (one lost caption among
  200,000 should not stop a run); ``manifest.json`` lists each under
  ``annotations.dropped_empty_captions``.
- Kept and counted: a JSON video without a ``category`` (absent or null) gets category
  None, listed under ``annotations.videos_without_category`` with the CSV ids that have
  no JSON entry at all (``csv_ids_without_captions``).
- Kept as is: the same caption twice for one video (14,632 such repeats in the official
  files: different annotators) and the same 1k-A sentence for different videos (4
  sentences on 9 rows, 995 distinct of 1,000: real video-to-text ties).

:func:`describe` (printed by the CLI and notebook 00) reports every drop, every video
without a category, every CSV id without captions and where the category names came from.

Outputs besides the layout's files: ``manifest.json`` (where each input came from, the
downloads and their sha256, expected/present/missing/unreadable videos per split, the ids of
missing videos, each unreadable file with the reason, CSV ids without captions, split
overlaps, and ``annotations``: where the category names came from, dropped empty captions,
videos without a category) and ``summary.json`` (per split: videos, captions, distinct
sentences, the same for the present part, missing and unreadable counts). A video is *present* when its file
exists, is not empty, and decord opens it with more than 0 frames (a cheap check: a file
damaged further in is caught later by the frame sampler, which masks unreadable frames).
``videos.json`` records ``status`` ("ok", "missing" or "unreadable"); a missing video's
``path`` is where it was expected.

Evaluate on what is present: ``Dataset.split(name, present_only=True)`` restricts a split to the caption rows
whose video has status "ok" (the whole split when every video is there).

Resumability: every file is written atomically; ``dataset.json`` is removed at the start
and written last, so a root is complete exactly when it has one. Re-running recomputes the
same bytes; the decord checks are kept in ``OUT/.video_probe.json`` (keyed by path, size
and mtime) so a re-run after a kill does not re-open the videos already checked.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import decord
import pooch

from vidret_lib.cache import folder_lock, load_json, save_json
from vidret_lib.datasets import Dataset, Split, load_dataset, write_dataset
from vidret_lib.progress import progress

from .download import Archive, Downloader, fetch_and_extract

PREP_VERSION = "1"
ARCHIVES = (
    Archive("https://www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip"),
    Archive("https://github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msrvtt_data.zip"),
)
OFFICIAL_JSON = {  # member -> zip of the 2016 release that holds it
    "train_val_videodatainfo.json": "train_val_annotation.zip",
    "test_videodatainfo.json": "test_videodatainfo.json.zip",
}
MERGED_JSON = "MSRVTT_data.json"
CSV_9K, CSV_7K, CSV_1KA = "MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv", "MSRVTT_JSFUSION_test.csv"
CSV_COLUMNS = {CSV_9K: ("video_id",), CSV_7K: ("video_id",), CSV_1KA: ("video_id", "sentence")}
VAL_NUMBERS = range(6513, 7010)  # readme.txt: Val video6513 : video7009 (497)
TEST_NUMBERS = range(7010, 10000)  # readme.txt: Test video7010 : video9999 (2990)
VIDEO_ID = re.compile(r"video(0|[1-9]\d{0,3})")  # readme.txt: video0 ... video9999
SHIPPED_CATEGORIES = Path(__file__).with_name("msrvtt_category.txt")  # see the module docstring
PROBE_FILE = ".video_probe.json"
SPLIT_NOTES = {
    "train_9k": "MSRVTT_train.9k.csv; contains the val videos and 1,990 test_full videos",
    "train_7k": "MSRVTT_train.7k.csv (official train + val); contains the val videos",
    "val": "official validation videos 6513-7009; they are inside train_9k and train_7k: select on val "
    "only when training on train_9k_noval or train_7k_noval",
    "train_9k_noval": "train_9k minus the val videos (train here when selecting on val)",
    "train_7k_noval": "train_7k minus the val videos, i.e. the official train split",
    "test_1ka": "MSRVTT_JSFUSION_test.csv: 1,000 videos, one query each (995 distinct sentences)",
    "test_full": "official test videos 7010-9999 with all captions (train on train_7k)",
}
EVAL_SPLITS = ("val", "test_1ka", "test_full")


@dataclass(frozen=True)
class Annotations:
    """What the annotation files say, before any video is looked at."""

    captions: dict[str, list[str]]  # video_id -> its captions, in the JSON's order
    category: dict[str, str | None]  # video_id -> category name (None: the JSON gives no category)
    train_9k: list[str]  # video ids in CSV order
    train_7k: list[str]
    test_1ka: list[dict[str, str]]  # {"video_id", "sentence"} in CSV order
    caption_source: str  # "official-2016" or "clip4clip-merged"
    categories_from: str  # where the category names were read
    dropped_captions: list[dict[str, str]]  # {"where", "video_id"} of each empty caption left out
    sources: list[str]  # where each file was read from
    digest: str  # sha256 of every byte read, in a fixed order


def _number(video_id: str) -> int:
    return int(video_id[len("video"):])


def _index_files(root: Path) -> dict[str, Path]:
    """File name -> its first path (sorted) under ``root``."""
    index: dict[str, Path] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        index.setdefault(path.name, path)
    return index


def _read(files: dict[str, Path], name: str, zip_name: str | None = None) -> tuple[bytes, str] | None:
    """The bytes of file ``name`` (or of the member of that name in zip ``zip_name``) and where from."""
    if name in files:
        return files[name].read_bytes(), str(files[name])
    if zip_name in files:
        try:
            with zipfile.ZipFile(files[zip_name]) as zf:
                member = next((m for m in zf.namelist() if Path(m).name == name), None)
                if member is not None:
                    return zf.read(member), f"{files[zip_name]}:{member}"
        except zipfile.BadZipFile:
            raise ValueError(f"{files[zip_name]} is not a valid zip file; replace it (or --download)") from None
    return None


def _missing(root: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no {what} under {root}: pass --from DIR with the MSR-VTT annotations (train_val_annotation.zip and "
        f"test_videodatainfo.json.zip of the 2016 release, or CLIP4Clip's {MERGED_JSON}; {CSV_9K}, {CSV_7K}, "
        f"{CSV_1KA}) and the videos (video<N>.mp4), or use --download"
    )


def _decode(blob: bytes, where: str) -> str:
    """``blob`` as UTF-8 text (a leading BOM dropped); ValueError naming ``where``, line and offset if it is not."""
    try:
        return blob.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = blob.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{where} line {line}: byte {blob[err.start]:#04x} at offset {err.start} is not UTF-8 text; "
            "re-save the file as UTF-8, or replace it with the original release"
        ) from None


def _parse_json(blob: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(_decode(blob, where))
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err}); replace it") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(key), list) for key in ("videos", "sentences")):
        raise ValueError(f"{where} lacks the 'videos' and 'sentences' lists of the MSR-VTT format")
    return doc


def _parse_csv(blob: bytes, where: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of a split CSV as dicts, checked as the module docstring says."""
    reader = csv.reader(io.StringIO(_decode(blob, where)))
    header = next(reader, [])
    if not set(columns) <= set(header):
        raise ValueError(f"{where} has columns {header}, expected {list(columns)}")
    rows, first_line = [], {}
    try:
        for values in reader:
            line = reader.line_num  # the line the row ends on (a quoted field may span lines)
            if not values:  # a blank line
                continue
            if len(values) != len(header):
                raise ValueError(f"{where} line {line}: {len(values)} fields, the header has {len(header)}; fix it")
            row = dict(zip(header, values))
            video_id = row["video_id"]
            if not VIDEO_ID.fullmatch(video_id):
                raise ValueError(f"{where} line {line}: video_id {video_id!r} is not of the form video<N>, N in 0-9999")
            if video_id in first_line:
                raise ValueError(
                    f"{where} line {line}: {video_id} repeats line {first_line[video_id]}; a split lists each video "
                    "once: remove one of the rows (or use the original file)"
                )
            first_line[video_id] = line
            if "sentence" in columns and not row["sentence"].strip():
                raise ValueError(f"{where} line {line} ({video_id}): empty sentence; a query needs text: fix the row")
            rows.append(row)
    except csv.Error as err:
        raise ValueError(f"{where} line {reader.line_num}: {err}; fix the row") from None
    return rows


def _parse_categories(blob: bytes, where: str) -> dict[int, str]:
    """category.txt (``name<TAB>index`` per line) as index -> name."""
    names: dict[int, str] = {}
    first_line: dict[int, int] = {}
    for line_number, line in enumerate(_decode(blob, where).splitlines(), start=1):
        if not line.strip():
            continue
        name, tab, index = line.rpartition("\t")
        if not (tab and name.strip() and index.strip().isdecimal()):
            raise ValueError(f"{where} line {line_number}: {line!r} is not 'name<TAB>index'; fix the line")
        if int(index) in names:
            raise ValueError(f"{where} line {line_number}: index {int(index)} repeats line {first_line[int(index)]}")
        names[int(index)] = name
        first_line[int(index)] = line_number
    return names


def _video_id(entry: Any, at: str) -> str:
    """The ``video_id`` of JSON entry ``entry`` (found at ``at``), checked."""
    if not isinstance(entry, dict) or not isinstance(entry.get("video_id"), str):
        raise ValueError(f"{at}: expected an object with a 'video_id', got {entry!r:.80}; fix or remove the entry")
    if not VIDEO_ID.fullmatch(entry["video_id"]):
        raise ValueError(f"{at}: video_id {entry['video_id']!r} is not of the form video<N>, N in 0-9999")
    return entry["video_id"]


def _read_captions(
    docs: list[tuple[bytes, str]], names: dict[int, str], names_from: str
) -> tuple[dict[str, list[str]], dict[str, str | None], list[dict[str, str]]]:
    """Captions, category names and dropped empty captions of the caption JSONs ``docs`` (module docstring)."""
    parsed = [(_parse_json(blob, where), where) for blob, where in docs]
    category: dict[str, str | None] = {}
    video_at: dict[str, str] = {}
    for doc, where in parsed:  # every file's videos first: a sentence may name a video of the other file
        for i, video in enumerate(doc["videos"]):
            at = f"{where} videos[{i}]"
            video_id = _video_id(video, at)
            if video_id in video_at:
                raise ValueError(f"{at}: {video_id} is listed twice (first at {video_at[video_id]}); remove one")
            video_at[video_id] = at
            index = video.get("category")
            if index is not None and (type(index) is not int or index not in names):  # bool is not an index
                raise ValueError(
                    f"{at} ({video_id}): category {index!r} is not an index in {names_from}; fix the entry, or "
                    "pass the category.txt that goes with this file"
                )
            category[video_id] = None if index is None else names[index]
    captions: dict[str, list[str]] = {}
    dropped: list[dict[str, str]] = []
    sen_at: dict[int, tuple[str, int]] = {}  # sen_id -> (file, index) where first seen
    for doc, where in parsed:
        for i, sentence in enumerate(doc["sentences"]):
            # 200,000 sentences: the position string is built only for a message (or a drop)
            video_id = sentence.get("video_id") if type(sentence) is dict else None
            if type(video_id) is not str or video_id not in category:  # the known ids were checked above
                at = f"{where} sentences[{i}]"
                _video_id(sentence, at)
                raise ValueError(f"{at}: {video_id} is in no 'videos' list; add the video or remove the sentence")
            caption = sentence.get("caption")
            if type(caption) is not str:
                raise ValueError(
                    f"{where} sentences[{i}] ({video_id}): caption {caption!r:.80} is not text (a JSON string); fix it")
            sen_id = sentence.get("sen_id")  # optional; the official files number every sentence
            if sen_id is not None:
                if type(sen_id) is not int:
                    raise ValueError(f"{where} sentences[{i}] ({video_id}): sen_id {sen_id!r:.80} is not an integer")
                if sen_id in sen_at:
                    first = "{} sentences[{}]".format(*sen_at[sen_id])
                    raise ValueError(f"{where} sentences[{i}] ({video_id}): sen_id {sen_id} repeats {first}; drop one")
                sen_at[sen_id] = (where, i)
            if not caption.strip():
                dropped.append({"where": f"{where} sentences[{i}]", "video_id": video_id})
                continue
            captions.setdefault(video_id, []).append(caption)
    return captions, category, dropped


def read_annotations(root: str | Path) -> Annotations:
    """Read the caption JSON, the three split CSVs and the category names found under ``root``.

    Checks every entry as the module docstring says. Raises FileNotFoundError when
    a file is missing, ValueError (naming the file and line, or JSON index) for a bad entry.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass --from DIR with the MSR-VTT files, or --download")
    files = _index_files(root)
    found = {m: _read(files, m, z) for m, z in OFFICIAL_JSON.items()}
    if all(found.values()):
        caption_source, docs = "official-2016", list(found.values())
    elif (merged := _read(files, MERGED_JSON)) is not None:
        caption_source, docs = "clip4clip-merged", [merged]
    else:
        absent = [f"{m} (or {z})" for m, z in OFFICIAL_JSON.items() if not found[m]]
        raise _missing(root, f"{' / '.join(absent)} and no {MERGED_JSON}")
    csvs = {}
    for name in CSV_COLUMNS:
        csvs[name] = _read(files, name)
        if csvs[name] is None:
            raise _missing(root, name)
    category_file = _read(files, "category.txt", OFFICIAL_JSON["train_val_videodatainfo.json"]) or (
        SHIPPED_CATEGORIES.read_bytes(), str(SHIPPED_CATEGORIES))

    names = _parse_categories(*category_file)
    captions, category, dropped = _read_captions(docs, names, category_file[1])
    rows = {name: _parse_csv(blob, where, CSV_COLUMNS[name]) for name, (blob, where) in csvs.items()}

    read = [*docs, *csvs.values(), category_file]
    return Annotations(
        captions=captions,
        category=category,
        train_9k=[r["video_id"] for r in rows[CSV_9K]],
        train_7k=[r["video_id"] for r in rows[CSV_7K]],
        test_1ka=[{"video_id": r["video_id"], "sentence": r["sentence"]} for r in rows[CSV_1KA]],
        caption_source=caption_source,
        categories_from=category_file[1],
        dropped_captions=dropped,
        sources=[where for _, where in read],
        digest=hashlib.sha256(b"".join(blob for blob, _ in read)).hexdigest(),
    )


def build_splits(ann: Annotations) -> dict[str, list[dict[str, str]]]:
    """Caption rows of every split (see the module docstring's table)."""
    numbered = sorted(ann.captions, key=_number)
    val = [v for v in numbered if _number(v) in VAL_NUMBERS]
    is_val = set(val)

    def rows(video_ids: list[str]) -> list[dict[str, str]]:
        return [{"video_id": v, "sentence": s} for v in video_ids for s in ann.captions.get(v, [])]

    return {
        "train_9k": rows(ann.train_9k),
        "train_7k": rows(ann.train_7k),
        "val": rows(val),
        "train_9k_noval": rows([v for v in ann.train_9k if v not in is_val]),
        "train_7k_noval": rows([v for v in ann.train_7k if v not in is_val]),
        "test_1ka": list(ann.test_1ka),
        "test_full": rows([v for v in numbered if _number(v) in TEST_NUMBERS]),
    }


def check_video(path: str | Path) -> str | None:
    """None if ``path`` is a video decord opens with more than 0 frames, else why not.

    Example:
        >>> import tempfile, pathlib
        >>> empty = pathlib.Path(tempfile.mkdtemp()) / "video1.mp4"
        >>> _ = empty.write_bytes(b"")
        >>> check_video(empty)
        'empty file (0 bytes)'
    """
    size = Path(path).stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    try:
        frames = len(decord.VideoReader(str(path), num_threads=1))
    except (RuntimeError, decord.DECORDError) as err:
        return f"decord cannot open it ({size} bytes): {str(err).splitlines()[0]}"
    return None if frames > 0 else "decord reads 0 frames"


def probe_videos(paths: dict[str, Path], cache_path: Path) -> dict[str, str | None]:
    """``check_video`` for every path, reusing results cached for the same path, size and mtime."""
    cache = load_json(cache_path) if cache_path.exists() else {}
    known = cache.get("videos", {}) if cache.get("decord") == decord.__version__ else {}
    problems, checked = {}, 0
    for video_id, path in progress(paths.items(), desc="check videos"):
        stat = path.stat()
        entry = known.get(str(path))
        if entry is None or (entry["size"], entry["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns):
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "problem": check_video(path)}
            known[str(path)] = entry
            checked += 1
            if checked % 500 == 0:  # a killed run keeps most of its checks
                save_json(cache_path, {"decord": decord.__version__, "videos": known})
        problems[video_id] = entry["problem"]
    save_json(cache_path, {"decord": decord.__version__, "videos": known})
    return problems


def _split_report(rows: list[dict[str, str]], status: dict[str, str]) -> dict[str, Any]:
    split = Split("", [r["sentence"] for r in rows], [r["video_id"] for r in rows])
    present = [r for r in rows if status[r["video_id"]] == "ok"]
    by_status = Counter(status[v] for v in split.video_ids)
    return {
        **split.counts(),
        "present": Split("", [r["sentence"] for r in present], [r["video_id"] for r in present]).counts(),
        "missing_videos": by_status["missing"],
        "unreadable_videos": by_status["unreadable"],
    }


def find_videos(source: Path) -> dict[str, Path]:
    """video_id -> the first file ``video<N>.mp4`` (sorted path order) under ``source``, by video number."""
    found: dict[str, Path] = {}
    for path in sorted(source.rglob("video*.mp4")):
        if VIDEO_ID.fullmatch(path.stem) and path.is_file():
            found.setdefault(path.stem, path)
    return {v: found[v] for v in sorted(found, key=_number)}


def video_records(
    ann: Annotations, found: dict[str, Path], problems: dict[str, str | None], source: Path
) -> list[dict[str, Any]]:
    """One videos.json record per video any annotation names; a missing video gets its expected path."""
    video_dir = Counter(p.parent for p in found.values()).most_common(1)[0][0] if found else source / "videos"
    named = set(ann.captions).union(ann.train_9k, ann.train_7k, (r["video_id"] for r in ann.test_1ka))
    return [
        {
            "video_id": v,
            "path": str(found.get(v, video_dir / f"{v}.mp4")),
            "title": None,  # MSR-VTT has no titles
            "category": ann.category.get(v),
            "status": "missing" if v not in found else "unreadable" if problems[v] else "ok",
        }
        for v in sorted(named, key=_number)
    ]


def make_manifest(
    ann: Annotations, splits: dict[str, list[dict]], videos: list[dict], problems: dict[str, str | None]
) -> dict[str, Any]:
    """Where the inputs came from, and expected vs present videos overall and per split."""
    status = {r["video_id"]: r["status"] for r in videos}
    counts = Counter(status.values())
    ids = {name: {r["video_id"] for r in rows} for name, rows in splits.items()}
    return {
        "read": ann.sources,
        "videos": {"expected": len(videos), **{s: counts[s] for s in ("ok", "missing", "unreadable")}},
        "splits": {name: _split_report(rows, status) for name, rows in splits.items()},
        "missing_ids": [r["video_id"] for r in videos if r["status"] == "missing"],
        "unreadable": [
            {"video_id": r["video_id"], "path": r["path"], "reason": problems[r["video_id"]]}
            for r in videos
            if r["status"] == "unreadable"
        ],
        "csv_ids_without_captions": {
            name: [v for v in video_ids if v not in ann.captions]
            for name, video_ids in (
                (CSV_9K, ann.train_9k), (CSV_7K, ann.train_7k), (CSV_1KA, [r["video_id"] for r in ann.test_1ka])
            )
        },
        "overlaps": {
            f"{a} & {b}": len(ids[a] & ids[b]) for a in splits if a.startswith("train") for b in EVAL_SPLITS
        },
        "annotations": {
            "category_names_from": ann.categories_from,
            "videos_without_category": [r["video_id"] for r in videos if r["category"] is None],
            "dropped_empty_captions": ann.dropped_captions,
        },
    }


def prepare(source: str | Path, out: str | Path, downloads: list[dict] | None = None,
            reuse_complete: bool = False) -> Dataset:
    """Build every split from the files under ``source``, check the videos, write the dataset root ``out``.

    ``downloads`` (from :func:`download`) is recorded in the manifest. Returns the loaded dataset.
    Runs under :func:`vidret_lib.cache.folder_lock` on ``out``; a second process waits. With
    ``reuse_complete`` (what ``vidret_lib.pipeline.prepare_dataset`` passes, having found ``out``
    incomplete), a root that is complete by then and was prepared from the same ``source`` (by the
    process this one waited for, e.g. another torchrun rank) is loaded, not prepared again.
    """
    source, out = Path(source).resolve(), Path(out)
    with folder_lock(out):
        if reuse_complete and (out / "dataset.json").exists() and load_json(out / "manifest.json").get("source") == str(source):
            return load_dataset(out)
        ann = read_annotations(source)
        (out / "dataset.json").unlink(missing_ok=True)  # the root is incomplete until written again
        splits = build_splits(ann)
        found = find_videos(source)
        problems = probe_videos(found, out / PROBE_FILE)
        videos = video_records(ann, found, problems, source)
        manifest = {
            "source": str(source), "downloads": downloads or [],
            **make_manifest(ann, splits, videos, problems),
        }
        save_json(out / "manifest.json", manifest)
        save_json(out / "summary.json", manifest["splits"])
        info = {
            "name": "msrvtt",
            "version": f"{PREP_VERSION}-{ann.digest[:12]}",
            "source": "MSR-VTT 2016 (Xu et al., CVPR 2016) with the CLIP4Clip/EMCL retrieval splits",
            "caption_source": ann.caption_source,
            "split_notes": SPLIT_NOTES,
        }
        return write_dataset(out, info, videos, splits)


def download(
    cache_dir: str | Path, archives: tuple[Archive, ...] = ARCHIVES, downloader: Downloader | None = None
) -> tuple[Path, list[dict]]:
    """Fetch and unpack ``archives`` under ``cache_dir``; returns the folder to prepare from and the downloads.

    A cached archive that is not a readable zip is replaced (:func:`data_prep.download.fetch_and_extract`).
    """
    cache_dir = Path(cache_dir)
    records = [
        fetch_and_extract(a, cache_dir, cache_dir / "extracted" / Path(a.fname).stem, downloader) for a in archives
    ]
    return cache_dir / "extracted", records


def _preview(items: list[str], shown: int = 5) -> str:
    """The first ``shown`` items, comma-separated, and how many more.

    Example:
        >>> _preview(["a", "b", "c"], shown=2)
        'a, b, ... and 1 more'
    """
    more = f", ... and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def describe(manifest: dict[str, Any]) -> str:
    """The human summary printed at the end of a run: how much of each split is present, and
    every annotation entry that was dropped or lacks something (see the module docstring)."""
    notes = manifest["annotations"]
    lines = [f"category names from {notes['category_names_from']}"]
    for name, video_ids in manifest["csv_ids_without_captions"].items():
        if video_ids:
            lines.append(f"{name}: {len(video_ids)} video ids without captions, left out of the split "
                         f"({_preview(video_ids)})")
    if no_category := notes["videos_without_category"]:
        lines.append(f"{len(no_category)} videos without a category ({_preview(no_category)}): "
                     "title_source='category' (MBVR) has no text for them")
    if dropped := notes["dropped_empty_captions"]:
        lines.append(f"{len(dropped)} empty captions dropped: "
                     + _preview([f"{d['where']} ({d['video_id']})" for d in dropped]))
    for name, r in manifest["splits"].items():
        p = r["present"]
        use = "training will use" if name.startswith("train") else "evaluation will run on"
        lines.append(
            f"{name}: {p['videos']} of {r['videos']} videos present ({r['missing_videos']} missing, "
            f"{r['unreadable_videos']} unreadable); {use} those {p['videos']} "
            f"({p['captions']} of {r['captions']} captions)"
        )
    lines += [f"unreadable {u['path']}: {u['reason']}" for u in manifest["unreadable"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_prep.msrvtt", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--from", dest="source", type=Path, help="folder with the MSR-VTT annotations and videos")
    where.add_argument("--download", action="store_true", help="download the public archives (needs internet)")
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write")
    parser.add_argument("--cache", type=Path, help="download folder (default ~/.cache/vidret/msrvtt)")
    args = parser.parse_args(argv)
    if args.cache and not args.download:
        parser.error("--cache only applies with --download")
    try:
        if args.download:
            source, downloads = download(args.cache or pooch.os_cache("vidret") / "msrvtt")
        else:
            source, downloads = args.source, None
        prepare(source, args.out, downloads)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        parser.exit(2, f"error: {err}\n")
    print(describe(load_json(args.out / "manifest.json")))
    print(f"wrote {args.out} (summary.json, manifest.json)")


if __name__ == "__main__":
    main(sys.argv[1:])
