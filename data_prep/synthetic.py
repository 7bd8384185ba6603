"""ShapeMotion: a synthetic text-video retrieval benchmark, deterministic from a seed.

Short videos of a coloured shape moving over a background, with small distractor shapes,
written as real H.264 mp4 files in the shared dataset layout (:mod:`vidret_lib.datasets`),
so every notebook runs the same pipeline on it as on MSR-VTT. Each property below exists so
that one of the replicated papers has something to show (``PROPERTIES`` is the short form
written to ``dataset.json``):

- several captions per training video (``captions_per_train_video``), one per val video and
  ``captions_per_test_video`` per test video (MSR-VTT 9k / 1k-A style; several test captions
  give more test queries for the same gallery), and a validation split separate from test;
- temporal-only facts: a family may hold a video and its exact time reversal (its *twin*),
  whose frames are the same set in the opposite order, so any mean over frames is equal,
  while the captions differ in direction of motion or order of events (CLIP4Clip seqTransf
  vs meanP);
- near-duplicate *families*: variants of a base video that differ from it in exactly one
  attribute (hard negatives for VSE++);
- under-specified captions ("a shape is shown") at ``underspecified_rate`` (hub videos, for
  CAMoE's dual softmax re-ranking);
- a title per video naming appearance facts only, missing or wrong at controllable rates;
  motion and event order are never in a title, so queries about them need vision (MBVR);
- graded relevance labels for video pairs from weighted attribute overlap plus noise,
  quantised to ``label_levels`` values, in train/val/test pair splits (CIKM 2021).

Videos have ``fps * (sampled_frames - 1) + 1`` frames, so CLIP4Clip's 1-fps rule picks
exactly ``sampled_frames`` of them (frames ``0, fps, 2 fps, ...``), evenly spread over the
motion, forwards for a video and backwards for its twin.

Fields beyond the shared layout. A ``videos.json`` record adds ``split``, ``family``,
``varied`` ("base", "time" for the twin, or the attribute a variant changes), ``twin`` (the
reversed video's id or None), ``attributes`` (shape, colour, size, motion, background,
distractors, event, shape2, colour2: what captions and labels are made from), ``scene``
(what the renderer draws), ``title_correct`` (None when the title is missing),
``title_facts`` and ``title_wrong_fact``; ``category`` is the motion's kind without its
direction ("horizontal", "circling", ...). A caption row adds ``facts`` (what it states),
``underspecified`` and ``needs_vision``.

The default size has 600 / 500 / 1,000 videos (train / val / test), 5 captions per train
video and 2 per test video (1,000 test videos and 2,000 test queries, the size of MSR-VTT 1k-A's
gallery; issue 12).

Run ``python -m data_prep.synthetic --size {smoke,default,large} --seed 0 --out DIR``, or
call :func:`generate`. The same seed and size give byte-identical files, mp4s included, with
any number of worker processes. Generation is resumable: each mp4 is written atomically and
carries its key (what produced it) in its metadata; a re-run keeps every valid mp4 whose key
matches and writes ``dataset.json`` last.

:func:`static_pairs` draws still images with captions of static facts only (no motion, no
event), from a random stream of their own: the image-text pairs on which
:mod:`vidret_lib.pretrain` aligns the encoder's towers, as CLIP was aligned before any
video paper fine-tuned it.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from vidret_lib.cache import atomic_write, cache_key, folder_lock, load_json, remove_stale_temporaries
from vidret_lib.datasets import Dataset, write_dataset
from vidret_lib.progress import progress

from . import grammar
from .synthetic_render import (
    BACKGROUNDS, COLOURS, SHAPES, SIZES, mp4_matches, render_frame, render_frames, write_mp4,
)

GENERATOR_VERSION = "2"  # bump whenever the generator's output changes (it is in every cache key)

MOTIONS = (
    "left_to_right", "right_to_left", "up", "down", "diagonal_up", "diagonal_down",
    "clockwise", "counterclockwise", "bouncing", "static",
)
# What a motion looks like played backwards; bouncing and static read the same both ways.
REVERSE_MOTION = {
    "left_to_right": "right_to_left", "right_to_left": "left_to_right", "up": "down", "down": "up",
    "diagonal_up": "diagonal_down", "diagonal_down": "diagonal_up", "clockwise": "counterclockwise",
    "counterclockwise": "clockwise", "bouncing": "bouncing", "static": "static",
}
MOTION_KIND = {
    "left_to_right": "horizontal", "right_to_left": "horizontal", "up": "vertical", "down": "vertical",
    "diagonal_up": "diagonal", "diagonal_down": "diagonal", "clockwise": "circling",
    "counterclockwise": "circling", "bouncing": "bouncing", "static": "static",
}
EVENTS = ("none", "colour_change", "sequence")
# Attributes a family variant changes (one each); "time" marks a base's reversed twin.
VARIABLE_ATTRIBUTES = ("shape", "colour", "size", "motion", "background")
# Weights of the per-attribute similarities in a pair's relevance (they sum to 1).
RELEVANCE_WEIGHTS = {
    "shape": 0.25, "colour": 0.2, "motion": 0.25, "size": 0.1, "background": 0.1, "event": 0.1,
}
SPLITS = ("train", "val", "test")

PROPERTIES = {
    "captions": "train videos have captions_per_train_video captions, test videos captions_per_test_video, "
    "val videos one each",
    "temporal_twins": "a family may hold a video and its exact time reversal ('twin'): same frames in "
    "reverse order, captions differ in direction of motion or order of events",
    "families": "videos of a family differ from its base in exactly one attribute ('varied')",
    "underspecified": "a share underspecified_rate of captions states no fact ('a shape is shown')",
    "titles": "titles name appearance facts only (never motion or event order); missing or wrong at "
    "title_missing_rate / title_wrong_rate; videos.json records title_correct and title_facts",
    "needs_vision": "a caption needs vision when it states a fact the video's title does not give correctly",
    "pairs": "graded relevance of video pairs within a split: weighted attribute overlap plus Gaussian "
    "noise (label_noise), quantised to label_levels values in [0, 1]",
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that shapes a ShapeMotion dataset (besides the seed). Rates are shares in [0, 1]."""

    n_train: int = 600
    n_val: int = 500
    n_test: int = 1000
    captions_per_train_video: int = 5
    captions_per_test_video: int = 2  # val videos have one each
    frame_size: int = 96  # pixels, square
    fps: int = 8
    sampled_frames: int = 8  # frames CLIP4Clip's 1-fps rule picks; the video has fps*(this-1)+1 frames
    family_size: int = 4  # base + variants (at most 2 + len(VARIABLE_ATTRIBUTES))
    twin_rate: float = 0.5  # share of families holding the base's time-reversed twin
    colour_change_rate: float = 0.2  # share of base videos whose shape changes colour midway
    sequence_rate: float = 0.2  # share of base videos whose shape is replaced by another midway
    max_distractors: int = 2
    underspecified_rate: float = 0.1
    caption_colour_rate: float = 0.85  # chance a caption states each fact (the shape is always stated)
    caption_size_rate: float = 0.5
    caption_motion_rate: float = 0.85
    caption_event_rate: float = 0.9
    caption_background_rate: float = 0.35
    caption_distractor_rate: float = 0.25
    title_missing_rate: float = 0.15
    title_wrong_rate: float = 0.15
    title_size_rate: float = 0.4  # titles always name shape and colour
    title_background_rate: float = 0.3
    pairs_per_video: int = 10  # random pair partners per video, besides its family
    label_levels: int = 20
    label_noise: float = 0.05  # std of the Gaussian noise added before quantising
    crf: int = 18  # x264 quality

    def __post_init__(self) -> None:
        rates = [f.name for f in fields(self) if f.name.endswith("_rate") or f.name == "label_noise"]
        bad = [f"{r}={getattr(self, r)}" for r in rates if not 0.0 <= getattr(self, r) <= 1.0]
        if self.title_missing_rate + self.title_wrong_rate > 1:
            bad.append("title_missing_rate + title_wrong_rate > 1")
        if self.colour_change_rate + self.sequence_rate > 1:
            bad.append("colour_change_rate + sequence_rate > 1")
        if not 1 <= self.family_size <= 2 + len(VARIABLE_ATTRIBUTES):
            bad.append(f"family_size={self.family_size} (1..{2 + len(VARIABLE_ATTRIBUTES)})")
        if self.frame_size % 2 or self.frame_size < 48:
            bad.append(f"frame_size={self.frame_size} (must be even for yuv420p, and >= 48)")
        minimum = {"sampled_frames": 2, "fps": 1, "label_levels": 2, "captions_per_train_video": 1,
                   "captions_per_test_video": 1}
        minimum |= {k: 0 for k in ("n_train", "n_val", "n_test", "max_distractors", "pairs_per_video")}
        bad += [f"{k}={getattr(self, k)} (< {m})" for k, m in minimum.items() if getattr(self, k) < m]
        if bad:
            raise ValueError(f"invalid SyntheticConfig: {'; '.join(bad)}")

    @property
    def n_frames(self) -> int:
        """Frames per video."""
        return self.fps * (self.sampled_frames - 1) + 1


