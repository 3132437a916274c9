"""InCTRL's model: the in-context residual forward from encoded tensors to scores and map.

Port of the official implementation (github.com/mala-lab/InCTRL, CVPR 2024, "Toward Generalist
Anomaly Detection via In-context Residual Learning with Few-shot Sample Prompts"). A query is
compared with k normal images ("sample prompts") at three levels:

* **patch residual** (paper Eq. 2-3): every query patch token against every normal patch token of
  the same ViT layer; the residual of a patch is its smallest ``0.5 * (1 - cos)``; the map ``M`` is
  the mean over the three layers of these per-layer minima;
* **image residual** (Eq. 4): normal prototype minus query of the adapted CLIP image embeddings,
  scored by ``diff_head_ref``;
* **text prior** (Eq. 5): CLIP zero-shot probability of "abnormal" from WinCLIP-style prompts.

The holistic map ``M + text_score + image_residual_score`` goes through ``diff_head``; the final
score is the mean of that head's output and ``max(M)`` (Eq. 6-7). ``InCTRLModel`` is that whole
forward; inference (``detector.py``) and training (``train.py``) both call it.

Module and parameter names follow the official ``open_clip/model.py`` (``adapter.fc.0``,
``diff_head.projection1``, ``diff_head_ref.bn2``, ...) so the released checkpoints load as they
are. Differences from the official code, all deliberate: each query is scored on its own (the
official forward mixes queries, layers and shots when the batch is larger than 1); text features
are computed once per class name instead of once per query; the patch residual is one batched
matrix product; unused computations (attention maps) are skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...backbone import Backbone
from ...feature_cache import cache_dir, entry_key, load_or_compute
from .prompts import prompt_texts

#: Official 0-based vision blocks whose outputs give the patch tokens (``out_layers=[7, 9, 11]``
#: with a 1-based counter) on the official 12-block model.
OFFICIAL_BLOCKS = (6, 8, 10)
OFFICIAL_NUM_BLOCKS = 12
#: Temperature of the text prior, hard-coded in the official code (no ``logit_scale``).
TEXT_TEMPERATURE = 100.0
#: Changes when the way text features are computed changes (invalidates the disk cache).
TEXT_FEATURES_VERSION = "end-token-cut"


def encode_texts(backbone: Backbone, texts: Sequence[str]) -> torch.Tensor:
    """CLIP text embeddings ``(T, E)``, not normalised (EOT pooling -> ``ln_final`` -> projection),
    computed only up to the batch's last end token (``Backbone.encode_text_to_end``: equal
    to the full 77-token pass, the attention being causal)."""
    return backbone.encode_text_to_end(backbone.tokenize(texts))


@functools.lru_cache(maxsize=64)
def text_prior_features(backbone: Backbone, class_name: str) -> torch.Tensor:
    """The two text prototypes ``(2, E)`` (row 0 normal, row 1 abnormal), L2-normalised.

    Per side: normalise each prompt embedding, average, normalise again. Cached per
    (backbone, class name) in memory, and on disk (``detector.feature_cache``) keyed by the
    text tower's weights and the prompts: the features depend on nothing else.
    """
    normal, abnormal = prompt_texts(class_name)

    def compute() -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for texts in (normal, abnormal):
                features = encode_texts(backbone, texts).float()
                features = features / features.norm(dim=-1, keepdim=True)
                mean = features.mean(dim=0)
                rows.append(mean / mean.norm())
        return torch.stack(rows).detach()

    key = entry_key(backbone, "inctrl-text-prior-v1", [TEXT_FEATURES_VERSION, *normal, "|", *abnormal])
    return load_or_compute(cache_dir(), key, compute).to(backbone.device)


def text_prior_score(image_embeddings: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``text_score`` ``(B,)``: ``softmax(100 * [cos(img, t_normal), cos(img, t_abnormal)])[1]``.

    Args:
        image_embeddings: ``(B, E)`` unnormalised CLIP image embeddings.
        text_features: ``(2, E)`` from ``text_prior_features``.
    """
    image = image_embeddings / image_embeddings.norm(dim=-1, keepdim=True)
    logits = TEXT_TEMPERATURE * image @ text_features.to(image).T
    return logits.softmax(dim=-1)[:, 1]


# -- patch residual ---------------------------------------------------------------------------


def l2_normalize(tokens: torch.Tensor) -> torch.Tensor:
    """Plain L2 normalisation along the last axis (``x / ||x||``, as the official code)."""
    return tokens / tokens.norm(dim=-1, keepdim=True)


