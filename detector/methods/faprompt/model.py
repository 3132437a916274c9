"""FAPrompt's model: the two-pass forward from encoded images to scores and map.

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

from dataclasses import dataclass
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...backbone import Backbone
from .config import PRIOR_OPTIONS, PRIOR_PATCHES, TEMPERATURE
from .encoders import DualPathVisionEncoder, PromptTextEncoder, vv_start_block
from .learner import FAPromptLearner


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


class FAPromptImagePath(nn.Module):
    """FAPrompt's frozen image path as a module with a fixed signature (for the runtime).

    ``forward(images (B, 3, S, S)) -> (global (B, E), patches (B, 1 + N, E))``, both
    L2-normalised: exactly ``FAPromptModel.encode_images`` (the V-V path and the global
    feature of ``DualPathVisionEncoder``). The vision tower is registered (its weights are
    the module's parameters, for export and the weights fingerprint); nothing of it is
    modified.
    """

    def __init__(self, model: FAPromptModel) -> None:
        super().__init__()
        self.visual = model.vision.visual
        self.__dict__["model"] = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_images(images)
