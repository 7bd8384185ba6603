"""The pretrained start: its loss, its map, its training, cache and lock (with a stand-in encoder)."""
import dataclasses
import threading

import numpy as np
import pytest
import torch

from data_prep.synthetic_render import COLOURS
from vidret_lib import pretrain
from vidret_lib.pretrain import PretrainConfig, StartCheckpoint, apply_start, pretrain_start, start_key
from vidret_lib.train import FeatureSplit

DIM = 16
VOCAB = ("red", "green", "blue", "yellow", "purple", "violet", "orange", "cyan", "turquoise", "pink",
         "circle", "disk", "square", "box", "triangle", "star", "diamond", "rhombus", "cross", "plus",
         "small", "little", "tiny", "large", "big", "black", "white", "grey", "gray", "striped", "checkered")


class StandIn:
    """A tiny, deterministic encoder: image = fixed mix of colour statistics, text = fixed mix of
    word counts, both 16-d and unrelated until the start aligns them. Counts its calls."""

    cache_id, device, embed_dim = "stand-in-encoder", "cpu", DIM

    def __init__(self):
        g = np.random.default_rng(0)
        self.mix_image = g.standard_normal((DIM, 12))
        self.mix_text = g.standard_normal((DIM, len(VOCAB)))
        self.calls = {"image": 0, "text": 0}

    def encode_image(self, frames):
        self.calls["image"] += 1
        x = np.asarray(frames, np.float64)[:, ::4, ::4, None, :]  # (N, H/4, W/4, 1, 3): every 4th pixel
        palette = np.array(list(COLOURS.values()) + [(12,) * 3, (240,) * 3, (125,) * 3, (60,) * 3], np.float64)
        near = np.linalg.norm(x - palette, axis=-1) < 40  # (N, H, W, 12): pixel close to a colour / background
        return torch.from_numpy(near.mean((1, 2)) @ self.mix_image.T).float()

    def encode_text(self, captions, batch_size=None):
        self.calls["text"] += 1
        counts = np.array([[c.split().count(w) for w in VOCAB] for c in captions], np.float64)
        return torch.from_numpy(counts @ self.mix_text.T + 0.1).float()


TINY = PretrainConfig(n_images=160, heldout=40, captions_per_image=2, epochs=40, batch_size=64, lr=1e-2,
                      logit_scale=20.0, seed=0)
QUICK = dataclasses.replace(TINY, epochs=2)  # for what does not need a trained start


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    enc = StandIn()
    cache = tmp_path_factory.mktemp("cache")
    return enc, cache, pretrain_start(enc, cache, TINY)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("changes, message", [
    ({"n_images": 10, "heldout": 9}, "n_images - heldout = 1"),
    ({"heldout": 1}, "heldout=1"),
    ({"epochs": 0}, "epochs=0"),
    ({"batch_size": 1}, "batch_size=1"),
    ({"lr": 0.0}, "lr=0.0"),
    ({"logit_scale": -1.0}, "logit_scale=-1.0"),
    ({"lr": "fast"}, "lr='fast'"),
    ({"epochs": 2.0}, "epochs=2.0 \\(must be an int\\)"),
    ({"captions_per_image": True}, "captions_per_image=True"),
])
def test_bad_config_is_named(changes, message):
    with pytest.raises(ValueError, match=f"invalid PretrainConfig: .*{message}"):
        dataclasses.replace(PretrainConfig(), **changes)


# ---------------------------------------------------------------- the loss against a naive loop


def naive_loss(w_text, w_image, text, image, image_ids, caption_ids, scale):
    """Symmetric InfoNCE by loops in float64, masked pairs left out of both softmaxes."""
    t = [w_text @ x for x in text]
    v = [w_image @ x for x in image]
    t = [x / np.linalg.norm(x) for x in t]
    v = [x / np.linalg.norm(x) for x in v]
    b = len(t)
    negative = [[i == j or (image_ids[i] != image_ids[j] and caption_ids[i] != caption_ids[j])
                 for j in range(b)] for i in range(b)]
    t2v = v2t = 0.0
    for i in range(b):
        row = [scale * float(t[i] @ v[j]) for j in range(b) if negative[i][j]]
        col = [scale * float(t[j] @ v[i]) for j in range(b) if negative[j][i]]
        t2v += -scale * float(t[i] @ v[i]) + np.log(np.sum(np.exp(row)))
        v2t += -scale * float(t[i] @ v[i]) + np.log(np.sum(np.exp(col)))
    return (t2v + v2t) / (2 * b)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_batch_loss_matches_a_naive_loop(dtype, tol):
    g = torch.Generator().manual_seed(0)
    b, d = 7, 5
    w_text, w_image = torch.randn(d, d, generator=g, dtype=dtype), torch.randn(d, d, generator=g, dtype=dtype)
    text, image = torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)
    image_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    caption_ids = torch.tensor([10, 11, 10, 12, 13, 11, 14])  # two captions shared by two stills each
    got = pretrain._batch_loss(w_text, w_image, text, image, image_ids, caption_ids, 20.0)
    want = naive_loss(*(x.double().numpy() for x in (w_text, w_image, text, image)),
                      image_ids.tolist(), caption_ids.tolist(), 20.0)
    assert got.dtype == dtype
    assert abs(got.item() - want) < tol * max(1.0, abs(want))


