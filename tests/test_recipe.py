"""CLIP4Clip's end-to-end recipe pieces on a tiny open_clip CLIP: the --freeze_layer_num 0 rule,
the precision modes (fp16 weights as convert_weights, fp32, bf16 autocast), the step count of
--expand_msrvtt_sentences, one training step in train_epoch's order against a plain loop
written here from ArrowLuo/CLIP4Clip main_task_retrieval.py, and train() in end-to-end mode
against that same plain loop."""
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from vidret_lib.clip4clip_recipe import (
    LOGIT_SCALE_MAX,
    apply_clip4clip_freeze,
    clip4clip_step,
    plan_steps,
    precision_context,
    prepare_precision,
)
from vidret_lib.encoders import Encoder
from vidret_lib.optim import BertAdam, bert_adam, param_groups
from vidret_lib.train import RawSplit, TrainConfig, featurize, train

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "msrvtt"
NO_SHARED = f"{SHARED} is absent (the real MSR-VTT files sit in ../shared/data beside the project)"

LAYERS = (0, 1)
TOWERS = ("visual.transformer.resblocks", "transformer.resblocks")
# convert_weights (CLIP4Clip modules/module_clip.py): Conv/Linear weight+bias, MultiheadAttention
# in_proj_weight/in_proj_bias, and the text_projection / proj matrices
FP16 = sorted(
    ["visual.conv1.weight", "visual.proj", "text_projection"]
    + [f"{tower}.{i}.{name}" for tower in TOWERS for i in LAYERS for name in (
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
    )]
)
LAYER_NORMS = sorted(
    ["visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
     "ln_final.weight", "ln_final.bias"]
    + [f"{tower}.{i}.{ln}.{w}" for tower in TOWERS for i in LAYERS for ln in ("ln_1", "ln_2") for w in ("weight", "bias")]
)
FP32 = sorted(LAYER_NORMS + ["logit_scale", "token_embedding.weight", "positional_embedding",
                             "visual.class_embedding", "visual.positional_embedding"])


def tiny_clip(seed=0):
    """A CLIP-shaped open_clip model (width 64, 2 layers, 2 heads, 32 px, patch 16, context 16,
    vocab 100, embed 32), built from its config without any download; logit scale at ln 100 as
    OpenAI's trained CLIP."""
    torch.manual_seed(seed)
    clip = CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        text_cfg={"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2},
        quick_gelu=True,
    )
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(100))
    return clip


class Wrapped(nn.Module):
    """CLIP4Clip-like: the CLIP towers under ``clip.`` (lr * coef_lr) and one new module (lr);
    ``head=False``: CLIP4Clip's meanP exactly, the towers alone."""

    def __init__(self, clip, head=True):
        super().__init__()
        self.clip = clip
        self.head = nn.Linear(32, 32) if head else nn.Identity()

    def loss(self, pixels, tokens, precision):
        """CLIP4Clip meanP (modules/modeling.py ``_loose_similarity``, ``CrossEn``): per-frame
        features, normalised, mean over frames (all valid), normalised; symmetric cross-entropy on
        ``logit_scale.exp() * (text @ video.T)``. CLIP4Clip normalises the text twice and the pooled
        video once, vidret the text once and the pooled video twice (``mean_pool``, then
        ``scores``): the same numbers up to float32 rounding, which fp16 weights under BertAdam
        amplify (measured: 226 of 195,590 moved elements differ), so this loop normalises as vidret."""
        b, t = pixels.shape[:2]
        with precision_context(precision, "cpu"):
            text = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
            frames = self.head(self.clip.encode_image(pixels.flatten(0, 1)).float()).view(b, t, -1)
            video = F.normalize(F.normalize(F.normalize(frames, dim=-1).mean(1), dim=-1), dim=-1)
            logits = self.clip.logit_scale.exp() * (text @ video.T)
            labels = torch.arange(b)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def batches(n, b=4, t=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, t, 3, 32, 32, generator=g), torch.randint(1, 99, (b, 16), generator=g)) for _ in range(n)]


# ---------------------------------------------------------------- 1. --freeze_layer_num


