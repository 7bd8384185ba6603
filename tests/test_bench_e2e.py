"""benchmarks/bench_e2e.py: its step is train()'s end-to-end step, and its main runs at the tiny size on the CPU."""
import doctest
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from vidret_lib.clip4clip_recipe import plan_steps
from vidret_lib.encoders import load_encoder
from vidret_lib.train import RawSplit, frame_loader, train

pytestmark = pytest.mark.usefixtures("one_thread")

_SPEC = importlib.util.spec_from_file_location(
    "bench_e2e", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

FIELDS = ("s_per_step", "steps_per_s", "frames_per_s", "epoch_seconds", "peak_memory_bytes")


@pytest.mark.parametrize("precision", ["fp32", "fp16_weights", "amp_bf16"])
def test_bench_step_and_loader_are_trains(tmp_path, precision):
    # one epoch of train() (two batches: BertAdam's warmup gives the first update lr 0) vs two RecipeSteps on
    # the batches of bench's loader (train's frame_loader) in train()'s order (one randperm of the captions
    # from a generator seeded with config.seed), at a larger lr so that the weights move
    encoder = load_encoder(bench.register_tiny_clip(tmp_path), "cpu", pretrained=None)
    split = bench.caption_split(bench.write_frame_cache(tmp_path, 3, 2, encoder.image_size))
    config = bench.recipe_config(precision, 3, "cpu", lr=1e-3, coef_lr=0.1, epochs=1, seed=5)
    result = train(config, split, encoder=encoder)

    step = bench.RecipeStep(config, encoder, total_steps=2)
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    order = torch.randperm(split.num_texts, generator=torch.Generator().manual_seed(config.seed))
    plan = [(c, split.caption_video[c]) for c in (order[:3], order[3:])]
    losses = [step(batch) for batch in frame_loader(split, plan, encoder.tokenizer, workers=1)]

    assert result.history[0]["steps"] == 2
    assert sum(losses) / 2 == pytest.approx(result.history[0]["loss"], rel=1e-6)
    state = step.model.state_dict()
    assert state.keys() == result.last_state.keys()
    assert any(not torch.equal(state[k], before[k]) for k in state)  # the steps changed weights
    for name, value in state.items():
        torch.testing.assert_close(value, result.last_state[name], msg=name)


def test_batch_plan_covers_the_measurement_with_shuffled_captions():
    sentences, caption_video = bench.captions(3)
    split = RawSplit(None, sentences, caption_video, 3)
    plan = bench.batch_plan(split, 4, 5)  # 20 samples of 6 captions: 4 shuffled passes, cut
    assert len(plan) == 5 and all(len(c) == 4 for c, _ in plan)
    flat = torch.cat([c for c, _ in plan])
    assert sorted(flat[:6].tolist()) == list(range(6)) and sorted(flat[6:12].tolist()) == list(range(6))
    assert all(torch.equal(v, split.caption_video[c]) for c, v in plan)


def test_main_tiny_prints_and_writes_finite_figures(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    figures = bench.main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--workers", "1",
                          "--json", str(out)])
    assert json.loads(out.read_text()) == figures
    assert figures["device"] == "cpu" and figures["torch"] == torch.__version__
    assert (figures["batch_size"], figures["frames"]) == (4, 2)
    assert figures["epoch_steps"] == plan_steps(180_000, 4, 1).steps_per_epoch == 45_000
    rows = figures["rows"]
    assert [(r["precision"], r["loader"]) for r in rows] == [
        (p, loader) for p in ("fp16_weights", "amp_bf16", "fp32") for loader in (False, True)]
    for row in rows:
        assert row["error"] is None and row["steps"] == 2
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in FIELDS), row
        assert row["frames_per_s"] == pytest.approx(row["steps_per_s"] * 4 * 2)
        assert row["epoch_seconds"] == pytest.approx(45_000 * row["s_per_step"])
    printed = capsys.readouterr().out
    for text in ("device cpu", f"torch {torch.__version__}", "load average", "s/step", "steps/s", "frames/s",
                 "epoch h:mm", "peak MiB", "45000 steps"):
        assert text in printed
    assert sum(line.startswith(("fp16_weights", "amp_bf16", "fp32")) for line in printed.splitlines()) == 6


def test_a_precision_that_cannot_run_is_reported_not_fatal(monkeypatch, capsys):
    def no_kernel(self, *batch):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr(bench.RecipeStep, "__call__", no_kernel)
    figures = bench.main(["--tiny", "--device", "cpu", "--precision", "fp16_weights", "--steps", "1", "--workers", "0"])
    assert [(r["loader"], r["error"]) for r in figures["rows"]] == [
        (loader, "RuntimeError: \"addmm_impl_cpu_\" not implemented for 'Half'") for loader in (False, True)]
    assert capsys.readouterr().out.count("fp16_weights  off    does not run on cpu: RuntimeError") == 1


def test_docstring_examples():
    assert doctest.testmod(bench).failed == 0


def test_default_size_on_the_cpu_shrinks_to_tiny_and_says_so(capsys):
    args = bench.parse_args(["--device", "cpu"])
    assert args.tiny and (args.batch_size, args.frames) == (4, 2)
    assert "no CUDA device" in capsys.readouterr().out
    args = bench.parse_args(["--device", "cpu", "--batch-size", "8"])  # the real ViT-B/32 at a chosen size
    assert not args.tiny and (args.batch_size, args.frames) == (8, 12)
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--batch-size", "1"])
