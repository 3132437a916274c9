"""FAPrompt's encoders over a shared CLIP: the dual-path V-V vision forward and the text
tower on prompt embeddings with deep prompts (official ``DAPM_replace`` / ``encode_text_learn``).

Both hold the CLIP modules by reference and register nothing of them, so ``train()``, ``to()``
and ``state_dict()`` never touch the shared backbone.
"""

from __future__ import annotations

from typing import Callable, Sequence

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...weights import TINY_TEST
from .config import (
    DEFAULT_BACKBONE,
    OFFICIAL_CONFIG_SIZE,
    OFFICIAL_DEEP_PROMPTS,
    OFFICIAL_IMAGE_SIZE,
    OFFICIAL_TEXT_BLOCKS,
    OFFICIAL_VISION_BLOCKS,
    OFFICIAL_VV_START,
)


# -- sizes derived from the backbone ---------------------------------------------------------


def method_image_size(model_name: str) -> int:
    """Input side of FAPrompt on an open_clip model.

    518 px for ViT-L-14-336 (the official size, a 37 x 37 grid); for any other model the
    same enlargement of its configured size, rounded to whole patches:
    ``round(config_size * 518 / 336 / patch) * patch`` (``tiny-test``: 64 px -> 96 px).
    """
    config = open_clip.get_model_config(model_name)
    if not config:
        raise ValueError(f"unknown backbone {model_name!r}")
    vision = config["vision_cfg"]
    size = vision["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    patch = int(vision["patch_size"])
    if model_name == DEFAULT_BACKBONE:
        return OFFICIAL_IMAGE_SIZE
    return max(1, int(round(size * OFFICIAL_IMAGE_SIZE / OFFICIAL_CONFIG_SIZE / patch))) * patch


def quick_gelu_for(model_name: str) -> bool | None:
    """QuickGELU on the official model and on ``tiny-test`` whatever the weights (random
    weights of the official architecture then run the official activation); ``None`` =
    the backbone's rule (QuickGELU exactly for OpenAI weights)."""
    return True if model_name in (DEFAULT_BACKBONE, TINY_TEST) else None


def vv_start_block(num_blocks: int) -> int:
    """First V-V block: ``round(5 * L / 24)`` (5 on the official 24-block tower)."""
    return int(round(OFFICIAL_VV_START * num_blocks / OFFICIAL_VISION_BLOCKS))


def num_deep_prompts(num_text_blocks: int) -> int:
    """Number of deep text prompts: ``round(8 * L / 12)``, at most ``L - 1`` (8 on 12 blocks).
    Prompt ``j`` (0-based) is written before text block ``j + 1``."""
    count = int(round(OFFICIAL_DEEP_PROMPTS * num_text_blocks / OFFICIAL_TEXT_BLOCKS))
    return max(0, min(count, num_text_blocks - 1))


# -- vision: dual-path V-V forward ---------------------------------------------------------


def dual_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard and value-value self-attention of one CLIP block on the same input.

    Reuses the block's ``attn.in_proj_weight/bias`` (q, k, v) and ``attn.out_proj`` (official
    ``Attention`` built by ``DAPM_replace``; dropout 0).

    Args:
        block: an open_clip ``ResidualAttentionBlock``.
        x: ``(B, N, C)`` already layer-normed tokens (``ln_1`` output).

    Returns:
        ``(standard, value_only)``, each ``(B, N, C)`` after ``out_proj``:
        ``softmax(q k^T / sqrt(d)) v`` and ``softmax(v v^T / sqrt(d)) v`` per head.
    """
    attn = block.attn
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    standard = F.scaled_dot_product_attention(q, k, v)
    value_only = F.scaled_dot_product_attention(v, v, v)

    def merge(heads_out: torch.Tensor) -> torch.Tensor:
        return attn.out_proj(heads_out.transpose(1, 2).reshape(batch, tokens, width))

    return merge(standard), merge(value_only)


class DualPathVisionEncoder(nn.Module):
    """The official DPAM vision forward over an open_clip ``VisionTransformer``.

    The vision tower is held by reference and not registered: ``train()``, ``to()`` and
    ``state_dict()`` of this module never touch the shared backbone, and nothing of it is
    modified.

    Args:
        visual: open_clip ``VisionTransformer`` (already at the method's input size).
        vv_start: first 0-based block with the dual path.
        attention: ``(block, ln_1 output) -> (standard, value_only)``; :func:`dual_attention`
            (fused kernels) by default.
    """

    def __init__(
        self,
        visual: nn.Module,
        vv_start: int,
        attention: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = dual_attention,
    ) -> None:
        super().__init__()
        self.__dict__["visual"] = visual
        self.vv_start = int(vv_start)
        self.attention = attention
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + positional embedding + ``ln_pre``: ``(B, 1 + G*G, C)``."""
        visual = self.visual
        x = visual.conv1(images)
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        return visual.ln_pre(x)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images.

        Args:
            images: ``(B, 3, S, S)`` normalised input.

        Returns:
            ``(global_features (B, E), patch_features (B, 1 + G*G, E))``, not normalised.
            Patch features (CLS first, then the grid row-major) are ``ln_post(x_vv) @ proj``;
            the global feature is ``x_ori[CLS] @ proj`` without ``ln_post`` (official quirk).
        """
        visual = self.visual
        blocks = visual.transformer.resblocks
        x = self.embed(images.to(visual.conv1.weight.dtype))
        for block in blocks[: self.vv_start]:
            x = block(x) if self.batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        x_ori, x_vv = x, x
        for block in blocks[self.vv_start:]:
            standard, value_only = self.attention(block, block.ln_1(x_ori))
            x_vv = x_vv + block.ls_1(value_only)
            x_ori = x_ori + block.ls_1(standard)
            x_ori = x_ori + block.ls_2(block.mlp(block.ln_2(x_ori)))
        patch_features = visual.ln_post(x_vv) @ visual.proj
        global_features = x_ori[:, 0] @ visual.proj
        return global_features, patch_features


# -- text: prompt embeddings through the CLIP text tower -------------------------------------


class PromptTextEncoder(nn.Module):
    """CLIP text tower on prompt embeddings, with deep prompts (official ``encode_text_learn``).

    The CLIP model is held by reference, not registered (see ``DualPathVisionEncoder``).
    Sequences are cut after the last end-of-text position of the batch: attention is causal,
    so the features at the EOT token do not change (``cut_at_end_token=False`` runs all
    context positions, as the official code does; used by the benchmark's reference row).
    """

    def __init__(self, clip_model: nn.Module, cut_at_end_token: bool = True) -> None:
        super().__init__()
        self.__dict__["clip"] = clip_model
        self.cut_at_end_token = bool(cut_at_end_token)
        self.calls = 0

    def forward(
        self,
        embeddings: torch.Tensor,
        eot_positions: torch.Tensor,
        deep_prompts: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Text features of prompt embeddings.

        Args:
            embeddings: ``(P, T, W)`` token embeddings (T <= context length).
            eot_positions: ``(P,)`` index of each prompt's end-of-text token.
            deep_prompts: ``D`` tensors ``(n, W)``; prompt ``j`` replaces token positions
                ``1..n`` of every prompt before text block ``j + 1``, after rounding to fp16
                (official ``.half()``).

        Returns:
            ``(P, E)`` raw (unnormalised) features ``ln_final(x)[EOT] @ text_projection``.
        """
        self.calls += 1
        clip = self.clip
        length = int(eot_positions.max()) + 1 if self.cut_at_end_token else embeddings.shape[1]
        x = embeddings[:, :length]
        x = x + clip.positional_embedding[:length].to(x.dtype)
        mask = clip.attn_mask[:length, :length] if getattr(clip, "attn_mask", None) is not None else None
        deep = list(deep_prompts) if deep_prompts is not None else []
        batch_first = bool(getattr(clip.transformer, "batch_first", True))
        for index, block in enumerate(clip.transformer.resblocks):
            if 1 <= index <= len(deep):
                tokens = deep[index - 1]
                count = tokens.shape[0]
                tokens = tokens.to(torch.float16).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], tokens, x[:, 1 + count:]], dim=1)
            if batch_first:
                x = block(x, attn_mask=mask)
            else:
                x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        x = clip.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_positions.long()]
        projection = clip.text_projection
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
