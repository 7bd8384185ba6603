"""Heads against naive loops: meanP pooling, seqTransf masking and CLIP init, title fusion, EMCL blocks."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from vidret_lib.emcl import EMCL
from vidret_lib.encoders import Encoder
from vidret_lib.heads import (
    RetrievalModel,
    SeqTransf,
    TitleFusion,
    clip_text_init,
    identity_adapter,
    mean_pool,
    r_vt,
)

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def tiny_encoder(dim=64, text_width=64):
    model = open_clip.CLIP(
        embed_dim=dim,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=16, image_size=32, head_width=16),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=text_width, heads=2, layers=4),
    ).eval()
    return Encoder(model, "tiny-clip", "tiny", dim, 32, torch.device("cpu"), (0.5,) * 3, (0.5,) * 3, None)


def naive_mean_pool(video, mask):
    out = []
    for v in range(video.shape[0]):
        acc, n = [0.0] * video.shape[2], 0
        for t in range(video.shape[1]):
            if mask[v, t]:
                f = video[v, t].tolist()
                norm = math.sqrt(sum(x * x for x in f))
                acc = [a + x / norm for a, x in zip(acc, f)]
                n += 1
        mean = [a / max(n, 1) for a in acc]
        norm = math.sqrt(sum(x * x for x in mean))
        out.append([x / norm if norm > 0 else 0.0 for x in mean])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_pool_matches_naive_loop(dtype):
    g = torch.Generator().manual_seed(0)
    video = torch.randn(4, 5, 3, generator=g, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    video[~mask] = 0.0  # padded frames are zero in the feature cache
    got = mean_pool(video, mask)
    assert got.dtype == dtype and not torch.isnan(got).any()
    assert torch.allclose(got, torch.tensor(naive_mean_pool(video, mask), dtype=dtype), **TOL[dtype])


def test_identity_adapter():
    x = torch.randn(3, 8)
    assert torch.equal(identity_adapter(8)(x), x)


def test_seqtransf_masks_padded_frames_and_uses_positions():
    torch.manual_seed(0)
    head = SeqTransf(64, layers=2).double()
    x = torch.randn(2, 6, 64, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = head(x, mask)
    assert out.shape == x.shape
    # valid outputs equal running on the unpadded sequence alone: padded keys get no attention
    alone = head(x[:1, :4], torch.ones(1, 4, dtype=torch.bool))
    assert torch.allclose(out[0, :4], alone[0], atol=1e-10)
    # changing padded frames changes nothing valid
    y = x.clone()
    y[0, 4:] = 100.0
    assert torch.allclose(head(y, mask)[0, :4], out[0, :4], atol=1e-10)
    # frame order matters (position embeddings): reversing the input is not reversing the output
    rev = head(x[1:].flip(1), mask[1:])
    assert not torch.allclose(rev.flip(1), out[1:], atol=1e-4)
    assert head.init_source.startswith("random")


@pytest.mark.parametrize("dtype", DTYPES)
def test_seqtransf_output_is_blocks_plus_positions_plus_residual(dtype):
    # with every block's output projections at zero each block is the identity, so the head returns
    # (frames + position embeddings) + frames: this checks the residual and the positions exactly
    torch.manual_seed(0)
    head = SeqTransf(16, layers=2).to(dtype)
    with torch.no_grad():
        for block in head.blocks:
            for proj in (block.attn.out_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    x = torch.randn(3, 5, 16, dtype=dtype)
    mask = torch.ones(3, 5, dtype=torch.bool)
    pos = head.frame_position_embeddings.weight[:5]
    expected = torch.stack([torch.stack([2 * x[v, f] + pos[f] for f in range(5)]) for v in range(3)])
    assert torch.allclose(head(x, mask), expected, **TOL[dtype])


def test_seqtransf_initialised_from_clip_text_transformer():
    enc = tiny_encoder(dim=64, text_width=64)
    init = clip_text_init(enc, 64, layers=4)
    assert init is not None and len(init.blocks) == 4
    head = SeqTransf(64, layers=4, init=init)
    src = enc.model.transformer.resblocks
    for i in range(4):
        for (n, a), (_, b) in zip(head.blocks[i].named_parameters(), src[i].named_parameters()):
            assert torch.equal(a, b), n
            assert a.data_ptr() != b.data_ptr()  # copies: training the head leaves CLIP alone
    assert torch.equal(head.frame_position_embeddings.weight[:8], enc.model.positional_embedding)
    assert "tiny-clip" in head.init_source
    # a text width different from D (the offline default's case) falls back to random init
    assert clip_text_init(tiny_encoder(dim=64, text_width=32), 64) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_seqtransf_block_is_clip4clip_module_cross_quickgelu_and_layernorm_eps_1e12(dtype):
    # one random-init block by hand: x + attn(ln_1(x)), then + c_proj(QuickGELU(c_fc(ln_2(x)))),
    # with x * sigmoid(1.702 x) and LayerNorm eps 1e-12 (CLIP4Clip modules/module_cross.py)
    head = SeqTransf(16, layers=1).to(dtype)
    block = head.blocks[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    x = torch.randn(2, 3, 16, generator=g, dtype=dtype) * 1e-5  # tiny inputs: eps 1e-5 would swamp the variance

    def layer_norm(z, ln):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-12) * ln.weight + ln.bias

    with torch.no_grad():
        h = layer_norm(x, block.ln_1)
        attn = block.attn(h, h, h, need_weights=False)[0]
        y = x + attn
        u = block.mlp.c_fc(layer_norm(y, block.ln_2))
        expected = y + block.mlp.c_proj(u * torch.sigmoid(1.702 * u))
        got = block(x)
    assert torch.allclose(got, expected, **TOL[dtype])
    # blocks copied from CLIP's text tower keep its weights and activation, with module_cross's eps
    init = clip_text_init(tiny_encoder(dim=64, text_width=64), 64, layers=2)
    copied = SeqTransf(64, layers=2, init=init)
    assert {m.eps for m in copied.blocks.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}


@pytest.mark.parametrize("dtype", DTYPES)
def test_title_fusion_starts_as_normalised_sum_and_r_vt(dtype):
    g = torch.Generator().manual_seed(1)
    v = F.normalize(torch.randn(5, 8, generator=g, dtype=dtype), dim=-1)
    t = F.normalize(torch.randn(5, 8, generator=g, dtype=dtype), dim=-1)
    with torch.no_grad():
        fused = TitleFusion(8).to(dtype)(v, t)
    assert torch.allclose(fused, F.normalize(v + t, dim=-1), **TOL[dtype])
    # R_vt on inputs where it is not 1: un-normalised, different norms, a fused vector leaning to vision
    vision, title = 3.0 * v, 0.5 * t
    leaning = 2.0 * v + t
    expected = []
    for i in range(5):
        cos = lambda a, b: float((a @ b) / (a.norm() * b.norm()))  # noqa: E731
        expected.append(cos(vision[i], leaning[i]) / cos(title[i], leaning[i]))
    got = r_vt(vision, title, leaning)
    assert got.dtype == dtype and torch.allclose(got, torch.tensor(expected, dtype=dtype), **TOL[dtype])
    assert (got > 1).all(), "a fused vector closer to vision gives R_vt > 1"


def naive_cos(a, b):
    return [[float((x @ y) / (x.norm() * y.norm())) for y in b] for x in a]


@pytest.mark.parametrize("dtype", DTYPES)
def test_similarity_meanp_matches_naive(dtype):
    g = torch.Generator().manual_seed(2)
    model = RetrievalModel(6).to(dtype)
    with torch.no_grad():
        model.text_adapter.weight.copy_(torch.randn(6, 6, generator=g))
    text = torch.randn(7, 6, generator=g, dtype=dtype)
    video = torch.randn(3, 4, 6, generator=g, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        sim = model.similarity(text, video, mask, chunk=2)
        t = model.text_adapter(text)
    pooled = torch.tensor(naive_mean_pool(video, mask), dtype=dtype)
    assert torch.allclose(sim, torch.tensor(naive_cos(t, pooled), dtype=dtype), **TOL[dtype])


def naive_emcl_block(emcl, text, pooled, rows):
    """Scores (N, V) of one block by an explicit loop over the rows EMCL is fed (EMCL-Net get_logits)."""
    n, v = len(text), len(pooled)
    stack, row_of = [], {}  # X as a list of rows; row_of[(i, j)] = the video row text i meets for video j
    for i in range(n):
        for j in range(v):
            if rows == "pairs":  # one row per (text, video) pair: video j's pooled vector, again for each text
                row_of[i, j] = len(stack)
                stack.append(pooled[j])
            elif i == 0:  # "stacked": each video once
                stack.append(pooled[j])
            if rows == "stacked":
                row_of[i, j] = j
    text_row = [len(stack) + i for i in range(n)]
    y = emcl(torch.stack(stack + list(text)))  # Y = X + beta * X_hat on the whole block
    return [[naive_cos(y[text_row[i]][None], y[row_of[i, j]][None])[0][0] for j in range(v)] for i in range(n)]


@pytest.mark.parametrize("rows", ["pairs", "stacked"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_similarity_with_emcl_runs_on_blocks(dtype, rows):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    emcl = EMCL(k=4, stage_num=3)
    model = RetrievalModel(6, emcl=emcl, emcl_block=2, emcl_rows=rows).to(dtype).eval()
    text = torch.randn(5, 6, generator=g, dtype=dtype)
    video = torch.randn(3, 4, 6, generator=g, dtype=dtype)
    mask = torch.ones(3, 4, dtype=torch.bool)
    with torch.no_grad():
        sim = model.similarity(text, video, mask)
        raw_v = video.mean(1)  # un-normalised pooled video fed to EMCL (EMCL-Net)
        expected = torch.empty(5, 3, dtype=dtype)
        for i in range(0, 5, 2):  # 2 x 2 blocks, ragged at the edges as EMCL-Net's torch.split
            for j in range(0, 3, 2):
                block = naive_emcl_block(emcl, text[i:i + 2], raw_v[j:j + 2], rows)
                expected[i:i + 2, j:j + 2] = torch.tensor(block, dtype=dtype)
    assert torch.allclose(sim, expected, **TOL[dtype])
    # a pair's score depends on its block (pitfall 4): one big block gives other scores
    model.emcl_block = 8
    with torch.no_grad():
        assert not torch.allclose(model.similarity(text, video, mask), sim, atol=1e-6)


@pytest.mark.parametrize("rows", ["pairs", "stacked"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_similarity_scores_blocks_in_batches_equal_to_the_per_block_loop(dtype, rows, monkeypatch):
    # 7 x 8 pairs in 3 x 3 blocks: full blocks, a ragged last row (1 text), last column (2 videos) and corner,
    # scored in batches of several blocks (bounded by emcl_batch_rows), each equal to its own naive block
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    model = RetrievalModel(6, emcl=EMCL(k=3, stage_num=4), emcl_block=3, emcl_rows=rows).to(dtype).eval()
    text = torch.randn(7, 6, generator=g, dtype=dtype)
    video = torch.randn(8, 4, 6, generator=g, dtype=dtype)
    mask = torch.ones(8, 4, dtype=torch.bool)
    mu = model.emcl.mu.clone()
    calls = []
    forward = EMCL.forward
    def recording_forward(self, x, weights=None):  # (blocks, EMCL rows) of each call
        calls.append(tuple(x.shape[:-1]))
        return forward(self, x, weights)

    monkeypatch.setattr(EMCL, "forward", recording_forward)
    with torch.no_grad():
        raw_v = video.mean(1)  # un-normalised pooled video fed to EMCL (EMCL-Net)
        expected = torch.empty(7, 8, dtype=dtype)
        for i in range(0, 7, 3):
            for j in range(0, 8, 3):
                block = naive_emcl_block(model.emcl, text[i:i + 3], raw_v[j:j + 3], rows)
                expected[i:i + 3, j:j + 3] = torch.tensor(block, dtype=dtype)
        calls.clear()
        for batch_rows in (1, 12, 10_000):  # one block per batch, 12 EMCL rows (two full blocks) per batch, all at once
            sim = model.similarity(text, video, mask, emcl_batch_rows=batch_rows)
            assert sim.dtype == dtype and torch.allclose(sim, expected, **TOL[dtype]), batch_rows
            assert all(len(shape) == 2 and shape[0] * shape[1] <= max(batch_rows, shape[1]) for shape in calls)
            # (blocks, EMCL rows) per call: 4 full blocks (3 + 3 rows), 2 of the last column (3 texts + 2 videos),
            # 2 of the last row (1 text + 3 videos), 1 corner (1 + 2)
            assert sorted(calls) == sorted({1: [(1, 6)] * 4 + [(1, 5)] * 2 + [(1, 4)] * 2 + [(1, 3)],
                                            12: [(2, 6)] * 2 + [(2, 5), (2, 4), (1, 3)],
                                            10_000: [(4, 6), (2, 5), (2, 4), (1, 3)]}[batch_rows]), calls
            calls.clear()
    assert torch.equal(model.emcl.mu, mu), "evaluation leaves EMCL's bases alone"
    with pytest.raises(ValueError, match="emcl_batch_rows must be >= 1; got 0"):
        model.similarity(text, video, mask, emcl_batch_rows=0)


def test_similarity_with_emcl_refuses_train_mode():
    # in train mode each EMCL call moves the bases: scoring blocks there would move them once per block
    model = RetrievalModel(4, emcl=EMCL(k=2), emcl_block=2).train()
    mu = model.emcl.mu.clone()
    with pytest.raises(ValueError, match=r"eval mode: call model.eval\(\)"):
        model.similarity(torch.randn(3, 4), torch.randn(3, 2, 4), torch.ones(3, 2, dtype=torch.bool))
    assert torch.equal(model.emcl.mu, mu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emcl_rows_in_training_match_naive_and_differ(dtype):
    # training calls scores() on the whole batch (train mode): the same rows, one bases update per call
    g = torch.Generator().manual_seed(4)
    text, vision = torch.randn(4, 6, generator=g, dtype=dtype), torch.randn(4, 6, generator=g, dtype=dtype)
    out = {}
    for rows in ("pairs", "stacked"):
        torch.manual_seed(0)
        model = RetrievalModel(6, emcl=EMCL(k=3, stage_num=4), emcl_rows=rows).to(dtype).train()
        reference = EMCL(k=3, stage_num=4).to(dtype).train()
        reference.mu.copy_(model.emcl.mu)
        expected = torch.tensor(naive_emcl_block(reference, text, vision, rows), dtype=dtype)
        out[rows] = model.scores(text, vision)
        assert torch.allclose(out[rows], expected, **TOL[dtype])
        assert torch.allclose(model.emcl.mu, reference.mu, **TOL[dtype])  # the same momentum update
        x, weights = model.emcl_input(text, vision)  # [videos; texts], videos counted once per text for "pairs"
        assert torch.equal(x, torch.cat([vision, text]))
        assert weights.tolist() == [4.0 if rows == "pairs" else 1.0] * 4 + [1.0] * 4
    # the 16 repeated video rows weigh on EM: the two row sets give different scores
    assert not torch.allclose(out["pairs"], out["stacked"], atol=1e-4)


def test_emcl_rows_unknown_is_refused():
    with pytest.raises(ValueError, match="emcl_rows 'videos'.*pairs"):
        RetrievalModel(4, emcl=EMCL(k=2), emcl_rows="videos")


def test_model_modalities_and_errors():
    model = RetrievalModel(4, use_title=True)
    video, mask = torch.randn(3, 2, 4), torch.ones(3, 2, dtype=torch.bool)
    title, present = torch.randn(3, 4), torch.tensor([True, True, False])
    mods = model.modalities(video, mask, title, present)
    assert torch.equal(mods["title"][2], torch.zeros(4))  # no title: zero text side
    assert torch.allclose(mods["fused"][2], mods["vision"][2])  # fused = vision alone
    with pytest.raises(ValueError, match="title"):
        model.similarity(torch.randn(2, 4), video, mask)
    with pytest.raises(ValueError, match="unknown head"):
        RetrievalModel(4, head="lstm")
