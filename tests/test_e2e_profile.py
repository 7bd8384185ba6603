"""The end-to-end recipe reached from notebooks and profiles (issue 11, items 1 and 3).

- the ``msrvtt-e2e`` profile, resolved as a notebook receives it, plans CLIP4Clip's steps on the real
  annotation files (skipped with a reason without ``../shared/data/msrvtt``);
- the parameters cells' recipe switches default to TrainConfig's frozen values (the default profile
  trains as before) and are passed on to TrainConfig under their own names;
- ``pipeline.raw_split`` has the feature split's videos and captions in the same order, and lists the
  videos left out; ``pipeline.model_features`` encodes a RawSplit with the trained towers, checked
  against a plain loop over the towers.
"""
import dataclasses
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from test_recipe import recipe_config, tiny_clip, tiny_encoder
from vidret_lib import pipeline, profiles
from vidret_lib.clip4clip_recipe import plan_steps
from vidret_lib.datasets import write_dataset
from vidret_lib.pipeline import RECIPE_SWITCHES, DataConfig
from vidret_lib.train import FeatureSplit, RawSplit, TrainConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = profiles.PROJECT_ROOT.parent / "shared" / "data" / "msrvtt"
E2E_NOTEBOOKS = ("01_clip4clip", "02_vsepp", "03_camoe_dsl", "05_emcl")  # 04 (titles) and 06 (LBPC) stay frozen
FIELDS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _notebook(stem):
    return profiles.NOTEBOOKS_DIR / f"{stem}.ipynb"


# ------------------------------------------------------------------ the profile on the real annotations
@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "annotations").is_dir(), reason=f"{SHARED}/annotations is absent (no ../shared)")
@pytest.mark.parametrize("stem", E2E_NOTEBOOKS)
def test_msrvtt_e2e_plans_clip4clips_steps_on_the_real_annotations(stem):
    from data_prep import msrvtt

    params = profiles.profile_params("msrvtt-e2e", stem)
    config = TrainConfig(**{k: params[k] for k in RECIPE_SWITCHES},
                         epochs=params["epochs"], batch_size=params["batch_size"], lr=params["lr"])
    config.validate()
    splits = msrvtt.build_splits(msrvtt.read_annotations(SHARED / "annotations"))
    train_captions = splits[params["train_split"]]  # one entry per caption
    n_items = len(train_captions) if config.sampling == "caption" else len({r["video_id"] for r in train_captions})
    plan = plan_steps(n_items, config.batch_size, config.epochs)
    print(f"{stem}: msrvtt-e2e trains on {params['train_split']}: {n_items:,} caption samples, batch "
          f"{config.batch_size}, {plan.steps_per_epoch:,} steps/epoch, {plan.total_steps:,} in all")
    assert (params["train_split"], params["val_split"], params["test_split"]) == ("train_9k_noval", "val", "test_1ka")
    assert (n_items, plan.steps_per_epoch, plan.total_steps) == (170_060, 1328, 6640)
    # the rest of CLIP4Clip's README command (papers.md §0)
    assert (config.mode, config.precision, config.freeze_layer_num, config.false_negatives) == (
        "end_to_end", "fp16_weights", 0, "keep")
    assert config.learned_logit_scale and config.loader_workers > 0
    assert (config.lr, config.coef_lr, config.optimizer, params["seeds"]) == (1e-4, 1e-3, "bert_adam", [42])
    assert (params["encoder"], params["pretrained"], params["max_frames"], params["context_length"]) == (
        "ViT-B-32-quickgelu", "openai", 12, 32)


def test_msrvtt_e2e_switches_only_the_end_to_end_notebooks_and_06_follows_the_lbpc_write_up():
    e2e = profiles.profile_overrides("msrvtt-e2e")
    frozen = profiles.profile_overrides("msrvtt-frozen")
    assert profiles.profile_overrides("msrvtt-gpu") == e2e
    assert sorted(stem for stem, values in e2e.items() if values.get("mode") == "end_to_end") == list(E2E_NOTEBOOKS)
    for stem in ("04_mbvr", "06_cikm_lbpc"):  # on frozen features: only where results go differs
        assert "mode" not in e2e[stem]
        assert {k: v for k, v in e2e[stem].items() if not k.endswith("_dir")} == \
            {k: v for k, v in frozen[stem].items() if not k.endswith("_dir")}
    assert e2e["06_cikm_lbpc"]["batch_size"] == frozen["06_cikm_lbpc"]["batch_size"] == 2048
    assert all(v["results_dir"] == "../results/msrvtt-e2e" for v in e2e.values())


