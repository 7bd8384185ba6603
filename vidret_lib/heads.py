"""Similarity heads on per-frame and per-caption features: meanP, seqTransf, MBVR title fusion, EMCL.

The pipeline of :class:`RetrievalModel` (shapes: N captions, V videos, T frames, D dims)::

    text (N, D)    -> text adapter              -> t (N, D)
    video (V, T, D)-> video adapter -> temporal -> frames (V, T, D)
                      meanP pooling: normalise each frame, masked mean, normalise  -> v (V, D)
    [MBVR]  title (V, D) -> title adapter, normalise -> F_t;  F_m = fusion(F_v = v, F_t)
    [EMCL]  v = masked_mean(frames) (un-normalised, EMCL-Net); per block of N texts x V videos,
            emcl_rows="pairs":   Y = EMCL([v; t]) with each video row counted N times (EMCL-Net's N*V + N rows)
            emcl_rows="stacked": Y = EMCL([v; t]) (V + N rows)
            score[i, j] = cos(Y_t[i], Y_v[j])
    similarity = cos(t, video embedding)                                     (N, V)

Every L2 normalisation is :func:`vidret_lib.losses.safe_normalize`: equal to ``F.normalize``
on non-zero vectors, and a zero vector (a video that failed to decode, a fully masked
pooling, a missing title) stays zero and passes no gradient, instead of ``F.normalize``'s
backward gain of ``1 / eps = 1e12``, which sent MBVR training to NaN (issue 10 item 2).

The adapters are ``nn.Linear(D, D)`` initialised to the identity: in frozen-feature mode
they are the trainable stand-in for the CLIP weights that the papers train at lr 1e-7
(with the default offline encoder the joint-space projections are untrained, so the
adapters matter). "meanP" and "seqTransf" follow CLIP4Clip (``ArrowLuo/CLIP4Clip``
``modules/modeling.py`` ``_loose_similarity``); seqTransf's 4 blocks and frame position
embeddings are copied from CLIP's text transformer when the encoder provides compatible
ones (:func:`clip_text_init`), else randomly initialised as CLIP4Clip's ``init_weights``
(normal 0.02) -- ``SeqTransf.init_source`` says which.
"""
from __future__ import annotations

import copy
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .emcl import EMCL
from .losses import safe_normalize

Tensor = torch.Tensor

__all__ = [
    "HEADS",
    "MODALITIES",
    "EMCL_ROWS",
    "identity_adapter",
    "masked_mean",
    "mean_pool",
    "MeanP",
    "SeqTransf",
    "SeqInit",
    "clip_text_init",
    "TitleFusion",
    "r_vt",
    "RetrievalModel",
]

HEADS = ("meanP", "seqTransf")
MODALITIES = ("fused", "vision", "title")
EMCL_ROWS = ("pairs", "stacked")  # what RetrievalModel stacks into EMCL's X (see RetrievalModel.emcl_input)
EMCL_BATCH_ROWS = 1024  # EMCL input rows per batch of blocks in RetrievalModel.similarity: bounds its memory;
# measured here (1 thread, D = 512) 512-2048 rows are fastest (the batch stays in cache), 8192 ~30% slower
MASK_BIAS = -1e6  # CLIP4Clip's additive attention mask for padded frames
SEQ_LAYERNORM_EPS = 1e-12  # CLIP4Clip modules/module_cross.py LayerNorm (TF style)


