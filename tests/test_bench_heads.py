"""benchmarks/bench_heads.py: its main runs at a tiny size, and its EMCL rows score what the per-block loop scores."""
import importlib.util
from pathlib import Path

import pytest
import torch

from vidret_lib import EMCL
from vidret_lib.heads import RetrievalModel

pytestmark = pytest.mark.usefixtures("one_thread")

_SPEC = importlib.util.spec_from_file_location(
    "bench_heads", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_heads.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_main_prints_every_row_and_batched_emcl_equals_the_loop(capsys):
    figures = bench.main(["--quick", "--captions", "9", "--videos", "7", "--batch", "4"])
    assert list(figures) == [1] and torch.get_num_threads() == 1
    rows = figures[1]
    emcl_rows = [name for name in rows if name.startswith(("EMCL", "plug-in"))]
    assert len(emcl_rows) == 6 and sum(name.endswith("/ per-block loop") for name in emcl_rows) == 3
    for name, row in rows.items():
        assert row["seconds"] > 0 and row["per_unit_ms"] > 0 and row["peak_mib"] >= 0, name
        if name.endswith("/ per-block loop"):
            assert row["max_abs_diff"] <= 1e-6, name  # batched blocks score what one block at a time scores
        else:
            assert row["max_abs_diff"] is None, name
    out = capsys.readouterr().out
    assert "1 thread(s)" in out and "seqTransf train step (batch 4 x 8)" in out and "seqTransf eval (9 x 7)" in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_block_loop_is_scores_on_each_block(dtype):
    # the benchmark's reference: scores() on each emcl_block x emcl_block block, ragged blocks included
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = RetrievalModel(8, emcl=EMCL(k=3, stage_num=2), emcl_block=2).to(dtype).eval()
    text, video = torch.randn(3, 8, generator=g, dtype=dtype), torch.randn(3, 2, 8, generator=g, dtype=dtype)
    mask = torch.ones(3, 2, dtype=torch.bool)
    with torch.no_grad():
        got = bench.per_block_loop(model, text, video, mask)
        t, v = model.encode_text(text), model.encode_video(video, mask)
        expected = torch.empty(3, 3, dtype=dtype)
        for i, j in ((0, 0), (0, 2), (2, 0), (2, 2)):
            expected[i:i + 2, j:j + 2] = model.scores(t[i:i + 2], v[j:j + 2])
    assert torch.equal(got, expected)


def test_bad_sizes_are_refused():
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--captions", "4", "--videos", "3", "--batch", "5"])