PRESETS: dict[str, SyntheticConfig] = {
    "smoke": SyntheticConfig(
        n_train=24, n_val=8, n_test=8, frame_size=64, sampled_frames=6, pairs_per_video=6
    ),
    "default": SyntheticConfig(),
    "large": SyntheticConfig(n_train=3000, n_val=500, n_test=1000),
}


# ---------------------------------------------------------------- scenes and attributes


def _path(rng: np.random.Generator, motion: str, frame_size: int) -> dict:
    """Random path for ``motion`` that keeps a shape of any size inside the frame."""
    s = frame_size
    margin = math.ceil(max(SIZES.values()) * s) + 2
    lo, hi, jitter = margin, s - 1 - margin, 0.1 * s

    def r(a: float, b: float) -> float:
        return round(float(rng.uniform(a, b)), 2)

    if motion in ("left_to_right", "right_to_left"):
        y, left, right = r(lo, hi), r(lo, lo + jitter), r(hi - jitter, hi)
        ends = [[left, y], [right, y]]
    elif motion in ("up", "down"):
        x, top, bottom = r(lo, hi), r(lo, lo + jitter), r(hi - jitter, hi)
        ends = [[x, bottom], [x, top]]
    elif motion in ("diagonal_up", "diagonal_down"):
        ends = [[r(lo, lo + jitter), r(hi - jitter, hi)], [r(hi - jitter, hi), r(lo, lo + jitter)]]
    elif motion in ("clockwise", "counterclockwise"):
        radius = r(0.18 * s, 0.28 * s)
        slack = (hi - lo) / 2 - radius
        return {
            "kind": "circle",
            "centre": [r(s / 2 - slack, s / 2 + slack), r(s / 2 - slack, s / 2 + slack)],
            "radius": radius,
            "angle0": r(0, 2 * math.pi),
            "sweep": 1 if motion == "clockwise" else -1,
        }
    elif motion == "bouncing":
        floor = r(hi - jitter, hi)
        height = r(0.35 * s, floor - lo)
        return {"kind": "bounce", "x": r(lo, hi), "floor": floor, "height": height, "bounces": 3}
    elif motion == "static":
        return {"kind": "static", "at": [r(lo, hi), r(lo, hi)]}
    else:
        raise ValueError(f"unknown motion {motion!r}; known motions: {MOTIONS}")
    # ``ends`` run left to right, bottom to top, bottom-left to top-right; the others go back.
    start, end = ends if motion in ("left_to_right", "up", "diagonal_up") else ends[::-1]
    return {"kind": "linear", "start": start, "end": end}


