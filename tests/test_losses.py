"""Every loss of vidret_lib.losses against a naive loop written here, in float32 and float64.

The references work on Python floats with math.exp/math.log (a max-shifted log-sum-exp)
and re-express the official code step by step: CLIP4Clip CrossEn, fartashf/vsepp
ContrastiveLoss (on scores = im @ s.T, i.e. rows = images), starmemda/CAMoE DSL.py,
EMCL-Net's inverted softmax, MBVR's L_ms and the AnalytiCup LBPC.
"""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from vidret_lib.losses import (
    dual_softmax_loss,
    dual_softmax_rerank,
    infonce_loss,
    modality_shuffle_loss,
    pearson_loss,
    rank_normalize,
    vsepp_loss,
)

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


# ---------------------------------------------------------------- naive references
def lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def softmax(values):
    z = lse(values)
    return [math.exp(v - z) for v in values]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def ref_infonce(S, scale):
    n = len(S)
    L = [[scale * S[i][j] for j in range(n)] for i in range(n)]
    rows = sum(lse(L[i]) - L[i][i] for i in range(n)) / n  # CE of text i over videos
    cols = sum(lse([L[i][j] for i in range(n)]) - L[j][j] for j in range(n)) / n  # video j over texts
    return (rows + cols) / 2


def ref_vsepp_official(sim, margin, max_violation):
    """fartashf/vsepp ContrastiveLoss.forward, with scores = im @ s.T = sim transposed."""
    n = len(sim)
    scores = [[sim[j][i] for j in range(n)] for i in range(n)]  # rows = images
    cost_s = [[0.0 if i == j else max(0.0, margin + scores[i][j] - scores[i][i]) for j in range(n)]
              for i in range(n)]  # image anchor i (row), negative caption j
    cost_im = [[0.0 if i == j else max(0.0, margin + scores[i][j] - scores[j][j]) for j in range(n)]
               for i in range(n)]  # caption anchor j (column), negative image i
    if max_violation:
        return (sum(max(cost_s[i]) for i in range(n))
                + sum(max(cost_im[i][j] for i in range(n)) for j in range(n)))
    return sum(map(sum, cost_s)) + sum(map(sum, cost_im))


def ref_dsl(S, temp):
    """DSL.py: S * softmax(S/temp, dim=0) * len(S), then -diag(log_softmax(., dim=-1))."""
    n = len(S)
    cols = [softmax([S[i][j] / temp for i in range(n)]) for j in range(n)]  # cols[j][i] = P[i][j]
    R = [[S[i][j] * cols[j][i] * n for j in range(n)] for i in range(n)]
    return [lse(R[i]) - R[i][i] for i in range(n)]


def ref_rerank(S, temp, direction):
    nt, nv = len(S), len(S[0])
    out = [[0.0] * nv for _ in range(nt)]
    if direction == "t2v":
        for j in range(nv):
            p = softmax([S[i][j] / temp for i in range(nt)])
            for i in range(nt):
                out[i][j] = S[i][j] * p[i] * nt
    else:
        for i in range(nt):
            p = softmax([S[i][j] / temp for j in range(nv)])
            for j in range(nv):
                out[i][j] = S[i][j] * p[j] * nv
    return out


def ref_ms(Q, P, NEG, temp, margins):
    """L_ms: NEG[b] is the list of MS negatives of row b, margins[b] the margin of row b."""
    total = 0.0
    for b in range(len(Q)):
        pos = cosine(Q[b], P[b]) / temp
        negs = [(cosine(Q[b], m) + margins[b]) / temp for m in NEG[b]]
        total += lse([pos] + negs) - pos
    return total / len(Q)


def ref_pearson(pred, y, temp):
    p = softmax([v / temp for v in pred])
    pm, ym = sum(p) / len(p), sum(y) / len(y)
    pc, yc = [v - pm for v in p], [v - ym for v in y]
    num = sum(a * b for a, b in zip(pc, yc))
    return -num / (math.sqrt(sum(a * a for a in pc)) * math.sqrt(sum(b * b for b in yc)) + 1e-5)


def ref_average_ranks(values):
    return [sum(w < v for w in values) + (sum(w == v for w in values) + 1) / 2 for v in values]


# ---------------------------------------------------------------- helpers
def cos_matrix(n, d=8, seed=0, m=None):
    g = torch.Generator().manual_seed(seed)
    t = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    v = torch.nn.functional.normalize(torch.randn(m or n, d, generator=g, dtype=torch.float64), dim=1)
    return t @ v.T


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def close(actual, expected, dtype):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype])


