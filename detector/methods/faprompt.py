"""FAPrompt: fine-grained abnormality prompts for zero-shot anomaly detection.

Port of the official implementation (github.com/mala-lab/FAPrompt, ICCV 2025, "Fine-grained
Abnormality Prompt Learning for Zero-shot Anomaly Detection", built on AnomalyCLIP). No normal
image is needed: a query is compared with one normal prompt and ten learned abnormality prompts.

* **Vision (V-V / DPAM path).** From block ``round(5 * L / 24)`` on (block 5 of ViT-L/14's 24)
  every block runs two paths that start from the same state: the unmodified CLIP path and a
  value-value attention path ``softmax(v v^T / sqrt(d)) v`` fed with ``ln_1`` of the *CLIP path*,
  without MLP. Patch features are ``ln_post(x_vv) @ proj`` of the last block only; the global
  feature is the CLIP path's CLS token ``@ proj`` *without* ``ln_post`` (official quirk).
* **Compound abnormality prompts (CAP).** ``"[5 normal tokens] object."`` and ten
  ``"[5 normal tokens] [2 abnormal tokens] damaged object."``; learned deep tokens, rounded to
  fp16, overwrite token positions 1-4 before text blocks 1..8 (mapped by depth on other models).
  The abnormal class feature is the mean of the ten raw abnormal features.
* **Data-dependent abnormality prior (DAP).** ``patch_meta_net`` maps ten patch features of the
  query to a bias added to every abnormal token; the official code feeds the *first ten patches*
  although it computes a top-k (quirk kept by default, ``prior_patches="topk"`` corrects it).
* **Scoring** (official ``test.py``): pass 1 without, pass 2 with the prior bias;
  ``score = 0.5 * (text_prob + (2 * m1 + m2) / 3)`` where ``text_prob`` uses the pass-2 text
  features and ``m1``/``m2`` are the largest patch probabilities of "abnormal"; the map averages
  both passes and is smoothed with a Gaussian (sigma 10 px at 518 px).

Input size: 518 px on ViT-L/14@336 (37 x 37 grid); on another backbone the same ratio,
``round(config_size * 518 / 336 / patch) * patch`` (96 px on ``tiny-test``). The positional
embedding is resized bilinearly (align_corners False, no antialias), as the official code does.

Without a checkpoint the method runs in a training-free *word prompt* mode: the same templates
with context tokens taken from real word embeddings (``WORD_NORMAL_PHRASE``,
``WORD_ABNORMALITY_PHRASES``), deep prompts and the prior switched off.

Module, parameter and buffer names of ``FAPromptLearner`` follow the official ``FAPrompt.py``
so the released ``{"prompt_learner": state_dict}`` files load strictly.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone import Backbone
from ..base import BackboneChoice, Detector, MethodOutput, PreparedBatch, ProgressCallback
from ..checkpoints import NESTING_KEYS, check_keys, read_header, read_state_dict
from ..errors import CheckpointError
from ..registry import register_method
from ..results import Box, DetectionResult, Explanation, PromptSimilarity
from ..spec import MethodSpec, Option
from ..weights import TINY_TEST

#: Official backbone: open_clip model name, pretrained tag and input side.
DEFAULT_BACKBONE = "ViT-L-14-336"
DEFAULT_WEIGHTS = "openai"
OFFICIAL_IMAGE_SIZE = 518
OFFICIAL_CONFIG_SIZE = 336
#: V-V attention from this 0-based block of the official 24-block vision tower on
#: (``DAPM_replace(DPAM_layer=20)`` replaces the last 19 blocks).
OFFICIAL_VV_START = 5
OFFICIAL_VISION_BLOCKS = 24
#: Deep text prompts: ``depth=9`` gives 8 tensors for text blocks 1..8 of 12.
OFFICIAL_DEEP_PROMPTS = 8
OFFICIAL_TEXT_BLOCKS = 12
#: Tokens per deep prompt (``t_n_ctx``), written at token positions 1..4.
DEEP_PROMPT_TOKENS = 4
#: Learned context tokens: 5 normal ones (all prompts), 2 per abnormal prompt, 10 abnormal prompts.
NORMAL_CONTEXT_TOKENS = 5
ABNORMAL_CONTEXT_TOKENS = 2
NUM_ABNORMAL_PROMPTS = 10
#: Patches fed to the abnormality prior (``k``).
PRIOR_PATCHES = 10
#: Width of the unused ``compound_prompt_projections`` (hard-coded in the official code).
UNUSED_PROJECTION_WIDTH = 896
#: Fixed softmax temperature of every similarity (not CLIP's ``logit_scale``).
TEMPERATURE = 0.07
#: Default Gaussian sigma of ``anomaly_map`` in model-input pixels (official ``--sigma 10``).
DEFAULT_SIGMA = 10.0
#: Prompt templates of the official code; "N" and "A" only reserve token positions.
NORMAL_TEMPLATE = "N N N N N object."
ABNORMAL_TEMPLATE = "N N N N N A A damaged object."
#: Training-free word prompts (api.md, "Training-free modes"). The normal phrase is exactly five
#: tokens; each abnormality phrase is tokenized with the backbone's tokenizer and cut to its
#: first two tokens, or padded with the token of ``WORD_PAD`` when it has only one.
WORD_NORMAL_PHRASE = "a cropped photo of the"
WORD_ABNORMALITY_PHRASES = (
    "scratch",
    "crack",
    "hole",
    "stain",
    "dent",
    "contamination",
    "missing part",
    "bent",
    "broken",
    "discoloration",
)
WORD_PAD = ","
PROMPTS_OPTIONS = ("auto", "learned", "words")
PRIOR_OPTIONS = ("first", "topk")
#: ``"fp32"`` (default, the official numbers) or ``"bf16"`` (opt-in: backbone and prompt state
#: in bfloat16; changes the numbers, and is only faster on CPUs with native bf16 matmuls).
PRECISION_OPTIONS = ("fp32", "bf16")
#: Registered name (the ``method`` field of our checkpoint headers).
METHOD_NAME = "faprompt"


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


# -- prompt learner (official key layout) ---------------------------------------------------


class FAPromptLearner(nn.Module):
    """Learned prompt state; names and shapes follow the official ``FAPrompt`` module.

    Args:
        text_width: width ``W`` of the text tower (768 on ViT-L/14).
        embed_dim: joint embedding size ``E`` (768); the prior takes ``10 * E`` inputs.
        deep_prompts: number of deep prompts (8 on a 12-block text tower).
        context_length: token positions (77).

    Parameters / buffers (official names):
        ``ctx_pos (1, 1, 5, W)``, ``ctx_neg (1, 10, 2, W)``,
        ``token_prefix_pos (1, 1, 1, W)``, ``token_suffix_pos (1, 1, T-6, W)``,
        ``token_prefix_neg (1, 10, 1, W)``, ``token_suffix_neg (1, 10, T-8, W)``,
        ``tokenized_prompts_pos (1, 1, T)`` / ``_neg (1, 10, T)`` int32 (EOT = argmax),
        ``patch_meta_net.linear1 (10E -> 10E//16)``, ReLU, ``.linear2 (-> W)``,
        ``compound_prompts_text.{j} (4, W)``, and the unused
        ``compound_prompt_projections.{j}`` (Linear ``W -> 896``), kept for strict loading.
    """

    def __init__(self, text_width: int, embed_dim: int, deep_prompts: int, context_length: int = 77) -> None:
        super().__init__()
        width = int(text_width)
        self.text_width = width
        self.embed_dim = int(embed_dim)
        prior_in = PRIOR_PATCHES * self.embed_dim
        self.patch_meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(prior_in, prior_in // 16)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("linear2", nn.Linear(prior_in // 16, width)),
                ]
            )
        )
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.zeros(DEEP_PROMPT_TOKENS, width)) for _ in range(deep_prompts)]
        )
        self.compound_prompt_projections = nn.ModuleList(
            [nn.Linear(width, UNUSED_PROJECTION_WIDTH) for _ in range(deep_prompts)]
        )
        self.ctx_pos = nn.Parameter(torch.zeros(1, 1, NORMAL_CONTEXT_TOKENS, width))
        self.ctx_neg = nn.Parameter(torch.zeros(1, NUM_ABNORMAL_PROMPTS, ABNORMAL_CONTEXT_TOKENS, width))
        normal_end = 1 + NORMAL_CONTEXT_TOKENS
        abnormal_end = normal_end + ABNORMAL_CONTEXT_TOKENS
        self.register_buffer("token_prefix_pos", torch.zeros(1, 1, 1, width))
        self.register_buffer("token_suffix_pos", torch.zeros(1, 1, context_length - normal_end, width))
        self.register_buffer("token_prefix_neg", torch.zeros(1, NUM_ABNORMAL_PROMPTS, 1, width))
        self.register_buffer("token_suffix_neg", torch.zeros(1, NUM_ABNORMAL_PROMPTS, context_length - abnormal_end, width))
        self.register_buffer("tokenized_prompts_pos", torch.zeros(1, 1, context_length, dtype=torch.int32))
        self.register_buffer("tokenized_prompts_neg", torch.zeros(1, NUM_ABNORMAL_PROMPTS, context_length, dtype=torch.int32))

    @classmethod
    def for_backbone(cls, backbone: Backbone) -> "FAPromptLearner":
        """Zero-filled learner with the shapes of ``backbone`` (ready for ``load_state_dict``)."""
        return cls(
            backbone.text_width,
            backbone.embed_dim,
            num_deep_prompts(backbone.num_text_blocks),
            int(backbone.model.positional_embedding.shape[0]),
        )

    @torch.no_grad()
    def initialize(self, backbone: Backbone, seed: int = 0) -> "FAPromptLearner":
        """Official initialisation: template buffers from ``token_embedding``, context and
        deep tokens ~ N(0, 0.02), PyTorch's default ``nn.Linear`` init; seeded."""
        self.set_template_buffers(backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            nn.init.normal_(self.ctx_pos, std=0.02)
            nn.init.normal_(self.ctx_neg, std=0.02)
            for tokens in self.compound_prompts_text:
                nn.init.normal_(tokens, std=0.02)
            for module in list(self.patch_meta_net) + list(self.compound_prompt_projections):
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
        return self

    @torch.no_grad()
    def set_template_buffers(self, backbone: Backbone) -> None:
        """Token ids and embeddings of the official templates (the checkpoint stores them too)."""
        normal_ids = backbone.tokenizer([NORMAL_TEMPLATE]).to(torch.int32)
        abnormal_ids = backbone.tokenizer([ABNORMAL_TEMPLATE] * NUM_ABNORMAL_PROMPTS).to(torch.int32)
        embedding = backbone.model.token_embedding
        device = embedding.weight.device
        normal = embedding(normal_ids.long().to(device)).float().unsqueeze(0)
        abnormal = embedding(abnormal_ids.long().to(device)).float().unsqueeze(0)
        normal_end = 1 + NORMAL_CONTEXT_TOKENS
        abnormal_end = normal_end + ABNORMAL_CONTEXT_TOKENS
        self.token_prefix_pos.copy_(normal[:, :, :1])
        self.token_suffix_pos.copy_(normal[:, :, normal_end:])
        self.token_prefix_neg.copy_(abnormal[:, :, :1])
        self.token_suffix_neg.copy_(abnormal[:, :, abnormal_end:])
        self.tokenized_prompts_pos.copy_(normal_ids.unsqueeze(0))
        self.tokenized_prompts_neg.copy_(abnormal_ids.unsqueeze(0))

    @torch.no_grad()
    def set_word_context(self, backbone: Backbone) -> dict[str, Any]:
        """Training-free context: ``ctx_pos`` from ``WORD_NORMAL_PHRASE`` (five tokens) and each
        ``ctx_neg[j]`` from ``WORD_ABNORMALITY_PHRASES[j]`` (first two tokens; a one-token
        phrase is followed by the token of ``WORD_PAD``). Returns the token ids used."""
        tokenizer = backbone.tokenizer

        def content_ids(text: str) -> list[int]:
            ids = tokenizer([text])[0].tolist()
            end = ids.index(max(ids))  # EOT has the largest id
            return ids[1:end]

        normal_ids = content_ids(WORD_NORMAL_PHRASE)
        if len(normal_ids) != NORMAL_CONTEXT_TOKENS:
            raise ValueError(f"{WORD_NORMAL_PHRASE!r} must be {NORMAL_CONTEXT_TOKENS} tokens, got {len(normal_ids)}")
        pad_ids = content_ids(WORD_PAD)
        abnormal_ids = []
        for phrase in WORD_ABNORMALITY_PHRASES:
            ids = content_ids(phrase)
            while len(ids) < ABNORMAL_CONTEXT_TOKENS:
                ids = ids + pad_ids
            abnormal_ids.append(ids[:ABNORMAL_CONTEXT_TOKENS])
        embedding = backbone.model.token_embedding
        device = embedding.weight.device
        self.ctx_pos.copy_(embedding(torch.tensor(normal_ids, device=device)).view_as(self.ctx_pos))
        self.ctx_neg.copy_(embedding(torch.tensor(abnormal_ids, device=device)).view_as(self.ctx_neg))
        return {"normal": normal_ids, "abnormal": abnormal_ids}

    def eot_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """End-of-text index of the normal prompt ``(1,)`` and of the abnormal prompts ``(10,)``."""
        return (
            self.tokenized_prompts_pos.reshape(-1, self.tokenized_prompts_pos.shape[-1]).argmax(-1),
            self.tokenized_prompts_neg.reshape(-1, self.tokenized_prompts_neg.shape[-1]).argmax(-1),
        )

    def normal_embeddings(self) -> torch.Tensor:
        """``[prefix, ctx_pos, suffix]``: ``(1, T, W)``."""
        prompts = torch.cat([self.token_prefix_pos, self.ctx_pos, self.token_suffix_pos], dim=2)
        return prompts.reshape(-1, prompts.shape[2], prompts.shape[3])

    def abnormal_embeddings(self, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``[prefix, ctx_pos, ctx_neg_j + bias, suffix]`` for the ten prompts: ``(10, T, W)``.

        Args:
            bias: ``(W,)`` or ``(1, W)`` prior output added to every abnormal token, or None.
        """
        ctx_neg = self.ctx_neg if bias is None else self.ctx_neg + bias.reshape(1, 1, 1, -1)
        ctx_pos = self.ctx_pos.expand(-1, ctx_neg.shape[1], -1, -1)
        prompts = torch.cat([self.token_prefix_neg, ctx_pos, ctx_neg, self.token_suffix_neg], dim=2)
        return prompts.reshape(-1, prompts.shape[2], prompts.shape[3])

    def abnormality_bias(self, prior_tokens: torch.Tensor) -> torch.Tensor:
        """Prior network (DAP): ``(B, 10, E)`` normalised patch features -> bias ``(B, W)``."""
        return self.patch_meta_net(prior_tokens.reshape(prior_tokens.shape[0], -1))


# -- scoring (official test.py) ---------------------------------------------------------------


def class_text_features(normal: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
    """``[f_n, mean(f_a)]`` L2-normalised: ``(1, E)`` and ``(10, E)`` raw -> ``(2, E)``."""
    pair = torch.cat([normal.reshape(1, -1), abnormal.mean(dim=0, keepdim=True)], dim=0)
    return pair / pair.norm(dim=-1, keepdim=True)


def class_probabilities(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``softmax(features @ text^T / 0.07)`` over [normal, abnormal].

    Args:
        features: ``(..., N, E)`` normalised features.
        text: ``(2, E)`` or ``(..., 2, E)`` normalised class features.

    Returns:
        ``(..., N, 2)``.
    """
    return (features @ text.transpose(-1, -2) / TEMPERATURE).softmax(dim=-1)


def select_prior_tokens(patch_features: torch.Tensor, pass1: torch.Tensor, mode: str = "first") -> torch.Tensor:
    """Ten patch features for the prior.

    Args:
        patch_features: ``(B, 1 + N, E)`` normalised, CLS first.
        pass1: ``(B, 1 + N, 2)`` pass-1 probabilities.
        mode: ``"first"`` = patches 0..9 (official quirk: the computed top-k is unused);
            ``"topk"`` = the ten patches with the highest pass-1 abnormal probability.

    Returns:
        ``(B, 10, E)``.
    """
    patches = patch_features[:, 1:]
    if mode == "first":
        return patches[:, :PRIOR_PATCHES]
    if mode == "topk":
        index = pass1[:, 1:, 1].topk(PRIOR_PATCHES, dim=1).indices
        return torch.gather(patches, 1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    raise ValueError(f"prior_patches must be one of {PRIOR_OPTIONS}, got {mode!r}")


def combined_map(pass1: torch.Tensor, pass2: torch.Tensor) -> torch.Tensor:
    """``(s1[ab] + 1 - s1[n] + s2[ab] + 1 - s2[n]) / 4`` per patch: ``(..., N, 2)`` -> ``(..., N)``."""
    return (pass1[..., 1] + 1 - pass1[..., 0] + pass2[..., 1] + 1 - pass2[..., 0]) / 4


def image_score(text_prob: torch.Tensor, pass1: torch.Tensor, pass2: torch.Tensor) -> torch.Tensor:
    """``0.5 * (text_prob + (2 * m1 + m2) / 3)`` with ``m = max over patches (CLS excluded)``.

    Args:
        text_prob: ``(B,)``; pass1, pass2: ``(B, 1 + N, 2)``.
    """
    m1 = pass1[:, 1:, 1].max(dim=1).values
    m2 = pass2[:, 1:, 1].max(dim=1).values
    return 0.5 * (text_prob + (2 * m1 + m2) / 3)


@dataclass(frozen=True)
class TextState:
    """Pass-1 text features of one prompt state (computed once).

    Attributes:
        normal: ``(1, E)`` raw normal-prompt feature (independent of the prior).
        abnormal: ``(10, E)`` raw abnormal-prompt features without bias.
        classes: ``(2, E)`` normalised ``[f_n, mean f_a]``.
    """

    normal: torch.Tensor
    abnormal: torch.Tensor
    classes: torch.Tensor


class FAPromptModel(nn.Module):
    """Vision encoder, text encoder and prompt learner together; only the learner has
    parameters of its own.

    Args:
        backbone: shared frozen backbone at the method's input size.
        learner: prompt state.
        use_deep_prompts: write the learner's deep prompts (off in word mode).
        use_prior: run pass 2 with the prior bias (off in word mode: pass 2 = pass 1).
        prior_patches: ``"first"`` (official) or ``"topk"``.
    """

    def __init__(
        self,
        backbone: Backbone,
        learner: FAPromptLearner,
        *,
        use_deep_prompts: bool = True,
        use_prior: bool = True,
        prior_patches: str = "first",
    ) -> None:
        super().__init__()
        self.vision = DualPathVisionEncoder(backbone.visual, vv_start_block(backbone.num_vision_blocks))
        self.text = PromptTextEncoder(backbone.model)
        self.learner = learner
        self.use_deep_prompts = use_deep_prompts
        self.use_prior = use_prior
        if prior_patches not in PRIOR_OPTIONS:
            raise ValueError(f"prior_patches must be one of {PRIOR_OPTIONS}, got {prior_patches!r}")
        self.prior_patches = prior_patches

    def deep_prompts(self) -> list[torch.Tensor] | None:
        return list(self.learner.compound_prompts_text) if self.use_deep_prompts else None

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``(global (B, E), patches (B, 1 + N, E))``."""
        global_features, patch_features = self.vision(images)
        return F.normalize(global_features, dim=-1), F.normalize(patch_features, dim=-1)

    def encode_normal(self) -> torch.Tensor:
        """Raw normal-prompt feature ``(1, E)``."""
        eot_normal, _ = self.learner.eot_positions()
        return self.text(self.learner.normal_embeddings(), eot_normal, self.deep_prompts())

    def encode_abnormal(self, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Raw abnormal-prompt features ``(10, E)``, with the prior ``bias (W,)`` if given."""
        _, eot_abnormal = self.learner.eot_positions()
        return self.text(self.learner.abnormal_embeddings(bias), eot_abnormal, self.deep_prompts())

    def text_state(self) -> TextState:
        """Pass-1 text features (no prior)."""
        normal = self.encode_normal()
        abnormal = self.encode_abnormal()
        return TextState(normal, abnormal, class_text_features(normal, abnormal))

    def second_pass(
        self, patches: torch.Tensor, pass1: torch.Tensor, state: TextState
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prior-dependent text features for each image.

        Args:
            patches: ``(B, 1 + N, E)`` normalised; pass1: ``(B, 1 + N, 2)``; state: pass-1 text.

        Returns:
            ``(classes (B, 2, E), abnormal (B, 10, E) raw, bias (B, W) or zeros)``.
        """
        if not self.use_prior:
            batch = patches.shape[0]
            zeros = patches.new_zeros(batch, self.learner.text_width)
            return state.classes.expand(batch, -1, -1), state.abnormal.expand(batch, -1, -1), zeros
        biases = self.learner.abnormality_bias(select_prior_tokens(patches, pass1, self.prior_patches))
        classes, abnormal = [], []
        for bias in biases:
            features = self.encode_abnormal(bias)
            abnormal.append(features)
            classes.append(class_text_features(state.normal, features))
        return torch.stack(classes), torch.stack(abnormal), biases

    def score_features(
        self, global_features: torch.Tensor, patches: torch.Tensor, state: TextState
    ) -> dict[str, torch.Tensor]:
        """Official two-pass scoring of encoded images (``encode_images`` output).

        Returns a dict with ``score (B,)``, ``text_prob (B,)``, ``text_logits (B, 2)``,
        ``pass1``/``pass2`` ``(B, 1+N, 2)``, ``map (B, N)`` (combined, CLS excluded),
        ``classes2 (B, 2, E)``, ``abnormal2 (B, 10, E)``, ``bias (B, W)``.
        """
        pass1 = class_probabilities(patches, state.classes)
        classes2, abnormal2, bias = self.second_pass(patches, pass1, state)
        pass2 = class_probabilities(patches, classes2)
        text_logits = (global_features.unsqueeze(1) @ classes2.transpose(1, 2)).squeeze(1) / TEMPERATURE
        text_prob = text_logits.softmax(dim=-1)[:, 1]
        return {
            "score": image_score(text_prob, pass1, pass2),
            "text_prob": text_prob,
            "text_logits": text_logits,
            "pass1": pass1,
            "pass2": pass2,
            "map": combined_map(pass1, pass2)[:, 1:],
            "classes2": classes2,
            "abnormal2": abnormal2,
            "bias": bias,
        }

    def score(self, images: torch.Tensor, state: TextState) -> dict[str, torch.Tensor]:
        """``score_features`` of ``encode_images(images)`` (``(B, 3, S, S)``)."""
        return self.score_features(*self.encode_images(images), state)


# -- checkpoints ----------------------------------------------------------------------------


def expected_shapes(learner: FAPromptLearner) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in learner.state_dict().items()}


def load_learner_state(learner: FAPromptLearner, path: str | Path, *, what: str) -> dict[str, Any]:
    """Load an official ``{"prompt_learner": state_dict}`` file or our safetensors output
    strictly into ``learner``; returns the safetensors header (empty for official files).

    Raises ``CheckpointError`` naming missing / unexpected keys and shape mismatches.
    """
    header = read_header(path)
    method = header.get("method")
    if method is not None and method != METHOD_NAME:
        raise CheckpointError(f"{Path(str(path)).name} was written for the method {method!r}, not {METHOD_NAME}")
    state = read_state_dict(path, nested=("prompt_learner",) + NESTING_KEYS)
    check_keys(state, expected_shapes(learner), what=what)
    reference = learner.state_dict()
    converted = {k: v.to(reference[k].dtype) for k, v in state.items()}
    learner.load_state_dict(converted, strict=True)
    return header


# -- the detector ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptEvidence:
    """What ``explain`` reads: the query's V-V patch features ``(N, E)`` and the normalised
    prompt features ``(11, E)`` (row 0 normal, rows 1..10 the pass-2 abnormal prompts)."""

    patch_features: np.ndarray
    prompt_features: np.ndarray


@register_method("FAPrompt")
class FAPromptDetector(Detector):
    """Zero-shot FAPrompt (see the module docstring). ``fit`` is optional and never changes
    scores; normals given to it are only scored as queries for calibration."""

    spec = MethodSpec(
        display_name="FAPrompt",
        default_backbone=DEFAULT_BACKBONE,
        default_weights=DEFAULT_WEIGHTS,
        resize="squash",
        default_sigma=DEFAULT_SIGMA,
        needs_normals=False,
        trained_offline=True,
        training_module="detector.training.faprompt",
        options={
            "prompts": Option("auto", PROMPTS_OPTIONS, help="learned prompts (auto = when a checkpoint is loaded) or word prompts"),
            "prior_patches": Option("first", PRIOR_OPTIONS, help="official first-ten-patches quirk or the corrected top-k"),
            "precision": Option("fp32", PRECISION_OPTIONS, help="fp32 (official numbers) or opt-in bf16"),
        },
    )

    # -- construction hooks ---------------------------------------------------------------
    def _validate(self) -> None:
        if self.options["prompts"] == "learned" and self.checkpoint is None:
            raise ValueError("prompts='learned' needs a checkpoint (FAPrompt prompt-learner file)")

    def _backbone_choice(self, backbone: str | None, backbone_weights: str | None, artefact: Any) -> BackboneChoice:
        """The official backbone at 518 px (or the same enlargement of another model),
        QuickGELU on the official model and on tiny-test whatever the weights."""
        choice = super()._backbone_choice(backbone, backbone_weights, artefact)
        model_name = choice.model_name
        return BackboneChoice(
            model_name,
            choice.weights,
            image_size=method_image_size(model_name),
            precision=self.options["precision"],
            quick_gelu=True if model_name in (DEFAULT_BACKBONE, TINY_TEST) else None,
        )

    def _build(self, artefact: Path | None) -> None:
        visual = self.backbone.visual
        model_name = self.backbone.spec.model_name
        is_vit_clip = hasattr(visual, "transformer") and getattr(visual, "proj", None) is not None
        if not is_vit_clip or not hasattr(self.backbone.model, "token_embedding"):
            raise ValueError(
                f"FAPrompt needs a ViT CLIP with a projected CLS token and a text tower; {model_name} is not one"
            )
        self.precision = self.options["precision"]
        self.prior_patches = self.options["prior_patches"]
        learner = FAPromptLearner.for_backbone(self.backbone)
        self.checkpoint_header: dict[str, Any] = {}
        if artefact is not None:
            self.checkpoint_header = load_learner_state(learner, artefact, what=f"the FAPrompt prompt learner of {model_name}")
        self.learned = artefact is not None and self.options["prompts"] != "words"
        self.word_ids: dict[str, Any] | None = None
        if not self.learned:
            learner = FAPromptLearner.for_backbone(self.backbone)
            learner.set_template_buffers(self.backbone)
            self.word_ids = learner.set_word_context(self.backbone)
        learner.to(self.backbone.device, dtype=self.backbone.dtype).eval().requires_grad_(False)
        self.model = FAPromptModel(
            self.backbone, learner, use_deep_prompts=self.learned, use_prior=self.learned, prior_patches=self.prior_patches
        )
        self._text_state: TextState | None = None
        self._normals: PreparedBatch | None = None
        self._normal_outputs: list[MethodOutput] | None = None

    # -- description ---------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self.learned

    @property
    def mode(self) -> str:
        return "learned" if self.learned else "training-free"

    def _details(self) -> dict[str, Any]:
        return {
            "grid": list(self.grid),
            "prompts": "learned" if self.learned else "words",
            "prior_patches": self.prior_patches,
            "precision": self.precision,
            "vv_start_block": self.model.vision.vv_start,
            "deep_prompts": len(self.model.learner.compound_prompts_text) if self.learned else 0,
            "uses_normal_images": False,
        }

    # -- fit: nothing to learn -------------------------------------------------------------
    def _fit(self, normals: PreparedBatch, progress: ProgressCallback | None) -> None:
        """Keep the normals for calibration only (scored as queries on demand)."""
        self._normals = normals
        self._normal_outputs = None

    def _leave_one_out(self) -> list[MethodOutput] | None:
        """The fitted normals scored as queries, one at a time as ``predict`` does
        (zero-shot: a normal's score never depends on the other normals); ``None`` with
        fewer than 2 normals."""
        normals = self._normals
        if normals is None or len(normals) < 2:
            return None
        if self._normal_outputs is None:
            outputs = []
            for index in range(len(normals)):
                one = normals.select([index])
                outputs.extend(self._score(self._encode(one), one))
            self._normal_outputs = outputs
        return list(self._normal_outputs)

    # -- prediction --------------------------------------------------------------------------
    def text_state(self) -> TextState:
        """Pass-1 text features, computed once per detector (prompt state)."""
        if self._text_state is None:
            with torch.inference_mode():
                self._text_state = self.model.text_state()
        return self._text_state

    def _encode(self, batch: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``(global (B, E), patches (B, 1 + N, E))``."""
        return self.model.encode_images(batch.pixels)

    def _score(self, encoded: tuple[torch.Tensor, torch.Tensor], batch: PreparedBatch) -> list[MethodOutput]:
        state = self.text_state()
        global_features, patches = encoded
        out = self.model.score_features(global_features, patches, state)
        normal_prompt = F.normalize(state.normal, dim=-1)
        results = []
        for i in range(len(batch)):
            prompt_features = torch.cat([normal_prompt, F.normalize(out["abnormal2"][i], dim=-1)])
            extras = {
                "text_prob": float(out["text_prob"][i]),
                "max_patch_prob_pass1": float(out["pass1"][i, 1:, 1].max()),
                "max_patch_prob_pass2": float(out["pass2"][i, 1:, 1].max()),
                "mode": self.mode,
            }
            evidence = PromptEvidence(
                patch_features=patches[i, 1:].float().cpu().numpy().astype(np.float32),
                prompt_features=prompt_features.float().cpu().numpy().astype(np.float32),
            )
            raw_map = out["map"][i].reshape(self.grid).float().cpu().numpy().astype(np.float32)
            results.append(MethodOutput(float(out["score"][i]), raw_map, extras, evidence))
        return results

    # -- inspection ----------------------------------------------------------------------
    def prompt_label(self, index: int) -> str:
        """Readable name of prompt ``index`` (0 = normal): "abnormal 3 (hole)" in word mode."""
        if index == 0:
            return "normal"
        phrase = f" ({WORD_ABNORMALITY_PHRASES[index - 1]})" if not self.learned and index <= len(WORD_ABNORMALITY_PHRASES) else ""
        return f"abnormal {index}{phrase}"

    def _explain_patch(self, result: DetectionResult, row: int, col: int, query_box: Box) -> Explanation:
        """The cosine of the patch's V-V feature with the normal prompt and each abnormal
        prompt (pass-2 features)."""
        evidence: PromptEvidence = result.evidence
        cosines = evidence.prompt_features @ evidence.patch_features[row * self.grid[1] + col]
        prompts = tuple(
            PromptSimilarity("normal" if j == 0 else f"abnormal_{j}", self.prompt_label(j), float(c)) for j, c in enumerate(cosines)
        )
        return Explanation(patch=(row, col), value=float(result.raw_map[row, col]), query_box=query_box, prompts=prompts)
