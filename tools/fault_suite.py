"""Fault suite for issue 10: try faults against a fresh clone of HEAD and count what holds.

Usage (minutes; not a pytest test)::

    .venv/bin/python tools/fault_suite.py [--keep] [--only GROUP ...] [--no-reproduce]

It clones the committed HEAD of this repository into a temporary folder (``git clone``; the
working tree is never touched), runs every fault there with this interpreter and
``PYTHONPATH=<clone>`` (so the clone's ``vidret_lib``/``data_prep`` are the code under test), and
prints one row per fault: name, kind, what happened, held?, then totals (tried / held / silent
wrong results / lost work) and the wall time.

A fault **holds** when it leaves no silent wrong result (every artefact and metric after the
fault, and after a re-run where there is one, equals an uninterrupted reference run), loses no
finished work (an artefact complete before the re-run is not computed again) and, where the
command fails, fails with a clear error that names the file or value. Kill trials also require
the re-run to leave no temporary file and the kill to leave no orphaned process.

Groups (``--only``): ``kill`` (kill -9 / Ctrl-C at random moments of: ShapeMotion generation,
the frame cache with 2 workers, feature caching, ``run_variant`` over 3 seeds, ``reproduce
--profile smoke --only 00``), ``concurrent`` (two writers into one folder), ``corrupt``
(truncated .npz, garbage JSON, a forged metric, a deleted record, a NaN record of another
profile), ``disk`` (a full disk: ``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored, so a write fails with
EFBIG as it would with ENOSPC; and an output folder ``chmod 555``, run without
``CAP_DAC_OVERRIDE`` via ``setpriv`` so that root obeys it), ``profile`` (the profile mistakes
of issue 10 items 4 and 10), ``video`` (hostile videos with the frame number drawn in the
pixels), ``annotation`` (malformed MSR-VTT files), ``network`` (``--download`` in a network
namespace without network, ``unshare -n``).

Sizes are the smoke sizes (40 videos of 64 px); features use a stand-in encoder (a few pixel
statistics, with a sleep so that a kill lands mid-way): the cache logic under test does not
depend on the encoder, and loading the real one costs ~40 s per process on a busy 2-core machine.
Only ``reproduce --only 00`` runs the real pipeline end to end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
THIS = Path(__file__).resolve()
N_VIDEOS = 40  # the smoke preset: 24 train, 8 val, 8 test


@dataclass
class Outcome:
    """One fault's verdict (a row of the table)."""

    fault: str
    kind: str
    happened: str
    held: bool
    silent_wrong: bool = False
    lost_work: bool = False


@dataclass
class Target:
    """A command whose outputs are compared with an uninterrupted reference run.

    ``compare`` globs (under ``root``) name the outputs compared with the reference, ``work`` globs
    the finished-work artefacts (a re-run must reuse them), ``reset`` empties the outputs.
    """

    name: str
    cmd: list[str]
    root: Path
    compare: tuple[str, ...]
    work: tuple[str, ...]
    reset: Callable[[], None]
    ref: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    n_work: int = 0


# ---------------------------------------------------------------------------- helpers