def patch_residual(query_tokens: torch.Tensor, normal_tokens: torch.Tensor) -> torch.Tensor:
    """Per-layer patch residuals ``d(l, p) = min_n 0.5 * (1 - cos(q_lp, n_ln))`` (paper Eq. 2-3).

    The minimum runs over all normal patches of the same layer, pooled across shots and
    positions.

    Args:
        query_tokens: ``(B, L, N, D)`` L2-normalised query patch tokens (L layers, N patches).
        normal_tokens: ``(L, M, D)`` L2-normalised normal patch tokens shared by every query
            (M = k * N; one batched matrix product covers every layer), or ``(B, L, M, D)``
            with each query's own normals (training).

    Returns:
        ``(B, L, N)`` residuals in [0, 1]. The map ``M`` is its mean over ``L``.
    """
    if normal_tokens.dim() == 4:
        similarity = torch.matmul(query_tokens, normal_tokens.transpose(-1, -2))  # (B, L, N, M)
        return (0.5 * (1.0 - similarity)).min(dim=-1).values
    batch, layers, patches, width = query_tokens.shape
    queries = query_tokens.permute(1, 0, 2, 3).reshape(layers, batch * patches, width)
    similarity = torch.bmm(queries, normal_tokens.transpose(1, 2))  # (L, B*N, M)
    residual = (0.5 * (1.0 - similarity)).min(dim=-1).values  # (L, B*N)
    return residual.reshape(layers, batch, patches).permute(1, 0, 2)


def patch_residual_map(query_tokens: torch.Tensor, normal_tokens: torch.Tensor) -> torch.Tensor:
    """``M`` ``(B, N)``: the mean over layers of ``patch_residual`` (a mean of minima)."""
    return patch_residual(query_tokens, normal_tokens).mean(dim=1)


def pool_normals(tokens: torch.Tensor) -> torch.Tensor:
    """``(..., k, L, N, D) -> (..., L, k*N, D)``: the normals' patches of each layer pooled,
    shot-major (the order only matters for ties, which the minimum ignores)."""
    *lead, shots, layers, patches, width = tokens.shape
    moved = tokens.movedim(-3, -4)  # (..., L, k, N, D)
    return moved.reshape(*lead, layers, shots * patches, width)


# -- learned modules (official names) ---------------------------------------------------------


