"""vidret_lib.metrics against a brute-force sort-based reference and CLIP4Clip's compute_metrics."""
import csv
import hashlib
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from vidret_lib.metrics import both_directions, flatten_metrics, query_ranks, retrieval_metrics

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MSRVTT_1KA_CSV = SHARED_DATA / "msrvtt" / "annotations" / "MSRVTT_JSFUSION_test.csv"


# ---------------------------------------------------------------- references written for the tests


def brute_force_ranks(sim, targets, ties):
    """Sort each query's items with an explicit tie-break; rank = position of the first target + 1.

    pessimistic: among equal scores non-targets come first; optimistic: targets come first;
    mean: the average of the two positions.
    """
    ranks = []
    for row, tgt in zip(np.asarray(sim, dtype=np.float64).tolist(), targets):
        tgt = set(int(t) for t in tgt)

        def position(targets_first):
            order = sorted(range(len(row)), key=lambda j: (-row[j], (j in tgt) != targets_first))
            return next(pos for pos, j in enumerate(order) if j in tgt) + 1

        if ties == "pessimistic":
            ranks.append(float(position(targets_first=False)))
        elif ties == "optimistic":
            ranks.append(float(position(targets_first=True)))
        else:
            ranks.append((position(False) + position(True)) / 2)
    return ranks


def brute_force_metrics(sim, targets, ties):
    ranks = brute_force_ranks(sim, targets, ties)
    n = len(ranks)
    return {
        "R1": 100 * sum(r <= 1 for r in ranks) / n,
        "R5": 100 * sum(r <= 5 for r in ranks) / n,
        "R10": 100 * sum(r <= 10 for r in ranks) / n,
        "MdR": statistics.median(ranks),
        "MnR": sum(ranks) / n,
        "n_queries": n,
    }


def clip4clip_compute_metrics(x):
    """The arithmetic of compute_metrics in ArrowLuo/CLIP4Clip metrics.py (same in CLIP2Video).

    Also returns how many "hits" each row contributes (positions where the sorted row equals its
    diagonal value): 1 without ties, more with them.
    """
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, np.newaxis]
    rows, ind = np.where(sx - d == 0)
    metrics = {
        "R1": float(np.sum(ind == 0)) * 100 / len(ind),
        "R5": float(np.sum(ind < 5)) * 100 / len(ind),
        "R10": float(np.sum(ind < 10)) * 100 / len(ind),
        "MR": np.median(ind) + 1,
        "MeanR": np.mean(ind) + 1,
    }
    return metrics, np.bincount(rows, minlength=len(x))


