"""vidret_lib.EMCL against a plain-loop EM re-expressing jpthu17/EMCL's Emcl arithmetic."""
import math

import pytest
import torch

import vidret_lib
from vidret_lib import EMCL

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def ref_emcl(x, mu0, stage_num, lamd):
    """Loops over Python floats: x is N x D, mu0 the K initial bases (the (1, K) buffer).

    Returns the final bases (N x K), responsibilities (D x K) and X_hat (N x D).
    """
    n, d, k = len(x), len(x[0]), len(mu0)
    mu = [list(mu0) for _ in range(n)]  # buffer repeated over N
    for _ in range(stage_num):
        z = []
        for c in range(d):  # E-step: channel c is a point in R^N
            logits = [sum(x[i][c] * mu[i][j] for i in range(n)) / lamd for j in range(k)]
            top = max(logits)
            e = [math.exp(v - top) for v in logits]
            z.append([v / sum(e) for v in e])
        for j in range(k):  # normalise each basis' responsibilities over the D channels
            col = sum(z[c][j] for c in range(d))
            for c in range(d):
                z[c][j] /= 1e-6 + col
        mu = [[sum(x[i][c] * z[c][j] for c in range(d)) for j in range(k)] for i in range(n)]  # M-step
        for j in range(k):  # unit-norm columns over N
            norm = math.sqrt(sum(mu[i][j] ** 2 for i in range(n)))
            for i in range(n):
                mu[i][j] /= 1e-6 + norm
    x_hat = [[sum(mu[i][j] * z[c][j] for j in range(k)) for c in range(d)] for i in range(n)]
    return mu, z, x_hat


def features(n=6, d=9, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def close(actual, expected, dtype):
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), **TOL[dtype])


TRAINING = dict(k=4, stage_num=9, lamd=1.0, beta=3.0)  # EMCL-Net's settings (smaller K)
INFERENCE = dict(k=7, stage_num=10, lamd=0.1, beta=4.0)  # the inference-module variant
SOFT = dict(k=4, stage_num=2, lamd=0.5, beta=3.0)  # lamd != 1 in float32: where lamd enters the E-step


# At lamd=0.1 the EM amplifies the ~1e-6 differences between the +-1 initial bases, so on
# small batches float32 rounding alone changes how the bases split (differences up to
# 1e-1 vs float64, any implementation); that variant is compared in float64 only.
@pytest.mark.parametrize("dtype,params", [(torch.float32, TRAINING), (torch.float64, TRAINING),
                                          (torch.float64, INFERENCE), (torch.float32, SOFT), (torch.float64, SOFT)])