def identity_adapter(dim: int) -> nn.Linear:
    """A ``Linear(dim, dim)`` initialised to the identity (weight I, bias 0).

    Example:
        >>> x = torch.randn(3, 4); torch.equal(identity_adapter(4)(x), x)
        True
    """
    layer = nn.Linear(dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
        layer.bias.zero_()
    return layer


def masked_mean(frames: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid frames: ``frames`` (V, T, D), ``mask`` (V, T) bool -> (V, D).

    A video with no valid frame gives a zero vector (CLIP4Clip sets the count to 1).

    Example:
        >>> masked_mean(torch.tensor([[[1.0], [3.0], [9.0]]]), torch.tensor([[True, True, False]]))
        tensor([[2.]])
    """
    w = mask.to(frames.dtype).unsqueeze(-1)  # (V, T, 1)
    return (frames * w).sum(1) / w.sum(1).clamp(min=1.0)


def mean_pool(frames: Tensor, mask: Tensor) -> Tensor:
    """CLIP4Clip's meanP: L2-normalise each frame, masked mean, L2-normalise -> (V, D).

    Padded frames and a video with no valid frame stay zero (:func:`safe_normalize`), with no
    gradient.

    Example:
        >>> mean_pool(torch.tensor([[[2.0, 0.0], [0.0, 5.0]]]), torch.ones(1, 2, dtype=torch.bool))
        tensor([[0.7071, 0.7071]])
    """
    return safe_normalize(masked_mean(safe_normalize(frames), mask))


class MeanP(nn.Module):
    """Parameter-free temporal head: frames pass unchanged (pooling is :func:`mean_pool`)."""

    init_source = "parameter-free"

    def forward(self, frames: Tensor, mask: Tensor) -> Tensor:
        return frames


class SeqInit(NamedTuple):
    """Blocks and frame position embeddings to initialise :class:`SeqTransf` from CLIP."""

    blocks: list[nn.Module]
    positional_embedding: Tensor | None
    source: str


def clip_text_init(encoder, dim: int, layers: int = 4) -> SeqInit | None:
    """CLIP4Clip's initialisation of seqTransf from an encoder, or None if it cannot apply.

    Takes the first ``layers`` blocks of ``encoder.text_transformer_blocks()`` and the
    text positional embedding (``encoder.model.positional_embedding``) when they are
    open_clip ``ResidualAttentionBlock``s of width ``dim`` (true for CLIP ViT-B/32:
    text width 512 = embed dim 512). The offline default's HF text tower does not
    qualify, so its seqTransf is randomly initialised.
    """
    from open_clip.transformer import ResidualAttentionBlock  # imported here: open_clip loads slowly

    blocks = encoder.text_transformer_blocks(layers)
    if blocks is None or len(blocks) < layers:
        return None
    blocks = list(blocks)[:layers]
    if not all(isinstance(b, ResidualAttentionBlock) and b.ln_1.normalized_shape[0] == dim for b in blocks):
        return None
    pos = getattr(encoder.model, "positional_embedding", None)
    if pos is not None and pos.shape[-1] != dim:
        pos = None
    return SeqInit(blocks, None if pos is None else pos.detach(), f"{encoder.name} text transformer")


class SeqTransf(nn.Module):
    """CLIP4Clip's seqTransf: ``frames + Transformer(frames + pos)``, padded frames masked as keys.

    ``frames`` (V, T, D) -> (V, T, D). ``layers`` residual attention blocks of width D
    (D // 64 heads, CLIP's rule), learned frame position embeddings for up to
    ``max_positions`` frames (77, CLIP's context length), additive key mask -1e6.
    """

    def __init__(self, dim: int, layers: int = 4, max_positions: int = 77, init: SeqInit | None = None) -> None:
        super().__init__()
        # imported here: open_clip loads slowly
        from open_clip.transformer import LayerNorm, QuickGELU, ResidualAttentionBlock

        self.frame_position_embeddings = nn.Embedding(max_positions, dim)
        if init is None:
            heads = max(1, dim // 64)
            if dim % heads:
                raise ValueError(f"seqTransf needs a width divisible by its {heads} heads; got D={dim}")
            # CLIP4Clip modules/module_cross.py: QuickGELU and a TF-style LayerNorm with eps 1e-12
            norm = functools.partial(LayerNorm, eps=SEQ_LAYERNORM_EPS)
            self.blocks = nn.ModuleList(
                ResidualAttentionBlock(dim, heads, act_layer=QuickGELU, norm_layer=norm, batch_first=True)
                for _ in range(layers)
            )
            self.apply(_clip4clip_init)
            self.init_source = "random (normal 0.02, CLIP4Clip init_weights)"
        else:
            # module_cross.py's blocks with CLIP's text weights: the activation comes with the encoder
            # (QuickGELU for OpenAI weights, see vidret_lib.encoders), the LayerNorm eps is module_cross's
            self.blocks = nn.ModuleList(copy.deepcopy(b) for b in init.blocks[:layers])
            for norm_layer in (m for m in self.blocks.modules() if isinstance(m, nn.LayerNorm)):
                norm_layer.eps = SEQ_LAYERNORM_EPS
            nn.init.normal_(self.frame_position_embeddings.weight, std=0.02)
            if init.positional_embedding is not None:
                n = min(max_positions, init.positional_embedding.shape[0])
                with torch.no_grad():
                    self.frame_position_embeddings.weight[:n].copy_(init.positional_embedding[:n])
            self.init_source = f"first {layers} blocks of {init.source}"

    def forward(self, frames: Tensor, mask: Tensor) -> Tensor:
        v, t, _ = frames.shape
        if t > self.frame_position_embeddings.num_embeddings:
            raise ValueError(f"seqTransf holds {self.frame_position_embeddings.num_embeddings} positions; got T={t}")
        x = frames + self.frame_position_embeddings.weight[:t]  # (V, T, D) + (T, D)
        heads = self.blocks[0].attn.num_heads
        bias = (~mask).to(frames.dtype) * MASK_BIAS  # (V, T): -1e6 on padded keys
        attn_mask = bias[:, None, :].expand(v, t, t).repeat_interleave(heads, dim=0)  # (V*heads, T, T)
        batch_first = self.blocks[0].attn.batch_first
        x = x if batch_first else x.transpose(0, 1)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        x = x if batch_first else x.transpose(0, 1)
        return x + frames  # residual to the input frames


def _clip4clip_init(module: nn.Module) -> None:
    """CLIP4Clip ``init_weights``: Linear/Embedding weights N(0, 0.02), Linear biases 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class TitleFusion(nn.Module):
    """MBVR fusion of a video's text side (title) and its vision: ``F_m`` (B, D).

    ``F_m = normalise(F_v + F_t + W [F_v; F_t])`` with ``F_v`` (B, D) the normalised vision
    embedding, ``F_t`` (B, D) the normalised title embedding (zero where the title is
    absent) and ``W`` a ``Linear(2D, D)`` initialised to zero: training starts from the
    normalised sum and learns how much of each modality to keep. MBVR's own fusion is
    not public (papers.md §(c)); this is our choice.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mix = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, vision: Tensor, title: Tensor) -> Tensor:
        return safe_normalize(vision + title + self.mix(torch.cat([vision, title], dim=-1)))


def r_vt(vision: Tensor, title: Tensor, fused: Tensor) -> Tensor:
    """MBVR's diagnostic ``R_vt = cos(F_v, F_m) / cos(F_t, F_m)`` per video -> (V,).

    Above 1: the fused embedding follows vision more than the title text.

    Example:
        >>> v, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> r_vt(v, t, F.normalize(v + t, dim=-1))
        tensor([1.0000])
    """
    cos_v = F.cosine_similarity(vision, fused, dim=-1)
    cos_t = F.cosine_similarity(title, fused, dim=-1)
    return cos_v / cos_t


class RetrievalModel(nn.Module):
    """Text adapter + video head (+ MBVR fusion) (+ EMCL) (+ CLIP towers in end-to-end mode).

    ``similarity(text, video, mask) -> (N_text, N_video)`` cosine scores. With EMCL the
    scores of each ``emcl_block x emcl_block`` block of (texts, videos) are computed by
    :meth:`scores` on that block alone, as EMCL-Net evaluates (so a pair's score depends on
    its block, papers.md pitfall 4); training calls :meth:`scores` on the whole batch, so
    both feed EMCL the same kind of rows, chosen by ``emcl_rows`` (:meth:`emcl_input`):

    - ``"pairs"`` (default, EMCL-Net's training layer): one video row per (text, video)
      pair, then the texts -- ``N * V + N`` rows (1,056 for a 32 x 32 block, 16,512 for a
      batch of 128), as ``get_logits`` in ``jpthu17/EMCL``
      ``video_retrieval/EMCL-Net/tvr/models/modeling.py``. There the pair rows are
      text-conditioned poolings of the frames; our pooling is not, so the pair row
      ``(i, j)`` is video ``j``'s pooled vector, the same for every text ``i``. EM sees the
      repeats, as EMCL-Net's would with a pooling that ignores the text: they are fed as
      ``[videos; texts]`` with each video row's multiplicity N (``EMCL(x, weights)``, exactly
      EM on the N * V + N rows), and all N copies of video ``j``'s row come out equal, so
      pair (i, j) is scored on video ``j``'s output row.
    - ``"stacked"``: ``[videos; texts]``, ``V + N`` rows (64 for a 32 x 32 block), as EMCL's
      inference-module variant on CLIP2Video does (``video_retrieval/As_an_inference_module/
      modules/modeling.py`` ``get_similarity_logits``; vidret's pre-issue-11 training layer).

    EMCL as an inference-only module (EMCL-Net's CLIP2Video variant): assign
    ``model.emcl = EMCL(...)`` (and ``model.emcl_rows = "stacked"``) to a trained model
    and call ``model.eval()``. ``clip`` holds the open_clip towers in end-to-end mode
    (parameter names ``clip.*`` train at ``lr * coef_lr``). Raises ``ValueError`` for an
    unknown head or ``emcl_rows``, or ``use_title`` with EMCL.
    """

    def __init__(
        self,
        dim: int,
        head: str = "meanP",
        use_title: bool = False,
        emcl: EMCL | None = None,
        emcl_block: int = 32,
        seq_layers: int = 4,
        seq_init: SeqInit | None = None,
        emcl_rows: str = "pairs",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")
        if emcl_rows not in EMCL_ROWS:
            raise ValueError(f"unknown emcl_rows {emcl_rows!r}; choose one of {EMCL_ROWS}")
        if use_title and emcl is not None:
            raise ValueError("use_title and EMCL together are not supported: EMCL-Net has no title modality")
        self.dim, self.head_name, self.use_title, self.emcl_block = dim, head, use_title, emcl_block
        self.text_adapter = identity_adapter(dim)
        self.video_adapter = identity_adapter(dim)
        self.temporal = MeanP() if head == "meanP" else SeqTransf(dim, seq_layers, init=seq_init)
        self.title_adapter = identity_adapter(dim) if use_title else None
        self.fusion = TitleFusion(dim) if use_title else None
        self.emcl, self.emcl_rows = emcl, emcl_rows
        self.clip: nn.Module | None = None  # open_clip towers, end-to-end mode only

    # ---------------------------------------------------------------- per-modality encoders
    def encode_text(self, text: Tensor) -> Tensor:
        """Adapted caption features (N, D), not normalised."""
        return self.text_adapter(text)

    def encode_video(self, video: Tensor, mask: Tensor) -> Tensor:
        """The video side fed to the similarity (V, D).

        meanP pooling (normalised) of the head's frames; with EMCL, the **un-normalised**
        masked mean of the head's frames (EMCL-Net feeds raw pooled features to EMCL).
        """
        frames = self.temporal(self.video_adapter(video), mask)  # (V, T, D)
        return masked_mean(frames, mask) if self.emcl is not None else mean_pool(frames, mask)

    def encode_title(self, title: Tensor, present: Tensor) -> Tensor:
        """Normalised title embeddings ``F_t`` (V, D), zero rows where no title exists."""
        return safe_normalize(self.title_adapter(title)) * present.to(title.dtype)[:, None]

    def video_embedding(self, vision: Tensor, title: Tensor | None = None, modality: str = "fused") -> Tensor:
        """The normalised embedding a query is compared with: vision ``F_v``, title ``F_t`` or fused ``F_m``."""
        if not self.use_title or modality == "vision":
            return safe_normalize(vision)
        if modality == "title":
            return title
        if modality != "fused":
            raise ValueError(f"unknown modality {modality!r}; choose one of {MODALITIES}")
        return self.fusion(vision, title)

    # ---------------------------------------------------------------- scores
    def emcl_input(self, text: Tensor, vision: Tensor) -> tuple[Tensor, Tensor]:
        """EMCL's input for one batch/block: ``X = [vision; text]`` (V + N, D) and each row's multiplicity (V + N,).

        ``text`` (N, D), ``vision`` (V, D), encoded. ``emcl_rows="pairs"``: each video row
        counts N times (EMCL-Net's one row per (text, video) pair, equal under our
        text-independent pooling), each text row once; ``"stacked"``: every row once.
        Same dtype/device as the inputs. A batch of B blocks, ``text`` (B, N, D) and
        ``vision`` (B, V, D), gives ``X`` (B, V + N, D) and multiplicities (B, V + N).

        Example:
            >>> model = RetrievalModel(2, emcl=EMCL(k=2))
            >>> x, weights = model.emcl_input(torch.zeros(3, 2), torch.ones(4, 2))
            >>> tuple(x.shape), weights.tolist()
            ((7, 2), [3.0, 3.0, 3.0, 3.0, 1.0, 1.0, 1.0])
        """
        n_video, n_text = vision.shape[-2], text.shape[-2]
        x = torch.cat([vision, text], dim=-2)  # ([B,] V + N, D)
        weights = x.new_ones(x.shape[:-1])
        if self.emcl_rows == "pairs":
            weights[..., :n_video] = n_text  # video j stands for its N pair rows (text i, video j)
        return x, weights

    def emcl_embeddings(self, text: Tensor, vision: Tensor) -> tuple[Tensor, Tensor]:
        """EMCL's output rows ``Y`` for one batch/block, not normalised: text (N, D), video (V, D).

        Pair (text i, video j) is scored on ``(text[i], video[j])``: with ``"pairs"`` every
        one of video j's N pair rows has this output. Train mode updates the EMCL bases
        (one call, one update). In eval mode a batch of B independent blocks, ``text``
        (B, N, D) and ``vision`` (B, V, D), gives (B, N, D) and (B, V, D).
        """
        x, weights = self.emcl_input(text, vision)
        y = self.emcl(x, weights)  # ([B,] V + N, D)
        n_video = vision.shape[-2]
        return y[..., n_video:, :], y[..., :n_video, :]

    def scores(self, text: Tensor, vision: Tensor, title: Tensor | None = None, modality: str = "fused") -> Tensor:
        """Cosine scores (N, V) from encoded text (N, D) and encoded video (V, D) of one batch/block.

        With EMCL, cosines of the rows of :meth:`emcl_embeddings` on this batch (EMCL-Net
        ``get_logits``: the normalised text row against the normalised video row of the pair);
        in eval mode also of a batch of B independent blocks, (B, N, D) and (B, V, D) -> (B, N, V).
        """
        if self.emcl is not None:
            text, vision = self.emcl_embeddings(text, vision)
        video = self.video_embedding(vision, title, modality)
        return safe_normalize(text) @ safe_normalize(video).mT

    def similarity(
        self,
        text: Tensor,
        video: Tensor,
        mask: Tensor,
        title: Tensor | None = None,
        title_present: Tensor | None = None,
        modality: str = "fused",
        chunk: int = 1024,
        emcl_batch_rows: int = EMCL_BATCH_ROWS,
    ) -> Tensor:
        """Cosine similarity (N_text, N_video) of caption features and video features.

        Features are encoded in chunks of ``chunk`` rows; call under ``torch.no_grad()``.
        With EMCL each ``emcl_block x emcl_block`` block is scored on its own, as
        :meth:`scores` on that block would (the ragged last row and column of blocks
        included), but blocks of equal shape are run as batches of independent EMs of at most
        ``emcl_batch_rows`` input rows in all (a 32 x 32 block has 64; ``emcl_rows="pairs"``
        weights rows instead of repeating them; a block larger than that is run alone). The
        extra memory is about ``9 * emcl_batch_rows * D`` values besides the (N_text, N_video)
        output (measured peak: 150 MiB at 8192 rows, D = 512, float32; ~25 MiB at the default 1024).
        The scores are those of the per-block loop (bitwise on this CPU at the default profile's sizes).
        Raises ``ValueError`` when EMCL is in train mode (its bases would move once per
        block; call ``model.eval()``), or when a title model gets no titles.
        """
        if self.use_title and (title is None or title_present is None):
            raise ValueError("this model fuses titles: pass title (V, D) and title_present (V,)")
        if self.emcl is not None and self.emcl.training:
            raise ValueError("similarity with EMCL scores blocks in eval mode: call model.eval() first "
                             "(in train mode EMCL would move its bases once per block)")
        if emcl_batch_rows < 1:
            raise ValueError(f"emcl_batch_rows must be >= 1; got {emcl_batch_rows}")
        t = torch.cat([self.encode_text(text[i:i + chunk]) for i in range(0, len(text), chunk)])
        v = torch.cat([self.encode_video(video[i:i + chunk], mask[i:i + chunk]) for i in range(0, len(video), chunk)])
        ft = self.encode_title(title, title_present) if self.use_title else None
        if self.emcl is None:
            return self.scores(t, v, ft, modality)
        return self._emcl_blocks(t, v, emcl_batch_rows)

    def _emcl_blocks(self, text: Tensor, vision: Tensor, batch_rows: int) -> Tensor:
        """EMCL scores (N, V) of encoded ``text`` (N, D) and ``vision`` (V, D), one ``emcl_block`` block at a time.

        Blocks are grouped by shape (full; the ragged last row; the ragged last column; the
        corner) and each group is scored as batches of at most ``batch_rows`` EMCL rows.
        """
        b = self.emcl_block
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (texts, videos) of a block -> block starts
        for i in range(0, len(text), b):
            for j in range(0, len(vision), b):
                groups.setdefault((min(b, len(text) - i), min(b, len(vision) - j)), []).append((i, j))
        sim = text.new_empty(len(text), len(vision))
        for (n_t, n_v), starts in groups.items():
            per_batch = max(1, batch_rows // (n_t + n_v))  # blocks per batch: EMCL sees n_v + n_t rows per block
            for k in range(0, len(starts), per_batch):
                batch = starts[k:k + per_batch]
                scores = self.scores(torch.stack([text[i:i + n_t] for i, _ in batch]),  # (B, n_t, D)
                                     torch.stack([vision[j:j + n_v] for _, j in batch]))  # (B, n_v, D) -> (B, n_t, n_v)
                for (i, j), block in zip(batch, scores):
                    sim[i:i + n_t, j:j + n_v] = block
        return sim

    def modalities(self, video: Tensor, mask: Tensor, title: Tensor, title_present: Tensor) -> dict[str, Tensor]:
        """MBVR's three video embeddings, normalised (V, D) each: ``vision``, ``title``, ``fused``."""
        vision = safe_normalize(self.encode_video(video, mask))
        ft = self.encode_title(title, title_present)
        return {"vision": vision, "title": ft, "fused": self.fusion(vision, ft)}