def _choice(rng: np.random.Generator, options, exclude=()) -> str:
    options = [o for o in options if o not in exclude]
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, cfg: SyntheticConfig, reversible: bool = False) -> dict:
    """A random scene. ``reversible=True`` makes it differ from its time reversal (for a twin).

    Example:
        >>> s = sample_scene(np.random.default_rng(0), PRESETS["smoke"], reversible=True)
        >>> describe(s) != describe(reverse_scene(s))
        True
    """
    r = rng.random()
    event = "colour_change" if r < cfg.colour_change_rate else "none"
    if cfg.colour_change_rate <= r < cfg.colour_change_rate + cfg.sequence_rate:
        event = "sequence"
    time_symmetric = ("bouncing", "static")  # played backwards they look the same
    motion = _choice(rng, MOTIONS, exclude=time_symmetric if reversible and event == "none" else ())
    shape, colour = _choice(rng, SHAPES), _choice(rng, COLOURS)
    actor = {
        "shape": shape,
        "colour": colour,
        "size": _choice(rng, SIZES),
        "motion": motion,
        "path": _path(rng, motion, cfg.frame_size),
        "event": event,
        "shape2": _choice(rng, SHAPES, exclude=[shape]) if event == "sequence" else None,
        "colour2": _choice(rng, COLOURS, exclude=[colour]) if event != "none" else None,
    }
    distractors = []
    s = cfg.frame_size
    for _ in range(int(rng.integers(cfg.max_distractors + 1))):
        start = rng.uniform(0.1 * s, 0.9 * s, size=2)
        end = np.clip(start + rng.uniform(-0.25 * s, 0.25 * s, size=2), 0.1 * s, 0.9 * s)
        path = {"kind": "linear", "start": np.round(start, 2).tolist(), "end": np.round(end, 2).tolist()}
        distractors.append({"shape": _choice(rng, SHAPES), "colour": _choice(rng, COLOURS), "path": path})
    return {
        "background": _choice(rng, BACKGROUNDS),
        "phase": int(rng.integers(16)),
        "reversed": False,
        "actor": actor,
        "distractors": distractors,
    }


