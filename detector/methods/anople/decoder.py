"""The lightweight multi-view decoder (docs/anople.md §2.4, a reconstruction of [paper] P6).

[paper]: "a lightweight decoder with a learnable multi-view signal, trained on
multi-scale images"; the CVPR version calls the signal a "scale-aware prefix". Here:
per-level linear adapters summed over levels, a learnable view token (global / local)
prepended as a prefix, one pre-LN Transformer layer, a linear head back to the joint
embedding, L2-normalised. Initialised from a private generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .prompts import make_linear

#: View ids of the multi-view signal.
GLOBAL_VIEW = 0
LOCAL_VIEW = 1


def make_layer_norm(width: int) -> nn.LayerNorm:
    return nn.LayerNorm(width)  # ones / zeros: no randomness involved


class PreLNBlock(nn.Module):
    """One pre-LN Transformer encoder layer: x + MHA(LN(x)); x + MLP(LN(x)); GELU, no dropout."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, generator: torch.Generator) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.ln_1 = make_layer_norm(width)
        self.qkv = make_linear(width, 3 * width, generator)
        self.out = make_linear(width, width, generator)
        self.ln_2 = make_layer_norm(width)
        hidden = int(width * mlp_ratio)
        self.fc_1 = make_linear(width, hidden, generator)
        self.fc_2 = make_linear(hidden, width, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.fc_2(F.gelu(self.fc_1(self.ln_2(x))))


class MultiViewDecoder(nn.Module):
    """``(tokens per level, view) -> z (B, N, E)``, L2-normalised patch embeddings.

    Args:
        num_levels: number of input levels (|Lambda_dec|, 3).
        embed_dim: E, the joint CLIP embedding (input and output width).
        width: d (256).
        heads: attention heads (4).
        mlp_ratio: MLP hidden / width (2).
        generator: source of all initial values; view tokens ~ N(0, 0.02^2).
    """

    def __init__(
        self,
        num_levels: int,
        embed_dim: int,
        generator: torch.Generator,
        *,
        width: int = 256,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.adapters = nn.ModuleList([make_linear(embed_dim, width, generator) for _ in range(num_levels)])
        self.view_tokens = nn.Parameter(torch.randn((2, width), generator=generator) * 0.02)
        self.block = PreLNBlock(width, heads, mlp_ratio, generator)
        self.head = make_linear(width, embed_dim, generator)

    def forward(self, tokens: list[torch.Tensor], view: torch.Tensor | int) -> torch.Tensor:
        """``tokens``: one ``(B, N, E)`` tensor per level (u_l); ``view``: int or ``(B,)`` ids
        (0 global, 1 local). Returns ``(B, N, E)`` unit vectors."""
        h = sum(adapter(u) for adapter, u in zip(self.adapters, tokens))
        batch = h.shape[0]
        if isinstance(view, int):
            prefix = self.view_tokens[view].reshape(1, 1, -1).expand(batch, 1, -1)
        else:
            prefix = self.view_tokens[view.to(self.view_tokens.device)].unsqueeze(1)
        x = self.block(torch.cat([prefix.to(h.dtype), h], dim=1))[:, 1:]
        return F.normalize(self.head(x), dim=-1)