# ------------------------------------------------------------------ the parameters cells
@pytest.mark.parametrize("stem", E2E_NOTEBOOKS)
def test_parameters_cells_default_to_trainconfigs_frozen_behaviour_and_pass_the_switches_on(stem):
    declared = profiles.notebook_parameters(_notebook(stem))
    for name in RECIPE_SWITCHES:
        assert name in declared, f"{stem} has no parameter {name!r}"
        assert declared[name]["default"] == FIELDS[name], (stem, name)
        assert declared[name]["annotation"] == type(FIELDS[name]).__name__, (stem, name)
    assert declared["context_length"] == {"annotation": "int", "default": 0}  # 0: the encoder's own
    code = "\n".join("".join(c["source"]) for c in json.loads(_notebook(stem).read_text())["cells"]
                     if c["cell_type"] == "code")
    call = re.search(r"base = TrainConfig\((.*?)\)\n", code, re.S).group(1)
    for name in RECIPE_SWITCHES:
        assert re.search(rf"\b{name}={name}\b", call), f"{stem}: TrainConfig(...) does not get {name}={name}"
    assert "open_encoder(encoder, pretrained, device, context_length)" in code, stem


@pytest.mark.parametrize("stem", ("04_mbvr", "06_cikm_lbpc"))
def test_frozen_only_notebooks_have_no_mode(stem):
    assert not set(RECIPE_SWITCHES) & set(profiles.notebook_parameters(_notebook(stem)))


def test_frozen_config_resets_only_the_end_to_end_switches():
    e2e = recipe_config("fp16_weights", lr=0.5, head="seqTransf")
    frozen = pipeline.frozen_config(e2e)
    frozen.validate()
    assert frozen == dataclasses.replace(e2e, mode="frozen", precision="fp32", freeze_layer_num=-1,
                                         learned_logit_scale=False, loader_workers=0)
    assert pipeline.frozen_config(TrainConfig(lr=0.5)) == TrainConfig(lr=0.5)


# ------------------------------------------------------------------ raw_split, split_inputs, model_features
VIDEOS = ("a", "b", "c", "d")
FAILED = {"d": "moov atom not found"}  # could not be decoded
EMPTY = "b"  # decoded, but no valid frame


def _frames(video_id):
    """(frames (2, 32, 32, 3) uint8, mask (2,)) of a video, distinct per id; ``b`` has no valid frame."""
    rng = np.random.default_rng(ord(video_id))
    mask = np.array([video_id != EMPTY, video_id == "a"])
    return rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8) * mask[:, None, None, None], mask


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """A 4-video dataset (2 or 3 captions each) with a stand-in frame cache and feature caches."""
    videos = [{"video_id": v, "path": f"{v}.mp4"} for v in VIDEOS]
    rows = [{"video_id": v, "sentence": f"a {v} thing number {k}"} for v in VIDEOS for k in range(2 + (v == "c"))]
    ds = write_dataset(tmp_path / "ds", {"name": "t"}, videos, {"test": rows})
    calls = []

    def frame_cache(dataset, ids, cache_dir, **sampling):
        calls.append((tuple(ids), sampling))
        return types.SimpleNamespace(failed=dict(FAILED), load=lambda v: _frames(v) if v not in FAILED
                                     else (np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, bool)))

    monkeypatch.setattr(pipeline, "frame_cache", frame_cache)
    masks = np.stack([_frames(v)[1] if v not in FAILED else np.zeros(2, bool) for v in VIDEOS])
    monkeypatch.setattr(pipeline, "video_features",
                        lambda enc, frames, ids, cache: (torch.ones(len(ids), 2, 4), torch.as_tensor(masks)))
    monkeypatch.setattr(pipeline, "text_features", lambda enc, sentences, cache: torch.randn(len(sentences), 4))
    config = DataConfig(cache_dir=str(tmp_path / "cache"), max_frames=2)
    encoder = types.SimpleNamespace(name="tiny", image_size=32)
    with pytest.warns(UserWarning, match="2 of 4 videos left out"):
        features = pipeline.split_features(config, ds, "test", encoder)
    return config, ds, encoder, features, calls


