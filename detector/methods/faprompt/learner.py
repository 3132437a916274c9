"""FAPrompt's learned prompt state (official key layout) and its checkpoint files.

Module, parameter and buffer names of ``FAPromptLearner`` follow the official ``FAPrompt.py``
so the released ``{"prompt_learner": state_dict}`` files load strictly.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ... import limits
from ...backbone import Backbone
from ...checkpoint_sets import file_identity
from ...checkpoints import NESTING_KEYS, CheckpointInfo, check_keys, key_groups, read_header, read_state_dict
from ...errors import CheckpointError
from .config import (
    ABNORMAL_CONTEXT_TOKENS,
    DEEP_PROMPT_TOKENS,
    METHOD_NAME,
    NORMAL_CONTEXT_TOKENS,
    NUM_ABNORMAL_PROMPTS,
    PRIOR_PATCHES,
    UNUSED_PROJECTION_WIDTH,
)
from .encoders import num_deep_prompts
from .prompts import ABNORMAL_TEMPLATE, NORMAL_TEMPLATE, WORD_ABNORMALITY_PHRASES, WORD_NORMAL_PHRASE, WORD_PAD


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
        return cls(*learner_shapes(backbone))

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


# -- checkpoints ----------------------------------------------------------------------------


#: Where an official file nests the learner's state dict, then the usual containers.
NESTING = ("prompt_learner",) + NESTING_KEYS
#: Key groups of the learner, for ``inspect_checkpoint``.
KEY_GROUPS = {
    "context tokens": ("ctx_pos", "ctx_neg"),
    "deep prompts": ("compound_prompts_text.",),
    "abnormality prior": ("patch_meta_net.",),
    "template buffers": ("token_prefix", "token_suffix", "tokenized_prompts"),
    "unused projections": ("compound_prompt_projections.",),
}


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Layout, key groups and header facts of a prompt-learner file (it never holds CLIP)."""
    header = read_header(path)
    groups = key_groups(read_state_dict(path, nested=NESTING), KEY_GROUPS)
    layout = "own training output (safetensors)" if header else "official {'prompt_learner': state_dict}"
    if header.get("source_file"):
        layout = f"converted from {header['source_file']} (safetensors)"
    keys = ("dataset", "categories", "epoch", "backbone", "image_size", "trained_on", "trained_on_set", "source_file", "source_sha256")
    facts = {key: header[key] for key in keys if key in header}
    return CheckpointInfo(str(path), layout, groups, False, facts)


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
    state = read_state_dict(path, nested=NESTING)
    check_keys(state, expected_shapes(learner), what=what)
    reference = learner.state_dict()
    converted = {k: v.to(reference[k].dtype) for k, v in state.items()}
    learner.load_state_dict(converted, strict=True)
    return header


def learner_shapes(backbone: Backbone) -> tuple[int, int, int, int]:
    """``FAPromptLearner``'s constructor arguments for ``backbone``: text width, embedding
    width, deep-prompt count, context length."""
    return (
        backbone.text_width,
        backbone.embed_dim,
        num_deep_prompts(backbone.num_text_blocks),
        int(backbone.model.positional_embedding.shape[0]),
    )


def shared_learner(backbone: Backbone, path: str | Path, *, what: str) -> tuple[FAPromptLearner, dict[str, Any]]:
    """``(learner, header)``: the prompt learner of the file ``path`` for ``backbone``'s
    shapes, device and dtype, in eval mode without gradients, loaded once per version of the
    file (path, size, modification time) and per such backbone. Every detector with the same
    file shares it (a full fitted-detector cache would otherwise hold one 39 MB copy per fit
    of ViT-L-14-336; benchmarks/RESULTS.md, "The app's memory over many Runs"): nothing
    changes it at inference, and training builds a learner of its own. The cache holds no
    backbone (``clear_backbone_cache`` frees them). Raises as ``load_learner_state``."""
    learner, header = _loaded_learner(learner_shapes(backbone), str(backbone.device), backbone.dtype, str(path), file_identity(path), what)
    return learner, dict(header)


@functools.lru_cache(maxsize=limits.BACKBONE_CACHE_SIZE)
def _loaded_learner(
    shapes: tuple[int, int, int, int], device: str, dtype: torch.dtype, path: str, _identity: tuple, what: str
) -> tuple[FAPromptLearner, tuple[tuple[str, Any], ...]]:
    learner = FAPromptLearner(*shapes)
    header = load_learner_state(learner, path, what=what)
    learner.to(device, dtype=dtype).eval().requires_grad_(False)
    return learner, tuple(header.items())
