"""CLIP's two towers with deep prompts injected MaPLe-style (docs/anople.md §2.3).

``PromptedCLIP`` wraps a frozen open_clip ``CLIP`` without copying or changing it: the
loops below call open_clip's own embedding layers, ``resblocks``, norms, pooling and
projections, and only insert, replace or drop prompt tokens between blocks.

* Text: block-1 prompts replace the placeholder tokens at positions 1..n_t; each deeper
  prompted block replaces the same positions (no positional embedding on deep prompts).
  The sequence is cut after the last EOT: the causal mask makes this exact.
* Vision: block-1 prompts are appended after the patch tokens before ``ln_pre``; deeper
  prompted blocks replace the last n_v tokens (or append when the previous block had
  none). Prompt outputs are dropped at the end.

Blocks are 1-based throughout; "tokens of block l" are its output.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, text_global_pool

#: Called on the (B, 1 + N, D) output of one block (prompt tokens excluded); returns the
#: tensor that continues through the network. Used for latent anomalies.
TokenHook = Callable[[torch.Tensor], torch.Tensor]


def lean_block_applies(block: torch.nn.Module) -> bool:
    """Whether ``lean_block`` reproduces ``block``: open_clip's standard residual block with
    a packed-projection ``nn.MultiheadAttention`` (all CLIP ViT-B/L towers and tiny-test)."""
    attn = getattr(block, "attn", None)
    return (
        type(block) is ResidualAttentionBlock
        and isinstance(attn, torch.nn.MultiheadAttention)
        and bool(attn._qkv_same_embed_dim)
        and attn.in_proj_bias is not None
        and attn.out_proj.bias is not None
        and not hasattr(block, "ln_1_kv")
    )


def lean_block(
    block: torch.nn.Module,
    x: torch.Tensor,
    extra: torch.Tensor | None = None,
    *,
    attn_mask: torch.Tensor | None = None,
    keep_extra: bool = True,
) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock.forward`` on ``cat(x, extra)``, written with
    ``F.linear`` / ``F.scaled_dot_product_attention`` on the block's own weights (the same
    arithmetic, less dispatch).

    Args:
        x: ``(B, L, D)`` batch-first tokens.
        extra: ``(B, n, D)`` tokens appended after ``x`` (prompt tokens), or ``None``.
        attn_mask: additive ``(L + n, L + n)`` mask (text: causal), or ``None``.
        keep_extra: return the outputs of the ``extra`` tokens too. With ``False`` only the
            ``L`` rows of ``x`` are computed: the extra tokens still act as keys and values
            (that is how prompts act), but their queries, MLP and outputs are skipped, and
            when ``x`` needs no gradient (cached tokens) the backward pass touches only the
            projections of the extra tokens.

    Returns:
        ``(B, L + n, D)`` with ``keep_extra``, else ``(B, L, D)``.
    """
    attn = block.attn
    width = x.shape[-1]
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if extra is not None and extra.shape[1] and not keep_extra:
        queries = x
        q, k, v = F.linear(block.ln_1(x), weight, bias).split(width, dim=-1)
        k_extra, v_extra = F.linear(block.ln_1(extra), weight[width:], bias[width:]).split(width, dim=-1)
        k, v = torch.cat([k, k_extra], dim=1), torch.cat([v, v_extra], dim=1)
        if attn_mask is not None:
            attn_mask = attn_mask[: x.shape[1]]
    else:
        queries = x if extra is None or not extra.shape[1] else torch.cat([x, extra], dim=1)
        q, k, v = F.linear(block.ln_1(queries), weight, bias).split(width, dim=-1)
    batch = x.shape[0]

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)

    mask = attn_mask.to(q.dtype) if attn_mask is not None else None
    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), attn_mask=mask)
    out = F.linear(out.transpose(1, 2).reshape(batch, q.shape[1], width), attn.out_proj.weight, attn.out_proj.bias)
    h = queries + block.ls_1(out)
    return h + block.ls_2(block.mlp(block.ln_2(h)))


