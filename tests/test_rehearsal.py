"""The CPU dress rehearsal of the MSR-VTT profiles (issue 11 items 5 and 6).

``data_prep.rehearsal`` builds a mini MSR-VTT source folder and a tiny CLIP; the slow test runs
every notebook of ``params/msrvtt-rehearsal.yaml`` (MSR-VTT, device "cuda") in a copy of the
project under CUDA's device rules on the CPU (``reproduce --cuda-rules 1``).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import msrvtt, rehearsal
from vidret_lib import profiles
from vidret_lib.encoders import load_encoder

SHARED = rehearsal.SHARED_MSRVTT
needs_shared = pytest.mark.skipif(not (SHARED / "annotations").is_dir(), reason=f"{SHARED} is absent")


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != rehearsal.STAMP}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """The rehearsal folder built without the shared files (a user's clone)."""
    out = tmp_path_factory.mktemp("stand-in") / "rehearsal"
    return out, rehearsal.build(out, shared=out.parent / "no-shared-data")


def test_stand_in_prepares_with_the_planned_missing_and_damaged_videos(stand_in, tmp_path):
    out, info = stand_in
    assert info["annotations_from"] == "stand-in"
    ds = msrvtt.prepare(info["source"], tmp_path / "msrvtt")
    manifest = ds.manifest()
    kinds = info["videos"]
    assert sorted(manifest["missing_ids"]) == sorted(v for v, k in kinds.items() if k == "missing")
    assert len(manifest["missing_ids"]) == 3
    damaged = sorted(v for v, k in kinds.items() if k in ("truncated", "garbage"))
    assert len(damaged) == 2 and all((out / "source" / "videos" / f"{v}.mp4").is_file() for v in damaged)
    assert sorted(u["video_id"] for u in manifest["unreadable"]) == damaged  # decord refuses both
    counts = manifest["splits"]
    assert counts["train_9k_noval"]["videos"] == rehearsal.TRAIN_VIDEOS
    assert counts["val"]["videos"] == rehearsal.VAL_VIDEOS
    assert counts["test_1ka"]["captions"] == rehearsal.TEST_QUERIES
    assert all(r["category"] is not None for r in ds.videos.values())  # MBVR's title_source="category"


def test_build_is_deterministic_and_reused(stand_in, tmp_path):
    out, info = stand_in
    again = rehearsal.build(tmp_path / "again", shared=tmp_path / "no-shared-data")
    assert _digests(tmp_path / "again") == _digests(out)
    assert again["key"] == info["key"]
    stamp_time = (out / rehearsal.STAMP).stat().st_mtime_ns
    assert rehearsal.build(out, shared=out.parent / "no-shared-data") == info  # reused, not rebuilt
    assert (out / rehearsal.STAMP).stat().st_mtime_ns == stamp_time


def test_generated_clip_decodes_to_its_frames(stand_in):
    import av

    out, info = stand_in
    video_id = next(v for v, k in info["videos"].items() if k == "generated")
    with av.open(str(out / "source" / "videos" / f"{video_id}.mp4")) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    expected = rehearsal.generated_clip(video_id)
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 8  # H.264 at crf 28: close, not exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_clip_checkpoint_loads_through_load_encoder(stand_in, dtype):
    out, info = stand_in
    name = rehearsal.register_model(info["model_dir"])
    encoder = load_encoder(name, pretrained=info["checkpoint"])
    saved = torch.load(info["checkpoint"], map_location="cpu")
    assert encoder.model.state_dict().keys() == saved.keys()
    assert all(torch.equal(encoder.model.state_dict()[k], v) for k, v in saved.items())
    assert (encoder.embed_dim, encoder.image_size, encoder.tokenizer.context_length) == (64, 32, 77)
    assert len(encoder.text_transformer_blocks(4)) == 2 and encoder.model.visual.transformer.width == 64
    # the image feature is the ViT's: compare with a plain forward of the same weights in `dtype`
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    model = encoder.model.to(dtype)
    x = encoder.preprocess_frames(frames).to(dtype)
    with torch.no_grad():
        expected = model.visual(x)
        got = model.encode_image(x)
    torch.testing.assert_close(got, expected)
    assert got.shape == (2, 64) and got.dtype == dtype


@needs_shared
@pytest.mark.shared_data
def test_real_subset_keeps_the_real_entries_and_first_captions_verbatim(tmp_path):
    info = rehearsal.build(tmp_path / "real")
    assert info["annotations_from"] == "real subset"
    mini = msrvtt.read_annotations(Path(info["source"]) / "annotations")
    full = msrvtt.read_annotations(SHARED / "annotations")
    chosen = [v for ids in info["ids"].values() for v in ids]
    assert set(mini.captions) == set(chosen)
    for video_id in chosen:
        assert mini.captions[video_id] == full.captions[video_id][:rehearsal.CAPTIONS_PER_VIDEO]  # the first ones
        assert mini.category[video_id] == full.category[video_id]
    assert mini.test_1ka == full.test_1ka[:rehearsal.TEST_QUERIES]
    assert mini.train_9k == [v for v in full.train_9k if v in set(chosen)]
    assert mini.train_7k == [v for v in full.train_7k if v in set(chosen)]
    real = {p.name: p.read_bytes() for p in (SHARED / "videos").glob("*.mp4")}
    for video_id, kind in info["videos"].items():
        if kind.startswith("real:"):
            assert (Path(info["source"]) / "videos" / f"{video_id}.mp4").read_bytes() == real[kind[5:]]
    assert {"video9770", "video9771"} <= {v for v, k in info["videos"].items() if k.startswith("real:")}


def _copy_project(dest: Path) -> Path:
    """The files a reproduce run reads (notebooks, params, vidret_lib, data_prep) copied to ``dest/main``,
    with ``dest/shared`` pointing at the real shared data when present, as beside this checkout."""
    root = dest / "main"
    ignore = shutil.ignore_patterns("__pycache__", "kernel-ipc-*", ".ipynb_checkpoints")
    for folder in ("notebooks", "params", "vidret_lib", "data_prep"):
        shutil.copytree(profiles.PROJECT_ROOT / folder, root / folder, ignore=ignore)
    if SHARED.is_dir():
        (dest / "shared" / "data").mkdir(parents=True)
        (dest / "shared" / "data" / "msrvtt").symlink_to(SHARED)
    return root


@pytest.mark.slow
def test_msrvtt_rehearsal_runs_every_notebook_under_cuda_device_rules(tmp_path):
    root = _copy_project(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(root), "VIDRET_PROGRESS": "0"}
    env.pop(profiles.CUDA_RULES_ENV, None)
    run = subprocess.run([sys.executable, "-m", "vidret_lib.reproduce", "--profile", "msrvtt-rehearsal",
                          "--cuda-rules", "1"], cwd=root, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    stems = [p.stem for p in profiles.notebook_paths()]
    for stem in stems:
        assert f"[msrvtt-rehearsal] {stem}: ran (never ran)" in run.stdout, run.stdout
        assert (root / "executed" / "msrvtt-rehearsal" / f"{stem}.ipynb").is_file()
    results = root / "runs" / "msrvtt-rehearsal" / "results"
    for stem in stems[:-1]:  # 07_summary writes figures only
        records = {p: json.loads(p.read_text()) for p in sorted((results / stem).glob("*.json"))}
        assert records, f"{stem} wrote no results under {results / stem}"
        on_cuda = [p for p, r in records.items() if "virtual CUDA device" in r.get("environment", {}).get("device", "")]
        assert on_cuda, f"no record of {stem} ran on the virtual CUDA device"
        for path, record in records.items():  # the others chose the CPU (03's gradient probe: device="cpu")
            if "environment" in record and path not in on_cuda:
                assert record["config"].get("device") == "cpu", (path, record["environment"], record["config"])
    assert sorted((root / "runs" / "msrvtt-rehearsal" / "figures").glob("07_*.png"))
    manifest = json.loads((root / "runs" / "msrvtt-rehearsal" / "data" / "msrvtt" / "manifest.json").read_text())
    # 3 ids missing. The truncated copy (its index lost) is always refused at preparation; the copy with garbage
    # bytes over its media data keeps its index, and from a real clip's stream decoders conceal the damage and
    # decode it (with artifacts): refused from the generated stand-in (test above), not always from a real clip.
    assert manifest["videos"]["missing"] == 3
    assert 1 <= manifest["videos"]["unreadable"] <= 2, manifest["unreadable"]