def env(clone: Path) -> dict[str, str]:
    """The environment every command runs in: the clone's code, quiet progress, one thread per process."""
    return {**os.environ, "PYTHONPATH": str(clone), "VIDRET_PROGRESS": "0", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def worker(name: str, *args: str) -> list[str]:
    """The command running ``WORKERS[name](*args)`` in a fresh process."""
    return [PY, str(THIS), "--worker", name, *map(str, args)]


def run(cmd: list[str], clone: Path, timeout: float = 900, preexec: Callable | None = None,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *cmd], cwd=clone, env=env(clone), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def short(text: str, n: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def content_digest(path: Path) -> str:
    """sha256 of a file; for a results record, of its ``config`` and ``metrics`` only (without the
    ``written_at`` time, the environment and notebook 00's per-stage ``seconds``); for an ``.npz``, of
    its arrays without ``source`` (the frame cache's ``size:mtime_ns`` stamp of the video file, which
    differs between two generations of the same bytes)."""
    blob = path.read_bytes()
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as data:
                blob = b"".join(k.encode() + data[k].tobytes() for k in sorted(data.files) if k != "source")
        except Exception:  # damaged: its bytes
            pass
    if path.suffix == ".json":
        try:
            doc = json.loads(blob)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and "written_at" in doc:
            metrics = doc.get("metrics")
            if isinstance(metrics, dict):
                metrics = {k: v for k, v in metrics.items() if k != "seconds"}
            blob = json.dumps({"config": doc.get("config"), "metrics": metrics}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def volatile(path: Path) -> bool:
    """Files never compared: locks, ledgers (they hash a record's bytes, time included), temporaries."""
    return path.name == ".vidret.lock" or path.suffix == ".sha256" or is_temporary(path)


def is_temporary(path: Path) -> bool:
    return path.name.endswith(".tmp") or path.name.startswith("tmp")


def file_key(root: Path, path: Path) -> str:
    """How a file is matched with the reference: its path under ``root``, except a video-features
    chunk, whose name hashes its videos' file stamps (size, mtime), so that a regenerated dataset
    renames it: it is keyed by its folder and the video ids it holds."""
    if path.parent.name.startswith("video-features-") and path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as data:
                return f"{path.parent.relative_to(root).as_posix()}/<{','.join(data['video_ids'].tolist())}>"
        except Exception:  # damaged: by its name
            pass
    return path.relative_to(root).as_posix()


def outputs(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file() and not volatile(p)})


def state(root: Path, patterns: tuple[str, ...]) -> dict[str, str]:
    """``{file key: content digest}`` of the files under ``root`` matching ``patterns``."""
    return {file_key(root, p): content_digest(p) for p in outputs(root, patterns)}


def work_state(root: Path, patterns: tuple[str, ...]) -> dict[str, tuple[int, str]]:
    """``{file key: (mtime_ns, digest)}`` of the finished-work artefacts."""
    return {file_key(root, p): (p.stat().st_mtime_ns, content_digest(p)) for p in outputs(root, patterns)}


def temporaries(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and is_temporary(p))


def diff(ref: dict[str, str], now: dict[str, str]) -> list[str]:
    """Paths that differ from the reference: missing, extra or changed."""
    return sorted(k for k in set(ref) | set(now) if ref.get(k) != now.get(k))


def processes_of(clone: Path) -> list[int]:
    """Live processes running the clone's code (``PYTHONPATH=<clone>`` in their environment): the
    command's tree, including a notebook kernel that papermill started in a session of its own."""
    marker = f"PYTHONPATH={clone}".encode() + b"\0"
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(int(entry.name))
            except OSError:  # exited meanwhile
                pass
    return alive


def orphans_after(clone: Path, grace: float = 8.0) -> list[int]:
    """Wait up to ``grace`` s for the killed command's processes to exit; kill (ours) and return those left."""
    deadline = time.monotonic() + grace
    while (left := processes_of(clone)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def copy_tree(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)


def full_disk(limit: int) -> Callable[[], None]:
    """A preexec function: files may not grow beyond ``limit`` bytes; a write past it fails (EFBIG)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


NO_DAC = ("setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search")


def names_a_path(message: str, paths: list[Path]) -> bool:
    return any(str(p) in message for p in paths)


# ---------------------------------------------------------------------------- workers (run in the clone)


class StandInEncoder:
    """A deterministic stand-in for the image/text towers: pixel statistics, 8 dims; slow on purpose."""

    cache_id, device, embed_dim, image_size = "fault-suite-standin", "cpu", 8, 64

    def encode_image(self, frames):
        import numpy as np
        import torch

        time.sleep(0.3)
        x = frames.astype(np.float32) / 255.0  # (n, S, S, 3)
        h = x.shape[1] // 2
        parts = [x.mean(axis=(1, 2))] + [q.mean(axis=(1, 2, 3))[:, None] for q in
                                          (x[:, :h, :h], x[:, :h, h:], x[:, h:, :h], x[:, h:, h:], x[:, ::2, ::2])]
        return torch.from_numpy(np.concatenate(parts, axis=1))

    def encode_text(self, sentences, batch_size=None):
        import numpy as np
        import torch

        time.sleep(0.3)
        rows = [np.frombuffer(hashlib.sha256(s.encode()).digest()[:8], np.uint8) / 255.0 for s in sentences]
        return torch.from_numpy(np.stack(rows).astype(np.float32))


def w_frames(data: str, cache: str) -> None:
    from vidret_lib.datasets import load_dataset
    from vidret_lib.frame_cache import frame_cache

    ds = load_dataset(data)
    fc = frame_cache(ds, list(ds.videos), cache, max_frames=12, size=64, workers=2)
    print(fc.summary())


def w_features(data: str, cache: str) -> None:
    from vidret_lib.datasets import load_dataset
    from vidret_lib.features import text_features, video_features
    from vidret_lib.frame_cache import frame_cache

    ds = load_dataset(data)
    ids = list(ds.videos)
    fc = frame_cache(ds, ids, cache, max_frames=12, size=64, workers=1)
    enc = StandInEncoder()
    video_features(enc, fc, ids, cache, batch_size=24, chunk_size=4)
    text_features(enc, ds.split("train").sentences, cache, batch_size=16, chunk_size=16)
    print("features done")


def _feature_split(seed: int, videos: int = 32, captions_per_video: int = 2, dim: int = 16):
    import numpy as np

    from vidret_lib.train import FeatureSplit

    g = np.random.default_rng(seed)
    video = g.standard_normal((videos, 6, dim)).astype(np.float32)
    caption_video = np.repeat(np.arange(videos), captions_per_video)
    text = video.mean(1)[caption_video] + 0.7 * g.standard_normal((len(caption_video), dim)).astype(np.float32)
    ids = tuple(f"s{seed}v{i:03d}" for i in range(videos))
    return FeatureSplit(text, video, np.ones((videos, 6), bool), caption_video, video_ids=ids)


def w_variant(results: str) -> None:
    import torch

    from vidret_lib.experiment import run_variant
    from vidret_lib.train import TrainConfig

    torch.set_num_threads(1)
    config = TrainConfig(loss="infonce", head="seqTransf", lr=1e-3, epochs=3, batch_size=8)
    tr, va, te = _feature_split(0), _feature_split(1), _feature_split(2)
    rec = run_variant("v", config, [0, 1, 2], tr, va, te, results, "nb", "data-fault-suite")
    print("t2v_R1", rec["metrics"]["summary"]["plain"]["selected"]["t2v_R1"])


def _frame_number_video(path: str, fmt: str | None, codec: str, frames: int = 250, fps: int = 25,
                        width: int = 160, height: int = 120) -> None:
    """A video whose frame n shows n in binary: 8 horizontal bands, white = 1 (most significant on top)."""
    import av
    import numpy as np

    with av.open(path, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "mpeg2video":
            stream.bit_rate = 4_000_000
        else:
            stream.options = {"crf": "10"}
        band = height // 8
        for n in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            for bit in range(8):
                if n >> (7 - bit) & 1:
                    img[bit * band:(bit + 1) * band] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _read_number(frame) -> int:
    """The frame number drawn by :func:`_frame_number_video`, read from a (S, S, 3) frame."""
    size = frame.shape[0]
    value = 0
    for bit in range(8):
        row = int((bit + 0.5) * size / 8)
        value = value * 2 + int(frame[row, :, :].mean() > 127)
    return value


def w_videos(folder: str) -> None:
    """Hostile videos: sample each with CLIP4Clip's rule, then cache them all; print JSON verdicts."""
    import warnings

    import numpy as np

    from vidret_lib.datasets import write_dataset
    from vidret_lib.frame_cache import frame_cache
    from vidret_lib.frames import VideoDecodeError, sample_clip

    root = Path(folder)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    v = root / "videos"
    _frame_number_video(str(v / "mpeg2.mpg"), "mpeg", "mpeg2video")
    _frame_number_video(str(v / "h264.ts"), "mpegts", "libx264")
    _frame_number_video(str(v / "full.mp4"), "mp4", "libx264")
    blob = (v / "full.mp4").read_bytes()
    (v / "truncated.mp4").write_bytes(blob[: len(blob) * 6 // 10])
    (v / "zero.mp4").write_bytes(b"")
    (v / "text.mp4").write_text("this is not a video\n")
    expected = [25 * k for k in range(10)]  # 250 frames at 25 fps: one a second (0, 25, ..., 225) <= 12 slots
    report = {}
    for name in ("mpeg2.mpg", "h264.ts", "full.mp4", "truncated.mp4", "zero.mp4", "text.mp4"):
        path = v / name
        try:
            clip = sample_clip(path, max_frames=12, size=64)
        except VideoDecodeError as err:
            report[name] = {"error": str(err)}
            continue
        except Exception as err:  # anything else is not the documented error
            report[name] = {"other_error": f"{type(err).__name__}: {err}"}
            continue
        seen = [_read_number(f) for f in clip.frames[clip.mask]]
        report[name] = {"seen": seen, "indices": clip.indices.tolist(), "expected": expected, "decoder": clip.decoder}
    records = [{"video_id": p.stem, "path": f"videos/{p.name}"} for p in sorted(v.iterdir())]
    rows = [{"video_id": r["video_id"], "sentence": f"caption of {r['video_id']}"} for r in records]
    ds = write_dataset(root / "ds", {"name": "hostile"}, [{**r, "path": str(v / Path(r["path"]).name)} for r in records],
                       {"test": rows})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fc = frame_cache(ds, [r["video_id"] for r in records], root / "cache", max_frames=12, size=64, workers=2)
    cached = {}
    for vid in fc.video_ids:
        frames, mask = fc.load(vid)
        cached[vid] = [_read_number(f) for f in frames[mask]] if vid not in fc.failed else None
    report["frame_cache"] = {"failed": fc.failed, "cached": cached, "warnings": [str(w.message) for w in caught],
                             "expected": expected}
    print("JSON" + json.dumps(report))


def _msrvtt_folder(root: Path) -> None:
    """A small valid MSR-VTT source folder: 10 videos, 2 captions each, the 3 split CSVs, category.txt."""
    videos = [{"video_id": f"video{i}", "category": i % 3} for i in range(10)]
    sentences = [{"video_id": f"video{i}", "caption": f"a clip number {i} take {k}", "sen_id": 2 * i + k}
                 for i in range(10) for k in range(2)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
    (root / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"video{i}\n" for i in range(7)))
    (root / "MSRVTT_train.7k.csv").write_text("video_id\n" + "".join(f"video{i}\n" for i in range(6)))
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n" + "".join(f"ret{i},msr{i},video{i},a clip number {i}\n" for i in range(7, 10)))
    (root / "category.txt").write_text("music\t0\npeople\t1\ngaming\t2\n")


ANNOTATION_CASES = {  # name -> (file, how to damage it, expected: "refuse" or "drop")
    "json-not-utf8": ("MSRVTT_data.json", lambda t: t.replace(b"take 1", b"take \xff1", 1), "refuse"),
    "csv-not-utf8": ("MSRVTT_train.9k.csv", lambda t: t.replace(b"video3", b"vid\xe9o3"), "refuse"),
    "category-no-tab": ("category.txt", lambda t: t.replace(b"people\t1", b"people 1"), "refuse"),
    "sentence-no-caption": ("MSRVTT_data.json", lambda t: t.replace(b'"caption": "a clip number 4 take 0", ', b"", 1), "refuse"),
    "caption-null": ("MSRVTT_data.json", lambda t: t.replace(b'"a clip number 5 take 1"', b"null", 1), "refuse"),
    "caption-number": ("MSRVTT_data.json", lambda t: t.replace(b'"a clip number 6 take 0"', b"42", 1), "refuse"),
    "video-id-clip_7010": ("MSRVTT_train.9k.csv", lambda t: t.replace(b"video2\n", b"clip_7010\n"), "refuse"),
    "duplicate-9k-id": ("MSRVTT_train.9k.csv", lambda t: t + b"video4\n", "refuse"),
    "duplicate-1ka-row": ("MSRVTT_JSFUSION_test.csv", lambda t: t + b"ret8,msr8,video8,a clip number 8\n", "refuse"),
    "json-garbage": ("MSRVTT_data.json", lambda t: t[: len(t) // 2], "refuse"),
    "empty-caption": ("MSRVTT_data.json", lambda t: t.replace(b'"a clip number 3 take 1"', b'"  "', 1), "drop"),
}


def w_annotations(folder: str) -> None:
    from data_prep.msrvtt import read_annotations

    report = {}
    for case, (name, damage, _) in {"valid": ("category.txt", lambda t: t, "ok"), **ANNOTATION_CASES}.items():
        root = Path(folder) / case
        _msrvtt_folder(root)
        (root / name).write_bytes(damage((root / name).read_bytes()))
        try:
            ann = read_annotations(root)
            report[case] = {"ok": True, "dropped": len(ann.dropped_captions),
                            "captions": sum(map(len, ann.captions.values())), "test_1ka": len(ann.test_1ka)}
        except Exception as err:
            report[case] = {"ok": False, "error": f"{type(err).__name__}: {err}", "file": str(root / name)}
    print("JSON" + json.dumps(report))


PROFILE_CASES = {  # profile file text -> what the one-line error must name besides the file
    "exponent-string": ("02_vsepp:\n  lr: 1e-4\n", ["lr", "1.0e-4"]),
    "yaml-syntax": ("02_vsepp:\n  lr: [0.1,\n", []),
    "common-list": ("common: [1, 2]\n", ["common"]),
    "misspelt-section": ("02_vsep:\n  lr: 0.001\n", ["02_vsep"]),
    "quoted-int": ("02_vsepp:\n  epochs: '2'\n", ["epochs"]),
    "empty-seeds": ("02_vsepp:\n  seeds: []\n", ["seeds"]),
    "scalar-seeds": ("02_vsepp:\n  seeds: 0\n", ["seeds"]),
    "word-for-float": ("02_vsepp:\n  lr: fast\n", ["lr"]),
    "unknown-common-key": ("common:\n  no_such_parameter: 1\n", ["no_such_parameter"]),
    "unknown-key": ("02_vsepp:\n  margn: 0.1\n", ["margn"]),
    "yes-for-str": ("02_vsepp:\n  dataset: yes\n", ["dataset"]),
}


def w_profiles() -> None:
    """Each profile case through ``reproduce.main`` (the CLI's code path) in this process; notebooks are
    not executed (a stub records whether any would have run)."""
    from vidret_lib import profiles, reproduce

    ran: list[str] = []
    reproduce.run_notebook = lambda path, *args, **kwargs: ran.append(path.stem) or "not run (fault suite)"
    report = {}
    for case, (text, _) in PROFILE_CASES.items():
        name = f"fault-{case}"
        path = profiles.PARAMS_DIR / f"{name}.yaml"
        path.write_text(text)
        try:
            reproduce.main(["--profile", name])
            report[case] = {"exit": None, "message": "", "file": str(path)}
        except SystemExit as err:
            report[case] = {"exit": str(err.code), "message": str(err.code), "file": str(path)}
        except Exception as err:
            report[case] = {"exit": "exception", "message": f"{type(err).__name__}: {err}", "file": str(path)}
        report[case]["ran"] = bool(ran)
        ran.clear()
    print("JSON" + json.dumps(report))


WORKERS = {"frames": w_frames, "features": w_features, "variant": w_variant, "videos": w_videos,
           "annotations": w_annotations, "profiles": w_profiles}


def json_report(proc: subprocess.CompletedProcess) -> dict:
    for line in proc.stdout.splitlines():
        if line.startswith("JSON"):
            return json.loads(line[4:])
    raise RuntimeError(f"worker failed (rc {proc.returncode}): {proc.stderr[-2000:]}")


# ---------------------------------------------------------------------------- the suite


class Suite:
    """Holds the clone, the reference outputs and the outcomes."""

    def __init__(self, clone: Path, seed: int) -> None:
        self.clone = clone
        self.fs = clone / "fault"
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.targets: dict[str, Target] = {}

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        mark = "held" if outcome.held else "FAILED"
        print(f"  [{mark}] {outcome.fault}: {outcome.happened}", flush=True)

    # ------------------------------------------------------------ targets and references
    def build_targets(self, reproduce: bool) -> None:
        fs, c = self.fs, self.clone
        gen_out, data = fs / "gen", fs / "ref-data"
        self.targets["generate"] = Target(
            "generate", [PY, "-m", "data_prep.synthetic", "--size", "smoke", "--out", str(gen_out)], gen_out,
            ("**/*",), ("videos/*.mp4",), lambda: shutil.rmtree(gen_out, ignore_errors=True))
        self.targets["frames"] = Target(
            "frames", worker("frames", data, fs / "frames"), fs / "frames", ("**/*",), ("frames/*/*.npz",),
            lambda: shutil.rmtree(fs / "frames", ignore_errors=True))

        def reset_features() -> None:
            shutil.rmtree(fs / "features", ignore_errors=True)
            shutil.copytree(fs / "frames-ref", fs / "features")  # the frames are cached; only features compute

        self.targets["features"] = Target(
            "features", worker("features", data, fs / "features"), fs / "features", ("features/**/*",),
            ("features/*/*.npz",), reset_features)
        self.targets["variant"] = Target(
            "run_variant", worker("variant", fs / "results"), fs / "results", ("**/*.json",), ("nb/.local/runs/*.json",),
            lambda: shutil.rmtree(fs / "results", ignore_errors=True))
        if reproduce:
            def reset_reproduce() -> None:
                for p in ("data/shapemotion-smoke", "cache", "runs/smoke", "executed/smoke"):
                    shutil.rmtree(c / p, ignore_errors=True)

            self.targets["reproduce"] = Target(
                "reproduce-00", [PY, "-m", "vidret_lib.reproduce", "--profile", "smoke", "--only", "00"], c,
                ("data/shapemotion-smoke/**/*", "cache/**/*", "runs/smoke/results/**/*.json"),
                ("data/shapemotion-smoke/videos/*.mp4", "cache/frames/*/*.npz", "cache/features/*/*.npz"),
                reset_reproduce)

    def reference(self, target: Target) -> None:
        """Run ``target`` uninterrupted from empty outputs; keep its outputs' digests."""
        target.reset()
        start = time.perf_counter()
        proc = run(target.cmd, self.clone)
        target.seconds = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"reference run of {target.name} failed:\n{proc.stderr[-3000:]}")
        target.ref = state(target.root, target.compare)
        target.n_work = len(outputs(target.root, target.work))
        print(f"reference {target.name}: {target.seconds:.1f} s, {len(target.ref)} files", flush=True)

    def prepare_references(self) -> None:
        fs = self.fs
        self.reference(self.targets["generate"])
        copy_tree(fs / "gen", fs / "ref-data")
        self.reference(self.targets["frames"])
        copy_tree(fs / "frames", fs / "frames-ref")
        self.reference(self.targets["features"])
        copy_tree(fs / "features", fs / "features-ref")
        self.reference(self.targets["variant"])
        copy_tree(fs / "results", fs / "results-ref")

    # ------------------------------------------------------------ kill -9 / Ctrl-C
    def kill_trial(self, target: Target, sig: signal.Signals) -> Outcome:
        """Start ``target``, send ``sig`` at a random moment, re-run it to completion, compare."""
        target.reset()
        # the moment: once a random number k of the reference's N artefacts are written, plus a random
        # fraction of a second (a moment by the clock would miss the work on a machine whose load varies)
        k = self.rng.randint(1, max(1, target.n_work - 1))
        extra = self.rng.uniform(0.0, 0.3)
        # output to a file, not a pipe: processes the kill orphans would hold a pipe open
        log = open(self.fs / "killed.log", "w")
        start = time.monotonic()
        proc = subprocess.Popen(target.cmd, cwd=self.clone, env=env(self.clone), stdout=log, stderr=log,
                                start_new_session=True)
        while proc.poll() is None and len(outputs(target.root, target.work)) < k:
            time.sleep(0.05)
        time.sleep(extra)
        if proc.poll() is None:
            if sig == signal.SIGKILL:
                os.kill(proc.pid, signal.SIGKILL)  # kill -9 PID: the main process only
            else:
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
            landed = f"at {time.monotonic() - start:.1f} s, after artefact {k} of {target.n_work} + {extra:.2f} s"
        else:
            landed = "after it finished"
        proc.wait(timeout=300)
        log.close()
        orphans = orphans_after(self.clone)
        before = work_state(target.root, target.work)
        correct_before = sum(1 for k, (_, d) in before.items() if target.ref.get(k) == d)
        rerun = run(target.cmd, self.clone)
        after = work_state(target.root, target.work)
        wrong = diff(target.ref, state(target.root, target.compare))
        redone = sorted(k for k, (mtime, d) in before.items() if target.ref.get(k) == d and after.get(k, (None,))[0] != mtime)
        litter = temporaries(target.root)
        fault = f"{target.name}: {sig.name} {landed}"
        parts = [f"{correct_before} finished artefacts survived the kill (rc {proc.returncode})",
                 f"re-run rc {rerun.returncode}", f"reused {correct_before - len(redone)}, redone {len(redone)}"]
        if wrong:
            parts.append(f"{len(wrong)} outputs differ from the reference ({short(', '.join(wrong), 80)})")
        if litter:
            parts.append(f"temporaries left: {short(', '.join(litter), 80)}")
        if orphans:
            parts.append(f"{len(orphans)} orphaned processes after the kill (pids {orphans})")
        if rerun.returncode:
            parts.append("re-run error: " + short(last_line(rerun.stderr)))
        held = rerun.returncode == 0 and not wrong and not redone and not litter and not orphans
        return Outcome(fault, "kill", "; ".join(parts), held,
                       silent_wrong=bool(wrong) and rerun.returncode == 0, lost_work=bool(redone))

    def kills(self, reproduce: bool) -> None:
        plan = [("generate", signal.SIGKILL, 3), ("generate", signal.SIGINT, 2), ("frames", signal.SIGKILL, 3),
                ("frames", signal.SIGINT, 2), ("features", signal.SIGKILL, 2), ("features", signal.SIGINT, 1),
                ("variant", signal.SIGKILL, 3), ("variant", signal.SIGINT, 2)]
        if reproduce:
            plan += [("reproduce", signal.SIGKILL, 1), ("reproduce", signal.SIGINT, 1)]
        for name, sig, times in plan:
            for _ in range(times):
                self.add(self.kill_trial(self.targets[name], sig))

    # ------------------------------------------------------------ two writers at once
    def concurrent(self) -> None:
        for name in ("generate", "frames", "variant"):
            target = self.targets[name]
            target.reset()
            procs = [subprocess.Popen(target.cmd, cwd=self.clone, env=env(self.clone), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2)]
            results = [p.communicate(timeout=600) for p in procs]
            rcs = [p.returncode for p in procs]
            wrong = diff(target.ref, state(target.root, target.compare))
            litter = temporaries(target.root)
            errors = [short(last_line(err)) for (_, err), rc in zip(results, rcs) if rc]
            held = rcs == [0, 0] and not wrong and not litter
            happened = f"exit codes {rcs}; {len(wrong)} outputs differ from the reference" + (
                f" ({short(', '.join(wrong), 80)})" if wrong else "") + (f"; temporaries left {litter}" if litter else "") + (
                f"; error: {errors[0]}" if errors else "")
            self.add(Outcome(f"{target.name}: two writers into one folder", "concurrent", happened, held,
                             silent_wrong=bool(wrong) and rcs == [0, 0]))

    # ------------------------------------------------------------ corrupted caches and records
    def repaired(self, fault: str, target: Target, setup: Callable[[], None], damage: Callable[[], list[Path]],
                 expect_ran: bool = False) -> None:
        """Reference outputs (``setup``), ``damage`` some, re-run: the outputs must equal the reference
        again (repaired, every other artefact reused) or the run must stop naming the damaged file."""
        setup()
        undamaged = state(target.root, target.compare)
        damaged = damage()
        rel = set(diff(undamaged, state(target.root, target.compare)))  # the damaged files, under either key
        before = work_state(target.root, target.work)
        proc = run(target.cmd, self.clone)
        wrong = diff(target.ref, state(target.root, target.compare))
        after = work_state(target.root, target.work)
        redone = sorted(k for k, (mtime, d) in before.items()
                        if k not in rel and target.ref.get(k) == d and after.get(k, (None,))[0] != mtime)
        if proc.returncode == 0:
            held = not wrong and not redone
            happened = "re-ran (rc 0): " + ("outputs equal the reference" if not wrong else
                                            f"{len(wrong)} outputs differ: {short(', '.join(wrong), 90)}")
            if expect_ran:
                said = [ln for ln in proc.stdout.splitlines() if "00_data:" in ln]
                happened += f"; reproduce said: {short(' '.join(said), 90)}"
                held = held and any(": ran" in ln for ln in said)
        else:
            message = last_line(proc.stderr)
            named = names_a_path(message, damaged)
            wrong = [w for w in wrong if w not in rel]  # a damaged file named in the error may stay damaged
            held = named and not wrong
            happened = f"stopped (rc {proc.returncode}): {short(message)}" + ("" if named else " [does not name the damaged file]")
        happened += f"; {len(before) - len(redone) - len(rel & set(before))} other artefacts reused, {len(redone)} redone"
        self.add(Outcome(fault, "corrupt", happened, held, silent_wrong=bool(wrong) and proc.returncode == 0,
                         lost_work=bool(redone)))

    def from_reference(self, target: Target, source: str) -> Callable[[], None]:
        """A setup that puts the reference outputs ``fs/<source>`` in place of ``target``'s."""
        return lambda: copy_tree(self.fs / source, target.root)

    def corrupt(self, reproduce: bool) -> None:
        fr, fe, rv = self.targets["frames"], self.targets["features"], self.targets["variant"]
        frame_npz = lambda: sorted((fr.root / "frames").glob("*/*.npz"))  # noqa: E731
        feat_npz = lambda: sorted((fe.root / "features").glob("video-features-*/*.npz"))  # noqa: E731
        record = lambda: [rv.root / "nb" / "v.json"]  # noqa: E731
        seed_record = lambda: [rv.root / "nb" / ".local" / "runs" / "v.seed1.json"]  # noqa: E731
        frames_ref, features_ref = self.from_reference(fr, "frames-ref"), self.from_reference(fe, "features-ref")
        results_ref = self.from_reference(rv, "results-ref")
        self.repaired("frame cache: a truncated .npz", fr, frames_ref, lambda: truncate(frame_npz()[5:6]))
        self.repaired("frame cache: garbage failures.json", fr, frames_ref,
                      lambda: garbage([frame_npz()[0].parent / "failures.json"]))
        self.repaired("features: a truncated chunk .npz", fe, features_ref, lambda: truncate(feat_npz()[2:3]))
        self.repaired("run_variant: garbage JSON record", rv, results_ref, lambda: garbage(record()))
        # a kill after seed 1 was written and before the record: the re-run must read (and refuse) the garbage
        self.repaired("run_variant: garbage JSON per-seed record, record absent", rv, results_ref,
                      lambda: garbage(seed_record()) + delete(record()))
        self.repaired("run_variant: forged metric 99.9", rv, results_ref, lambda: forge(record()))
        self.repaired("run_variant: deleted record", rv, results_ref, lambda: delete(record()))
        self.repaired("run_variant: NaN record of another profile", rv, results_ref, lambda: nan_record(record()))
        self.dead_end_advice()
        if reproduce:
            rp = self.targets["reproduce"]
            stats = [self.clone / "runs/smoke/results/00_data/stats.json"]
            for fault, damage in (("forged metric 99.9 in stats.json", forge_stats), ("deleted stats.json", delete),
                                  ("NaN stats.json of another profile", nan_stats)):
                self.repaired(f"reproduce 00: {fault}", rp, self._reproduce_reference_state,
                              lambda d=damage: d(stats), expect_ran=True)

    def dead_end_advice(self) -> None:
        """Garbage videos.json: the error must name it and say what rebuilds it; following the advice
        must rebuild the dataset (every video reused) and give the reference frames."""
        data, cache = self.fs / "bad-data", self.fs / "bad-cache"
        copy_tree(self.fs / "ref-data", data)
        shutil.rmtree(cache, ignore_errors=True)
        garbage([data / "videos.json"])
        videos = work_state(data, ("videos/*.mp4",))
        first = run(worker("frames", data, cache), self.clone)
        message = last_line(first.stderr)
        named = str(data / "videos.json") in message
        if first.returncode == 0 or not named or "dataset.json" not in message:
            self.add(Outcome("dataset: garbage videos.json", "corrupt", f"rc {first.returncode}: {short(message)} "
                             "[does not name the file or what rebuilds it]", False, silent_wrong=first.returncode == 0))
            return
        (data / "dataset.json").unlink()  # the advice: delete dataset.json (or the folder) and run again
        regen = run([PY, "-m", "data_prep.synthetic", "--size", "smoke", "--out", str(data)], self.clone)
        second = run(worker("frames", data, cache), self.clone)
        wrong = diff(self.targets["generate"].ref, state(data, ("**/*",)))
        wrong += diff(self.targets["frames"].ref, state(cache, ("**/*",)))
        redone = [k for k, v in videos.items() if work_state(data, ("videos/*.mp4",)).get(k) != v]
        held = regen.returncode == 0 and second.returncode == 0 and not wrong and not redone
        self.add(Outcome("dataset: garbage videos.json", "corrupt",
                         f"stopped: {short(message, 110)}; advice followed: regenerate rc {regen.returncode}, "
                         f"frames rc {second.returncode}, {len(wrong)} outputs differ, {len(redone)} videos re-rendered",
                         held, silent_wrong=bool(wrong), lost_work=bool(redone)))

    def _reproduce_reference_state(self) -> None:
        """Outputs of a completed ``reproduce --only 00`` (a kill trial's re-run leaves them; else run it)."""
        rp = self.targets["reproduce"]
        if diff(rp.ref, state(rp.root, rp.compare)):
            proc = run(rp.cmd, self.clone)
            if proc.returncode:
                raise RuntimeError(f"reproduce --only 00 failed:\n{proc.stderr[-3000:]}")

    # ------------------------------------------------------------ full disk, read-only folder
    def refused_write(self, fault: str, kind: str, target: Target, keep: Callable[[], None], limit: int | None) -> None:
        """Half the reference outputs in place, then a run that cannot write: it must fail naming a path
        under its output folder, leave no temporary or partial file, and keep what was there."""
        target.reset()
        keep()
        before = work_state(target.root, target.work)
        if limit is None:
            for p in [target.root, *target.root.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
            proc = run(target.cmd, self.clone, prefix=NO_DAC)
            for p in [target.root, *target.root.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o755)
        else:
            proc = run(target.cmd, self.clone, preexec=full_disk(limit))
        after = work_state(target.root, target.work)
        lost = sorted(k for k in before if after.get(k) != before[k])
        partial = [k for k, (_, d) in after.items() if k not in before and target.ref.get(k) != d]
        litter = temporaries(target.root)
        message = last_line(proc.stderr)
        named = str(target.root) in message
        held = proc.returncode != 0 and named and not lost and not partial and not litter
        happened = (f"rc {proc.returncode}: {short(message)}" + ("" if named else " [names no path under the output folder]")
                    + f"; kept {len(before) - len(lost)} of {len(before)} finished artefacts"
                    + (f"; partial files {partial}" if partial else "") + (f"; temporaries left {litter}" if litter else ""))
        self.add(Outcome(fault, kind, happened, held, silent_wrong=proc.returncode == 0 and bool(partial),
                         lost_work=bool(lost)))

    def disk_and_readonly(self) -> None:
        gen, fr, fe, rv = (self.targets[k] for k in ("generate", "frames", "features", "variant"))

        def half_videos() -> None:
            copy_tree(self.fs / "ref-data", gen.root)
            (gen.root / "dataset.json").unlink()
            for p in sorted((gen.root / "videos").glob("*.mp4"))[N_VIDEOS // 2:]:
                p.unlink()

        def half_frames() -> None:
            copy_tree(self.fs / "frames-ref", fr.root)
            for p in sorted(fr.root.glob("frames/*/*.npz"))[N_VIDEOS // 2:]:
                p.unlink()

        def half_features() -> None:
            copy_tree(self.fs / "features-ref", fe.root)
            for p in sorted(fe.root.glob("features/video-features-*/*.npz"))[4:]:
                p.unlink()
            for p in fe.root.glob("features/text-features-*"):
                shutil.rmtree(p)

        def record_deleted() -> None:
            copy_tree(self.fs / "results-ref", rv.root)
            (rv.root / "nb" / "v.json").unlink()
            (rv.root / "nb" / ".local" / "runs" / "v.seed2.json").unlink()

        cases = [("generation", gen, half_videos, 3000), ("frame cache", fr, half_frames, 100_000),
                 ("features", fe, half_features, 1000), ("run_variant record", rv, record_deleted, 2000)]
        for what, target, keep, limit in cases:
            self.refused_write(f"{what}: disk full", "disk", target, keep, limit)
        for what, target, keep, _ in cases:
            self.refused_write(f"{what}: output folder chmod 555", "readonly", target, keep, None)

    # ------------------------------------------------------------ bad parameters, videos, annotations, network
    def profiles(self) -> None:
        report = json_report(run(worker("profiles"), self.clone))
        for case, r in report.items():
            text, must = PROFILE_CASES[case]
            message = r["message"]
            one_line = bool(message) and "\n" not in message.strip() and "Traceback" not in message
            named = Path(r["file"]).name in message and all(m in message for m in must)
            held = r["exit"] not in (None, "exception") and one_line and named and not r["ran"]
            happened = (f"{'refused' if r['exit'] else 'ACCEPTED'}: {short(message, 130)}"
                        + ("" if named else " [does not name the file/key/fix]")
                        + ("" if one_line or not message else " [not one line]") + ("; a notebook ran" if r["ran"] else ""))
            self.add(Outcome(f"profile: {case} ({short(text.replace(chr(10), ' '), 40)})", "profile", happened, held,
                             silent_wrong=r["exit"] is None))

    def videos(self) -> None:
        report = json_report(run(worker("videos", self.fs / "videos"), self.clone, timeout=600))
        for name in ("mpeg2.mpg", "h264.ts", "full.mp4", "truncated.mp4", "zero.mp4", "text.mp4"):
            r = report[name]
            path = str(self.fs / "videos" / "videos" / name)
            if "seen" in r:  # decoded: the frames must be those named, and the ones the rule names
                right = r["seen"] == r["expected"] and r["indices"] == r["expected"]
                partial_ok = name == "truncated.mp4" and r["seen"] == r["indices"] and r["indices"] == r["expected"][:len(r["indices"])]
                held = right or partial_ok
                happened = f"decoded by {r['decoder']}: frames shown {r['seen']} for indices {r['indices']}"
                self.add(Outcome(f"video: {name}", "video", happened, held, silent_wrong=not held))
            else:
                message = r.get("error") or r.get("other_error")
                named = path in message
                should_decode = name in ("mpeg2.mpg", "h264.ts", "full.mp4")
                held = named and "error" in r and not should_decode
                self.add(Outcome(f"video: {name}", "video", f"refused: {short(message)}"
                                 + ("" if named else " [does not name the file]"), held))
        fc = report["frame_cache"]
        good = {"mpeg2", "h264", "full"}
        bad = {"truncated", "zero", "text"} - {k for k in ("truncated",) if fc["cached"].get(k) is not None}
        right = all(fc["cached"][v] == fc["expected"] for v in good)
        warned = fc["warnings"] and all(v in fc["warnings"][0] for v in bad)
        held = set(fc["failed"]) == bad and right and bool(warned)
        self.add(Outcome("video: frame cache over all six (workers=2)", "video",
                         f"failed {sorted(fc['failed'])}; good videos' frames right: {right}; warning names them: {bool(warned)}",
                         held, silent_wrong=not right))

    def annotations(self) -> None:
        report = json_report(run(worker("annotations", self.fs / "msrvtt"), self.clone))
        valid = report["valid"]
        self.add(Outcome("annotation: valid small folder (control)", "annotation",
                         f"read: {valid}" if valid["ok"] else f"REFUSED: {valid['error']}", valid["ok"]))
        for case, (name, _, expected) in ANNOTATION_CASES.items():
            r = report[case]
            if expected == "drop":
                held = r["ok"] and r["dropped"] == 1 and r["captions"] == valid["captions"] - 1
                happened = f"dropped and counted {r.get('dropped')}" if r["ok"] else f"refused: {short(r['error'])}"
            else:
                named = not r["ok"] and (r["file"] in r["error"] or name in r["error"])
                held = named
                happened = (f"refused: {short(r['error'], 140)}" + ("" if named else " [does not name the file]")
                            if not r["ok"] else f"ACCEPTED: {r}")
            self.add(Outcome(f"annotation: {case} ({name})", "annotation", happened, held,
                             silent_wrong=r["ok"] and expected == "refuse"))

    def network(self) -> None:
        cache, out = self.fs / "download-cache", self.fs / "download-out"
        proc = run([PY, "-m", "data_prep.msrvtt", "--download", "--out", str(out), "--cache", str(cache)], self.clone,
                   timeout=300, prefix=("unshare", "-n"))
        message = last_line(proc.stderr)
        left = [p.relative_to(self.fs).as_posix() for root in (cache, out) if root.exists() for p in root.rglob("*") if p.is_file()]
        named = any(host in message for host in ("robots.ox.ac.uk", "github.com"))  # data_prep.msrvtt.ARCHIVES
        traceback = "Traceback" in proc.stderr
        held = proc.returncode != 0 and named and not left and not traceback
        happened = (f"rc {proc.returncode}: {short(message)}" + ("" if named else " [does not name the URL]")
                    + (" [a raw traceback]" if traceback else "") + (f"; files left: {left}" if left else "; no file left"))
        self.add(Outcome("network: msrvtt --download without network", "network", happened, held))

    # ------------------------------------------------------------ table
    def table(self, seconds: float) -> str:
        rows = ["| # | fault | kind | what happened | held? |", "|---|---|---|---|---|"]
        for i, o in enumerate(self.outcomes, 1):
            rows.append(f"| {i} | {o.fault} | {o.kind} | {o.happened.replace('|', '/')} | {'yes' if o.held else '**no**'} |")
        held = sum(o.held for o in self.outcomes)
        rows.append("")
        rows.append(f"tried {len(self.outcomes)}, held {held}, failed {len(self.outcomes) - held}, "
                    f"silent wrong results {sum(o.silent_wrong for o in self.outcomes)}, "
                    f"lost work {sum(o.lost_work for o in self.outcomes)}; wall time {seconds / 60:.1f} min")
        return "\n".join(rows)


def truncate(paths: list[Path]) -> list[Path]:
    for p in paths:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return paths


def garbage(paths: list[Path]) -> list[Path]:
    for p in paths:
        p.write_text('{"metrics": {"t2v_R1": [}} garbage')
    return paths


def delete(paths: list[Path]) -> list[Path]:
    for p in paths:
        p.unlink()
    return paths


def _edit_json(paths: list[Path], edit: Callable[[dict], None]) -> list[Path]:
    for p in paths:
        doc = json.loads(p.read_text())
        edit(doc)
        p.write_text(json.dumps(doc, indent=2))
    return paths


def _nan(obj):
    """``obj`` with every float replaced by NaN."""
    if isinstance(obj, dict):
        return {k: _nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan(v) for v in obj]
    return float("nan") if isinstance(obj, float) else obj


def forge(paths: list[Path]) -> list[Path]:
    """A run_variant record whose mean t2v R@1 was edited to 99.9."""
    return _edit_json(paths, lambda d: d["metrics"]["summary"]["plain"]["selected"]["t2v_R1"].update(mean=99.9))


def nan_record(paths: list[Path]) -> list[Path]:
    """The record another profile (other epochs) wrote under the same name, with NaN metrics."""
    return _edit_json(paths, lambda d: d.update(config={**d["config"], "epochs": 1}, metrics=_nan(d["metrics"])))


def forge_stats(paths: list[Path]) -> list[Path]:
    return _edit_json(paths, lambda d: d["metrics"]["features"]["train"].update(mean_valid_frames=99.9))


def nan_stats(paths: list[Path]) -> list[Path]:
    return _edit_json(paths, lambda d: d.update(config={**d["config"], "max_frames_of_other_profile": 4},
                                                metrics=_nan(d["metrics"])))


GROUPS = ("kill", "concurrent", "corrupt", "disk", "profile", "video", "annotation", "network")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=GROUPS, help="groups to run (default: all)")
    parser.add_argument("--no-reproduce", action="store_true", help="skip the reproduce --only 00 faults (minutes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone (its path is printed)")
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="the git repository whose HEAD is tried (default: this one; another one to check "
                        "that the suite catches a deliberately broken library)")
    args = parser.parse_args(argv)
    groups = args.only or GROUPS
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vidret-faults-"))
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "--quiet", str(args.repo), str(clone)], check=True)
    head = subprocess.run(["git", "-C", str(clone), "log", "-1", "--format=%h %s"], capture_output=True, text=True).stdout.strip()
    print(f"clone of HEAD ({head}) in {clone}", flush=True)
    suite = Suite(clone, args.seed)
    reproduce = not args.no_reproduce and ("kill" in groups or "corrupt" in groups)
    try:
        suite.build_targets(reproduce)
        suite.fs.mkdir(parents=True)
        if {"kill", "concurrent", "corrupt", "disk"} & set(groups):
            suite.prepare_references()
        if reproduce:
            suite.reference(suite.targets["reproduce"])
        steps = {"kill": lambda: suite.kills(reproduce), "concurrent": suite.concurrent,
                 "corrupt": lambda: suite.corrupt(reproduce), "disk": suite.disk_and_readonly,
                 "profile": suite.profiles, "video": suite.videos, "annotation": suite.annotations,
                 "network": suite.network}
        for group in GROUPS:
            if group in groups:
                print(f"== {group}", flush=True)
                steps[group]()
    finally:
        print()
        print(suite.table(time.perf_counter() - start))
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if suite.outcomes and all(o.held for o in suite.outcomes) else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        WORKERS[sys.argv[2]](*sys.argv[3:])
    else:
        sys.exit(main())