# ---------------------------------------------------------------- values vs loops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [100.0, 20.0])
def test_infonce_matches_loop(dtype, scale):
    S = cos_matrix(7, seed=1)
    close(infonce_loss(S.to(dtype), logit_scale=scale), ref_infonce(S.tolist(), scale), dtype)


def test_infonce_accepts_tensor_scale():
    S = cos_matrix(5, seed=2)
    scale = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True).exp()
    close(infonce_loss(S, logit_scale=scale), ref_infonce(S.tolist(), 100.0), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_vsepp_matches_official(dtype, max_violation, reduction):
    S = cos_matrix(7, seed=3)
    expected = ref_vsepp_official(S.tolist(), 0.2, max_violation)
    if reduction == "mean":
        expected /= 7
    out = vsepp_loss(S.to(dtype), margin=0.2, max_violation=max_violation, reduction=reduction)
    close(out, expected, dtype)
    assert expected > 0  # the random batch does violate the margin


@pytest.mark.parametrize("max_violation", [True, False])
def test_vsepp_transposition_swaps_terms_keeps_total(max_violation):
    S = cos_matrix(6, seed=4)
    a = vsepp_loss(S, max_violation=max_violation)
    b = vsepp_loss(S.T.contiguous(), max_violation=max_violation)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temp", [1000.0, 10.0, 1.0])
def test_dsl_matches_loop(dtype, temp):
    S = 100 * cos_matrix(7, seed=5)
    expected = ref_dsl(S.tolist(), temp)
    close(dual_softmax_loss(S.to(dtype), temp=temp, reduction="none"), expected, dtype)
    close(dual_softmax_loss(S.to(dtype), temp=temp), sum(expected) / 7, dtype)


def test_dsl_at_huge_temperature_is_one_direction_of_infonce():
    S = cos_matrix(6, seed=6)
    rows = -torch.log_softmax(100 * S, dim=1).diagonal().mean()
    torch.testing.assert_close(dual_softmax_loss(100 * S, temp=1e12), rows, rtol=1e-9, atol=1e-9)
    symmetric = (dual_softmax_loss(100 * S, temp=1e12) + dual_softmax_loss(100 * S.T, temp=1e12)) / 2
    torch.testing.assert_close(symmetric, infonce_loss(S), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ["t2v", "v2t"])
@pytest.mark.parametrize("shape", [(6, 6), (9, 4)])
def test_rerank_matches_loop(dtype, direction, shape):
    S = cos_matrix(shape[0], m=shape[1], seed=7)
    out = dual_softmax_rerank(S.to(dtype), temp=0.05, direction=direction)
    close(out, ref_rerank(S.tolist(), 0.05, direction), dtype)


def test_rerank_temperature_scaling_matches_emcl_net_ranking():
    # CAMoE#4 (temp 1 on 100*cos) and EMCL-Net (temp 0.01 on cos): same prior, same ranking.
    S = cos_matrix(8, seed=8)
    a = dual_softmax_rerank(100 * S, temp=1.0)
    b = dual_softmax_rerank(S, temp=0.01)
    torch.testing.assert_close(a, 100 * b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [None, 3])
@pytest.mark.parametrize("margin_kind", ["scalar", "tensor"])
def test_modality_shuffle_matches_loop(dtype, m, margin_kind):
    g = torch.Generator().manual_seed(9)
    b, d = 5, 6
    q, pos = randn(g, b, d), randn(g, b, d)
    neg = randn(g, b, d) if m is None else randn(g, b, m, d)
    margins = [0.1] * b if margin_kind == "scalar" else randn(g, b).abs().tolist()
    margin = 0.1 if margin_kind == "scalar" else torch.tensor(margins, dtype=dtype)
    neg_lists = [[row] for row in neg.tolist()] if m is None else neg.tolist()
    expected = ref_ms(q.tolist(), pos.tolist(), neg_lists, 0.5, margins)
    out = modality_shuffle_loss(q.to(dtype), pos.to(dtype), neg.to(dtype), temp=0.5, margin=margin)
    close(out, expected, dtype)


def test_modality_shuffle_margin_raises_the_loss():
    g = torch.Generator().manual_seed(10)
    q, pos, neg = randn(g, 4, 5), randn(g, 4, 5), randn(g, 4, 5)
    assert modality_shuffle_loss(q, pos, neg, margin=0.2) > modality_shuffle_loss(q, pos, neg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temp", [0.2, 0.5])
def test_pearson_matches_loop(dtype, temp):
    g = torch.Generator().manual_seed(11)
    pred = torch.rand(12, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 20, (12,), generator=g).double() / 20  # graded labels with ties
    expected = ref_pearson(pred.tolist(), y.tolist(), temp)
    close(pearson_loss(pred.to(dtype), y.to(dtype), temp=temp), expected, dtype)
    close(pearson_loss(pred.to(dtype), y.numpy(), temp=temp), expected, dtype)  # NumPy labels


# ---------------------------------------------------------------- rank_normalize
def test_rank_normalize_ties_match_scipy_and_loop():
    values = np.array([0.3, 0.1, 0.3, 0.9, 0.1, 0.5, 0.3, 0.9, 0.0])
    ranks = scipy.stats.rankdata(values, method="average")
    np.testing.assert_allclose(ranks, ref_average_ranks(values.tolist()))  # the loop is right
    expected = (ranks - ranks.min()) / (ranks.max() - ranks.min())
    out = rank_normalize(values)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[0] == out[2] == out[6]  # ties keep equal values


def test_rank_normalize_random_with_ties_and_shape():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 7, size=(5, 8))
    ranks = scipy.stats.rankdata(values.ravel(), method="average").reshape(5, 8)
    out = rank_normalize(values)
    assert out.shape == (5, 8)
    np.testing.assert_allclose(out, (ranks - ranks.min()) / (ranks.max() - ranks.min()), atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_normalize_tensor_in_tensor_out(dtype):
    t = torch.tensor([2.0, 2.0, 1.0, 4.0], dtype=dtype)
    out = rank_normalize(t)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.device == t.device
    ranks = scipy.stats.rankdata(t.numpy(), method="average")
    close(out, (ranks - ranks.min()) / (ranks.max() - ranks.min()), dtype)
    assert rank_normalize(torch.tensor([3, 1, 2])).dtype == torch.float64


def test_rank_normalize_constant_empty_and_nan():
    np.testing.assert_array_equal(rank_normalize(np.full(5, 0.7)), np.zeros(5))
    assert torch.equal(rank_normalize(torch.ones(3)), torch.zeros(3))
    assert rank_normalize(np.array([1.0])).tolist() == [0.0]
    assert rank_normalize(np.array([])).shape == (0,)
    with pytest.raises(ValueError, match="NaN"):
        rank_normalize(np.array([1.0, np.nan]))


# ---------------------------------------------------------------- gradients (float64)
def _gradcheck(fn, *inputs):
    inputs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients():
    S = cos_matrix(5, seed=12)
    _gradcheck(lambda s: infonce_loss(s, 20.0), S)
    _gradcheck(lambda s: vsepp_loss(s, max_violation=True), S)
    _gradcheck(lambda s: vsepp_loss(s, max_violation=False, reduction="mean"), S)
    for temp in (1000.0, 1.0):
        _gradcheck(lambda s: dual_softmax_loss(10 * s, temp=temp, reduction="none"), S)
    _gradcheck(lambda s: dual_softmax_rerank(s, temp=0.1, direction="v2t"), cos_matrix(4, m=3, seed=13))
    g = torch.Generator().manual_seed(14)
    q, pos, neg = randn(g, 4, 5), randn(g, 4, 5), randn(g, 4, 2, 5)
    margin = torch.rand(4, generator=g, dtype=torch.float64)
    _gradcheck(lambda a, b, c: modality_shuffle_loss(a, b, c, temp=0.3, margin=margin), q, pos, neg)
    y = torch.rand(6, generator=g, dtype=torch.float64)
    _gradcheck(lambda p: pearson_loss(p, y, temp=0.2), torch.rand(6, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(10))
def test_vsepp_gradient_is_hardest_negative_only(seed):
    # MH sends gradient only to the positives and, for each anchor whose hinge is active, to its
    # hardest negative: (i, hardest column of row i) for text anchors, (hardest row of column j, j)
    # for video anchors. Several anchors may share a hardest negative.
    S = cos_matrix(6, seed=seed).requires_grad_(True)
    vsepp_loss(S, margin=0.2).backward()
    s = S.detach().tolist()
    allowed = set()
    for i in range(6):
        row = [(s[i][j], j) for j in range(6) if j != i]
        value, j = max(row)
        if 0.2 + value - s[i][i] > 0:
            allowed.add((i, j))
    for j in range(6):
        col = [(s[i][j], i) for i in range(6) if i != j]
        value, i = max(col)
        if 0.2 + value - s[j][j] > 0:
            allowed.add((i, j))
    nonzero = {(i, j) for i in range(6) for j in range(6) if i != j and S.grad[i, j] != 0}
    assert nonzero == allowed


# ---------------------------------------------------------------- degenerate input
ALL_SQUARE = [
    ("infonce", lambda s: infonce_loss(s)),
    ("vsepp", lambda s: vsepp_loss(s)),
    ("vsepp_sh", lambda s: vsepp_loss(s, max_violation=False)),
    ("dsl", lambda s: dual_softmax_loss(s)),
    ("dsl_t1", lambda s: dual_softmax_loss(s, temp=1.0)),
    ("rerank", lambda s: dual_softmax_rerank(s, temp=0.01).sum()),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,fn", ALL_SQUARE)
@pytest.mark.parametrize("case", ["n1", "equal", "huge"])
def test_degenerate_inputs_are_finite(dtype, name, fn, case):
    if case == "n1":
        S = torch.full((1, 1), 0.3, dtype=dtype)
    elif case == "equal":
        S = torch.full((5, 5), 0.3, dtype=dtype)
    else:
        S = 1e4 * cos_matrix(5, seed=16).to(dtype)
    S.requires_grad_(True)
    out = fn(S)
    out.backward()
    assert torch.isfinite(out).all() and torch.isfinite(S.grad).all()


def test_degenerate_known_values():
    one = torch.full((1, 1), 0.3)
    assert infonce_loss(one).item() == 0.0
    assert vsepp_loss(one).item() == 0.0 and vsepp_loss(one, max_violation=False).item() == 0.0
    assert dual_softmax_loss(one).item() == 0.0
    eq = torch.full((5, 5), 0.3, dtype=torch.float64)
    assert infonce_loss(eq).item() == pytest.approx(math.log(5), abs=1e-12)
    assert dual_softmax_loss(100 * eq).item() == pytest.approx(math.log(5), abs=1e-12)
    assert vsepp_loss(eq, margin=0.2).item() == pytest.approx(2 * 5 * 0.2, abs=1e-12)
    assert vsepp_loss(eq, margin=0.2, max_violation=False).item() == pytest.approx(2 * 20 * 0.2, abs=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_modality_shuffle_and_pearson(dtype):
    q = torch.randn(1, 4, dtype=dtype, requires_grad=True)
    neg = torch.randn(1, 3, 4, dtype=dtype)
    out = modality_shuffle_loss(q, q.detach() * 2, neg, temp=1e-4)  # logits ~1e4
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(q.grad).all()
    zero = torch.zeros(2, 4, dtype=dtype, requires_grad=True)  # zero vectors: cosine 0, not NaN
    assert torch.isfinite(modality_shuffle_loss(zero, zero, zero))
    for pred in (torch.full((6,), 0.4, dtype=dtype), torch.tensor([0.4], dtype=dtype)):
        pred.requires_grad_(True)
        loss = pearson_loss(pred, torch.arange(pred.numel(), dtype=dtype))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
        assert abs(loss.item()) < 1e-6
    assert pearson_loss(torch.rand(5, dtype=dtype), torch.ones(5, dtype=dtype)).item() == 0.0


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("fn", [infonce_loss, vsepp_loss, dual_softmax_loss])
def test_non_square_raises(fn):
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        fn(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="square"):
        fn(torch.zeros(3))


def test_bad_arguments_raise():
    S = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="reduction"):
        vsepp_loss(S, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        dual_softmax_loss(S, reduction="sum")
    with pytest.raises(ValueError, match="direction"):
        dual_softmax_rerank(S, direction="both")
    with pytest.raises(ValueError, match="2-D"):
        dual_softmax_rerank(torch.zeros(3))
    with pytest.raises(ValueError, match="temp"):
        dual_softmax_loss(S, temp=0.0)
    q = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="fused_pos"):
        modality_shuffle_loss(q, torch.zeros(3, 5), q)
    with pytest.raises(ValueError, match="fused_shuffled"):
        modality_shuffle_loss(q, q, torch.zeros(4, 2, 6))
    with pytest.raises(ValueError, match="margin"):
        modality_shuffle_loss(q, q, q, margin=torch.zeros(3))
    with pytest.raises(ValueError, match="same length"):
        pearson_loss(torch.zeros(4), torch.zeros(5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_follows_device():
    S = cos_matrix(6, seed=17).float()
    for fn in (infonce_loss, vsepp_loss, dual_softmax_loss):
        torch.testing.assert_close(fn(S.cuda()).cpu(), fn(S), rtol=1e-5, atol=1e-5)
    assert dual_softmax_rerank(S.cuda()).device.type == "cuda"
    q = torch.randn(3, 4)
    out = modality_shuffle_loss(q.cuda(), q.cuda(), q.cuda(), margin=torch.zeros(3).cuda())
    assert out.device.type == "cuda"
    assert pearson_loss(torch.rand(4).cuda(), torch.rand(4)).device.type == "cuda"
    assert rank_normalize(torch.tensor([1.0, 2.0]).cuda()).device.type == "cuda"
