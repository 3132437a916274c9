"""The official implementations' per-query computation patterns, rebuilt from our modules.

Each function does, for one query, the work the official code does for one test image,
so the speed-up of the package's cached path is a ratio measured side by side in one run
(the numbers equal; only what is recomputed differs):

* InCTRL (``engine_IC.py`` at batch 1): the 242 text prompts and the k normal images are
  encoded again for every query, then the query itself.
* FAPrompt (``test.py``): the image goes through the official attention arithmetic (explicit
  score matrices for both the standard and the value-value path), the pass-1 and pass-2 prompts
  are encoded for every image over all 77 token positions, and the map is upsampled to the input
  size with ``F.interpolate`` and smoothed with ``scipy.ndimage.gaussian_filter``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from detector.methods.faprompt import FAPromptDetector
from detector.methods.inctrl import InCTRLDetector


def inctrl_official_pattern(det: Any, normals: list, query: Any) -> float:
    """One query the official way: the 242 prompts through the text tower at all 77 token
    positions (no end-token cut, no cache), the normals encoded again; returns the score."""
    from detector.methods import inctrl

    with torch.inference_mode():
        for texts in inctrl.prompt_texts(det.class_name):
            det.backbone.model.encode_text(det.backbone.tokenize(texts), normalize=False)
    det.fit(normals)
    return det.predict(query).score


def official_dual_attention(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``Attention`` module's arithmetic (``AnomalyCLIP_lib``): explicit
    ``q k^T`` and ``v v^T`` score matrices, softmax and products for both paths, no fused kernel.

    Args:
        block: an open_clip ``ResidualAttentionBlock``; x: ``(B, N, C)`` ``ln_1`` output.

    Returns:
        ``(standard, value_only)`` after ``out_proj``, each ``(B, N, C)``.
    """
    attn = block.attn
    batch, tokens, width = x.shape
    heads = attn.num_heads
    scale = (width // heads) ** -0.5
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    standard_weights = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    value_weights = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)
    standard = (standard_weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    value_only = (value_weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    return attn.out_proj(standard), attn.out_proj(value_only)


def official_vision_encoder(det: Any) -> Any:
    """The detector's V-V vision encoder with the official attention arithmetic: the
    official ``VisionTransformer.forward(..., DPAM_layer=20)``, same numbers."""
    from detector.methods import faprompt

    vision = det.model.vision
    return faprompt.DualPathVisionEncoder(vision.visual, vision.vv_start, attention=official_dual_attention)


def faprompt_official_pattern(det: Any, normals: list, query: Any) -> float:
    """One image the way the official ``test.py`` computes it; returns the score.

    Per image, as the official loop does: the image through the official DPAM attention
    arithmetic; pass-1 normal and abnormal prompts encoded again over all 77 token positions;
    pass-2 prompts (normal again, abnormal with the image's prior bias) encoded over all 77
    positions; both passes' maps upsampled to the input size with ``F.interpolate`` and smoothed
    with ``scipy.ndimage.gaussian_filter``. The score equals ``det.predict(query).score``.
    """
    from scipy.ndimage import gaussian_filter

    from detector.images import load_image
    from detector.preprocess import preprocess
    from detector.methods import faprompt

    model = det.model
    learner = model.learner
    full_text = faprompt.PromptTextEncoder(det.backbone.model, cut_at_end_token=False)
    deep = model.deep_prompts()
    eot_normal, eot_abnormal = learner.eot_positions()
    with torch.inference_mode():
        tensor, _ = preprocess(load_image(query), det.preprocess_spec)
        global_features, patches = official_vision_encoder(det)(tensor.unsqueeze(0))
        global_features, patches = F.normalize(global_features, dim=-1), F.normalize(patches, dim=-1)
        normal = full_text(learner.normal_embeddings(), eot_normal, deep)
        abnormal = full_text(learner.abnormal_embeddings(), eot_abnormal, deep)
        pass1 = faprompt.class_probabilities(patches, faprompt.class_text_features(normal, abnormal))
        if model.use_prior:
            prior = faprompt.select_prior_tokens(patches, pass1, model.prior_patches)
            bias = learner.abnormality_bias(prior)[0]
            normal = full_text(learner.normal_embeddings(), eot_normal, deep)
            abnormal = full_text(learner.abnormal_embeddings(bias), eot_abnormal, deep)
        classes2 = faprompt.class_text_features(normal, abnormal).unsqueeze(0)
        pass2 = faprompt.class_probabilities(patches, classes2)
        logits = (global_features.unsqueeze(1) @ classes2.transpose(1, 2)).squeeze(1) / faprompt.TEMPERATURE
        score = faprompt.image_score(logits.softmax(dim=-1)[:, 1], pass1, pass2)
        rows, cols = det.grid
        size = det.image_size
        upsampled = []
        for probabilities in (pass1, pass2):
            grid = probabilities[:, 1:].reshape(1, rows, cols, 2).permute(0, 3, 1, 2)
            upsampled.append(F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False))
        combined = (upsampled[0][:, 1] + 1 - upsampled[0][:, 0] + upsampled[1][:, 1] + 1 - upsampled[1][:, 0]) / 4
        gaussian_filter(combined.numpy().astype(np.float64), sigma=10)
    return float(score[0])


#: method name -> official-pattern function, for the methods with official code.
OFFICIAL_PATTERNS: dict[str, Callable[[Any, list, Any], float]] = {
    InCTRLDetector.name: inctrl_official_pattern,
    FAPromptDetector.name: faprompt_official_pattern,
}