def reverse_scene(scene: dict) -> dict:
    """The same scene played backwards (its frames are the original's in reverse order)."""
    return {**scene, "reversed": not scene["reversed"]}


def vary_scene(rng: np.random.Generator, scene: dict, attribute: str, cfg: SyntheticConfig) -> dict:
    """A copy of ``scene`` whose described ``attribute`` (one of ``VARIABLE_ATTRIBUTES``) changes.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> base = sample_scene(rng, PRESETS["smoke"])
        >>> a, b = describe(base), describe(vary_scene(rng, base, "colour", PRESETS["smoke"]))
        >>> sorted(k for k in a if a[k] != b[k])
        ['colour']
    """
    actor = dict(scene["actor"])
    if attribute == "shape":
        actor["shape"] = _choice(rng, SHAPES, exclude=[actor["shape"], actor["shape2"]])
    elif attribute == "colour":
        actor["colour"] = _choice(rng, COLOURS, exclude=[actor["colour"], actor["colour2"]])
    elif attribute == "size":
        actor["size"] = _choice(rng, SIZES, exclude=[actor["size"]])
    elif attribute == "motion":
        actor["motion"] = _choice(rng, MOTIONS, exclude=[actor["motion"], REVERSE_MOTION[actor["motion"]]])
        actor["path"] = _path(rng, actor["motion"], cfg.frame_size)
    elif attribute == "background":
        return {**scene, "background": _choice(rng, BACKGROUNDS, exclude=[scene["background"]])}
    else:
        raise ValueError(f"cannot vary {attribute!r}; choose one of {VARIABLE_ATTRIBUTES}")
    return {**scene, "actor": actor}


def describe(scene: dict) -> dict:
    """The facts a viewer sees in a scene (what captions, titles and labels are made from).

    A reversed scene shows the reverse motion, and its event runs the other way (a red
    circle turning blue becomes a blue circle turning red).
    """
    a = scene["actor"]
    shape, colour, shape2, colour2 = a["shape"], a["colour"], a["shape2"], a["colour2"]
    motion = a["motion"]
    if scene["reversed"]:
        motion = REVERSE_MOTION[motion]
        if a["event"] == "colour_change":
            colour, colour2 = colour2, colour
        elif a["event"] == "sequence":
            shape, colour, shape2, colour2 = shape2, colour2, shape, colour
    return {
        "shape": shape,
        "colour": colour,
        "size": a["size"],
        "motion": motion,
        "background": scene["background"],
        "distractors": len(scene["distractors"]),
        "event": a["event"],
        "shape2": shape2,
        "colour2": colour2,
    }


# ---------------------------------------------------------------- relevance labels


def relevance(a: dict, b: dict) -> float:
    """Weighted attribute overlap of two videos' attributes, in [0, 1] (1 = same facts).

    Shapes and colours compare as sets (an event brings a second one). Opposite directions
    of a motion get half credit, and so does the same kind of event with another second
    colour or object (a twin's event, run the other way, is one).

    Example:
        >>> a = {"shape": "circle", "colour": "red", "size": "small", "motion": "up",
        ...      "background": "black", "distractors": 0, "event": "none", "shape2": None, "colour2": None}
        >>> relevance(a, a), relevance(a, {**a, "motion": "down"})
        (1.0, 0.875)
    """
    sizes = list(SIZES)

    def jaccard(x: set, y: set) -> float:
        return len(x & y) / len(x | y)

    def objects(v: dict, key: str) -> set:
        return {v[key], v[f"{key}2"]} - {None}

    if a["motion"] == b["motion"]:
        motion = 1.0
    else:
        motion = 0.5 if REVERSE_MOTION[a["motion"]] == b["motion"] else 0.0
    if a["event"] != b["event"]:
        event = 0.0
    else:
        event = 1.0 if (a["shape2"], a["colour2"]) == (b["shape2"], b["colour2"]) else 0.5
    parts = {
        "shape": jaccard(objects(a, "shape"), objects(b, "shape")),
        "colour": jaccard(objects(a, "colour"), objects(b, "colour")),
        "motion": motion,
        "size": 1 - abs(sizes.index(a["size"]) - sizes.index(b["size"])) / (len(sizes) - 1),
        "background": float(a["background"] == b["background"]),
        "event": event,
    }
    return round(sum(RELEVANCE_WEIGHTS[k] * v for k, v in parts.items()), 9)  # 9 places: 1 stays 1


