"""The on-disk layout shared by every dataset (the synthetic benchmark and prepared MSR-VTT).

A notebook swaps datasets by changing one path. Layout under a dataset root::

    dataset.json          {"name", "version", "source", "splits": {split: counts}}
    videos.json           [{"video_id", "path", "title", "category", ...}, ...]
    splits/<split>.json   {"split": name, "captions": [{"video_id", "sentence"}, ...]}
    pairs/<split>.json    [{"video_a", "video_b", "label"}, ...]      (optional)
    manifest.json         expected vs present videos, unreadable files (data prep writes it)
    videos/<video_id>.mp4 (a video's "path" is relative to the root, or absolute)

A split's videos are the distinct ``video_id`` of its captions, in order of first
appearance; caption ``i`` belongs to video ``caption_video[i]`` (an index into
``video_ids``). Retrieval splits with one caption per video (MSR-VTT 1k-A) therefore give a
square text-video matrix with matches on the diagonal.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .cache import load_json, save_json

LAYOUT_VERSION = 1


def _rebuild_advice(root: Path) -> str:
    """What rebuilds a damaged layout file: only a root without ``dataset.json`` is prepared again
    (``vidret_lib.pipeline.prepare_dataset``, ``data_prep``); deleting another file alone does nothing."""
    return (f"delete {root / 'dataset.json'} (or the whole folder {root}) and run again: the notebook "
            "(or data_prep) rebuilds a dataset whose dataset.json is absent")


@dataclass(frozen=True)
class Split:
    """One split: its captions, its videos, and which video each caption describes."""

    name: str
    sentences: list[str]
    caption_video_ids: list[str]
    video_ids: list[str] = field(init=False)
    caption_video: np.ndarray = field(init=False)  # (n_captions,) int64 index into video_ids

    def __post_init__(self) -> None:
        index: dict[str, int] = {}
        for vid in self.caption_video_ids:
            index.setdefault(vid, len(index))
        object.__setattr__(self, "video_ids", list(index))
        object.__setattr__(
            self, "caption_video", np.array([index[v] for v in self.caption_video_ids], dtype=np.int64)
        )

    def video_captions(self) -> list[list[int]]:
        """For each video of the split, the indices of its captions."""
        out: list[list[int]] = [[] for _ in self.video_ids]
        for i, v in enumerate(self.caption_video):
            out[v].append(i)
        return out

    def counts(self) -> dict[str, int]:
        """Numbers of videos, captions and distinct sentences (what summary.json reports)."""
        return {
            "videos": len(self.video_ids),
            "captions": len(self.sentences),
            "distinct_sentences": len(set(self.sentences)),
        }


@dataclass(frozen=True)
class Dataset:
    """A dataset root in the shared layout. Load with :func:`load_dataset`."""

    root: Path
    info: dict[str, Any]
    videos: dict[str, dict[str, Any]]  # video_id -> record from videos.json

    @property
    def name(self) -> str:
        return self.info["name"]

    def split_names(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "splits").glob("*.json"))

    def caption_rows(self, name: str, present_only: bool = False) -> list[dict[str, Any]]:
        """The caption records of split ``name`` as stored: ``video_id``, ``sentence`` and any
        per-caption labels the dataset adds (ShapeMotion: ``facts``, ``underspecified``, ...).

        ``present_only`` keeps the rows whose video is present. Data prep marks each video record
        with a ``status`` (``"ok"``, ``"missing"``, ``"unreadable"``); records without one
        (ShapeMotion writes its own files) count as present. Row i is caption i of
        :meth:`split` with the same arguments.
        """
        path = self.root / "splits" / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: dataset {self.name!r} has splits {self.split_names()}"
            )
        rows = load_json(path, _rebuild_advice(self.root))["captions"]
        unknown = sorted({c["video_id"] for c in rows} - set(self.videos))
        if unknown:
            raise ValueError(f"{path} names videos absent from videos.json: {unknown[:5]} ...")
        if present_only:
            rows = [c for c in rows if self.videos[c["video_id"]].get("status", "ok") == "ok"]
        return rows

    def split(self, name: str, present_only: bool = False) -> Split:
        """Split ``name``; with ``present_only``, only caption rows whose video is present
        (:meth:`caption_rows`): a partly downloaded MSR-VTT is evaluated on the present part,
        named ``<name>.present``.

        Example:
            >>> import tempfile
            >>> videos = [{"video_id": "a", "path": "a.mp4", "status": "ok"},
            ...           {"video_id": "b", "path": "b.mp4", "status": "missing"}]
            >>> rows = [{"video_id": "a", "sentence": "x"}, {"video_id": "b", "sentence": "y"}]
            >>> ds = write_dataset(tempfile.mkdtemp(), {"name": "t"}, videos, {"test": rows})
            >>> sp = ds.split("test", present_only=True)
            >>> sp.name, sp.sentences, sp.video_ids
            ('test.present', ['x'], ['a'])
        """
        rows = self.caption_rows(name, present_only)
        return Split(f"{name}.present" if present_only else name, [c["sentence"] for c in rows],
                     [c["video_id"] for c in rows])

    def manifest(self) -> dict[str, Any]:
        """The data-prep manifest (expected vs present videos), or {} if there is none."""
        path = self.root / "manifest.json"
        return load_json(path, _rebuild_advice(self.root)) if path.exists() else {}

    def pairs(self, name: str) -> list[dict[str, Any]]:
        path = self.root / "pairs" / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: dataset {self.name!r} has no {name!r} pair split")
        return load_json(path, _rebuild_advice(self.root))

    def video_path(self, video_id: str) -> Path:
        p = Path(self.videos[video_id]["path"])
        return p if p.is_absolute() else self.root / p

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this dataset's content in cache keys."""
        return {
            "name": self.name,
            "version": self.info.get("version"),
            "content": self.info.get("content_hash"),
            "layout": LAYOUT_VERSION,
        }