class Adapter(nn.Module):
    """Official ``Adapter(c_in, reduction)``: two bias-free linear layers, each followed by ReLU.

    ``fc.0``: ``Linear(c_in, c_in // reduction)``, ``fc.2``: ``Linear(c_in // reduction, c_in)``.
    The output replaces the input (no residual mix) and is non-negative. ``(..., c_in) -> (..., c_in)``.
    """

    def __init__(self, c_in: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = c_in // reduction
        self.fc = nn.Sequential(
            nn.Linear(c_in, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, c_in, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class TransformerBasicHead(nn.Module):
    """Official scoring head: ``(B, dim_in) -> (B, num_classes)`` probabilities.

    ``projection1 -> ReLU -> bn2 -> projection2 -> ReLU -> bn3 -> projection3 -> sigmoid``
    (batch norm after the ReLU). ``bn1`` exists in the official module, and therefore in its
    checkpoints, but is never applied.
    """

    def __init__(self, dim_in: int, num_classes: int = 1) -> None:
        super().__init__()
        self.projection1 = nn.Linear(dim_in, 128, bias=True)
        self.projection2 = nn.Linear(128, 64, bias=True)
        self.projection3 = nn.Linear(64, num_classes, bias=True)
        self.bn1 = nn.BatchNorm1d(dim_in)
        self.bn2 = nn.BatchNorm1d(128)
        self.bn3 = nn.BatchNorm1d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(F.relu(self.projection1(x)))
        x = self.bn3(F.relu(self.projection2(x)))
        return torch.sigmoid(self.projection3(x))


@dataclass
class InCTRLScores:
    """Per-query outputs of ``InCTRLModel`` (all ``(B,)`` except the ``(B, N)`` maps).

    ``image_residual_score`` and ``holistic_score`` are ``None`` without trained heads.
    """

    score: torch.Tensor
    text_score: torch.Tensor
    max_patch_residual: torch.Tensor
    patch_map: torch.Tensor
    holistic_map: torch.Tensor
    image_residual_score: torch.Tensor | None = None
    holistic_score: torch.Tensor | None = None


class InCTRLHeads(nn.Module):
    """The learned parts of InCTRL: ``adapter``, ``diff_head`` and ``diff_head_ref``.

    Their ``state_dict`` has exactly the 44 head keys of an official checkpoint. Sizes come
    from the backbone: ``embed_dim`` (640 on ViT-B-16-plus-240) and ``num_patches`` (225).
    """

    def __init__(self, embed_dim: int, num_patches: int, reduction: int = 4) -> None:
        super().__init__()
        self.adapter = Adapter(embed_dim, reduction)
        self.diff_head = TransformerBasicHead(num_patches, 1)
        self.diff_head_ref = TransformerBasicHead(embed_dim, 1)

    def image_residual_score(self, query_embeddings: torch.Tensor, normal_embeddings: torch.Tensor) -> torch.Tensor:
        """``diff_head_ref(mean_k adapter(normal_k) - adapter(query))`` ``(B,)`` (Eq. 4).

        Args:
            query_embeddings: ``(B, E)`` unnormalised CLIP image embeddings.
            normal_embeddings: ``(B, k, E)`` the normals of each query.
        """
        prototype = self.adapter(normal_embeddings).mean(dim=1)  # (B, E)
        residual = prototype - self.adapter(query_embeddings)  # normal prototype minus query
        return self.diff_head_ref(residual).squeeze(1)

    def forward(
        self,
        query_embeddings: torch.Tensor,
        normal_embeddings: torch.Tensor,
        patch_map: torch.Tensor,
        text_score: torch.Tensor,
    ) -> InCTRLScores:
        """Official scoring of a batch of independent queries.

        Args:
            query_embeddings: ``(B, E)``.
            normal_embeddings: ``(B, k, E)``.
            patch_map: ``(B, N)`` patch residual map ``M``.
            text_score: ``(B,)``.

        Returns:
            ``holistic_map = M + text_score + image_residual_score`` ``(B, N)``,
            ``holistic_score = diff_head(holistic_map)``, ``max_patch_residual = max(M)``
            and ``score = (holistic_score + max_patch_residual) / 2``.
        """
        image_residual = self.image_residual_score(query_embeddings, normal_embeddings)
        holistic_map = text_score[:, None] + image_residual[:, None] + patch_map
        holistic_score = self.diff_head(holistic_map).squeeze(1)
        max_patch = patch_map.max(dim=1).values
        return InCTRLScores(
            score=(holistic_score + max_patch) / 2,
            text_score=text_score,
            max_patch_residual=max_patch,
            patch_map=patch_map,
            holistic_map=holistic_map,
            image_residual_score=image_residual,
            holistic_score=holistic_score,
        )


def training_free_score(text_score: torch.Tensor, max_patch_residual: torch.Tensor) -> torch.Tensor:
    """Score without trained heads (docs/api.md §13): ``(text_score + max(M)) / 2``."""
    return (text_score + max_patch_residual) / 2


class InCTRLModel(nn.Module):
    """The whole InCTRL forward on encoded tensors; its only parameters are the heads.

    Args:
        heads: the learned parts (the 44 checkpoint keys).
        use_heads: score with the heads (trained) or with ``training_free_score``.
    """

    def __init__(self, heads: InCTRLHeads, use_heads: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.use_heads = bool(use_heads)

    def forward(
        self,
        query_tokens: torch.Tensor,
        query_embeddings: torch.Tensor,
        normal_tokens: torch.Tensor,
        normal_embeddings: torch.Tensor,
        text_score: torch.Tensor,
    ) -> InCTRLScores:
        """Score a batch of independent queries against their normals.

        Args:
            query_tokens: ``(B, L, N, D)`` from ``encode_images``.
            query_embeddings: ``(B, E)``.
            normal_tokens: ``(L, k*N, D)`` shared by every query (``pool_normals``) or
                ``(B, L, k*N, D)`` per query.
            normal_embeddings: ``(B, k, E)``.
            text_score: ``(B,)`` from ``text_prior_score``.
        """
        patch_map = patch_residual_map(query_tokens, normal_tokens)
        if self.use_heads:
            return self.heads(query_embeddings, normal_embeddings, patch_map, text_score)
        max_patch = patch_map.max(dim=1).values
        return InCTRLScores(
            score=training_free_score(text_score, max_patch),
            text_score=text_score,
            max_patch_residual=max_patch,
            patch_map=patch_map,
            # Without trained heads there is no image residual: the map is M + text_score.
            holistic_map=patch_map + text_score[:, None],
        )


# -- encoding ---------------------------------------------------------------------------------


def block_indices(backbone: Backbone) -> tuple[int, ...]:
    """The official blocks 6, 8, 10 (0-based) mapped onto ``backbone``'s depth."""
    return tuple(backbone.map_block_index(i, OFFICIAL_NUM_BLOCKS) for i in OFFICIAL_BLOCKS)


def encode_images(backbone: Backbone, images: torch.Tensor, blocks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One vision forward: patch tokens of ``blocks`` and the image embedding.

    Args:
        images: ``(B, 3, S, S)`` normalised input.

    Returns:
        ``(tokens (B, L, N, D) L2-normalised, embeddings (B, E) unnormalised)`` with L =
        len(blocks), N patches in row-major order, D the vision width.
    """
    out = backbone.intermediate_tokens(images, blocks)
    tokens = torch.stack([t.float() for t in out["patch_tokens"]], dim=1)
    return l2_normalize(tokens), out["image_features"].float()


class InCTRLImagePath(nn.Module):
    """InCTRL's frozen image path as a module with a fixed signature (for the runtime).

    ``forward(images (B, 3, S, S)) -> (tokens (B, L, N, D) L2-normalised, embeddings (B, E))``
    is exactly ``encode_images(backbone, images, blocks)``. The vision tower is registered
    (its weights are the module's parameters, for export and the weights fingerprint); the
    backbone's state is never modified.
    """

    def __init__(self, backbone: Backbone, blocks: Sequence[int]) -> None:
        super().__init__()
        self.visual = backbone.visual
        self.__dict__["backbone"] = backbone
        self.blocks = tuple(int(b) for b in blocks)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_images(self.backbone, images, self.blocks)