def quantise(value: float, levels: int) -> float:
    """Round ``value`` in [0, 1] to the nearest of ``levels`` evenly spaced values.

    Example:
        >>> quantise(0.5, 20), quantise(1.2, 20), quantise(-0.1, 20)
        (0.526316, 1.0, 0.0)
    """
    step = round(min(max(value, 0.0), 1.0) * (levels - 1))
    return round(step / (levels - 1), 6)


def graded_pairs(rng: np.random.Generator, videos: list[dict], cfg: SyntheticConfig) -> list[dict]:
    """Pairs of distinct videos (all from ``videos``) with noisy, quantised relevance labels.

    Each video is paired with its family and with ``pairs_per_video`` partners: half drawn
    uniformly, half among videos sharing its shape or colour (so labels spread over the range).
    """
    n = len(videos)
    pairs: set[tuple[int, int]] = set()
    for i, v in enumerate(videos):
        family = [j for j, w in enumerate(videos) if w["family"] == v["family"] and j != i]
        similar = [
            j for j, w in enumerate(videos)
            if j != i and (w["attributes"]["shape"] == v["attributes"]["shape"]
                           or w["attributes"]["colour"] == v["attributes"]["colour"])
        ]
        others = [j for j in range(n) if j != i]
        k_similar = min(cfg.pairs_per_video // 2, len(similar))
        partners = family + [similar[j] for j in rng.permutation(len(similar))[:k_similar]]
        k_random = min(cfg.pairs_per_video - k_similar, len(others))
        partners += [others[j] for j in rng.permutation(len(others))[:k_random]]
        pairs.update((min(i, j), max(i, j)) for j in partners)
    rows = []
    for i, j in sorted(pairs):
        if rng.random() < 0.5:
            i, j = j, i
        clean = relevance(videos[i]["attributes"], videos[j]["attributes"])
        label = quantise(clean + rng.normal(0.0, cfg.label_noise), cfg.label_levels)
        rows.append({"video_a": videos[i]["video_id"], "video_b": videos[j]["video_id"], "label": label})
    order = rng.permutation(len(rows))
    return [rows[k] for k in order]


# ---------------------------------------------------------------- captions and titles


def caption_facts(rng: np.random.Generator, attrs: dict, cfg: SyntheticConfig) -> list[str]:
    """Which facts one caption states: always the shape, each other fact at its rate."""
    rates = {
        "size": cfg.caption_size_rate,
        "colour": cfg.caption_colour_rate,
        "motion": cfg.caption_motion_rate,
        "event": cfg.caption_event_rate if attrs["event"] != "none" else 0.0,
        "background": cfg.caption_background_rate,
        "distractors": cfg.caption_distractor_rate if attrs["distractors"] > 0 else 0.0,
    }
    draws = {fact: rng.random() < rate for fact, rate in rates.items()}
    return [f for f in grammar.FACTS if f == "shape" or draws.get(f, False)]


def make_title(rng: np.random.Generator, attrs: dict, cfg: SyntheticConfig) -> dict:
    """Title fields of a video record: ``title`` (None if missing), ``title_correct``,
    ``title_facts`` (facts the title names) and ``title_wrong_fact`` (the one it gets wrong)."""
    r = rng.random()
    if r < cfg.title_missing_rate:
        return {"title": None, "title_correct": None, "title_facts": [], "title_wrong_fact": None}
    wrong_title = r < cfg.title_missing_rate + cfg.title_wrong_rate
    facts = ["colour", "shape"]
    if rng.random() < cfg.title_size_rate:
        facts.append("size")
    if rng.random() < cfg.title_background_rate:
        facts.append("background")
    facts = [f for f in grammar.TITLE_FACTS if f in facts]
    shown, wrong = dict(attrs), None
    if wrong_title:
        wrong = _choice(rng, facts)
        vocab = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "background": BACKGROUNDS}[wrong]
        shown[wrong] = _choice(rng, vocab, exclude=[attrs[wrong], attrs.get(f"{wrong}2")])
    return {
        "title": grammar.title(rng, shown, facts),
        "title_correct": not wrong_title,
        "title_facts": facts,
        "title_wrong_fact": wrong,
    }


