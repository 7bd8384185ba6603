"""BertAdam, its schedule, per-tensor clipping and CLIP4Clip's parameter groups.

The reference below re-expresses the update arithmetic of ArrowLuo/CLIP4Clip
modules/optimization.py (BertAdam.step) element by element on Python floats.
"""
import math

import pytest
import torch
from torch import nn

from vidret_lib.optim import (
    BertAdam,
    bert_adam,
    make_optimizer,
    param_groups,
    warmup_constant,
    warmup_cosine,
    warmup_linear,
)


def ref_bert_adam(params, grads_per_step, lr, warmup, t_total, b1, b2, e, wd, max_norm):
    """params: list of lists (one list of floats per tensor); grads_per_step[k][tensor] likewise."""
    params = [list(p) for p in params]
    m = [[0.0] * len(p) for p in params]
    v = [[0.0] * len(p) for p in params]
    for step, grads in enumerate(grads_per_step):
        x = step / t_total  # progress before the update
        mult = x / warmup if x < warmup else 0.5 * (1.0 + math.cos(math.pi * x))
        for t, g in enumerate(grads):
            norm = math.sqrt(sum(gi * gi for gi in g))
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:  # clip this tensor alone
                g = [gi * coef for gi in g]
            for i, gi in enumerate(g):
                m[t][i] = b1 * m[t][i] + (1 - b1) * gi
                v[t][i] = b2 * v[t][i] + (1 - b2) * gi * gi
                update = m[t][i] / (math.sqrt(v[t][i]) + e) + wd * params[t][i]
                params[t][i] -= lr * mult * update
    return params


def test_bert_adam_matches_reference_float64():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    steps = 6
    # large and small gradients, so that some steps clip a tensor and some do not
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) * (3.0 if k % 2 else 0.1) for s in shapes]
             for k in range(steps)]
    params = [nn.Parameter(x.clone()) for x in init]
    opt = bert_adam(params, lr=0.01, warmup=0.3, t_total=steps, weight_decay=0.2)
    for k in range(steps):
        for p, gr in zip(params, grads[k]):
            p.grad = gr.clone()
        opt.step()
    expected = ref_bert_adam(
        [x.flatten().tolist() for x in init], [[gr.flatten().tolist() for gr in gs] for gs in grads],
        lr=0.01, warmup=0.3, t_total=steps, b1=0.9, b2=0.98, e=1e-6, wd=0.2, max_norm=1.0,
    )
    for p, exp in zip(params, expected):
        assert torch.allclose(p.detach().flatten(), torch.tensor(exp, dtype=torch.float64), rtol=0, atol=1e-12)


def test_first_update_has_zero_lr_under_warmup_and_no_bias_correction():
    p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = bert_adam([p], lr=0.1, warmup=0.5, t_total=4, weight_decay=0.0)
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    assert p.item() == 1.0  # progress 0 -> multiplier 0
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()  # progress 1/4 -> multiplier 0.5; raw moving averages, no bias correction
    m = 0.9 * 0.05 + 0.1 * 0.5
    v = 0.98 * (0.02 * 0.25) + 0.02 * 0.25
    assert p.item() == pytest.approx(1.0 - 0.1 * 0.5 * m / (math.sqrt(v) + 1e-6), abs=1e-15)


