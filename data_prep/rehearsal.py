"""A mini MSR-VTT source folder and a tiny CLIP for the CPU dress rehearsal of the MSR-VTT profiles.

Usage::

    python -m data_prep.rehearsal [--out DIR]     # default runs/msrvtt-rehearsal (git-ignored)

``params/msrvtt-rehearsal.yaml`` names this module under ``prepare:``, so
``python -m vidret_lib.reproduce --profile msrvtt-rehearsal`` (and ``make reproduce
PROFILE=msrvtt-rehearsal``) builds the folder first, through :func:`prepare`.

What :func:`build` writes under ``DIR`` (deterministic; a folder whose ``rehearsal.json`` holds
the same key is reused as it is, any other is deleted and rebuilt):

- ``source/``: what ``python -m data_prep.msrvtt --from`` reads, in the layout of the
  real files (``../shared/data/msrvtt``):

  - ``annotations/``: ``train_val_annotation.zip`` (``category.txt``, ``readme.txt``,
    ``train_val_videodatainfo.json``), ``test_videodatainfo.json.zip``,
    ``MSRVTT_train.9k.csv``, ``MSRVTT_train.7k.csv``, ``MSRVTT_JSFUSION_test.csv``,
    ``category.txt``, ``readme.txt``. When ``../shared/data/msrvtt/annotations`` is there they
    are a subset of the real files (:data:`TRAIN_VIDEOS` non-val and :data:`VAL_VIDEOS` val
    videos in ``MSRVTT_train.9k.csv`` order, the first :data:`TEST_QUERIES` rows of
    ``MSRVTT_JSFUSION_test.csv``, each with every entry the JSON files give it and its first
    :data:`CAPTIONS_PER_VIDEO` captions, verbatim); otherwise a generated stand-in with the same names, schema and id ranges
    (train ``video0``..., val ``video6513``..., test ``video9770``...), whose captions say
    what its generated clips show;
  - ``videos/video<N>.mp4`` for every chosen id but three (one train, one val and one test
    id: missing), among them two damaged files: a copy of a real clip truncated to 60% (its
    ``moov`` box, at the end, is lost: decord cannot open it) and a copy with 4 kB of random
    bytes written over the middle of its media data (it opens; frames near the damage may not
    decode). Of the others, the two real clips keep their ids when chosen, every fourth id is a
    copy of a real clip and the rest are generated H.264 clips (64x48 pixels, 5 s at 5 fps, a
    coloured square moving over a plain background; ``data_prep.synthetic_render.write_mp4``).
    Without ``../shared/data/msrvtt/videos`` every clip is generated.
- ``model/``: :data:`TINY_CLIP_NAME`, a CLIP-shaped open_clip architecture
  (:data:`TINY_CLIP`: ViT of width 64, 2 layers, 32 px images in 8 px patches; a text tower of
  width 64, 2 layers, CLIP's 77-token context and vocabulary; QuickGELU, as OpenAI's CLIP), as
  the config file ``Tiny-CLIP-quickgelu.json`` and a random initialisation (seed 0) saved as the
  state dict ``tiny-clip.pt``. After :func:`register_model`,
  ``vidret_lib.encoders.load_encoder(TINY_CLIP_NAME, pretrained=".../tiny-clip.pt")`` loads it.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from vidret_lib.cache import save_json

from .msrvtt import CSV_1KA, CSV_7K, CSV_9K, OFFICIAL_JSON, SHIPPED_CATEGORIES, VAL_NUMBERS, _number
from .synthetic_render import write_mp4

REHEARSAL_VERSION = "2"  # bump when what build() writes changes
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = PROJECT_ROOT / "runs" / "msrvtt-rehearsal"  # params/msrvtt-rehearsal.yaml's paths point here
SHARED_MSRVTT = PROJECT_ROOT.parent / "shared" / "data" / "msrvtt"
TRAIN_VIDEOS, VAL_VIDEOS, TEST_QUERIES = 24, 8, 16
# captions per video in the JSON files (MSR-VTT has 20; the real subset keeps each video's first ones): the
# rehearsal trains end to end with caption sampling, where 20 captions would take 10x the steps of the tiny run
CAPTIONS_PER_VIDEO = 2
CLIP_FPS, CLIP_SECONDS, CLIP_SIZE = 5, 5, (48, 64)  # generated clips: (H, W)
TINY_CLIP_NAME = "Tiny-CLIP-quickgelu"
TINY_CLIP = {  # open_clip's model-config schema (open_clip/model_configs/ViT-B-32-quickgelu.json)
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CHECKPOINT = "tiny-clip.pt"
STAMP = "rehearsal.json"
ZIP_TIME = (2016, 4, 14, 17, 7, 0)  # fixed member times: the same files give the same zip bytes
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
MOTIONS = {"left to right": (1, 0), "right to left": (-1, 0), "downwards": (0, 1), "upwards": (0, -1)}


# ------------------------------------------------------------------ annotations
def _zip_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def real_subset(annotations: Path) -> dict[str, Any]:
    """A subset of the real annotation files under ``annotations`` (see the module docstring).

    Returns ``{"files": {name: bytes}, "ids": {"train", "val", "test"}: [video ids]}``: the
    files to write under ``source/annotations`` and the chosen ids (train and val in
    ``MSRVTT_train.9k.csv`` order, test in ``MSRVTT_JSFUSION_test.csv`` order). Raises
    ``FileNotFoundError`` naming a missing file.
    """
    def read(name: str) -> bytes:
        path = annotations / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the real MSR-VTT annotations need it")
        return path.read_bytes()

    nine_k = read(CSV_9K).decode().splitlines()
    ids_9k = [line.strip() for line in nine_k[1:] if line.strip()]
    train = [v for v in ids_9k if _number(v) not in VAL_NUMBERS][:TRAIN_VIDEOS]
    val = [v for v in ids_9k if _number(v) in VAL_NUMBERS][:VAL_VIDEOS]
    test_lines = read(CSV_1KA).decode().splitlines()
    test_rows = test_lines[1:TEST_QUERIES + 1]
    test = [next(csv.reader([row]))[2] for row in test_rows]
    chosen = set(train) | set(val) | set(test)
    seven_k = read(CSV_7K).decode().splitlines()
    files = {
        CSV_9K: _lines([nine_k[0], *[v for v in ids_9k if v in chosen]]),
        CSV_7K: _lines([seven_k[0], *[line for line in seven_k[1:] if line.strip() in chosen]]),
        CSV_1KA: _lines([test_lines[0], *test_rows]),
        "category.txt": read("category.txt"),
        "readme.txt": read("readme.txt"),
    }
    for member, zip_name in OFFICIAL_JSON.items():
        with zipfile.ZipFile(annotations / zip_name) as zf:
            doc = json.loads(zf.read(member))
        files[member] = _zip_json({
            "info": doc["info"],
            "videos": [v for v in doc["videos"] if v["video_id"] in chosen],
            "sentences": _first_captions([s for s in doc["sentences"] if s["video_id"] in chosen]),
        })
    return {"files": files, "ids": {"train": train, "val": val, "test": test}}


def _first_captions(sentences: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first :data:`CAPTIONS_PER_VIDEO` entries of each video in ``sentences``, in file order."""
    kept: list[dict[str, Any]] = []
    count: dict[str, int] = {}
    for sentence in sentences:
        count[sentence["video_id"]] = count.get(sentence["video_id"], 0) + 1
        if count[sentence["video_id"]] <= CAPTIONS_PER_VIDEO:
            kept.append(sentence)
    return kept