def make_captions(rng: np.random.Generator, video: dict, n: int, cfg: SyntheticConfig) -> list[dict]:
    """``n`` distinct caption rows for a video: ``{"video_id", "sentence", "facts",
    "underspecified", "needs_vision"}`` (``needs_vision``: states a fact the title does not give
    correctly)."""
    reliable = set(video["title_facts"]) - {video["title_wrong_fact"]}

    def draw() -> tuple[str, list[str]]:
        if rng.random() < cfg.underspecified_rate:
            return grammar.underspecified_caption(rng), []
        facts = caption_facts(rng, video["attributes"], cfg)
        return grammar.caption(rng, video["attributes"], facts), facts

    pairs = _distinct_captions(n, draw, f"video {video['video_id']}",
                               "lower captions_per_train_video or captions_per_test_video")
    return [
        {"video_id": video["video_id"], "sentence": text, "facts": facts, "underspecified": not facts,
         "needs_vision": bool(set(facts) - reliable)}
        for text, facts in pairs
    ]


def _distinct_captions(n: int, draw, what: str, fix: str) -> list[tuple[str, list[str]]]:
    """``n`` distinct ``(text, facts)`` from repeated ``draw()`` calls (at most ``50 n`` of them).

    Raises ``RuntimeError`` naming ``what`` and the ``fix`` when fewer distinct texts came out.
    """
    out: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(out) == n:
            break
        text, facts = draw()
        if text not in seen:
            seen.add(text)
            out.append((text, facts))
    if len(out) < n:
        raise RuntimeError(f"could not make {n} distinct captions for {what}; {fix}")
    return out