class PromptedCLIP:
    """Prompted forward passes over a frozen open_clip ``CLIP`` model.

    Not an ``nn.Module`` on purpose: the backbone is shared and read-only, and must not
    appear in the learned state.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        for name in ("visual", "transformer", "token_embedding", "ln_final", "attn_mask"):
            if not hasattr(model, name):
                raise TypeError(f"PromptedCLIP needs an open_clip CLIP with a ViT tower and text tower (missing {name!r})")
        if getattr(model.visual, "attn_pool", None) is not None:
            raise TypeError("PromptedCLIP supports class-token ViTs only (this model pools with attention)")
        self.model = model
        self.visual = model.visual
        self.vision_blocks = list(model.visual.transformer.resblocks)
        self.text_blocks = list(model.transformer.resblocks)
        self.vision_batch_first = bool(getattr(model.visual.transformer, "batch_first", True))
        self.text_batch_first = bool(getattr(model.transformer, "batch_first", True))

    # ------------------------------------------------------------------ facts
    @property
    def num_vision_blocks(self) -> int:
        return len(self.vision_blocks)

    @property
    def num_text_blocks(self) -> int:
        return len(self.text_blocks)

    @property
    def num_patches(self) -> int:
        grid = self.visual.grid_size
        return int(grid[0]) * int(grid[1])

    @property
    def logit_scale(self) -> float:
        """tau = exp(logit_scale), capped at 100 as CLIP trains it."""
        return float(min(self.model.logit_scale.exp().item(), 100.0))

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _run_block(block: torch.nn.Module, x: torch.Tensor, batch_first: bool, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if batch_first:
            return block(x, attn_mask=attn_mask)
        return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """u = ln_post(tokens) @ proj for ``(B, N, D_v)`` block outputs -> ``(B, N, E)``
        (AprilGAN/AnomalyCLIP convention for intermediate tokens)."""
        out = self.visual.ln_post(tokens)
        return out @ self.visual.proj if self.visual.proj is not None else out

    def pool_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """Global embedding g (B, E), not normalised, from final tokens (B, 1 + N, D_v)
        through open_clip's own ``_pool`` and ``proj``."""
        pooled, _ = self.visual._pool(tokens)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + class token + positional embedding, before ``ln_pre``:
        ``(B, 3, S, S) -> (B, 1 + N, D_v)`` (open_clip's ``_embeds`` minus ``ln_pre``)."""
        visual = self.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + visual.positional_embedding.to(x.dtype)

    # ------------------------------------------------------------------ vision
    def forward_vision(
        self,
        images: torch.Tensor | None = None,
        *,
        cached_tokens: torch.Tensor | None = None,
        start_block: int = 1,
        stop_block: int | None = None,
        visual_prompts: Mapping[int, torch.Tensor] | None = None,
        keep: Sequence[int] = (),
        hook_block: int | None = None,
        hook: TokenHook | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run vision blocks ``start_block..stop_block`` with prompts.

        Args:
            images: ``(B, 3, S, S)`` normalised input (when ``cached_tokens`` is None; then
                ``start_block`` must be 1).
            cached_tokens: ``(B, 1 + N, D_v)`` output of block ``start_block - 1`` from
                ``encode_prefix`` (no prompt tokens).
            stop_block: last block to run (default: the last one).
            visual_prompts: ``{j: (n_v, D_v)}`` effective prompts P^v_j.
            keep: blocks whose outputs (CLS + patches, no prompts) are returned.
            hook_block, hook: ``hook`` replaces the output of ``hook_block`` (prompts excluded).

        Returns:
            ``(tokens (B, 1 + N, D_v) after stop_block without prompt tokens, {l: (B, 1 + N, D_v)})``.
        """
        prompts = dict(visual_prompts or {})
        stop = self.num_vision_blocks if stop_block is None else int(stop_block)
        if cached_tokens is None:
            if images is None or start_block != 1:
                raise ValueError("give images (from block 1) or cached_tokens")
            x = self.embed_image(images)
            n_prompt = 0
            if 1 in prompts:
                x = torch.cat([x, self._expand(prompts[1], x)], dim=1)
                n_prompt = prompts[1].shape[0]
            x = self.visual.ln_pre(x)
        else:
            x = cached_tokens
            n_prompt = 0
        length = x.shape[1] - n_prompt
        kept: dict[int, torch.Tensor] = {}
        for j in range(start_block, stop + 1):
            if j in prompts and not (j == 1 and cached_tokens is None):
                extra = self._expand(prompts[j], x)
            else:
                extra = x[:, length:]
            block = self.vision_blocks[j - 1]
            if extra.shape[1] and lean_block_applies(block):
                # Prompt outputs are needed only when the next block keeps them.
                keep_extra = j < stop and (j + 1) not in prompts
                x = lean_block(block, x[:, :length], extra, keep_extra=keep_extra)
            else:
                inputs = torch.cat([x[:, :length], extra], dim=1) if extra.shape[1] else x[:, :length]
                x = self._run_block(block, inputs, self.vision_batch_first)
            if hook is not None and j == hook_block:
                x = torch.cat([hook(x[:, :length]), x[:, length:]], dim=1)
            if j in keep:
                kept[j] = x[:, :length]
        return x[:, :length], kept

    def encode_prefix(self, images: torch.Tensor, stop_block: int, keep: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Frozen, prompt-free blocks ``1..stop_block``: the cache boundary of the fast
        preset. Returns ``(tokens (B, 1 + N, D_v), {l: tokens of block l for l in keep})``."""
        return self.forward_vision(images, stop_block=stop_block, keep=[l for l in keep if l <= stop_block])

    @staticmethod
    def _expand(prompt: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return prompt.to(like.dtype).unsqueeze(0).expand(like.shape[0], -1, -1)

    # ------------------------------------------------------------------ text
    def encode_text_prompted(
        self,
        token_ids: torch.Tensor,
        text_prompts: Mapping[int, torch.Tensor] | None = None,
        *,
        truncate: bool = True,
        n_context: int | None = None,
    ) -> torch.Tensor:
        """Text features ``(P, E)`` (not normalised) of tokenised prompts ``(P, 77)``.

        ``text_prompts[1]`` replaces the token embeddings at positions 1..n_t (the
        placeholders); ``text_prompts[j]`` for j > 1 replaces the same positions of block
        j's input. With ``truncate`` the sequence is cut after the last EOT (positional
        embedding and causal mask sliced), which gives the same EOT features.
        """
        model = self.model
        prompts = dict(text_prompts or {})
        n_ctx = n_context if n_context is not None else (next(iter(prompts.values())).shape[0] if prompts else 0)
        cast = model.transformer.get_cast_dtype() if hasattr(model.transformer, "get_cast_dtype") else torch.float32
        x = model.token_embedding(token_ids).to(cast)
        if 1 in prompts:
            x = torch.cat([x[:, :1], self._expand(prompts[1], x), x[:, 1 + n_ctx :]], dim=1)
        length = int(token_ids.argmax(dim=-1).max().item()) + 1 if truncate else token_ids.shape[1]
        x = x[:, :length] + model.positional_embedding[:length].to(cast)
        mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
        for j, block in enumerate(self.text_blocks, start=1):
            if j > 1 and j in prompts:
                x = torch.cat([x[:, :1], self._expand(prompts[j], x), x[:, 1 + n_ctx :]], dim=1)
            if lean_block_applies(block):
                x = lean_block(block, x, attn_mask=mask)
            else:
                x = self._run_block(block, x, self.text_batch_first, attn_mask=mask)
        x = model.ln_final(x)
        pooled = text_global_pool(x, token_ids[:, :length], model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is not None:
            if isinstance(model.text_projection, torch.nn.Linear):
                pooled = model.text_projection(pooled)
            else:
                pooled = pooled @ model.text_projection
        return pooled


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