def _lines(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def clip_content(video_id: str) -> dict[str, str]:
    """The colour and motion of the generated clip of ``video_id`` (fixed by its number)."""
    n = _number(video_id)
    return {"colour": list(COLOURS)[n % len(COLOURS)], "motion": list(MOTIONS)[(n // len(COLOURS)) % len(MOTIONS)]}


def stand_in(seed: int = 0) -> dict[str, Any]:
    """Generated annotation files with the real names, schema and id ranges (see :func:`real_subset`).

    Captions describe :func:`clip_content` in a few phrasings; categories cycle over the 20 names
    of ``data_prep/msrvtt_category.txt``.
    """
    rng = np.random.default_rng(seed)
    train = [f"video{n}" for n in range(TRAIN_VIDEOS)]
    val = [f"video{VAL_NUMBERS.start + i}" for i in range(VAL_VIDEOS)]
    test = [f"video{9770 + i}" for i in range(TEST_QUERIES)]
    phrasings = ("a {colour} square moves {motion}", "a {colour} box slides {motion}",
                 "{colour} shape moving {motion}", "a small {colour} square goes {motion} on a plain background")

    def caption(video_id: str) -> str:
        return str(rng.choice(phrasings)).format(**clip_content(video_id))

    def doc(video_ids: list[str], split_of: dict[str, str], first_sen_id: int) -> dict[str, Any]:
        videos = [{"category": _number(v) % 20, "url": "", "video_id": v, "start time": 0.0,
                   "end time": float(CLIP_SECONDS), "split": split_of[v], "id": _number(v)} for v in video_ids]
        sentences = [{"caption": caption(v), "video_id": v, "sen_id": first_sen_id + i * CAPTIONS_PER_VIDEO + j}
                     for i, v in enumerate(video_ids) for j in range(CAPTIONS_PER_VIDEO)]
        return {"info": {"description": "vidret rehearsal stand-in for MSR-VTT (generated)"},
                "videos": videos, "sentences": sentences}

    train_val = doc(train + val, {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "validate")}, 0)
    test_doc = doc(test, dict.fromkeys(test, "test"), len(train_val["sentences"]))
    queries = [f"ret{i},msr{_number(v)},{v},{caption(v)}" for i, v in enumerate(test)]
    files = {
        CSV_9K: _lines(["video_id", *train, *val]),
        CSV_7K: _lines(["video_id", *train, *val]),
        CSV_1KA: _lines(["key,vid_key,video_id,sentence", *queries]),
        "category.txt": SHIPPED_CATEGORIES.read_bytes(),
        "readme.txt": b"vidret rehearsal stand-in for MSR-VTT 10K: generated annotations (data_prep/rehearsal.py)\n",
        "train_val_videodatainfo.json": _zip_json(train_val),
        "test_videodatainfo.json": _zip_json(test_doc),
    }
    return {"files": files, "ids": {"train": train, "val": val, "test": test}}


def write_annotations(files: dict[str, bytes], folder: Path) -> None:
    """The annotation files as the real release lays them out (the two JSON files zipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    zipped = {"train_val_annotation.zip": ("category.txt", "readme.txt", "train_val_videodatainfo.json"),
              "test_videodatainfo.json.zip": ("test_videodatainfo.json",)}
    for zip_name, members in zipped.items():
        with zipfile.ZipFile(folder / zip_name, "w", zipfile.ZIP_DEFLATED) as zf:
            for member in members:
                zf.writestr(zipfile.ZipInfo(member, ZIP_TIME), files[member])
    for name in (CSV_9K, CSV_7K, CSV_1KA, "category.txt", "readme.txt"):
        (folder / name).write_bytes(files[name])


# ------------------------------------------------------------------ videos
def generated_clip(video_id: str) -> np.ndarray:
    """uint8 RGB frames (CLIP_FPS * CLIP_SECONDS, H, W, 3): :func:`clip_content`'s square crossing a plain frame."""
    h, w = CLIP_SIZE
    n = CLIP_FPS * CLIP_SECONDS
    content = clip_content(video_id)
    dx, dy = MOTIONS[content["motion"]]
    shade = 60 + (_number(video_id) * 37) % 120  # background grey level, so clips differ beyond the caption
    frames = np.full((n, h, w, 3), shade, np.uint8)
    side = 12
    for t in range(n):
        u = t / (n - 1)  # 0 -> 1 across the clip
        cx = int(round((w - side) * (u if dx > 0 else 1 - u))) if dx else (w - side) // 2
        cy = int(round((h - side) * (u if dy > 0 else 1 - u))) if dy else (h - side) // 2
        frames[t, cy:cy + side, cx:cx + side] = COLOURS[content["colour"]]
    return frames


def plan_videos(ids: dict[str, list[str]], real_clips: list[Path]) -> dict[str, str]:
    """video id -> what its file is: ``"missing"``, ``"truncated"``, ``"garbage"``, ``"real:<name>"`` or ``"generated"``.

    The last train, val and test ids are missing; the second-to-last train id is truncated and the
    second-to-last test id gets garbage bytes (both copies of the first real clip, or of a generated
    clip when there is none); real clips keep their own ids; every fourth other id copies a real clip.
    """
    plan: dict[str, str] = {}
    for split in ("train", "val", "test"):
        plan[ids[split][-1]] = "missing"
    plan[ids["train"][-2]] = "truncated"
    plan[ids["test"][-2]] = "garbage"
    real = {p.stem: p.name for p in real_clips}
    every = sorted({v for split in ids.values() for v in split}, key=_number)
    for i, video_id in enumerate(every):
        if video_id in plan:
            continue
        if video_id in real:
            plan[video_id] = f"real:{real[video_id]}"
        elif real_clips and i % 4 == 0:
            plan[video_id] = f"real:{real_clips[(i // 4) % len(real_clips)].name}"
        else:
            plan[video_id] = "generated"
    return {v: plan[v] for v in every}


def write_videos(plan: dict[str, str], real_clips: list[Path], folder: Path) -> None:
    """The files of :func:`plan_videos` under ``folder`` (``video<N>.mp4``)."""
    folder.mkdir(parents=True, exist_ok=True)
    real = {p.name: p for p in real_clips}
    for video_id, kind in plan.items():
        path = folder / f"{video_id}.mp4"
        if kind == "missing":
            continue
        if kind.startswith("real:"):
            shutil.copyfile(real[kind[len("real:"):]], path)
            continue
        if kind == "generated" or not real_clips:
            write_mp4(path, generated_clip(video_id), CLIP_FPS, crf=28, comment=f"vidret rehearsal {video_id}")
        else:
            shutil.copyfile(real_clips[0], path)
        blob = bytearray(path.read_bytes())
        if kind == "truncated":  # the moov box (stream index) sits at the end of these files: it is lost
            path.write_bytes(bytes(blob[:int(len(blob) * 0.6)]))
        elif kind == "garbage":  # random bytes over the middle of the media data; the index is intact
            middle, size = len(blob) // 2, min(4096, len(blob) // 4)
            blob[middle:middle + size] = np.random.default_rng(_number(video_id)).bytes(size)
            path.write_bytes(bytes(blob))


# ------------------------------------------------------------------ the tiny CLIP
def register_model(model_dir: str | os.PathLike) -> str:
    """Register ``<model_dir>/Tiny-CLIP-quickgelu.json`` with open_clip (this process); return its name.

    Raises ``FileNotFoundError`` when the config is absent (run ``python -m data_prep.rehearsal``).
    """
    import open_clip

    config = Path(model_dir) / f"{TINY_CLIP_NAME}.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: build it with `python -m data_prep.rehearsal`")
    if TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(config)
    return TINY_CLIP_NAME


def write_model(model_dir: Path, seed: int = 0) -> Path:
    """The config of :data:`TINY_CLIP` and its random initialisation (``seed``) as a state dict file."""
    import open_clip
    import torch

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP, indent=1) + "\n")
    register_model(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP_NAME)
    path = model_dir / CHECKPOINT
    torch.save(model.state_dict(), path)
    return path