def test_freeze_layer_num_0_freezes_the_unnumbered_stem():
    clip = tiny_clip()
    frozen = apply_clip4clip_freeze(clip, 0)
    expected = sorted(["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                       "visual.ln_pre.weight", "visual.ln_pre.bias", "token_embedding.weight", "positional_embedding"])
    assert sorted(frozen) == expected
    assert sorted(n for n, p in clip.named_parameters() if not p.requires_grad) == expected
    trainable = {n for n, p in clip.named_parameters() if p.requires_grad}
    for kept in ("logit_scale", "text_projection", "visual.proj", "ln_final.weight", "visual.ln_post.bias",
                 "visual.transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.1.ln_2.weight"):
        assert kept in trainable


def test_freeze_layer_num_counts_blocks_and_minus_one_freezes_nothing():
    clip = tiny_clip()
    frozen = apply_clip4clip_freeze(clip, 1)  # block 0 of both towers joins the stem
    block0 = [n for n, _ in clip.named_parameters()
              if n.startswith(("visual.transformer.resblocks.0.", "transformer.resblocks.0."))]
    assert len(block0) == 2 * 12 and set(block0) <= set(frozen) and len(frozen) == 7 + 24
    assert not any(".resblocks.1." in n for n in frozen)
    clip = tiny_clip()
    assert apply_clip4clip_freeze(clip, -1) == [] and all(p.requires_grad for p in clip.parameters())


def test_freeze_refuses_bad_input():
    with pytest.raises(ValueError, match=r"freeze_layer_num=3 is outside \[-1, 2\]"):
        apply_clip4clip_freeze(tiny_clip(), 3)
    with pytest.raises(TypeError, match="open_clip CLIP"):
        apply_clip4clip_freeze(nn.Linear(2, 2))


# ---------------------------------------------------------------- 2. precision


def test_fp16_weights_converts_what_convert_weights_converts():
    clip = prepare_precision(tiny_clip(), "fp16_weights")
    dtypes = {n: p.dtype for n, p in clip.named_parameters()}
    assert sorted(n for n, d in dtypes.items() if d == torch.float16) == FP16
    assert sorted(n for n, d in dtypes.items() if d == torch.float32) == FP32
    for precision in ("fp32", "amp_bf16"):
        clip = prepare_precision(tiny_clip().half(), precision)
        assert {p.dtype for p in clip.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        prepare_precision(tiny_clip(), "fp16")
    # float32 (and bf16 autocast) take any tower, e.g. the offline default encoder's; fp16 storage is OpenAI's rule
    assert prepare_precision(nn.Linear(2, 2).half(), "fp32").weight.dtype == torch.float32
    with pytest.raises(TypeError, match="open_clip CLIP"):
        prepare_precision(nn.Linear(2, 2), "fp16_weights")
    with pytest.raises(ValueError, match="unknown precision"):
        precision_context("bf16", "cpu")


@pytest.mark.parametrize("precision, dtype, tol", [
    ("fp32", torch.float32, 0.0), ("fp16_weights", torch.float16, 2e-2), ("amp_bf16", torch.bfloat16, 8e-2),
])
def test_forward_runs_in_each_mode_on_float32_inputs(precision, dtype, tol):
    reference = tiny_clip().eval()
    clip = prepare_precision(tiny_clip(), precision).eval()
    pixels, tokens = torch.randn(3, 3, 32, 32), torch.randint(1, 99, (3, 16))
    with torch.no_grad(), precision_context(precision, "cpu"):
        image, text = clip.encode_image(pixels), clip.encode_text(tokens)  # float32 pixels, as the trainer passes
    assert image.dtype == text.dtype == dtype
    with torch.no_grad():
        for got, want in ((image, reference.encode_image(pixels)), (text, reference.encode_text(tokens))):
            assert (got.float() - want).abs().max() <= tol * want.abs().max()


def changed_fraction(before, model, names):
    """Fraction of the elements of ``names`` (parameters of ``model.clip``) that differ from ``before``."""
    params = dict(model.clip.named_parameters())
    changed = sum(int((params[n].detach() != before[n]).sum()) for n in names)
    return changed / sum(before[n].numel() for n in names)


def one_recipe_step(precision):
    """One BertAdam step at the recipe's rates (1e-4 new modules, 1e-7 CLIP), constant lr."""
    model = Wrapped(prepare_precision(tiny_clip(), precision))
    before = {n: p.detach().clone() for n, p in model.clip.named_parameters()}
    opt = bert_adam(param_groups(model, 1e-4, 1e-3, 0.2), lr=1e-4, t_total=-1)
    pixels, tokens = batches(1)[0]
    clip4clip_step(model.loss(pixels, tokens, precision), model.parameters(), opt, model.clip.logit_scale)
    return model, before


def test_lr_1e7_leaves_most_fp16_elements_unchanged_but_moves_the_layer_norms():
    # the mechanism behind ArrowLuo/CLIP4Clip#96: in fp16 an update of ~1e-7 is below half an
    # ulp of most weights; float32 LayerNorm weights near 1 (ulp 1.2e-7) and biases do move
    fp16_model, before16 = one_recipe_step("fp16_weights")
    fp32_model, before32 = one_recipe_step("fp32")
    assert changed_fraction(before16, fp16_model, FP16) < 0.2  # measured: 0.123 (zero-initialised biases move)
    assert changed_fraction(before16, fp16_model, LAYER_NORMS) > 0.6  # measured: 0.756
    assert changed_fraction(before32, fp32_model, FP16) > 0.95  # the same tensors in float32: 0.999


# ---------------------------------------------------------------- 3. steps of --expand_msrvtt_sentences


@pytest.mark.parametrize("n, batch, world", [(180_000, 128, 1), (180_000, 128, 4), (170_060, 128, 4),
                                             (130, 4, 4), (131, 8, 2), (37, 6, 3), (10, 10, 1)])
def test_plan_steps_is_the_length_of_clip4clips_loader(n, batch, world):
    # dataloader_msrvtt_train: DistributedSampler per process, batch_size // n_gpu, drop_last=True
    sampler = DistributedSampler(range(n), num_replicas=world, rank=0)
    loader = DataLoader(range(n), batch_size=batch // world, sampler=sampler, drop_last=True)
    assert plan_steps(n, batch, 5, world) == (len(loader), len(loader) * 5)


def test_plan_steps_msrvtt_9k_and_bad_arguments():
    assert plan_steps(180_000, 128, 5) == (1406, 7030)  # papers.md §0: 180000 / 128 = 1406.25
    with pytest.raises(ValueError, match="not divisible"):
        plan_steps(1000, 128, 5, world_size=3)
    with pytest.raises(ValueError, match="fill no batch"):
        plan_steps(100, 128, 5)
    with pytest.raises(ValueError, match=">= 1"):
        plan_steps(100, 16, 0)


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED.is_dir(), reason=NO_SHARED)
def test_plan_steps_on_the_real_msrvtt_training_splits():
    from data_prep import msrvtt

    splits = msrvtt.build_splits(msrvtt.read_annotations(SHARED / "annotations"))
    assert len(splits["train_9k"]) == 180_000 and len(splits["train_9k_noval"]) == 170_060
    assert plan_steps(len(splits["train_9k"]), 128, 5) == (1406, 7030)
    assert plan_steps(len(splits["train_9k_noval"]), 128, 5) == (1328, 6640)


# ---------------------------------------------------------------- 4. the training step


def clip4clip_reference_loop(model, data, precision, lr, coef_lr, t_total):
    """main_task_retrieval.py, written plainly: prep_optimizer's four groups over *all* named
    parameters (frozen ones included), BertAdam(warmup_cosine, b1 0.9, b2 0.98, e 1e-6, wd 0.2,
    max_grad_norm 1), then train_epoch: backward, global clip 1.0, step, zero_grad (torch 1.7:
    zeros), clamp the logit scale at log(100)."""
    named = list(model.named_parameters())
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    decay = [(n, p) for n, p in named if not any(nd in n for nd in no_decay)]
    nodecay = [(n, p) for n, p in named if any(nd in n for nd in no_decay)]
    groups = [
        {"params": [p for n, p in decay if "clip." in n], "weight_decay": 0.2, "lr": lr * coef_lr},
        {"params": [p for n, p in decay if "clip." not in n], "weight_decay": 0.2},
        {"params": [p for n, p in nodecay if "clip." in n], "weight_decay": 0.0, "lr": lr * coef_lr},
        {"params": [p for n, p in nodecay if "clip." not in n], "weight_decay": 0.0},
    ]
    optimizer = BertAdam(groups, lr=lr, warmup=0.1, schedule="warmup_cosine", b1=0.9, b2=0.98, e=1e-6,
                         t_total=t_total, weight_decay=0.2, max_grad_norm=1.0)
    for pixels, tokens in data:
        loss = model.loss(pixels, tokens, precision)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        torch.clamp_(model.clip.logit_scale.data, max=np.log(100))


@pytest.mark.parametrize("precision", ["fp32", "fp16_weights"])
def test_clip4clip_step_matches_the_plain_training_loop(precision):
    lr, coef_lr, steps = 1e-3, 0.1, 3
    model = Wrapped(prepare_precision(tiny_clip(), precision))
    apply_clip4clip_freeze(model.clip, 0)
    with torch.no_grad():
        model.clip.logit_scale.fill_(LOGIT_SCALE_MAX + 0.5)  # above the clamp: the clamp must act after the step
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = batches(steps)

    clip4clip_reference_loop(reference, data, precision, lr, coef_lr, t_total=steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bert_adam(param_groups(model, lr, coef_lr, 0.2), lr=lr, t_total=steps)
    norms = [clip4clip_step(model.loss(*batch, precision), params, optimizer, model.clip.logit_scale)
             for batch in data]

    assert min(norms) > 1.0  # the global clip acted at every step
    assert model.clip.logit_scale.item() <= LOGIT_SCALE_MAX  # clamped from ln 100 + 0.5
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[name].detach()), name
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert "head.weight" in moved and "clip.ln_final.weight" in moved and "clip.visual.conv1.weight" not in moved


def test_zero_grad_keeps_zeros_so_an_unused_parameter_still_moves():
    # torch 1.7's zero_grad (CLIP4Clip's) zeroes gradients: BertAdam keeps updating a parameter
    # that gets no gradient in a later step (momentum + decay); with None it would skip it
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = bert_adam([a, b], lr=0.1, t_total=-1, weight_decay=0.0)
    clip4clip_step((a + b).sum(), [a, b], opt)
    after_first = b.detach().clone()
    clip4clip_step(a.sum(), [a, b], opt)  # b unused
    assert b.grad is not None and not torch.equal(b.detach(), after_first)


def test_check_grad_norm_sees_the_unclipped_norm_before_any_weight_changes():
    w = nn.Parameter(torch.zeros(4))
    opt = bert_adam([w], lr=0.1, t_total=-1)

    def refuse(norm):
        assert norm.item() == pytest.approx(6.0)  # |(3, 3, 3, 3)|
        raise FloatingPointError("stop")

    with pytest.raises(FloatingPointError):
        clip4clip_step((3 * w).sum(), [w], opt, check_grad_norm=refuse)
    assert torch.equal(w.detach(), torch.zeros(4)) and not opt.state[w]


# ---------------------------------------------------------------- 5. the recipe inside train()

# 6 videos of 2 frames, 2 captions each: caption sampling puts same-video captions in one batch,
# and captions 2 and 7 are the same sentence; CLIP4Clip keeps both kinds as negatives
FRAMES = np.random.default_rng(0).integers(0, 255, size=(6, 2, 32, 32, 3), dtype=np.uint8)
SENTENCES = ["a red ball rolls", "a ball moves left", "a man is talking", "a blue cube spins", "a cube turns",
             "a car drives", "a green car drives fast", "a man is talking", "a dog runs", "a dog jumps up",
             "a bird flies", "a small bird flies away"]
CAPTION_VIDEO = [i // 2 for i in range(12)]


def tiny_encoder(clip):
    """An Encoder over ``clip`` (32 px, mean/std 0.5) with a word-hash tokenizer: word ids 1..98,
    end-of-text 99 (open_clip pools the text at the largest id), context 16."""
    def tokenize(captions):
        rows = [[1 + sum(map(ord, w)) % 98 for w in c.split()][:15] + [99] for c in captions]
        return torch.tensor([r + [0] * (16 - len(r)) for r in rows])

    return Encoder(clip, "tiny-clip", "tiny", 32, 32, torch.device("cpu"), (0.5,) * 3, (0.5,) * 3, tokenize)


def raw_split():
    return RawSplit(lambda i: (FRAMES[i], np.ones(2, dtype=bool)), SENTENCES, CAPTION_VIDEO, 6)


def recipe_config(precision, **changes):
    """CLIP4Clip's end-to-end recipe (--freeze_layer_num 0, --expand_msrvtt_sentences, BertAdam,
    learned logit scale, duplicate captions kept), at a tiny size and a larger lr so that fp32 moves."""
    recipe = dict(mode="end_to_end", sampling="caption", freeze_layer_num=0, optimizer="bert_adam", precision=precision,
                  learned_logit_scale=True, false_negatives="keep", lr=1e-3, coef_lr=0.1, epochs=2, batch_size=4,
                  seed=3, select="last")
    return TrainConfig(**recipe | changes)


@pytest.mark.parametrize("precision", ["fp32", "fp16_weights"])
def test_train_end_to_end_is_clip4clips_training_loop(precision):
    clip = tiny_clip()
    with torch.no_grad():
        clip.logit_scale.fill_(LOGIT_SCALE_MAX + 0.5)  # above the clamp: the loss must use it, then clamp it
    encoder = tiny_encoder(clip)
    config = recipe_config(precision)
    result = train(config, raw_split(), encoder=encoder)

    # the plain loop: the same weights, and the trainer's data order (one randperm of the
    # captions per epoch from a generator seeded with config.seed, batches in order, drop_last)
    reference = Wrapped(prepare_precision(copy.deepcopy(clip), precision), head=False)
    apply_clip4clip_freeze(reference.clip, 0)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    g, b, data = torch.Generator().manual_seed(config.seed), config.batch_size, []
    for _ in range(config.epochs):
        order = torch.randperm(len(SENTENCES), generator=g)
        for k in range(len(SENTENCES) // b):
            captions = order[k * b:(k + 1) * b].tolist()
            pixels = torch.stack([encoder.preprocess_frames(FRAMES[CAPTION_VIDEO[c]]) for c in captions])
            data.append((pixels, encoder.tokenize([SENTENCES[c] for c in captions])))
    clip4clip_reference_loop(reference, data, precision, config.lr, config.coef_lr, t_total=len(data))

    assert result.history[0]["steps"] == 3 and len(data) == 6
    got, want = dict(result.model.named_parameters()), dict(reference.named_parameters())
    assert got.keys() == want.keys()  # the towers alone: no adapter beside CLIP4Clip's meanP
    assert LOGIT_SCALE_MAX - 0.01 < got["clip.logit_scale"].item() <= LOGIT_SCALE_MAX  # clamped after each step
    moved = 0
    for name, p in got.items():
        torch.testing.assert_close(p.detach(), want[name].detach(), msg=name)  # float32 / float16 rounding
        if precision == "fp16_weights":
            assert torch.equal(p.detach() != before[name], want[name].detach() != before[name]), name
        moved += int((p.detach() != before[name]).sum())
    assert moved > 0 and torch.equal(got["clip.visual.conv1.weight"], before["clip.visual.conv1.weight"])  # frozen


def test_amp_bf16_trains_and_featurizes_under_bfloat16_autocast(monkeypatch):
    import vidret_lib.train as train_module

    autocast = []  # per step: was the loss computed under CPU autocast to bfloat16?
    real = train_module.compute_loss
    monkeypatch.setattr(train_module, "compute_loss", lambda *args: autocast.append(
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16) or real(*args))
    result = train(recipe_config("amp_bf16", epochs=1), raw_split(), encoder=tiny_encoder(tiny_clip()))
    assert autocast == [True] * 3 and result.model.precision == "amp_bf16"
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}  # autocast keeps float32 weights
    clip = result.model.clip
    features = featurize(result.model, raw_split())
    tokens = result.model.raw_encoder.tokenize(SENTENCES)
    with torch.no_grad(), precision_context("amp_bf16", "cpu"):
        expected = clip.encode_text(tokens).float()
    assert torch.equal(features.text, expected)
    with torch.no_grad():
        assert not torch.equal(features.text, clip.encode_text(tokens))  # float32 towers differ from bf16
