"""The trainer: loss dispatch and masking vs naive loops, sampling (and its global batches under
N processes vs torch's DistributedSampler), the end-to-end-only switches, selection, determinism,
a toy problem learned far above chance, evaluation with re-ranking, QB-Norm vs a naive loop,
end-to-end mode on a tiny open_clip model, and the CIKM pair-similarity trainer."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from vidret_lib.clip4clip_recipe import plan_steps
from vidret_lib.datasets import Split
from vidret_lib.encoders import Encoder
from vidret_lib.losses import dual_softmax_rerank, infonce_loss, modality_shuffle_loss, vsepp_loss
from vidret_lib.metrics import both_directions
from vidret_lib.pairsim import PairConfig, spearman, train_pair_similarity
from vidret_lib.rerank import qb_norm_rerank
from vidret_lib.train import (
    LOSSES,
    FeatureSplit,
    RawSplit,
    TrainConfig,
    _epoch_batches,
    build_model,
    compute_loss,
    evaluate,
    false_negative_mask,
    train,
)


def toy_split(V, C, T=4, D=16, seed=0, noise=0.5, titles=False):
    """Features = noisy copies of a per-video latent; captions live in a rotated space."""
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(123)))[0]
    z = torch.randn(V, D, generator=g)
    video = z[:, None, :] + noise * torch.randn(V, T, D, generator=g)
    cv = torch.arange(V).repeat_interleave(C)
    text = (z[cv] + noise * torch.randn(V * C, D, generator=g)) @ rot
    mask = torch.ones(V, T, dtype=torch.bool)
    mask[::2, T - 1] = False
    video[~mask] = 0.0
    title = present = None
    if titles:
        title = (z + noise * torch.randn(V, D, generator=g)) @ rot
        present = torch.rand(V, generator=g) > 0.2
    return FeatureSplit(text, video, mask, cv, title, present)


# ---------------------------------------------------------------- config and inputs
def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError) as err:
        TrainConfig(loss="triplet").validate()
    for name in LOSSES:
        assert name in str(err.value)


def test_select_test_is_refused_and_val_needs_a_split():
    with pytest.raises(ValueError, match="select='test' is refused"):
        TrainConfig(select="test").validate()
    with pytest.raises(ValueError, match="validation split"):
        train(TrainConfig(select="val", epochs=1), toy_split(8, 1))


def test_feature_split_checks_shapes():
    with pytest.raises(ValueError, match="same D"):
        FeatureSplit(torch.zeros(3, 4), torch.zeros(2, 5, 3), torch.ones(2, 5, dtype=bool), [0, 0, 1])
    with pytest.raises(ValueError, match="mask"):
        FeatureSplit(torch.zeros(3, 4), torch.zeros(2, 5, 4), torch.ones(2, 4, dtype=bool), [0, 0, 1])
    with pytest.raises(ValueError, match="caption_video"):
        FeatureSplit(torch.zeros(3, 4), torch.zeros(2, 5, 4), torch.ones(2, 5, dtype=bool), [0, 0, 2])
    with pytest.raises(ValueError, match="modality_shuffle"):
        TrainConfig(loss="modality_shuffle").validate()


def test_end_to_end_switches_are_refused_in_frozen_mode():
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; valid values: \('fp32'"):
        TrainConfig(mode="end_to_end", precision="fp16").validate()
    for switch in (dict(precision="fp16_weights"), dict(freeze_layer_num=0), dict(learned_logit_scale=True)):
        name = next(iter(switch))
        with pytest.raises(ValueError, match=f"{name}=.* trains the CLIP towers: set mode='end_to_end'"):
            TrainConfig(**switch).validate()
        TrainConfig(mode="end_to_end", **switch).validate()


# ---------------------------------------------------------------- loss dispatch and masking
def naive_infonce_masked(S, scale, masked):
    n = len(S)
    def ce(rows):
        total = 0.0
        for i in range(n):
            logits = [scale * rows[i][j] for j in range(n) if j == i or not masked(i, j, rows is S)]
            m = max(logits)
            total += m + math.log(sum(math.exp(x - m) for x in logits)) - scale * rows[i][i]
        return total / n
    St = [[S[j][i] for j in range(n)] for i in range(n)]
    return (ce(S) + ce(St)) / 2


def naive_vsepp_masked(S, margin, masked, max_violation):
    n = len(S)
    rows = [[max(0.0, margin + S[i][j] - S[i][i]) for j in range(n) if j != i and not masked(i, j, True)]
            for i in range(n)]
    cols = [[max(0.0, margin + S[i][j] - S[j][j]) for i in range(n) if i != j and not masked(i, j, True)]
            for j in range(n)]
    agg = (lambda xs: max(xs, default=0.0)) if max_violation else sum
    return sum(agg(r) for r in rows) + sum(agg(c) for c in cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_dispatch_and_false_negative_masking(dtype):
    g = torch.Generator().manual_seed(0)
    model = build_model(TrainConfig(), 8).to(dtype)
    text, vision = torch.randn(5, 8, generator=g, dtype=dtype), torch.randn(5, 8, generator=g, dtype=dtype)
    cos = F.normalize(text, dim=-1) @ F.normalize(vision, dim=-1).T
    videos = torch.tensor([0, 1, 2, 1, 4])  # rows 1 and 3: same video
    sentences = torch.tensor([7, 8, 9, 10, 7])  # rows 0 and 4: identical caption
    fn = false_negative_mask(videos, sentences)
    assert fn.sum() == 4 and not fn.diagonal().any()
    S = cos.tolist()
    is_fn = lambda i, j, _: bool(fn[i, j])  # noqa: E731
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)

    cfg = TrainConfig(loss="infonce")
    got = compute_loss(cfg, model, text, vision, fn)
    assert torch.allclose(got, torch.tensor(naive_infonce_masked(S, 100.0, is_fn), dtype=dtype), **tol)
    assert torch.allclose(compute_loss(cfg, model, text, vision, None), infonce_loss(cos), **tol)

    for mv in (True, False):
        cfg = TrainConfig(loss="vsepp", margin=0.3, max_violation=mv)
        got = compute_loss(cfg, model, text, vision, fn)
        assert torch.allclose(got, torch.tensor(naive_vsepp_masked(S, 0.3, is_fn, mv), dtype=dtype), **tol)
    cfg = TrainConfig(loss="vsepp", vsepp_reduction="mean", max_violation=False)
    assert torch.allclose(compute_loss(cfg, model, text, vision, None),
                          vsepp_loss(cos, 0.2, False, "mean"), **tol)

    cfg = TrainConfig(loss="dsl", dsl_temp=10.0)
    L = 100.0 * cos
    def dsl_rows(M):  # CAMoE DSL.py, one direction, naive
        n = len(M)
        out = 0.0
        for i in range(n):
            revised = []
            for j in range(n):
                col = [M[k][j] / 10.0 for k in range(n)]
                mx = max(col)
                prior = math.exp(col[i] - mx) / sum(math.exp(c - mx) for c in col)
                revised.append(M[i][j] * prior * n)
            mx = max(revised)
            out += mx + math.log(sum(math.exp(r - mx) for r in revised)) - revised[i]
        return out / n
    Lt = L.T.tolist()
    expected = (dsl_rows(L.tolist()) + dsl_rows(Lt)) / 2
    assert torch.allclose(compute_loss(cfg, model, text, vision, None), torch.tensor(expected, dtype=dtype), **tol)


def test_mbvr_loss_terms():
    g = torch.Generator().manual_seed(1)
    cfg = TrainConfig(loss="modality_shuffle", use_title=True, alpha=0.5, beta=0.25, gamma=2.0,
                      ms_margin=0.1, ms_dynamic_margin=True)
    model = build_model(cfg, 8)
    q, vis = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    title = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = compute_loss(cfg, model, q, vis, None, title, gen_a)
    # the same shuffle, rebuilt here: a derangement of the batch positions
    perm = torch.randperm(6, generator=gen_b)
    shuffled = torch.empty_like(perm)
    shuffled[perm] = perm.roll(1)
    assert (shuffled != torch.arange(6)).all()
    qn, fv = F.normalize(q, dim=-1), F.normalize(vis, dim=-1)
    fused, fused_ms = F.normalize(fv + title, dim=-1), F.normalize(fv[shuffled] + title, dim=-1)  # fusion at init
    margin = 0.1 * (1 - (fv * fv[shuffled]).sum(-1))
    expected = (infonce_loss(qn @ fused.T) + 0.5 * infonce_loss(qn @ fv.T) + 0.25 * infonce_loss(qn @ title.T)
                + 2.0 * modality_shuffle_loss(qn, fused, fused_ms, 0.05, margin))
    assert torch.allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------- sampling
def test_epoch_batches_video_and_caption_sampling():
    cv = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6])
    g = torch.Generator().manual_seed(0)
    batches = _epoch_batches(cv, 7, TrainConfig(batch_size=3, sampling="video"), g)
    assert len(batches) == 2  # 7 videos // 3, last partial batch dropped
    caps = torch.cat([c for c, _ in batches])
    vids = torch.cat([v for _, v in batches])
    assert len(set(vids.tolist())) == 6 and torch.equal(cv[caps], vids)  # one caption of each video
    batches = _epoch_batches(cv, 7, TrainConfig(batch_size=5, sampling="caption"), g)
    caps = torch.cat([c for c, _ in batches])
    assert sorted(caps.tolist()) == list(range(10))
    assert all(torch.equal(cv[c], v) for c, v in batches)


@pytest.mark.parametrize("n, batch, world", [(7, 4, 4), (37, 6, 3), (131, 8, 2), (130, 4, 4), (10, 10, 1), (9, 4, 1)])
def test_epoch_batches_are_the_global_batches_of_clip4clips_distributed_sampler(n, batch, world):
    # CLIP4Clip (dataloader_msrvtt_train): a DistributedSampler pads the shuffled samples to a
    # multiple of world by repeating the start, each process batches its share with drop_last;
    # global batch k is the union of every process's batch k. Here the sampler runs unshuffled
    # over the order the trainer drew, so both see the same permutation.
    cv = torch.arange(n)  # one caption per video: caption index = video index
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    config = TrainConfig(batch_size=batch, sampling="caption")
    got = _epoch_batches(cv, n, config, torch.Generator().manual_seed(0), world)
    loaders = [DataLoader(order, batch_size=batch // world, drop_last=True,
                          sampler=DistributedSampler(order, num_replicas=world, rank=r, shuffle=False))
               for r in range(world)]
    expected = [sorted(torch.cat(per_rank).tolist()) for per_rank in zip(*loaders)]
    assert [sorted(c.tolist()) for c, _ in got] == expected
    assert len(got) == plan_steps(n, batch, 1, world).steps_per_epoch


# ---------------------------------------------------------------- training
def test_infonce_meanp_learns_toy_problem_far_above_chance():
    tr, va = toy_split(96, 2), toy_split(40, 1, seed=1)
    cfg = TrainConfig(epochs=8, batch_size=32, lr=3e-2, select="val")
    before = evaluate(build_model(cfg, 16), va)
    result = train(cfg, tr, va)
    after = evaluate(result.model, va)
    assert before["t2v"]["R1"] < 15.0  # captions live in a rotated space: near chance (2.5%)
    assert after["t2v"]["R1"] > 60.0 and after["v2t"]["R1"] > 60.0
    # selection: best val t2v R@1, ties to the later epoch; last state kept beside it
    r1 = [h["val"]["t2v"]["R1"] for h in result.history]
    assert result.chosen_epoch == max(i + 1 for i, r in enumerate(r1) if r == max(r1))
    assert evaluate(result.model_at("last"), va) == result.history[-1]["val"]
    assert evaluate(result.model_at("selected"), va) == result.history[result.chosen_epoch - 1]["val"]


def test_same_seed_same_history_and_variants_run():
    tr, va = toy_split(48, 2, titles=True), toy_split(16, 1, seed=1, titles=True)
    configs = [
        TrainConfig(epochs=2, batch_size=16, head="seqTransf", select="last", seq_layers=1),
        TrainConfig(epochs=2, batch_size=16, emcl=True, emcl_k=4, sampling="caption", optimizer="adamw"),
        TrainConfig(epochs=2, batch_size=16, loss="modality_shuffle", use_title=True, alpha=0.5, beta=0.5),
        TrainConfig(epochs=2, batch_size=16, loss="vsepp", max_violation=False, false_negatives="keep"),
    ]
    for cfg in configs:
        a, b = train(cfg, tr, va), train(cfg, tr, va)
        strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
        assert strip(a.history) == strip(b.history), cfg
        assert all(math.isfinite(r["loss"]) for r in a.history)
    different = train(TrainConfig(epochs=2, batch_size=16, seed=7, select="last"), tr, va)
    assert strip(different.history) != strip(train(TrainConfig(epochs=2, batch_size=16, select="last"), tr, va).history)


# ---------------------------------------------------------------- evaluation and re-ranking
def naive_qb_norm(sim, bank, beta, k):
    sim, bank = sim.tolist(), bank.tolist()
    hubs = set()
    for row in bank:
        hubs.update(sorted(range(len(row)), key=lambda j: -row[j])[:k])
    norm = [sum(math.exp(beta * bank[b][g]) for b in range(len(bank))) for g in range(len(bank[0]))]
    out = []
    for row in sim:
        top = max(range(len(row)), key=lambda j: row[j])
        out.append([math.exp(beta * s) / norm[g] for g, s in enumerate(row)] if top in hubs else list(row))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3])
def test_qb_norm_matches_naive_loop(dtype, k):
    g = torch.Generator().manual_seed(k)
    sim = torch.rand(6, 5, generator=g, dtype=dtype) * 2 - 1
    bank = torch.rand(9, 5, generator=g, dtype=dtype) * 2 - 1
    got = qb_norm_rerank(sim, bank, beta=20.0, k=k)
    expected = torch.tensor(naive_qb_norm(sim, bank, 20.0, k), dtype=dtype)
    assert torch.allclose(got, expected, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)
    assert not torch.equal(got, sim)  # some rows were renormalised


def test_evaluate_reranks_match_manual_computation():
    tr, te = toy_split(40, 2), toy_split(12, 2, seed=3)
    model = train(TrainConfig(epochs=2, batch_size=16, lr=3e-2, select="last"), tr).model
    with torch.no_grad():
        sim = model.similarity(te.text, te.video, te.mask)
        bank_t = model.similarity(tr.text, te.video, te.mask)
        bank_v = model.similarity(te.text, tr.video, tr.mask).T
    cv = te.caption_video
    assert evaluate(model, te) == both_directions(sim, cv)
    dsl = evaluate(model, te, rerank="dsl")
    assert dsl["t2v"] == both_directions(dual_softmax_rerank(100 * sim, 1.0, "t2v"), cv)["t2v"]
    assert dsl["v2t"] == both_directions(dual_softmax_rerank(100 * sim, 1.0, "v2t"), cv)["v2t"]
    qb = evaluate(model, te, rerank="qb_norm", prior=tr)
    assert qb["t2v"] == both_directions(qb_norm_rerank(sim, bank_t), cv)["t2v"]
    assert qb["v2t"] == both_directions(qb_norm_rerank(sim.T, bank_v).T, cv)["v2t"]
    with pytest.raises(ValueError, match="prior"):
        evaluate(model, te, rerank="qb_norm")
    with pytest.raises(ValueError, match="rerank"):
        evaluate(model, te, rerank="softmax")


# ---------------------------------------------------------------- end-to-end mode
def tiny_clip_encoder():
    import open_clip  # imported here: test_distributed's torchrun script imports this module
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=16, image_size=32, head_width=16),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1),
    ).eval()

    def tokenize(captions):  # word ids 1..48, end-of-text 49 (open_clip pools at the argmax token)
        rows = [[1 + sum(map(ord, w)) % 48 for w in c.split()][:7] + [49] for c in captions]
        return torch.tensor([r + [0] * (8 - len(r)) for r in rows])

    return Encoder(model, "tiny-clip", "tiny", 16, 32, torch.device("cpu"), (0.5,) * 3, (0.5,) * 3, tokenize)


def test_end_to_end_step_changes_tower_weights():
    enc = tiny_clip_encoder()
    frames = np.random.default_rng(0).integers(0, 255, size=(2, 2, 32, 32, 3), dtype=np.uint8)
    masks = np.array([[True, True], [True, False]])
    cache = SimpleNamespace(failed={}, load=lambda vid: (frames[int(vid[1:])], masks[int(vid[1:])]))  # a frame cache
    raw = RawSplit.from_frame_cache(cache, Split("train", ["a dog runs", "a cat sleeps"], ["v0", "v1"]))
    before = {n: p.detach().clone() for n, p in enc.model.named_parameters()}
    cfg = TrainConfig(mode="end_to_end", epochs=1, batch_size=2, lr=1e-3, coef_lr=1.0, warmup=0.0, select="last")
    result = train(cfg, raw, encoder=enc)
    assert result.history[0]["steps"] == 1
    tower = dict(result.model.clip.named_parameters())
    changed = [n for n in ("visual.conv1.weight", "transformer.resblocks.0.attn.in_proj_weight", "token_embedding.weight")
               if not torch.equal(tower[n], before[n])]
    assert len(changed) == 3
    assert all(torch.equal(p, before[n]) for n, p in enc.model.named_parameters())  # caller's towers untouched
    metrics = evaluate(result.model, raw)  # featurises the raw split with the trained towers
    assert metrics["t2v"]["n_queries"] == 2
    with pytest.raises(TypeError, match="RawSplit"):
        train(cfg, toy_split(4, 1), encoder=enc)


# ---------------------------------------------------------------- CIKM pair similarity
def pair_data(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(120, 4, generator=g)
    feats = z @ torch.randn(4, 16, generator=torch.Generator().manual_seed(9)) + 0.3 * torch.randn(120, 16, generator=g)
    a, b = torch.randint(0, 120, (600,), generator=g), torch.randint(0, 120, (600,), generator=g)
    labels = (F.cosine_similarity(z[a], z[b]) * 5).round() / 5  # ~11 distinct graded labels
    return feats, (a, b, labels)


@pytest.mark.parametrize("loss", ["mse", "pearson"])
@pytest.mark.parametrize("rnt", [False, True])
def test_pair_similarity_trains_and_reports_spearman(loss, rnt):
    feats, pairs = pair_data(0)
    val = pair_data(1)[1]
    cfg = PairConfig(loss=loss, rnt=rnt, batch_size=200, epochs=3, select="val")
    model, history = train_pair_similarity(cfg, feats, pairs, val)
    assert len(history) == 3 and all(-1 <= h["val_spearman"] <= 1 for h in history)
    with torch.no_grad():
        emb = F.normalize(model.adapter(feats), dim=-1)
    scores = [float(emb[i] @ emb[j]) for i, j in zip(val[0].tolist(), val[1].tolist())]
    assert spearman(model, feats, val) == pytest.approx(scipy.stats.spearmanr(scores, val[2]).statistic, abs=1e-6)
    assert spearman(model, feats, val) == pytest.approx(max(h["val_spearman"] for h in history), abs=1e-12)
    with pytest.raises(ValueError, match="valid losses"):
        PairConfig(loss="cosent").validate()



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the msrvtt-gpu profile's case)")
def test_evaluate_scores_cpu_features_with_a_cuda_model():
    g = torch.Generator().manual_seed(0)
    split = FeatureSplit(torch.randn(4, 8, generator=g), torch.randn(4, 3, 8, generator=g),
                         torch.ones(4, 3, dtype=torch.bool), torch.arange(4))
    model = build_model(TrainConfig(device="cuda"), 8)
    assert evaluate(model, split) == evaluate(model.cpu(), split)


def test_select_val_keeps_the_best_epoch_not_the_last(monkeypatch):
    # a scripted val curve whose best epoch (4, tied with 2: the later wins) is not the last
    import vidret_lib.train as train_module

    curve = iter([10.0, 30.0, 20.0, 30.0, 5.0])
    monkeypatch.setattr(train_module, "evaluate", lambda model, split: {"t2v": {"R1": next(curve)}, "v2t": {"R1": 0.0}})
    result = train(TrainConfig(epochs=5, batch_size=8, lr=3e-2, select="val"), toy_split(16, 1), toy_split(8, 1, seed=1))
    assert result.chosen_epoch == 4
    assert any(not torch.equal(result.selected_state[k], result.last_state[k]) for k in result.last_state)
    assert all(torch.equal(v, result.model.state_dict()[k]) for k, v in result.selected_state.items())


@pytest.mark.parametrize("mode", ["mask", "keep"])
def test_training_masks_same_video_and_same_sentence_pairs(monkeypatch, mode):
    import vidret_lib.train as train_module

    split = toy_split(6, 3)  # 3 captions per video: caption sampling puts same-video pairs in a batch
    split.text[1] = split.text[7]  # caption 1 (video 0) and caption 7 (video 2) are the same sentence
    seen = []
    real = train_module.compute_loss

    def spy(config, model, text, vision, fn_mask, *args):
        seen.append(fn_mask)
        return real(config, model, text, vision, fn_mask, *args)

    monkeypatch.setattr(train_module, "compute_loss", spy)
    batches = []
    real_batches = train_module._epoch_batches
    monkeypatch.setattr(train_module, "_epoch_batches",
                        lambda *a: [b for b in real_batches(*a) if batches.append(b) or True])
    train(TrainConfig(epochs=2, batch_size=6, lr=1e-2, sampling="caption", select="last", false_negatives=mode), split)
    assert len(seen) == len(batches) == 2 * 3
    cv = split.caption_video
    for (caps, _videos), got in zip(batches, seen):
        if mode == "keep":
            assert got is None
            continue
        expected = torch.tensor([[i != j and (cv[a] == cv[b] or a in (1, 7) and b in (1, 7))
                                  for j, b in enumerate(caps.tolist())] for i, a in enumerate(caps.tolist())])
        assert torch.equal(got.cpu(), expected)


def test_emcl_rows_reach_the_model():
    assert build_model(TrainConfig(emcl=True, emcl_k=4), 8).emcl_rows == "pairs"  # EMCL-Net's rows by default
    assert build_model(TrainConfig(emcl=True, emcl_k=4, emcl_rows="stacked"), 8).emcl_rows == "stacked"
    with pytest.raises(ValueError, match="unknown emcl_rows 'videos'"):
        TrainConfig(emcl=True, emcl_rows="videos").validate()
