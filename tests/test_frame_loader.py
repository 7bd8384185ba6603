"""End-to-end frames through a DataLoader (vidret_lib.train.frame_loader): worker processes change
when frames are read, never the training; batches are pinned only for CUDA; under CUDA's device
rules (vidret_lib.devicecheck) nothing mixes devices; each batch reads only its own videos."""
import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import vidret_lib.train as train_module
from test_recipe import SENTENCES, recipe_config, tiny_clip, tiny_encoder
from vidret_lib.cache import save_npz
from vidret_lib.datasets import Split
from vidret_lib.devicecheck import cuda_rules
from vidret_lib.frame_cache import FrameCache
from vidret_lib.train import FrameBatches, RawBatch, RawSplit, TrainConfig, load_frames, train

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEO_IDS = [f"v{i}" for i in range(6)]
MASKS = np.array([[True, True], [True, False], [True, True], [True, True], [False, True], [True, True]])


@dataclasses.dataclass(frozen=True)
class LoggedCache(FrameCache):
    """A frame cache that leaves a file ``loaded-<pid>-<video>-<n>`` in ``log`` for every video it loads."""

    log: Path = Path(".")

    def load(self, video_id):
        n = len(list(self.log.glob(f"loaded-{os.getpid()}-{video_id}-*")))
        (self.log / f"loaded-{os.getpid()}-{video_id}-{n}").touch()
        return super().load(video_id)

    def loads(self) -> list[tuple[int, str]]:
        """(pid, video id) of every load so far."""
        return [(int(p.name.split("-")[1]), p.name.split("-")[2]) for p in self.log.glob("loaded-*")]


def cached_split(tmp_path) -> tuple[RawSplit, LoggedCache]:
    """test_recipe's 6 videos x 2 captions (2 frame slots, some padded) read from frame-cache files."""
    frames = np.random.default_rng(0).integers(0, 255, size=(6, 2, 32, 32, 3), dtype=np.uint8)
    for vid, f, m in zip(VIDEO_IDS, frames, MASKS):
        save_npz(tmp_path / f"{vid}.npz", frames=f * m[:, None, None, None], mask=m)
    (tmp_path / "log").mkdir()
    cache = LoggedCache(tmp_path, "k", tuple(VIDEO_IDS), 2, 32, {}, dict.fromkeys(VIDEO_IDS, "v"), {},
                        log=tmp_path / "log")
    split = Split("train", SENTENCES, [VIDEO_IDS[i // 2] for i in range(12)])
    return RawSplit.from_frame_cache(cache, split), cache


@pytest.mark.parametrize("precision", ["fp32", "fp16_weights"])
def test_workers_read_the_frames_and_the_parameters_are_the_same(tmp_path, precision):
    split, cache = cached_split(tmp_path)
    runs = {}
    for workers in (0, 2):
        for p in cache.log.iterdir():
            p.unlink()
        config = recipe_config(precision, loader_workers=workers)  # 2 epochs of 3 steps, batch 4
        runs[workers] = train(config, split, encoder=tiny_encoder(tiny_clip()))
        pids = {pid for pid, _ in cache.loads()}
        assert len(cache.loads()) == 2 * 3 * 4  # one load per video of each batch, nothing more
        assert (pids == {os.getpid()}) if workers == 0 else (os.getpid() not in pids)  # new workers each epoch
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[2].history]
    assert runs[0].last_state.keys() == runs[2].last_state.keys()
    for name, value in runs[0].last_state.items():
        assert torch.equal(value, runs[2].last_state[name]), name  # bitwise: the same batches in the same order


def test_end_to_end_on_cuda_with_loader_workers_pins_and_mixes_no_devices(tmp_path, monkeypatch):
    split, _ = cached_split(tmp_path)
    made = []  # the DataLoaders train() makes
    real = train_module.DataLoader
    monkeypatch.setattr(train_module, "DataLoader", lambda *a, **k: made.append(k) or real(*a, **k))
    config = recipe_config("fp32", epochs=1, loader_workers=2)
    reference = train(config, split, encoder=tiny_encoder(tiny_clip()))
    assert [(k["num_workers"], k["pin_memory"]) for k in made] == [(2, False)]  # the CPU: nothing to pin
    with cuda_rules():
        encoder = tiny_encoder(tiny_clip().to("cuda"))
        encoder = dataclasses.replace(encoder, device=torch.device("cuda"))
        result = train(dataclasses.replace(config, device="cuda"), split, encoder=encoder)
        assert next(result.model.parameters()).device == torch.device("cuda", 0)
    assert made[1:] == [dict(made[0], pin_memory=True)]
    assert result.history[0]["loss"] == reference.history[0]["loss"]
    for name, value in reference.last_state.items():
        assert torch.equal(value, result.last_state[name]), name


def test_a_batch_loads_only_its_videos_and_keeps_only_valid_frames(tmp_path):
    split, cache = cached_split(tmp_path)
    tokenizer = tiny_encoder(tiny_clip()).tokenizer
    batch = FrameBatches(split, [(torch.tensor([3, 9]), torch.tensor([1, 4]))], tokenizer)[0]
    assert isinstance(batch, RawBatch) and sorted(v for _, v in cache.loads()) == ["v1", "v4"]
    assert batch.mask.tolist() == [[True, False], [False, True]] and batch.frames.dtype == torch.uint8
    want = np.stack([cache.load("v1")[0][0], cache.load("v4")[0][1]])  # the valid frames, in order
    assert torch.equal(batch.frames, torch.from_numpy(want))
    assert torch.equal(batch.tokens, tokenizer([SENTENCES[3], SENTENCES[9]]))
    # a spawned worker (macOS, Windows) receives the split pickled: its frame-cache reader survives that
    frames, mask = pickle.loads(pickle.dumps(split.load_video))(1)
    assert np.array_equal(frames, cache.load("v1")[0]) and np.array_equal(mask, MASKS[1])


def test_bad_loader_settings_and_inconsistent_videos_are_named():
    with pytest.raises(ValueError, match=r"loader_workers=-1.*>= 0"):
        TrainConfig(mode="end_to_end", loader_workers=-1).validate()
    with pytest.raises(ValueError, match=r"loader_workers=2.*0 in 'frozen' mode"):
        TrainConfig(loader_workers=2).validate()
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    split = RawSplit(lambda i: (frames, np.ones(3 - i, bool)), ["a", "b"], [0, 1], 2, ("ok", "short"))
    with pytest.raises(ValueError, match=r"video short: 3 frames and a mask of \(2,\)"):
        load_frames(split, [0, 1])
