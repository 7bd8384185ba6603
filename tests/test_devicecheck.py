"""vidret_lib.devicecheck: CUDA's device rules on the CPU.

Each rule raises where real CUDA raises (the messages are torch's), and correct CUDA code runs
to the same numbers as on the CPU, in float32 and float64.
"""
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vidret_lib.devicecheck import cuda_rules

CUDA0, CUDA1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
SAME_DEVICE = "Expected all tensors to be on the same device"


def test_cuda_looks_available_and_outside_nothing_changes():
    with cuda_rules(device_count=2) as rules:
        assert torch.cuda.is_available() and torch.cuda.device_count() == 2
        assert torch.accelerator.is_available() and torch.accelerator.current_accelerator().type == "cuda"
        torch.cuda.set_device(1)
        assert torch.cuda.current_device() == 1 == rules.current
        assert torch.ones(1).cuda().device == CUDA1  # "cuda" is the current device
        torch.cuda.synchronize()
        torch.cuda.manual_seed_all(0)
        with torch.autocast("cuda", dtype=torch.float16):
            assert (torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")).dtype == torch.float32
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.ones(1).to("cuda:2")
    assert not torch.cuda.is_available()
    assert torch.ones(1).device == CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_devices_raise_like_torch(dtype):
    with cuda_rules(device_count=2):
        x, y = torch.ones(3, dtype=dtype).to("cuda"), torch.ones(3, dtype=dtype)
        for bad in (lambda: x + y, lambda: y * x, lambda: torch.cat([x, y]), lambda: x @ y,
                    lambda: F.linear(x, torch.ones(2, 3, dtype=dtype)), lambda: torch.where(x > 0, x, y)):
            with pytest.raises(RuntimeError, match=f"{SAME_DEVICE}.*cuda:0 and cpu|{SAME_DEVICE}.*cpu and cuda:0"):
                bad()
        z = torch.ones(3, dtype=dtype, device="cuda:1")
        with pytest.raises(RuntimeError, match=f"{SAME_DEVICE}.*cuda:0 and cuda:1"):
            x + z
        with pytest.raises(RuntimeError, match="indices should be either on cpu or on the same device"):
            y[torch.tensor([0], device="cuda")]
        with pytest.raises(RuntimeError, match=SAME_DEVICE):
            x[torch.tensor([True, False, True])] = torch.zeros(2, dtype=dtype)  # index_put_ of CPU values
        # what torch allows: CPU scalars, copy_, CPU indices, basic-index assignment, in-place on the device
        assert ((x + torch.tensor(2.0, dtype=dtype)) * 3).device == CUDA0
        x.copy_(torch.arange(3, dtype=dtype))
        x[1:] = torch.zeros(2, dtype=dtype)
        x[torch.tensor([0])] += 5
        assert x[torch.tensor([True, False, True])].device == CUDA0
        assert x.cpu().tolist() == [5.0, 0.0, 0.0] and x.sum().item() == 5.0


def test_numpy_of_cuda_raises_and_cpu_copies():
    with cuda_rules():
        x = torch.arange(4.0)
        g = x.to("cuda")
        assert g.device == CUDA0 and g.is_cuda and g.get_device() == 0 and x.device == CPU
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            g.numpy()
        with pytest.raises(TypeError, match="Use Tensor.cpu"):
            np.asarray(g)
        back = g.cpu()
        assert back.device == CPU and not back.is_cuda and back.get_device() == -1
        back.add_(1)  # a transfer copies: the device tensor keeps its values
        assert g.tolist() == x.tolist() == [0.0, 1.0, 2.0, 3.0]
        np.testing.assert_array_equal(back.numpy(), [1.0, 2.0, 3.0, 4.0])
        assert g.to(x).device == CPU and x.to(g).device == CUDA0 and g.to(torch.float64).device == CUDA0
        assert torch.as_tensor(x, device="cuda").device == CUDA0 and x.device == CPU


def test_factories_follow_device_and_generators_must_match():
    gen = torch.Generator().manual_seed(0)
    with cuda_rules(device_count=2):
        for make in (lambda d: torch.zeros(2, device=d), lambda d: torch.arange(3, device=d),
                     lambda d: torch.tensor([1.0, 2.0], device=d), lambda d: torch.eye(2, device=d),
                     lambda d: torch.empty(2, device=d, pin_memory=d == "cpu")):
            assert make("cuda:1").device == CUDA1 and make("cpu").device == CPU
        x = torch.ones(2, device="cuda")
        assert torch.zeros_like(x).device == x.new_zeros(3).device == CUDA0
        assert torch.zeros_like(x, device="cpu").device == CPU
        assert torch.randn(3, generator=gen).device == CPU  # a CPU generator on the CPU is fine
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
            torch.randn(3, device="cuda", generator=gen)
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
            nn.init.orthogonal_(torch.empty(2, 2, device="cuda"), generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_to_cuda_forward_backward_step_equals_cpu(dtype):
    """Correct CUDA code runs, gives the CPU numbers, and keeps every tensor on the device."""
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2)).to(dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        x = torch.randn(5, 4, dtype=dtype).to(device)
        for _ in range(3):
            loss = F.cross_entropy(model(x), torch.tensor([0, 1, 0, 1, 1]).to(device))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
        return model, opt, loss

    ref_model, _, ref_loss = run()
    with cuda_rules():
        model, opt, loss = run()
        assert loss.device == CUDA0
        for p in model.parameters():
            assert p.device == p.grad.device == opt.state[p]["exp_avg"].device == CUDA0
        assert model[0].weight.cpu().device == CPU
        state = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_backward_leaves_grads_on_the_parameter_device():
    with cuda_rules(device_count=2):
        a = nn.Parameter(torch.ones(3, device="cuda:1"))
        b = torch.ones(3, device="cuda:1", requires_grad=True)
        (a * b).sum().backward()
        assert a.grad.device == b.grad.device == CUDA1
        (ga,) = torch.autograd.grad((a * 2).sum(), [a])
        assert ga.device == CUDA1
        with pytest.raises(RuntimeError, match=SAME_DEVICE):
            a.grad = torch.zeros(3)  # torch refuses a gradient on another device
        with pytest.raises(RuntimeError, match=SAME_DEVICE):
            (a * b).sum().backward(torch.tensor(1.0, device="cuda:0"))


@pytest.mark.parametrize("workers", [0, 1])
def test_dataloader_pin_memory(workers):
    data = torch.utils.data.TensorDataset(torch.arange(8.0).view(4, 2), torch.arange(4))
    with cuda_rules():
        loader = torch.utils.data.DataLoader(data, batch_size=2, pin_memory=True, num_workers=workers)
        batches = [(x.to("cuda", non_blocking=True), y.cuda()) for x, y in loader]
        assert [x.device for x, _ in batches] == [CUDA0, CUDA0]
        total = sum((x.sum(1) * y).sum() for x, y in batches)
        assert total.device == CUDA0 and total.item() == sum(float(2 * i + 2 * i + 1) * i for i in range(4))
        with pytest.raises(RuntimeError, match="only dense CPU tensors can be pinned"):
            batches[0][0].pin_memory()


# ---------------------------------------------------------------- the library under CUDA's rules
TRAIN_CONFIGS = {
    "infonce-meanP": dict(),
    "vsepp-seqTransf-caption": dict(loss="vsepp", head="seqTransf", seq_layers=1, sampling="caption"),
    "dsl-emcl": dict(loss="dsl", emcl=True, emcl_k=4, optimizer="adamw"),
    "mbvr": dict(loss="modality_shuffle", use_title=True, alpha=0.5, beta=0.5, ms_dynamic_margin=True),
}


def _train_and_evaluate(config, train_split, val_split):
    from vidret_lib.train import evaluate, train

    result = train(config, train_split, val_split)
    modality = "title" if config.use_title else "fused"
    return result, {
        "none": evaluate(result.model, val_split, modality=modality),
        "dsl": evaluate(result.model, val_split, rerank="dsl"),
        "qb_norm": evaluate(result.model, val_split, rerank="qb_norm", prior=train_split),
    }


@pytest.mark.parametrize("name", list(TRAIN_CONFIGS))
def test_train_and_evaluate_on_cuda_with_cpu_feature_splits(name):
    """Splits built on the CPU (as from the feature cache), device="cuda": the CPU run's numbers."""
    from test_train import toy_split

    from vidret_lib.train import TrainConfig

    options = {**dict(epochs=1, batch_size=8, lr=1e-2, select="val"), **TRAIN_CONFIGS[name]}
    titles = options.get("use_title", False)
    tr, va = toy_split(16, 2, titles=titles), toy_split(8, 1, seed=1, titles=titles)
    ref, ref_metrics = _train_and_evaluate(TrainConfig(**options), tr, va)
    with cuda_rules():
        result, metrics = _train_and_evaluate(TrainConfig(**options, device="cuda"), tr, va)
        assert all(p.device == CUDA0 for p in result.model.parameters())
        assert tr.text.device == CPU  # the caller's split is not moved
    assert metrics == ref_metrics
    assert [h["loss"] for h in result.history] == [h["loss"] for h in ref.history]


def test_a_split_left_on_the_cpu_is_caught(monkeypatch):
    """The check has teeth: if train() forgot to move the features, CUDA would fail, and so does the mode."""
    from test_train import toy_split

    from vidret_lib.train import FeatureSplit, TrainConfig, train

    monkeypatch.setattr(FeatureSplit, "to", lambda self, device: self)
    with cuda_rules(), pytest.raises(RuntimeError, match=f"{SAME_DEVICE}.*cpu and cuda:0"):
        train(TrainConfig(epochs=1, batch_size=8, select="last", device="cuda"), toy_split(8, 1))


def test_end_to_end_training_and_featurize_on_cuda():
    from test_train import tiny_clip_encoder

    from vidret_lib.datasets import Split
    from vidret_lib.encoders import Encoder
    from vidret_lib.train import RawSplit, TrainConfig, evaluate, train

    frames = np.random.default_rng(0).integers(0, 255, size=(4, 2, 32, 32, 3), dtype=np.uint8)
    masks = np.array([[True, True], [True, False], [True, True], [False, True]])
    cache = types.SimpleNamespace(failed={}, load=lambda vid: (frames[int(vid[1:])], masks[int(vid[1:])]))
    raw = RawSplit.from_frame_cache(cache, Split("train", ["a dog runs", "a cat sleeps", "a car", "rain"],
                                                 ["v0", "v1", "v2", "v3"]))
    cfg = dict(mode="end_to_end", epochs=1, batch_size=4, lr=1e-3, coef_lr=1.0, warmup=0.0, select="last")
    ref = train(TrainConfig(**cfg), raw, encoder=tiny_clip_encoder())
    ref_metrics = evaluate(ref.model, raw)
    with cuda_rules():
        enc = tiny_clip_encoder()
        enc = Encoder(enc.model.to("cuda"), enc.name, enc.cache_id, enc.embed_dim, enc.image_size,
                      torch.device("cuda"), enc.mean, enc.std, enc.tokenizer)
        result = train(TrainConfig(**cfg, device="cuda"), raw, encoder=enc)
        assert next(result.model.clip.parameters()).device == CUDA0
        metrics = evaluate(result.model, raw)
    assert metrics == ref_metrics
    assert result.history[0]["loss"] == ref.history[0]["loss"]


def test_feature_extraction_on_cuda(monkeypatch, tmp_path):
    from test_encoders import register_tiny_clip

    from vidret_lib.encoders import load_encoder
    from vidret_lib.features import text_features, video_features

    register_tiny_clip(monkeypatch)
    frames = np.random.default_rng(0).integers(0, 255, size=(3, 2, 40, 48, 3), dtype=np.uint8)
    masks = np.array([[True, True], [True, False], [False, False]])
    cache = types.SimpleNamespace(key="k", failed={}, content=dict.fromkeys("012", "v1"),
                                  load=lambda vid: (frames[int(vid)], masks[int(vid)]))
    ref_enc = load_encoder("Tiny-B", "cpu", pretrained=None)
    ref_video = video_features(ref_enc, cache, ["0", "1", "2"], tmp_path / "cpu", batch_size=2)
    ref_text = text_features(ref_enc, ["a dog", "a cat runs"], tmp_path / "cpu")
    with cuda_rules():
        enc = load_encoder("Tiny-B", "cuda", pretrained=None)
        assert next(enc.model.parameters()).device == CUDA0 and enc.cache_id == ref_enc.cache_id
        feats, mask = video_features(enc, cache, ["0", "1", "2"], tmp_path / "cuda", batch_size=2)
        text = text_features(enc, ["a dog", "a cat runs"], tmp_path / "cuda")
        assert feats.device == mask.device == text.device == CPU  # the cache holds CPU arrays
    # float32 tolerance: nn.MultiheadAttention skips its fused fast path under a torch function mode
    torch.testing.assert_close(feats, ref_video[0])
    torch.testing.assert_close(text, ref_text)
    assert torch.equal(mask, ref_video[1])


def test_pair_similarity_trains_on_cuda():
    from test_train import pair_data

    from vidret_lib.pairsim import PairConfig, train_pair_similarity

    feats, pairs = pair_data(0)
    val = pair_data(1)[1]
    _, ref = train_pair_similarity(PairConfig(batch_size=200, epochs=1), feats, pairs, val)
    with cuda_rules():
        model, history = train_pair_similarity(PairConfig(batch_size=200, epochs=1, device="cuda"), feats, pairs, val)
        assert next(model.parameters()).device == CUDA0
    assert history == ref


def test_enable_for_process_keeps_the_rules_until_the_process_ends():
    # in a fresh Python: the mode is never left, so it must not leak into this test session
    import subprocess
    import sys

    script = """
import torch
from vidret_lib.devicecheck import enable_for_process
rules = enable_for_process(2)
assert enable_for_process(2) is rules and len(torch.overrides._get_current_function_mode_stack()) == 1
try:
    enable_for_process(1)
except ValueError as err:
    print(err)
x = torch.ones(2).to("cuda:1")
print(x.device, torch.cuda.device_count())
torch.ones(2).to("cuda:0") + x
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.stdout.splitlines() == ["cuda_rules already entered with device_count=2, not 1", "cuda:1 2"], run.stderr
    assert f"RuntimeError: {SAME_DEVICE}, but found at least two devices, cuda:0 and cuda:1!" in run.stderr


@pytest.mark.parametrize("backend", ["nccl", "cpu:gloo,cuda:nccl"])
def test_collectives_need_the_current_cuda_device_and_cpu_tensors_a_cpu_backend(tmp_path, backend):
    """As torch: NCCL takes CUDA tensors on the current device only; CPU tensors need a CPU backend (gloo)."""
    with cuda_rules(device_count=2):
        dist.init_process_group(backend=backend, init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
        try:
            torch.cuda.set_device(1)
            x = torch.ones(3, device="cuda")
            dist.all_reduce(x)
            assert x.device == torch.device("cuda", 1) and x.tolist() == [1.0, 1.0, 1.0]
            with pytest.raises(RuntimeError, match="current device cuda:1"):
                dist.all_reduce(torch.ones(3, device="cuda:0"))
            if backend == "nccl":
                with pytest.raises(RuntimeError, match="got one on cpu"):
                    dist.broadcast(torch.ones(3), src=0)
            else:
                dist.broadcast(torch.ones(3), src=0)  # the gloo part of the group
        finally:
            dist.destroy_process_group()