# ---------------------------------------------------------------- the whole dataset


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent random stream per purpose, so changing one part never reshuffles another."""
    return np.random.default_rng([seed, *stream.encode()])


def build_annotations(
    cfg: SyntheticConfig, seed: int
) -> tuple[list[dict], dict[str, list[dict]], dict[str, list[dict]]]:
    """Every video record, caption row and pair row (no pixels): ``(videos, splits, pairs)``.

    Families never straddle splits; video ids (``sm00000`` ...) run through train, val, test.

    Example:
        >>> videos, splits, pairs = build_annotations(PRESETS["smoke"], seed=0)
        >>> len(videos), [len(splits[s]) for s in SPLITS]
        (40, [120, 8, 16])
    """
    scene_rng, text_rng, pair_rng = _rng(seed, "scenes"), _rng(seed, "text"), _rng(seed, "pairs")
    videos: list[dict] = []
    n_families = 0
    for split, n in zip(SPLITS, (cfg.n_train, cfg.n_val, cfg.n_test)):
        members: list[tuple[dict, str, str]] = []  # scene, family id, varied attribute
        while len(members) < n:
            family = f"f{n_families:04d}"
            n_families += 1
            with_twin = cfg.family_size >= 2 and scene_rng.random() < cfg.twin_rate
            base = sample_scene(scene_rng, cfg, reversible=with_twin)
            group = [(base, "base")] + ([(reverse_scene(base), "time")] if with_twin else [])
            for attribute in scene_rng.permutation(VARIABLE_ATTRIBUTES)[: cfg.family_size - len(group)]:
                group.append((vary_scene(scene_rng, base, str(attribute), cfg), str(attribute)))
            members += [(scene, family, varied) for scene, varied in group][: n - len(members)]
        order = scene_rng.permutation(len(members))
        first = len(videos)
        for k, idx in enumerate(order):
            scene, family, varied = members[idx]
            videos.append({
                "video_id": f"sm{first + k:05d}",
                "path": f"videos/sm{first + k:05d}.mp4",
                "split": split,
                "category": MOTION_KIND[describe(scene)["motion"]],  # motion kind, no direction
                "family": family,
                "varied": varied,
                "twin": None,
                "attributes": describe(scene),
                "scene": scene,
            })
    by_family: dict[str, dict[str, dict]] = {}
    for v in videos:
        by_family.setdefault(v["family"], {})[v["varied"]] = v
    for fam in by_family.values():
        if "base" in fam and "time" in fam:
            fam["base"]["twin"], fam["time"]["twin"] = fam["time"]["video_id"], fam["base"]["video_id"]
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for v in videos:
        v.update(make_title(text_rng, v["attributes"], cfg))
        n_caps = {"train": cfg.captions_per_train_video, "val": 1, "test": cfg.captions_per_test_video}[v["split"]]
        splits[v["split"]] += make_captions(text_rng, v, n_caps, cfg)
    pairs = {s: graded_pairs(pair_rng, [v for v in videos if v["split"] == s], cfg) for s in SPLITS}
    return videos, splits, pairs


STATIC_FACTS = ("size", "colour", "shape", "background", "distractors")  # what one still frame shows


def static_pairs(
    n_images: int, seed: int, cfg: SyntheticConfig, captions_per_image: int = 1
) -> tuple[np.ndarray, list[list[str]], list[list[list[str]]]]:
    """Still images and captions of their static facts: the image-text pairs of the pretrained start.

    They play the part of CLIP's web image-text pairs (Radford et al. 2021) for
    :mod:`vidret_lib.pretrain`. Drawn from the random stream ``_rng(seed, "pretrain")``, which
    no split uses (train/val/test come from the "scenes", "text" and "pairs" streams), so no
    still is a frame of a dataset video. Image ``i`` is one frame of a fresh scene without
    events (:func:`sample_scene` with no colour change or sequence, so the shape has one
    colour), rendered with the video renderer at ``cfg.frame_size`` at a time drawn uniformly
    in [0, 1] of its motion (the shape anywhere along its path). Each caption states the shape
    and each other fact of ``STATIC_FACTS`` at ``cfg``'s caption rates (:func:`caption_facts`
    with motion and event dropped), in :func:`grammar.caption`'s phrasing with ``still=True``:
    never motion, direction or event order. No caption is underspecified. Deterministic for
    ``(n_images, seed, cfg, captions_per_image)``; image ``i`` does not depend on ``n_images``.

    Returns ``(frames, captions, facts)``: uint8 ``(n_images, S, S, 3)`` RGB with ``S =
    cfg.frame_size``; ``captions[i]``, ``captions_per_image`` distinct strings of image ``i``;
    ``facts[i][j]``, the facts (names from ``STATIC_FACTS``) caption ``captions[i][j]`` states.
    Raises ``ValueError`` for ``n_images < 1`` or ``captions_per_image < 1``.

    Example:
        >>> frames, captions, facts = static_pairs(3, 0, PRESETS["smoke"], captions_per_image=2)
        >>> frames.shape, frames.dtype, [len(c) for c in captions]
        ((3, 64, 64, 3), dtype('uint8'), [2, 2, 2])
        >>> all(f[0] != "motion" and "shape" in f for fs in facts for f in fs)
        True
    """
    if n_images < 1 or captions_per_image < 1:
        raise ValueError(f"static_pairs needs n_images >= 1 and captions_per_image >= 1; got {n_images}, "
                         f"{captions_per_image}")
    still_cfg = replace(cfg, colour_change_rate=0.0, sequence_rate=0.0)  # no events: one colour, one shape
    rng = _rng(seed, "pretrain")
    frames = np.empty((n_images, cfg.frame_size, cfg.frame_size, 3), np.uint8)
    captions, facts = [], []
    for i in range(n_images):
        scene = sample_scene(rng, still_cfg)
        frames[i] = render_frame(scene, cfg.frame_size, float(rng.uniform()))
        attrs = describe(scene)

        def draw() -> tuple[str, list[str]]:
            stated = [f for f in caption_facts(rng, attrs, cfg) if f in STATIC_FACTS]
            return grammar.caption(rng, attrs, stated, still=True), stated

        pairs = _distinct_captions(captions_per_image, draw, f"still {i}", "lower captions_per_image")
        captions.append([text for text, _ in pairs])
        facts.append([stated for _, stated in pairs])
    return frames, captions, facts


def _video_key(scene: dict, cfg: SyntheticConfig) -> str:
    """What produced one mp4 (stored in its metadata; a mismatch means re-render)."""
    return cache_key(
        "shapemotion-video", version=GENERATOR_VERSION, scene=scene,
        frame_size=cfg.frame_size, fps=cfg.fps, n_frames=cfg.n_frames, crf=cfg.crf,
    )


def dataset_name(size: str, seed: int, cfg: SyntheticConfig) -> str:
    """``shapemotion-<size>`` for a preset at seed 0, else with a hash suffix, so caches keyed
    by dataset name never mix two different datasets."""
    if seed == 0 and cfg == PRESETS[size]:
        return f"shapemotion-{size}"
    return f"shapemotion-{size}-{content_hash(cfg, seed)[-8:]}"


def content_hash(cfg: SyntheticConfig, seed: int) -> str:
    """Key of everything that determines a dataset's content."""
    return cache_key("shapemotion", version=GENERATOR_VERSION, seed=seed, config=asdict(cfg))


# fork: workers start in milliseconds and inherit the loaded modules; spawn where there is no fork
_MP = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _render_video(path: str, scene: dict, cfg: SyntheticConfig) -> None:
    """Render ``scene`` and write it to ``path`` atomically (one job of :func:`generate`)."""
    frames = render_frames(scene, cfg.frame_size, cfg.n_frames)
    key = _video_key(scene, cfg)
    atomic_write(path, lambda tmp: write_mp4(tmp, frames, cfg.fps, cfg.crf, key))


