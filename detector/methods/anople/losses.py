"""AnoPLe's three loss terms (docs/anople.md §3.2; [paper] Fig. 2 names them, the formulas are
reconstructions).

* global: cross-entropy of ``tau [<g, t_n>, <g, t_a>]`` against the image label (MaPLe's loss);
* local: binary focal (gamma 2, soft targets) + Dice(a, m) + Dice(1 - a, 1 - m)
  (AnomalyCLIP/AprilGAN convention);
* alignment: ``KL(q || p_g)`` with q from the stop-gradient mean of the top-kappa patch
  probabilities, pushing local evidence into the global prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-6


def two_way_logits(features: torch.Tensor, text_features: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau * [<f, t_n>, <f, t_a>]`` for unit ``features (..., E)`` and ``text_features (2, E)``."""
    return tau * features @ text_features.t()


def anomaly_logit(features: torch.Tensor, text_features: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau (<f, t_a> - <f, t_n>)``: the logit of the two-way softmax, shape ``features.shape[:-1]``."""
    logits = two_way_logits(features, text_features, tau)
    return logits[..., 1] - logits[..., 0]


def anomaly_probability(features: torch.Tensor, text_features: torch.Tensor, tau: float) -> torch.Tensor:
    """``softmax(tau [<f, t_n>, <f, t_a>])[1]`` -> shape ``features.shape[:-1]``."""
    return torch.sigmoid(anomaly_logit(features, text_features, tau))


def focal_loss(logit: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss with soft targets on logits ``l`` (a = sigmoid(l)), mean over entries.

    ``-[m (1 - a)^gamma log a + (1 - m) a^gamma log(1 - a)]``, with the logs computed as
    log-sigmoids so confident mistakes keep their gradient."""
    a = torch.sigmoid(logit)
    loss = -(target * (1 - a) ** gamma * F.logsigmoid(logit) + (1 - target) * a**gamma * F.logsigmoid(-logit))
    return loss.mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(a m) + s) / (sum(a) + sum(m) + s)`` per sample ``(B, N)``, mean over B."""
    inter = (prob * target).sum(dim=-1)
    total = prob.sum(dim=-1) + target.sum(dim=-1)
    return (1 - (2 * inter + smooth) / (total + smooth)).mean()


def top_k_mean(prob: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Mean of the top ``ceil(N / 64)`` patch probabilities per sample ``(B, N) -> (B,)``."""
    kappa = max(1, math.ceil(num_patches / 64))
    return prob.topk(kappa, dim=-1).values.mean(dim=-1)


def alignment_loss(global_logits: torch.Tensor, patch_prob: torch.Tensor) -> torch.Tensor:
    """``KL(q || p_g)``, q = [1 - a_bar, a_bar] with a_bar the stop-gradient top-kappa mean
    of ``patch_prob (B, N)``, p_g = softmax(``global_logits (B, 2)``)."""
    a_bar = top_k_mean(patch_prob, patch_prob.shape[-1]).detach().clamp(EPS, 1 - EPS)
    q = torch.stack([1 - a_bar, a_bar], dim=-1)
    kl = (q * (torch.log(q) - global_logits.log_softmax(dim=-1))).sum(dim=-1)
    return kl.mean()


@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    glob: torch.Tensor
    local: torch.Tensor
    align: torch.Tensor


def anople_loss(
    global_logits: torch.Tensor,
    labels: torch.Tensor,
    patch_logits: torch.Tensor,
    patch_targets: torch.Tensor,
    *,
    gamma: float = 2.0,
    align_weight: float = 0.5,
) -> LossTerms:
    """``L = L_glob + L_loc + align_weight * L_align``.

    Args:
        global_logits: ``(B, 2)`` = tau [<g, t_n>, <g, t_a>].
        labels: ``(B,)`` long, 1 for (pseudo-)anomalous.
        patch_logits: ``(B, N)`` decoder logits, a_i = sigmoid(logit_i).
        patch_targets: ``(B, N)`` soft targets m_i in [0, 1].
    """
    patch_prob = torch.sigmoid(patch_logits)
    glob = F.cross_entropy(global_logits, labels)
    local = focal_loss(patch_logits, patch_targets, gamma) + dice_loss(patch_prob, patch_targets) + dice_loss(1 - patch_prob, 1 - patch_targets)
    align = alignment_loss(global_logits, patch_prob)
    return LossTerms(glob + local + align_weight * align, glob, local, align)