# ---------------------------------------------------------------- apply_start against a naive loop


@pytest.mark.parametrize("titles", [True, False])
def test_apply_start_matches_a_naive_loop(titles):
    g = np.random.default_rng(1)
    v, t, d, n = 4, 3, 6, 5
    mask = g.random((v, t)) < 0.7
    mask[:, 0] = True
    video = g.standard_normal((v, t, d)) * mask[..., None]  # padded frames are zero, as the cache gives
    present = np.array([True, False, True, True])
    title = g.standard_normal((v, d)) * present[:, None] if titles else None
    split = FeatureSplit(g.standard_normal((n, d)), video, mask, [0, 1, 1, 2, 3], title,
                         present if titles else None, video_ids=("a", "b", "c", "d"), excluded={"e": "gone"})
    start = StartCheckpoint(torch.from_numpy(g.standard_normal((d, d))).float(),
                            torch.from_numpy(g.standard_normal((d, d))).float(), "k")
    got = apply_start(split, start)
    w_text, w_image = start.text.double().numpy(), start.image.double().numpy()
    text64, video64 = split.text.double().numpy(), split.video.double().numpy()
    for i in range(n):
        np.testing.assert_allclose(got.text[i].numpy(), w_text @ text64[i], rtol=1e-5, atol=1e-5)
    for j in range(v):
        for k in range(t):
            np.testing.assert_allclose(got.video[j, k].numpy(), w_image @ video64[j, k], rtol=1e-5, atol=1e-5)
            if not mask[j, k]:
                assert not got.video[j, k].any()  # a padded frame stays zero
        if titles:
            np.testing.assert_allclose(got.title[j].numpy(), w_text @ split.title[j].double().numpy(),
                                       rtol=1e-5, atol=1e-5)
    assert got.text.dtype == got.video.dtype == torch.float32
    assert torch.equal(got.mask, split.mask) and torch.equal(got.caption_video, split.caption_video)
    assert got.video_ids == split.video_ids and got.excluded == split.excluded
    assert (got.title is None) == (not titles)
    if titles:
        assert torch.equal(got.title_present, split.title_present) and not got.title[1].any()
    assert apply_start(split, None) is split


def test_apply_start_refuses_maps_of_another_width():
    split = FeatureSplit(np.zeros((1, 4)), np.zeros((1, 2, 4)), np.ones((1, 2), bool), [0])
    with pytest.raises(ValueError, match=r"start k: its text map is \(3, 3\), the features are 4-d"):
        apply_start(split, StartCheckpoint(torch.eye(3), torch.eye(3), "k"))


# ---------------------------------------------------------------- training, cache, determinism


def test_start_learns_an_alignment_from_the_identity(trained):
    _, _, start = trained
    assert start.text.shape == start.image.shape == (DIM, DIM) and start.text.dtype == torch.float32
    info = start.info
    assert info["n_train_images"] == TINY.n_images - TINY.heldout
    assert info["n_pairs"] == info["n_train_images"] * TINY.captions_per_image
    assert len(info["loss_history"]) == TINY.epochs
    assert info["loss_history"][-1] < 0.8 * info["loss_history"][0]
    held = info["heldout"]
    assert held["n_images"] == TINY.heldout and held["n_captions"] == TINY.heldout * TINY.captions_per_image
    assert held["pretrained"]["t2v_R1"] > held["identity"]["t2v_R1"] + 5
    assert held["pretrained"]["t2v_R1"] > 3 * held["chance_R1"]


def test_start_is_cached_and_deterministic(tmp_path):
    enc = StandIn()
    start = pretrain_start(enc, tmp_path / "a", QUICK)
    before = dict(enc.calls)
    again = pretrain_start(enc, tmp_path / "a", QUICK)
    assert enc.calls == before  # loaded, not trained: the encoder is not called
    assert again.key == start.key == start_key(enc, QUICK) and again.info == start.info
    assert torch.equal(again.text, start.text) and torch.equal(again.image, start.image)
    fresh = pretrain_start(StandIn(), tmp_path / "b", QUICK)  # another cache: trained again, bit for bit
    assert torch.equal(fresh.text, start.text) and torch.equal(fresh.image, start.image)
    assert fresh.info == start.info
    assert not torch.equal(start.text, torch.eye(DIM))
    assert start_key(enc, dataclasses.replace(QUICK, seed=1)) != start.key
    other = StandIn()
    other.cache_id = "another-encoder"
    assert start_key(other, QUICK) != start.key


def test_two_callers_train_once(tmp_path):
    enc = StandIn()
    out = []
    threads = [threading.Thread(target=lambda: out.append(pretrain_start(enc, tmp_path, QUICK))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and torch.equal(out[0].text, out[1].text)
    alone = StandIn()
    pretrain_start(alone, tmp_path / "alone", QUICK)
    assert enc.calls == alone.calls  # the second caller waited for the lock and loaded the file
