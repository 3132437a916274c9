"""AnoPLe's prompt learner: deep text and visual prompts with bidirectional coupling.

[paper] (abstract, Fig. 2): learnable multi-modal deep prompts whose text and visual
parts are coupled in both directions. MaPLe (the [MaPLe] base) projects text prompts to
visual prompts only; the form used here (docs/anople.md §2.2, a reconstruction) adds the
symmetric vision-to-text path and lets the two context lengths differ (Fig. 5)::

    P^t_j = T_j + A^{vt}_j V_j W^{vt}_j + b^{vt}_j      (j coupled)
    P^v_j = V_j + A^{tv}_j T_j W^{tv}_j + b^{tv}_j

Outside the coupled blocks a modality's effective prompt is its source prompt.
All parameters are initialised from a private ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def init_linear_(layer: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` init (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))),
    drawn from ``generator`` instead of the global RNG."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        if layer.bias is not None:
            bound = 1.0 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0.0
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def make_linear(in_features: int, out_features: int, generator: torch.Generator, bias: bool = True) -> nn.Linear:
    """An ``nn.Linear`` built without touching the global RNG, then default-initialised
    from ``generator``."""
    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)
    init_linear_(layer, generator)
    return layer


class TokenCoupling(nn.Module):
    """``F(X) = A X W + b``: maps ``(n_src, d_src)`` prompts to ``(n_dst, d_dst)``.

    ``A`` (n_dst x n_src) mixes tokens, so the two context lengths may differ; it starts
    as the identity when they are equal, else as 1/n_src everywhere. ``W``/``b`` is an
    ``nn.Linear`` with the default init, like MaPLe's ``proj`` [MaPLe].
    """

    def __init__(self, n_src: int, n_dst: int, d_src: int, d_dst: int, generator: torch.Generator) -> None:
        super().__init__()
        if n_src == n_dst:
            mix = torch.eye(n_dst)
        else:
            mix = torch.full((n_dst, n_src), 1.0 / n_src)
        self.token_mix = nn.Parameter(mix)
        self.proj = make_linear(d_src, d_dst, generator)

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        return self.token_mix @ self.proj(prompts)


class AnoPLePromptLearner(nn.Module):
    """Source prompts ``T_j`` (text blocks ``S_t``), ``V_j`` (vision blocks ``S_v``) and the
    coupling maps of the coupled block pairs.

    Args:
        text_blocks: 1-based text blocks that receive prompts (``S_t``).
        visual_blocks: 1-based vision blocks that receive prompts (``S_v``).
        coupled: ``(text_block, vision_block)`` pairs coupled in both directions.
        n_text, n_visual: context lengths n_t, n_v.
        text_width, visual_width: D_t, D_v.
        first_text_init: ``(n_t, D_t)`` token embeddings of "a photo of a" for T_1
            (MaPLe's CTX_INIT), or None for N(0, 0.02^2).
        coupling: ``"bidirectional"`` or ``"none"`` (no maps; source prompts only).
        generator: source of every random initial value.
    """

    def __init__(
        self,
        *,
        text_blocks: list[int],
        visual_blocks: list[int],
        coupled: list[tuple[int, int]],
        n_text: int,
        n_visual: int,
        text_width: int,
        visual_width: int,
        first_text_init: torch.Tensor | None,
        coupling: str,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        if coupling not in ("bidirectional", "none"):
            raise ValueError(f"coupling must be 'bidirectional' or 'none', got {coupling!r}")
        self.text_blocks = sorted(text_blocks)
        self.visual_blocks = sorted(visual_blocks)
        self.coupled = sorted(coupled) if coupling == "bidirectional" else []
        self.n_text, self.n_visual = n_text, n_visual
        self.text_prompts = nn.ParameterDict()
        for j in self.text_blocks:
            if j == 1 and first_text_init is not None:
                value = first_text_init.detach().clone().float()
            else:
                value = torch.randn((n_text, text_width), generator=generator) * 0.02
            self.text_prompts[str(j)] = nn.Parameter(value)
        self.visual_prompts = nn.ParameterDict()
        for j in self.visual_blocks:
            self.visual_prompts[str(j)] = nn.Parameter(torch.randn((n_visual, visual_width), generator=generator) * 0.02)
        self.text_to_visual = nn.ModuleDict()
        self.visual_to_text = nn.ModuleDict()
        for jt, jv in self.coupled:
            self.text_to_visual[str(jv)] = TokenCoupling(n_text, n_visual, text_width, visual_width, generator)
            self.visual_to_text[str(jt)] = TokenCoupling(n_visual, n_text, visual_width, text_width, generator)

    def forward(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Effective prompts: ``({j: P^t_j (n_t, D_t)}, {j: P^v_j (n_v, D_v)})``."""
        text = {j: self.text_prompts[str(j)] for j in self.text_blocks}
        visual = {j: self.visual_prompts[str(j)] for j in self.visual_blocks}
        text_out = dict(text)
        visual_out = dict(visual)
        for jt, jv in self.coupled:
            text_out[jt] = text[jt] + self.visual_to_text[str(jt)](visual[jv])
            visual_out[jv] = visual[jv] + self.text_to_visual[str(jv)](text[jt])
        return text_out, visual_out