def assert_metrics_equal(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key


def random_sim(rng, shape, dtype, tied):
    """Continuous scores (tie-free with probability 1) or small integers (many ties)."""
    values = rng.integers(0, 4, size=shape) if tied else rng.standard_normal(shape)
    return values.astype(dtype)


def random_targets(rng, n_queries, n_items, max_targets):
    return [rng.choice(n_items, size=rng.integers(1, max_targets + 1), replace=False) for _ in range(n_queries)]


# ---------------------------------------------------------------- agreement with the references

TIES = ["pessimistic", "optimistic", "mean"]


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("as_torch", [False, True])
def test_diagonal_matches_brute_force(ties, dtype, tied, as_torch):
    rng = np.random.default_rng(0)
    sim = random_sim(rng, (41, 41), dtype, tied)
    expected = brute_force_metrics(sim, [[i] for i in range(41)], ties)
    x = torch.from_numpy(sim) if as_torch else sim
    assert_metrics_equal(retrieval_metrics(x, ties=ties), expected)
    assert_metrics_equal(retrieval_metrics(x, ties=ties, chunk_size=3), expected)


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("as_torch", [False, True])
def test_several_targets_rectangular_matches_brute_force(ties, dtype, tied, as_torch):
    rng = np.random.default_rng(1)
    sim = random_sim(rng, (37, 23), dtype, tied)
    targets = random_targets(rng, 37, 23, max_targets=4)
    expected_ranks = brute_force_ranks(sim, targets, ties)
    x = torch.from_numpy(sim) if as_torch else sim
    for chunk_size in (1, 3, 256):
        got = query_ranks(x, targets, ties=ties, chunk_size=chunk_size)
        assert got.tolist() == expected_ranks
    assert_metrics_equal(retrieval_metrics(x, targets, ties=ties), brute_force_metrics(sim, targets, ties))


def test_target_forms_agree():
    """1-D int array, list of ints, (Q, k) array and torch tensors describe the same ground truth."""
    rng = np.random.default_rng(2)
    sim = random_sim(rng, (12, 9), np.float64, tied=True)
    one = rng.integers(0, 9, size=12)
    expected = query_ranks(sim, [[t] for t in one])
    assert (query_ranks(sim, one) == expected).all()
    assert (query_ranks(sim, one.tolist()) == expected).all()
    assert (query_ranks(sim, torch.from_numpy(one)) == expected).all()
    two = np.stack([one, (one + 1) % 9], axis=1)  # (Q, 2)
    assert (query_ranks(sim, two) == query_ranks(sim, two.tolist())).all()
    # a repeated target is the same set
    assert (query_ranks(sim, [[t, t] for t in one]) == expected).all()


def test_strided_read_only_and_integer_inputs():
    rng = np.random.default_rng(3)
    sim = random_sim(rng, (19, 19), np.float32, tied=True)
    expected = query_ranks(np.ascontiguousarray(sim.T))
    assert (query_ranks(sim.T) == expected).all()
    assert (query_ranks(torch.from_numpy(sim).T, chunk_size=4) == expected).all()
    read_only = sim.copy()
    read_only.flags.writeable = False
    assert (query_ranks(read_only) == query_ranks(sim)).all()
    assert (query_ranks(sim.astype(np.int64)) == query_ranks(sim)).all()
    assert (query_ranks(torch.from_numpy(sim).to(torch.bfloat16)) == query_ranks(sim)).all()  # ints exact


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equals_clip4clip_on_tie_free_matrices(dtype):
    rng = np.random.default_rng(4)
    sim = rng.standard_normal((300, 300)).astype(dtype)
    sim += 2.0 * np.eye(300, dtype=dtype)  # realistic: most targets near the top
    official, hits_per_row = clip4clip_compute_metrics(sim)
    assert (hits_per_row == 1).all()  # no ties
    for ties in TIES:
        ours = retrieval_metrics(sim, ties=ties)
        assert ours["R1"] == pytest.approx(official["R1"])
        assert ours["R5"] == pytest.approx(official["R5"])
        assert ours["R10"] == pytest.approx(official["R10"])
        assert ours["MdR"] == pytest.approx(official["MR"])
        assert ours["MnR"] == pytest.approx(official["MeanR"])
    assert 0 < official["R1"] < 100  # the comparison is not between two trivial values


# ---------------------------------------------------------------- ties


def test_constant_matrix_policies_and_clip4clip():
    n = 8
    sim = np.zeros((n, n), dtype=np.float32)
    assert query_ranks(sim).tolist() == [float(n)] * n  # rank after all n - 1 tied items
    pess = retrieval_metrics(sim)
    assert (pess["R1"], pess["R5"], pess["R10"], pess["MdR"]) == (0.0, 0.0, 100.0, n)
    assert retrieval_metrics(sim, ties="optimistic")["R1"] == 100.0
    assert retrieval_metrics(sim, ties="mean")["MnR"] == (1 + n) / 2
    official, hits_per_row = clip4clip_compute_metrics(sim)
    assert (hits_per_row == n).all()  # every row counted n times
    assert official["R1"] == pytest.approx(100 / n)


def test_duplicate_captions_give_v2t_ties_one_rank_each():
    """Two identical captions -> identical sim rows -> in v2t each of their videos has a tie."""
    rng = np.random.default_rng(5)
    n = 20
    sim = rng.standard_normal((n, n)) + 3.0 * np.eye(n)  # t2v, caption i -> video i
    sim[7] = sim[3]  # caption 7 is the same sentence as caption 3
    v2t = sim.T
    _, hits_per_row = clip4clip_compute_metrics(v2t)
    assert hits_per_row.tolist() == [2 if i in (3, 7) else 1 for i in range(n)]  # videos 3 and 7 counted twice
    pess, opt = query_ranks(v2t), query_ranks(v2t, ties="optimistic")
    assert len(pess) == n
    assert (pess - opt).tolist() == [1.0 if i in (3, 7) else 0.0 for i in range(n)]
    assert pess.tolist() == brute_force_ranks(v2t, [[i] for i in range(n)], "pessimistic")
    both = both_directions(sim)
    assert both["v2t"]["n_queries"] == n
    assert both["v2t"] == retrieval_metrics(v2t)
    assert both["t2v"] == retrieval_metrics(sim)


def test_targets_tied_with_each_other_do_not_compete():
    sim = np.array([[0.5, 0.5, 0.5, 0.1]])
    assert query_ranks(sim, [[0, 1]]).tolist() == [2.0]  # one tied non-target (item 2)
    assert query_ranks(sim, [[0, 1, 2]]).tolist() == [1.0]
    assert query_ranks(sim, [[0, 1]], ties="mean").tolist() == [1.5]


def _hash_vector(text, dim=16):
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


@pytest.mark.shared_data
@pytest.mark.skipif(not MSRVTT_1KA_CSV.exists(), reason=f"MSR-VTT 1k-A CSV not found at {MSRVTT_1KA_CSV}")
def test_msrvtt_1ka_duplicate_sentences_one_rank_per_query():
    with MSRVTT_1KA_CSV.open(newline="") as f:
        sentences = [row["sentence"] for row in csv.DictReader(f)]
    distinct = sorted(set(sentences))
    assert (len(sentences), len(distinct)) == (1000, 995)
    # Text embedding from a hash of the string: identical sentences give identical rows by construction.
    text_emb = np.stack([_hash_vector(s) for s in distinct])  # (995, 16)
    index_of = {s: i for i, s in enumerate(distinct)}
    sentence_index = np.array([index_of[s] for s in sentences])
    rng = np.random.default_rng(6)
    video_emb = text_emb[sentence_index] + 0.5 * rng.standard_normal((1000, 16))  # video i ~ caption i
    sim = (text_emb @ video_emb.T)[sentence_index].astype(np.float32)  # (1000 texts, 1000 videos)
    copies = np.bincount(sentence_index)[sentence_index] - 1  # other captions with the same sentence
    assert copies.sum() == 12 and (copies > 0).sum() == 9  # groups of 2, 3, 2, 2

    v2t = sim.T
    _, hits_per_row = clip4clip_compute_metrics(v2t)
    assert (hits_per_row == 1 + copies).all()  # the official trick counts tied videos several times
    pess, opt = query_ranks(v2t), query_ranks(v2t, ties="optimistic")
    assert len(pess) == 1000
    assert (pess - opt).tolist() == copies.astype(float).tolist()  # ties are exactly the duplicates
    both = both_directions(sim, ties="pessimistic")
    assert both["v2t"] == retrieval_metrics(v2t) and both["v2t"]["n_queries"] == 1000


# ---------------------------------------------------------------- both directions with several captions


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_directions_with_caption_video(dtype):
    rng = np.random.default_rng(7)
    caption_video = np.repeat(np.arange(6), 3)[rng.permutation(18)]  # 18 captions, 3 per video
    sim = random_sim(rng, (18, 6), dtype, tied=True)
    for ties in TIES:
        got = both_directions(sim, caption_video, ties=ties)
        video_captions = [np.flatnonzero(caption_video == v) for v in range(6)]
        assert_metrics_equal(got["t2v"], brute_force_metrics(sim, [[v] for v in caption_video], ties))
        assert_metrics_equal(got["v2t"], brute_force_metrics(sim.T, video_captions, ties))
    flat = flatten_metrics(got)
    assert flat["t2v_R1"] == got["t2v"]["R1"] and flat["v2t_MnR"] == got["v2t"]["MnR"] and len(flat) == 12


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_directions_with_ranks_gives_each_querys_brute_force_rank(dtype):
    rng = np.random.default_rng(8)
    caption_video = np.repeat(np.arange(5), 2)[rng.permutation(10)]
    sim = random_sim(rng, (10, 5), dtype, tied=True)
    got = both_directions(sim, caption_video, with_ranks=True)
    video_captions = [np.flatnonzero(caption_video == v) for v in range(5)]
    assert got["t2v"]["ranks"] == brute_force_ranks(sim, [[v] for v in caption_video], "pessimistic")
    assert got["v2t"]["ranks"] == brute_force_ranks(sim.T, video_captions, "pessimistic")
    assert "ranks" not in both_directions(sim, caption_video)["t2v"]


# ---------------------------------------------------------------- bad input


def test_errors():
    sim = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*pass query_targets"):
        retrieval_metrics(sim)
    with pytest.raises(ValueError, match="has 2 entries but sim has 3"):
        retrieval_metrics(sim, [0, 1])
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        retrieval_metrics(sim, [0, 1, 4])
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        retrieval_metrics(sim, [[0], [-1], [2]])
    with pytest.raises(ValueError, match="1 queries have no target .*query 1"):
        retrieval_metrics(sim, [[0], [], [2]])
    with pytest.raises(ValueError, match="integer indices"):
        retrieval_metrics(sim, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="not one of"):
        retrieval_metrics(np.zeros((2, 2)), ties="random")
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros(3))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(np.zeros((2, 2)), chunk_size=0)
    with pytest.raises(ValueError, match="video 1"):
        both_directions(sim, caption_video=[0, 2, 3])  # videos 1 has no caption


@pytest.mark.parametrize("as_torch", [False, True])
def test_nan_is_an_error_naming_the_count(as_torch):
    sim = np.random.default_rng(8).standard_normal((10, 10)).astype(np.float32)
    sim[2, 5] = sim[9, 1] = sim[9, 9] = np.nan
    with pytest.raises(ValueError, match="3 NaN scores"):
        retrieval_metrics(torch.from_numpy(sim) if as_torch else sim, chunk_size=4)