def generate(
    out: str | os.PathLike, size: str = "default", seed: int = 0, workers: int | None = None, **overrides: Any
) -> Dataset:
    """Write a ShapeMotion dataset to ``out`` and return it (see the module docstring).

    ``size`` names a preset of :class:`SyntheticConfig` (``PRESETS``); ``overrides`` replace
    its fields. Videos are rendered and encoded in ``workers`` processes (default
    ``os.cpu_count()``; 1 renders in this process); each video is encoded on one thread, so
    the bytes do not depend on ``workers``. Videos already in ``out/videos`` with the right
    key are kept, so an interrupted run finishes where it stopped; ``dataset.json`` is
    written last. Raises ``ValueError`` for an unknown size or ``workers < 1``, ``TypeError``
    for an unknown field.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as out:
        ...     ds = generate(out, "smoke", n_train=2, n_val=1, n_test=1, family_size=1)
        >>> ds.name, ds.info["splits"]["train"]["captions"]
        ('shapemotion-smoke-...', 10)
    """
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(PRESETS)}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers={workers}: need at least 1 worker process (None = os.cpu_count())")
    known = {f.name for f in fields(SyntheticConfig)}
    if set(overrides) - known:
        unknown = sorted(set(overrides) - known)
        raise TypeError(f"unknown SyntheticConfig fields {unknown}; known fields: {sorted(known)}")
    cfg = replace(PRESETS[size], **overrides)
    out = Path(out)
    with folder_lock(out):  # a second generation into `out` waits, then finds every file done
        key = content_hash(cfg, seed)
        if (out / "dataset.json").exists():
            old = load_json(out / "dataset.json")
            if old.get("content_hash") != key:
                raise FileExistsError(
                    f"{out} already holds dataset {old.get('name')!r} made with other settings "
                    f"({old.get('content_hash')} != {key}); pick another --out or delete {out}"
                )
        videos, splits, pairs = build_annotations(cfg, seed)
        video_dir = out / "videos"
        video_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(video_dir)  # left by killed runs (a live writer's are kept)
        jobs = [  # (path, scene, cfg) of every video that is missing, damaged or of other settings
            (str(out / v["path"]), v["scene"], cfg) for v in videos
            if not mp4_matches(out / v["path"], _video_key(v["scene"], cfg), cfg.n_frames, cfg.frame_size)
        ]
        n_workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
        with progress(total=len(jobs), desc="render videos", unit="video") as bar:
            if n_workers == 1:
                for job in jobs:
                    _render_video(*job)
                    bar.update(1)
            else:
                with ProcessPoolExecutor(n_workers, mp_context=_MP) as pool:
                    for _ in pool.map(_render_video, *zip(*jobs), chunksize=4):  # re-raises a worker's error
                        bar.update(1)
        info = {
            "name": dataset_name(size, seed, cfg),
            "version": GENERATOR_VERSION,
            "source": "synthetic (data_prep.synthetic)",
            "size": size,
            "seed": seed,
            "content_hash": key,
            "config": asdict(cfg),
            "video_format": {
                "codec": "h264", "pix_fmt": "yuv420p", "fps": cfg.fps, "frame_size": cfg.frame_size,
                "n_frames": cfg.n_frames, "frames_at_1fps": cfg.sampled_frames,
            },
            "description": "ShapeMotion: rendered videos of a moving coloured shape with distractors, "
            "captions from a grammar with paraphrases, titles, and graded pair labels",
            "properties": PROPERTIES,
            "vocabulary": {
                "shapes": SHAPES, "colours": list(COLOURS), "sizes": list(SIZES), "motions": MOTIONS,
                "backgrounds": BACKGROUNDS, "events": EVENTS, "categories": sorted(set(MOTION_KIND.values())),
            },
            "pairs": {s: len(rows) for s, rows in pairs.items()},
        }
        return write_dataset(out, info, videos, splits, pairs)


def _disk_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m data_prep.synthetic --size default --seed 0 --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="dataset root to write (resumes if present)")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: all CPU cores)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    ds = generate(args.out, args.size, args.seed, workers=args.workers)
    print(f"{ds.name} (generator v{ds.info['version']}) in {ds.root}: {time.perf_counter() - start:.1f} s, "
          f"{_disk_mb(ds.root):.1f} MiB")
    for split, counts in ds.info["splits"].items():
        print(f"  {split}: {counts}, {ds.info['pairs'][split]} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