@pytest.mark.parametrize("x", [0.0, 0.03, 0.0999, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_schedules_against_formula(x):
    w = 0.1
    cos_expected = x / w if x < w else 0.5 * (1 + math.cos(math.pi * x))  # whole-run cosine
    assert warmup_cosine(x, w) == pytest.approx(cos_expected, abs=1e-15)
    assert warmup_constant(x, w) == pytest.approx(x / w if x < w else 1.0)
    assert warmup_linear(x, w) == pytest.approx(x / w if x < w else max((x - 1) / (w - 1), 0.0))
    # the jump at the end of warmup: ~1 -> 0.5 * (1 + cos(0.1 pi))
    assert warmup_cosine(0.1, 0.1) == pytest.approx(0.97553, abs=1e-5)


def test_get_lr_follows_schedule():
    p = nn.Parameter(torch.zeros(2))
    opt = bert_adam([p], lr=1.0, warmup=0.1, t_total=10)
    for k in range(5):
        p.grad = torch.ones(2)
        opt.step()
        assert opt.get_lr() == [pytest.approx(warmup_cosine((k + 1) / 10, 0.1))]


def test_clipping_is_per_tensor():
    big = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    small = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = bert_adam([big, small], lr=0.1, t_total=-1, weight_decay=0.0, max_grad_norm=1.0)
    big.grad = torch.full((4,), 5.0, dtype=torch.float64)  # norm 10
    small.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)  # norm 0.5
    opt.step()
    assert big.grad.norm().item() == pytest.approx(1.0, abs=1e-6)  # clipped on its own
    assert small.grad.tolist() == [0.3, 0.4]  # untouched: a global clip (norm ~10) would scale it
    # no clipping when disabled
    p = nn.Parameter(torch.zeros(2))
    opt = BertAdam([p], lr=0.1, max_grad_norm=-1)
    p.grad = torch.full((2,), 10.0)
    opt.step()
    assert p.grad.tolist() == [10.0, 10.0]


def test_param_groups_reproduce_clip4clip_rule():
    class LayerNorm(nn.Module):  # BERT-style name as in CLIP4Clip's cross modules
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2))
            self.bias = nn.Parameter(torch.zeros(2))

    m = nn.Module()
    m.clip = nn.Module()
    m.clip.ln_1 = nn.LayerNorm(2)  # CLIP names its norms ln_*: weight IS decayed in CLIP4Clip
    m.clip.proj = nn.Linear(2, 2)
    m.head = nn.Module()
    m.head.LayerNorm = LayerNorm()
    m.head.fc = nn.Linear(2, 2)
    m.frozen = nn.Linear(2, 2)
    m.frozen.requires_grad_(False)
    groups = param_groups(m, lr=1e-4, coef_lr=1e-3, weight_decay=0.2)
    names = {id(p): n for n, p in m.named_parameters()}
    got = [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups]
    assert got == [
        (pytest.approx(1e-7), 0.2, ["clip.ln_1.weight", "clip.proj.weight"]),
        (1e-4, 0.2, ["head.fc.weight"]),
        (pytest.approx(1e-7), 0.0, ["clip.ln_1.bias", "clip.proj.bias"]),
        (1e-4, 0.0, ["head.LayerNorm.bias", "head.LayerNorm.weight", "head.fc.bias"]),
    ]


def test_adamw_option_uses_same_schedule():
    p = nn.Parameter(torch.zeros(3))
    opt, sched = make_optimizer("adamw", [{"params": [p]}], lr=1.0, warmup=0.2, t_total=10, weight_decay=0.2)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98)
    for k in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(warmup_cosine(k / 10, 0.2))
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    opt, sched = make_optimizer("bert_adam", [{"params": [p]}], lr=1.0, warmup=0.2, t_total=10, weight_decay=0.2)
    assert isinstance(opt, BertAdam) and sched is None


def test_bad_arguments():
    p = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="schedule"):
        bert_adam([p], lr=1.0, schedule="cosine")
    with pytest.raises(ValueError, match="warmup"):
        bert_adam([p], lr=1.0, warmup=1.5)
    with pytest.raises(ValueError, match="bert_adam"):
        make_optimizer("sgd", [{"params": [p]}], 1.0, 0.1, 10, 0.0)


def clip4clip_bert_adam_step(p, grad, state, lr, b1=0.9, b2=0.98, e=1e-6, wd=0.2, max_norm=1.0):
    """One BertAdam update of tensor ``p`` as ArrowLuo/CLIP4Clip modules/optimization.py
    BertAdam.step writes it: state and every operation in ``p``'s dtype (no float32 master copy),
    ``update_with_lr = lr * update`` rounded to that dtype, then subtracted."""
    if not state:
        state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
    norm = torch.linalg.vector_norm(grad)  # per-tensor clip, as clip_grad_norm_(p, max_norm)
    grad = grad * torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    state["m"] = state["m"].mul(b1).add(grad, alpha=1 - b1)
    state["v"] = state["v"].mul(b2).addcmul(grad, grad, value=1 - b2)
    update = state["m"] / (state["v"].sqrt() + e) + wd * p
    update_with_lr = lr * update
    state["step"] += 1
    return p - update_with_lr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_bert_adam_updates_in_the_param_dtype_as_clip4clip(dtype):
    # CLIP4Clip's fp16 CLIP weights (convert_weights) are updated in fp16: with lr 1e-7 the rounded
    # update is mostly below half an ulp of the weight, so most elements never change (CLIP4Clip#96)
    g = torch.Generator().manual_seed(0)
    init = (torch.randn(4000, generator=g) * 0.02).to(dtype)
    grads = [(torch.randn(4000, generator=g) * 1e-3).to(dtype) for _ in range(4)]
    p = nn.Parameter(init.clone())
    opt = bert_adam([p], lr=1e-7, t_total=-1)
    expected, state = init.clone(), {}
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        expected = clip4clip_bert_adam_step(expected, grad, state, lr=1e-7)
    assert opt.state[p]["next_m"].dtype == opt.state[p]["next_v"].dtype == dtype
    assert torch.equal(p.detach(), expected), f"{int((p.detach() != expected).sum())} of 4000 elements differ"