def test_raw_split_has_the_feature_splits_videos_and_captions_in_order(cached):
    config, ds, encoder, features, calls = cached
    raw = pipeline.raw_split(config, ds, "test", encoder, features)
    assert isinstance(raw, RawSplit)
    assert raw.video_ids == features.video_ids == ("a", "c")
    assert torch.equal(raw.caption_video, features.caption_video)
    assert list(raw.sentences) == [r["sentence"] for r in pipeline.feature_rows(ds, "test", features)]
    assert raw.excluded == features.excluded == {"d": FAILED["d"], "b": "no valid frame"}
    for i, v in enumerate(raw.video_ids):  # column i reads video_ids[i]'s frames
        assert all(np.array_equal(x, y) for x, y in zip(raw.load_video(i), _frames(v)))
    assert calls[-1] == calls[0]  # the same frame cache as the features: nothing decoded again
    assert pipeline.split_inputs("frozen", config, ds, "test", encoder, features) is features
    inputs = pipeline.split_inputs("end_to_end", config, ds, "test", encoder, features)
    assert (inputs.video_ids, inputs.sentences) == (raw.video_ids, raw.sentences)


def test_raw_split_refuses_features_of_another_split_and_split_inputs_an_unknown_mode(cached):
    config, ds, encoder, features, _ = cached
    other = FeatureSplit(torch.zeros(1, 4), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), [0],
                         video_ids=("z",))
    with pytest.raises(ValueError, match=r"features hold 1 videos that split 'test' .* has not \(e\.g\. \['z'\]\)"):
        pipeline.raw_split(config, ds, "test", encoder, other)
    shuffled = dataclasses.replace(features, caption_video=features.caption_video.flip(0))
    with pytest.raises(ValueError, match="do not match the features' captions"):
        pipeline.raw_split(config, ds, "test", encoder, shuffled)
    with pytest.raises(ValueError, match=r"unknown mode 'e2e'; valid modes: \('frozen', 'end_to_end'\)"):
        pipeline.split_inputs("e2e", config, ds, "test", encoder, features)


def test_model_features_are_the_trained_towers_on_a_raw_split_and_the_cache_on_a_feature_split():
    encoder = tiny_encoder(tiny_clip())
    model = build_model(recipe_config("fp32"), encoder.embed_dim, encoder)
    with torch.no_grad():
        for p in model.clip.parameters():  # "trained": not the encoder's weights any more
            p.add_(0.01 * torch.randn_like(p))
    ids = ("a", "b", "c")
    sentences = ["a dog runs", "a red car", "the dog again", "two birds", "a blue bird"]
    caption_video = [0, 1, 0, 2, 2]
    loads = []
    raw = RawSplit(lambda i: loads.append(i) or _frames(ids[i]), sentences, caption_video, 3, ids, {"x": "gone"})
    got = pipeline.model_features(model, raw, videos=2)
    assert sorted(set(loads)) == [0, 1]  # the third video is never read
    assert got.video_ids == ("a", "b") and got.excluded == {"x": "gone"}
    assert got.caption_video.tolist() == [0, 1, 0]
    with torch.no_grad():  # a plain loop over the trained towers, one caption and one frame at a time
        for i, k in enumerate([0, 1, 2]):
            want = model.clip.encode_text(encoder.tokenize([sentences[k]]))[0]
            torch.testing.assert_close(got.text[i], want, rtol=1e-5, atol=1e-5)
        for v in range(2):
            frames, mask = _frames(ids[v])
            for t in range(2):
                want = model.clip.encode_image(encoder.preprocess_frames(frames[t:t + 1]))[0] if mask[t] else torch.zeros(32)
                torch.testing.assert_close(got.video[v, t], want, rtol=1e-5, atol=1e-5)
            assert got.mask[v].tolist() == mask.tolist()
        start = encoder.model.encode_text(encoder.tokenize([sentences[0]]))[0]
    assert not torch.allclose(got.text[0], start, atol=1e-3)  # the trained towers, not the start's
    whole = pipeline.model_features(model, raw)
    assert whole.num_videos == 3 and whole.num_texts == 5
    features = FeatureSplit(torch.randn(2, 4), torch.randn(2, 1, 4), torch.ones(2, 1, dtype=torch.bool), [0, 1],
                            video_ids=("p", "q"))
    frozen = build_model(TrainConfig(), 4)
    same = pipeline.model_features(frozen, features)
    assert torch.equal(same.text, features.text) and same.video_ids == ("p", "q")