def test_forward_matches_loop(dtype, params):
    torch.manual_seed(1)
    emcl = EMCL(momentum=0.9, **params).to(dtype).eval()
    x = features(dtype=dtype)
    mu0 = emcl.mu[0].double().tolist()
    mu, z, x_hat = ref_emcl(x.double().tolist(), mu0, params["stage_num"], params["lamd"])
    bases, resp = emcl.em(x)
    close(bases, mu, dtype)
    close(resp, z, dtype)
    expected = [[x.double()[i, c].item() + params["beta"] * x_hat[i][c] for c in range(x.shape[1])]
                for i in range(x.shape[0])]
    close(emcl(x), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_train_mode_momentum_update_of_mu(dtype):
    torch.manual_seed(2)
    emcl = EMCL(k=5, stage_num=3, momentum=0.9).to(dtype).train()
    before = emcl.mu.clone()
    x = features(n=4, d=7, seed=3, dtype=dtype)
    mu, _, _ = ref_emcl(x.double().tolist(), before[0].double().tolist(), 3, 1.0)
    mean_n = [sum(row[j] for row in mu) / len(mu) for j in range(5)]
    expected = [[0.9 * before[0, j].item() + 0.1 * mean_n[j] for j in range(5)]]
    emcl(x)
    close(emcl.mu, expected, dtype)
    second = emcl.mu.clone()
    emcl(x)  # the next call starts from the updated buffer and moves it again
    assert not torch.equal(emcl.mu, second)


def test_eval_mode_leaves_mu_and_is_deterministic():
    emcl = EMCL(k=6).eval()
    before = emcl.mu.clone()
    x = features(dtype=torch.float32)
    y1, y2 = emcl(x), emcl(x)
    assert torch.equal(emcl.mu, before) and torch.equal(y1, y2)


def test_init_buffer_and_state_dict():
    torch.manual_seed(3)
    emcl = EMCL()
    assert tuple(emcl.mu.shape) == (1, 32) and emcl.mu.dtype == torch.float32
    # N(0, 2/K) divided by 1e-6 + its norm over the length-1 axis: entries are +-1 (to 1e-5)
    torch.testing.assert_close(emcl.mu.abs(), torch.ones(1, 32), rtol=0, atol=1e-4)
    assert (emcl.mu > 0).any() and (emcl.mu < 0).any()
    assert list(emcl.state_dict()) == ["mu"] and list(emcl.parameters()) == []
    other = EMCL()
    other.load_state_dict(emcl.state_dict())
    assert torch.equal(other.mu, emcl.mu)
    assert vidret_lib.EMCL is EMCL and "k=32" in repr(emcl)


def test_buffer_moves_with_to_and_computation_follows_input():
    emcl = EMCL(k=3).eval()
    assert emcl.to(torch.float64).mu.dtype == torch.float64
    emcl32 = EMCL(k=3).train()
    y = emcl32(features(dtype=torch.float64))  # float64 input, float32 buffer
    assert y.dtype == torch.float64 and emcl32.mu.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_equal_repeated_rows(dtype):
    # EM on x with row multiplicities == the plain-loop EM on the stack with each row repeated
    counts = [3, 1, 2, 1, 4]
    x = features(n=len(counts), d=7, seed=2, dtype=dtype)
    emcl = EMCL(momentum=0.9, **TRAINING).to(dtype).train()
    before = emcl.mu.clone()
    repeated = [row for row, c in zip(x.double().tolist(), counts) for _ in range(c)]
    mu, z, x_hat = ref_emcl(repeated, before[0].double().tolist(), TRAINING["stage_num"], TRAINING["lamd"])
    first = [sum(counts[:r]) for r in range(len(counts))]  # each distinct row's first copy in the stack
    for r, c in enumerate(counts):  # every copy of a row gets the same bases row
        for copy in range(1, c):
            torch.testing.assert_close(torch.tensor(mu[first[r] + copy]), torch.tensor(mu[first[r]]), rtol=1e-9, atol=0)
    weights = torch.tensor(counts, dtype=dtype)
    bases, resp = emcl.em(x, weights)
    close(bases, [mu[i] for i in first], dtype)
    close(resp, z, dtype)
    y = emcl(x, weights)
    rows = x.double().tolist()
    close(y, [[a + TRAINING["beta"] * b for a, b in zip(rows[r], x_hat[first[r]])] for r in range(len(counts))], dtype)
    # momentum update: the mean over all N = 11 rows of the stack
    mean = [sum(row[j] for row in mu) / len(mu) for j in range(TRAINING["k"])]
    close(emcl.mu, 0.9 * before.double() + 0.1 * torch.tensor([mean], dtype=torch.float64), dtype)
    # all-ones weights are the plain stack
    ones = EMCL(k=3).to(dtype).eval()
    assert torch.allclose(ones(x, torch.ones(len(x), dtype=dtype)), ones(x), **TOL[dtype])


@pytest.mark.parametrize("dtype,params", [(torch.float32, TRAINING), (torch.float64, TRAINING),
                                          (torch.float64, INFERENCE)])
def test_batch_of_inputs_equals_one_em_per_input(dtype, params):
    # B independent EMs at once (eval mode, as RetrievalModel.similarity runs its blocks) == the plain loop on each
    torch.manual_seed(4)
    emcl = EMCL(momentum=0.9, **params).to(dtype).eval()
    before = emcl.mu.clone()
    x = torch.stack([features(n=5, d=7, seed=s, dtype=dtype) for s in range(3)])  # (B=3, N=5, D=7)
    weights = torch.tensor([[3, 1, 2, 1, 1], [1, 1, 1, 1, 1], [4, 4, 1, 1, 2]], dtype=dtype)  # (B, N)
    bases, resp = emcl.em(x, weights)
    y = emcl(x, weights)
    assert bases.shape == (3, 5, params["k"]) and resp.shape == (3, 7, params["k"]) and y.shape == x.shape
    for b in range(3):
        counts = weights[b].long().tolist()
        repeated = [row for row, c in zip(x[b].double().tolist(), counts) for _ in range(c)]
        mu, z, x_hat = ref_emcl(repeated, before[0].double().tolist(), params["stage_num"], params["lamd"])
        first = [sum(counts[:r]) for r in range(len(counts))]  # each distinct row's first copy in the stack
        close(bases[b], [mu[i] for i in first], dtype)
        close(resp[b], z, dtype)
        close(y[b], [[a + params["beta"] * h for a, h in zip(x[b, r].double().tolist(), x_hat[first[r]])]
                     for r in range(len(counts))], dtype)
        one_bases, one_resp = emcl.em(x[b], weights[b])  # the 2-D call on this input alone
        torch.testing.assert_close(bases[b], one_bases, **TOL[dtype])
        torch.testing.assert_close(resp[b], one_resp, **TOL[dtype])
    assert torch.equal(emcl.mu, before), "eval mode leaves the bases alone"
    close(emcl(x)[1], emcl(x[1]).double(), dtype)  # without weights: every row once


def test_batch_in_train_mode_raises():
    emcl = EMCL(k=3).train()
    before = emcl.mu.clone()
    with pytest.raises(ValueError, match=r"batch \(2, 4, 5\) in train mode.*\.eval\(\)"):
        emcl(torch.randn(2, 4, 5))
    assert torch.equal(emcl.mu, before)


def test_bad_weights_raise():
    x = features(n=4, d=3)
    for bad in (torch.ones(3), torch.ones(4, 1), torch.tensor([1.0, 0.0, 2.0, 1.0])):
        with pytest.raises(ValueError, match=r"one positive multiplicity per row of x, shape \(4,\)"):
            EMCL(k=2)(x, bad)
    batch = torch.stack([x, x])  # (2, 4, 3): one multiplicity per row of each input, shape (2, 4)
    for bad in (torch.ones(4), torch.ones(2, 3), torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, 1.0]])):
        with pytest.raises(ValueError, match=r"one positive multiplicity per row of x, shape \(2, 4\)"):
            EMCL(k=2).eval()(batch, bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_gradient_through_reconstruction(dtype):
    emcl = EMCL(k=4).train()
    x = features(dtype=dtype).requires_grad_(True)
    w = torch.randn(x.shape, dtype=dtype)
    (w * emcl(x)).sum().backward()
    assert torch.equal(x.grad, w)  # dY/dX is the identity: X_hat is detached
    x.grad = None
    emcl(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_inputs_are_finite(dtype):
    emcl = EMCL(k=4).train()
    for x in (features(n=1, d=5, dtype=dtype), 1e4 * features(dtype=dtype), torch.zeros(3, 4, dtype=dtype)):
        assert torch.isfinite(emcl(x)).all()
    assert torch.isfinite(emcl.mu).all()


def test_default_bases_collapse_is_measurable():
    # the notebook's analysis: singular values of the final bases (N, K)
    bases, _ = EMCL(k=8).em(features(n=10, d=16, seed=5))
    s = torch.linalg.svdvals(bases)
    assert s.shape == (8,) and torch.isfinite(s).all()
    torch.testing.assert_close(bases.norm(dim=0), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-5)


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(N, D\) or a batch \(B, N, D\); got \(2, 1, 3, 4\)"):
        EMCL().eval()(torch.zeros(2, 1, 3, 4))
    with pytest.raises(ValueError, match="stage_num"):
        EMCL(stage_num=0)
    with pytest.raises(ValueError, match="momentum"):
        EMCL(momentum=1.5)