# ------------------------------------------------------------------ the folder
def rehearsal_key(shared: Path) -> str:
    """What the folder is built from: this version, the sizes and model, and every shared file's bytes."""
    h = hashlib.sha256(json.dumps({
        "version": REHEARSAL_VERSION, "sizes": [TRAIN_VIDEOS, VAL_VIDEOS, TEST_QUERIES, CAPTIONS_PER_VIDEO],
        "clip": [CLIP_FPS, CLIP_SECONDS, CLIP_SIZE], "model": TINY_CLIP,
    }, sort_keys=True).encode())
    for path in sorted(shared.rglob("*")) if shared.is_dir() else []:
        if path.is_file():
            h.update(path.relative_to(shared).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def build(out: str | os.PathLike = DEFAULT_OUT, shared: str | os.PathLike = SHARED_MSRVTT) -> dict[str, Any]:
    """Build (or reuse) the rehearsal folder ``out`` from ``shared`` (the real MSR-VTT files, if present).

    Returns the contents of ``out/rehearsal.json``: ``source`` and ``model_dir`` (paths),
    ``checkpoint``, ``model`` (the open_clip name), ``annotations_from`` (``"real subset"`` or
    ``"stand-in"``), ``videos`` (id -> kind, see :func:`plan_videos`) and ``key``. A folder with
    another key (older version, other shared files) is deleted first, with everything the
    rehearsal profile wrote under it (prepared data, caches, results).
    """
    out, shared = Path(out), Path(shared)
    key = rehearsal_key(shared)
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return json.loads(stamp.read_text())
    if out.exists():
        shutil.rmtree(out)
    annotations = shared / "annotations"
    subset = real_subset(annotations) if annotations.is_dir() else stand_in()
    real_clips = sorted((shared / "videos").glob("video*.mp4")) if (shared / "videos").is_dir() else []
    write_annotations(subset["files"], out / "source" / "annotations")
    plan = plan_videos(subset["ids"], real_clips)
    write_videos(plan, real_clips, out / "source" / "videos")
    checkpoint = write_model(out / "model")
    info = {
        "source": str(out / "source"), "model_dir": str(out / "model"), "checkpoint": str(checkpoint),
        "model": TINY_CLIP_NAME, "annotations_from": "real subset" if annotations.is_dir() else "stand-in",
        "ids": subset["ids"], "videos": plan, "key": key,
    }
    save_json(stamp, info)  # written last: a folder without it is incomplete and rebuilt
    return info


def prepare() -> dict[str, str]:
    """Build the default folder; return the environment the notebook kernels need.

    The hook ``reproduce`` calls for a profile whose ``prepare:`` names this module:
    ``VIDRET_OPEN_CLIP_CONFIGS`` makes each kernel register the tiny CLIP
    (:func:`vidret_lib.profiles.apply_smoke`).
    """
    return {"VIDRET_OPEN_CLIP_CONFIGS": build()["model_dir"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.rehearsal", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder to build (default {DEFAULT_OUT})")
    parser.add_argument("--shared", type=Path, default=SHARED_MSRVTT,
                        help="the real MSR-VTT files (annotations/, videos/); absent: a generated stand-in")
    args = parser.parse_args(argv)
    info = build(args.out, args.shared)
    kinds = {k: sum(1 for v in info["videos"].values() if v.split(":")[0] == k)
             for k in ("real", "generated", "missing", "truncated", "garbage")}
    print(f"{args.out}: annotations from {info['annotations_from']}, videos {kinds}, model {info['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