def load_dataset(root: str | os.PathLike) -> Dataset:
    """Read a dataset root written by ``data_prep`` (see the module docstring)."""
    root = Path(root)
    if not (root / "dataset.json").exists():
        raise FileNotFoundError(
            f"{root} is not a prepared dataset (no dataset.json); run "
            "`python -m data_prep.synthetic --out DIR` or `python -m data_prep.msrvtt --out DIR` first"
        )
    info = load_json(root / "dataset.json", _rebuild_advice(root))
    videos = {v["video_id"]: v for v in load_json(root / "videos.json", _rebuild_advice(root))}
    return Dataset(root=root, info=info, videos=videos)


def write_dataset(
    root: str | os.PathLike,
    info: dict[str, Any],
    videos: Iterable[dict[str, Any]],
    splits: dict[str, list[dict[str, str]]],
    pairs: dict[str, list[dict[str, Any]]] | None = None,
) -> Dataset:
    """Write the layout's JSON files atomically (videos themselves are written by the caller).

    ``splits`` maps a split name to its caption rows ``{"video_id", "sentence"}``;
    ``dataset.json`` is written last, so a root with ``dataset.json`` is complete.
    """
    root = Path(root)
    videos = list(videos)
    for v in videos:
        missing = {"video_id", "path"} - set(v)
        if missing:
            raise ValueError(f"video record {v} lacks {sorted(missing)}")
    save_json(root / "videos.json", videos)
    counts = {}
    for name, caps in splits.items():
        save_json(root / "splits" / f"{name}.json", {"split": name, "captions": caps})
        counts[name] = Split(name, [c["sentence"] for c in caps], [c["video_id"] for c in caps]).counts()
    for name, rows in (pairs or {}).items():
        save_json(root / "pairs" / f"{name}.json", rows)
    save_json(root / "dataset.json", {**info, "layout": LAYOUT_VERSION, "splits": counts})
    return load_dataset(root)
