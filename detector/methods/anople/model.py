"""The AnoPLe model: prompt learner + multi-view decoder + memory bank over a frozen CLIP.

Scoring (docs/anople.md §4, reconstruction; [paper] Fig. 2 / TL;DR say the image score comes
from the prediction logits plus a visual memory bank, which also localises):

* p_text = softmax(tau [<g, t_n>, <g, t_a>])[1]
* M_dec  = a_i of the decoder (§2.4)
* M_mem  = mean over memory levels of min_j (1 - <f_i, b_j>) / 2 (PromptAD's distance)
* raw map M = (M_dec + M_mem) / 2
* score s = (p_text + max M_mem) / 2, in [0, 1]

The arithmetic means replace the earlier PromptAD-style harmonic means (docs/anople.md §4.2):
a harmonic mean follows whichever part is smaller, so a decoder map or a text
probability that collapses towards 0 erased the memory bank's evidence. The mean keeps each
part's evidence when another part is constant; ``health.py`` names such degenerate parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import AnoPLeConfig, BlockLayout, block_layout
from .decoder import MultiViewDecoder
from .encoders import PromptedCLIP, TokenHook
from .health import PartHealth
from .losses import anomaly_logit, two_way_logits
from .prompts import AnoPLePromptLearner

#: Words of MaPLe's CTX_INIT used to initialise T_1.
CONTEXT_INIT = "a photo of a"
#: State words of the two prompts (docs/anople.md §2.2).
STATE_WORDS = ("normal", "anomalous")


def mean_fusion(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise ``(a + b) / 2`` (any equal shapes); in [0, 1] for parts in [0, 1]."""
    return 0.5 * (a + b)


def prompt_texts(class_name: str, n_text: int) -> list[str]:
    """``[P^t_1] normal {cls}.`` and ``[P^t_1] anomalous {cls}.`` with n_t placeholder words."""
    placeholder = " ".join(["X"] * n_text)
    name = class_name.replace("_", " ").strip() or "object"
    return [f"{placeholder} {state} {name}." for state in STATE_WORDS]


@dataclass
class QueryFeatures:
    """What one prompted encoder pass gives for a batch of views.

    Attributes:
        image: ``(B, E)`` unit global embeddings g.
        patches: ``{l: (B, N, E)}`` u_l for the decoder levels.
        memory: ``{l: (B, N, D_v)}`` unit raw block outputs f^l for the memory levels.
    """

    image: torch.Tensor
    patches: dict[int, torch.Tensor]
    memory: dict[int, torch.Tensor]


def features_from_tokens(
    clip: PromptedCLIP, layout: BlockLayout, final: torch.Tensor, levels: dict[int, torch.Tensor]
) -> QueryFeatures:
    """``QueryFeatures`` from the final tokens ``(B, 1 + N, D_v)`` and the patch rows
    ``{l: (B, N, D_v)}`` of (at least) the decoder and memory levels."""
    image = F.normalize(clip.pool_image(final), dim=-1)
    patches = {l: clip.project_tokens(levels[l]) for l in layout.decoder_levels}
    memory = {l: F.normalize(levels[l], dim=-1) for l in layout.memory_levels}
    return QueryFeatures(image=image, patches=patches, memory=memory)


def prompted_features(
    clip: PromptedCLIP,
    layout: BlockLayout,
    images: torch.Tensor,
    visual_prompts: dict[int, torch.Tensor],
    *,
    hook: TokenHook | None = None,
) -> QueryFeatures:
    """One full prompted vision pass from the images ``(B, 3, S, S)`` with the effective
    prompts ``{j: (n_v, D_v)}``; ``hook`` as in ``AnoPLe.encode_views``. It reads only the
    frozen vision tower, so it is also the predict-time image path (``image_path.py``)."""
    wanted = set(layout.decoder_levels) | set(layout.memory_levels)
    final, kept = clip.forward_vision(
        images, visual_prompts=visual_prompts, keep=sorted(wanted), hook_block=layout.latent_block, hook=hook
    )
    return features_from_tokens(clip, layout, final, {l: t[:, 1:] for l, t in kept.items()})


class AnoPLe(nn.Module):
    """Learnable parts of AnoPLe and its fitted buffers.

    Parameters: ``learner`` (T_j, V_j, coupling maps) and ``decoder`` (adapters, view
    tokens, layer, head). Buffers after fit: ``text_features (2, E)``, memory banks
    ``memory_<l> (k*N, D_v)``, ``normal_text_scores (k,)``, ``normal_decoder_maps (k, N)``,
    ``part_spreads (3,)`` (``health.PartHealth``; NaN = not checked).
    The CLIP backbone is held by ``clip`` (a ``PromptedCLIP``), outside the state dict.

    Args:
        clip: the prompted wrapper of the frozen, shared CLIP.
        token_ids: ``(2, 77)`` tokenised prompts (``prompt_texts``), n_t placeholders each.
        context_ids: ``(77,)`` tokens of "a photo of a" (T_1's initial value, MaPLe's CTX_INIT).
        config: the preset's numbers.
        generator: source of every random initial value.
    """

    def __init__(
        self,
        clip: PromptedCLIP,
        token_ids: torch.Tensor,
        context_ids: torch.Tensor,
        config: AnoPLeConfig,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.config = config
        self.layout: BlockLayout = block_layout(config, clip.num_vision_blocks, clip.num_text_blocks)
        model = clip.model
        text_width = int(model.token_embedding.embedding_dim)
        visual_width = int(model.visual.conv1.out_channels)
        embed_dim = int(model.text_projection.shape[1]) if not isinstance(model.text_projection, nn.Linear) else model.text_projection.out_features
        self.register_buffer("token_ids", token_ids.clone(), persistent=False)
        first_init = None
        if 1 in self.layout.text_blocks and config.n_text <= len(CONTEXT_INIT.split()):
            with torch.no_grad():
                first_init = model.token_embedding(context_ids[1 : 1 + config.n_text]).detach().clone()
        self.learner = AnoPLePromptLearner(
            text_blocks=list(self.layout.text_blocks),
            visual_blocks=list(self.layout.visual_blocks),
            coupled=list(self.layout.coupled),
            n_text=config.n_text,
            n_visual=config.n_visual,
            text_width=text_width,
            visual_width=visual_width,
            first_text_init=first_init,
            coupling=config.coupling,
            generator=generator,
        )
        self.decoder = MultiViewDecoder(
            len(self.layout.decoder_levels),
            embed_dim,
            generator,
            width=config.decoder_width,
            heads=config.decoder_heads,
            mlp_ratio=config.decoder_mlp_ratio,
        )
        self.embed_dim = embed_dim
        self.visual_width = visual_width
        self.register_buffer("text_features", torch.zeros(2, embed_dim))
        for level in self.layout.memory_levels:
            self.register_buffer(f"memory_{level}", torch.zeros(0, visual_width))
        self.register_buffer("normal_text_scores", torch.zeros(0))
        self.register_buffer("normal_decoder_maps", torch.zeros(0, clip.num_patches))
        self.register_buffer("part_spreads", PartHealth().to_tensor())

    # ------------------------------------------------------------------ parts
    @property
    def tau(self) -> float:
        return self.clip.logit_scale

    @property
    def health(self) -> PartHealth:
        """Which parts were degenerate over the clean fit views (stored in ``part_spreads``)."""
        return PartHealth.from_tensor(self.part_spreads)

    def memory_bank(self, level: int) -> torch.Tensor:
        return getattr(self, f"memory_{level}")

    def effective_prompts(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        return self.learner()

    def encode_text(self, text_prompts: dict[int, torch.Tensor] | None = None, *, truncate: bool = True) -> torch.Tensor:
        """Unit text features ``(2, E)``: rows t_n, t_a."""
        if text_prompts is None:
            text_prompts, _ = self.learner()
        features = self.clip.encode_text_prompted(self.token_ids, text_prompts, truncate=truncate, n_context=self.config.n_text)
        return F.normalize(features, dim=-1)

    def encode_views(
        self,
        images: torch.Tensor | None = None,
        *,
        visual_prompts: dict[int, torch.Tensor] | None = None,
        cached_tokens: torch.Tensor | None = None,
        cached_levels: dict[int, torch.Tensor] | None = None,
        hook=None,
    ) -> QueryFeatures:
        """One prompted vision pass (from the images, or from the cache boundary).

        Args:
            images: ``(B, 3, S, S)`` normalised views (full forward).
            visual_prompts: effective P^v_j (default: the learner's).
            cached_tokens: ``(B, 1 + N, D_v)`` output of block ``layout.boundary``.
            cached_levels: ``{l: (B, N, D_v)}`` patch rows of the cached blocks l <= boundary.
            hook: applied to the output of ``layout.latent_block`` (latent anomalies), only
                when that block runs in this pass.
        """
        layout = self.layout
        if visual_prompts is None:
            _, visual_prompts = self.learner()
        if cached_tokens is None:
            return prompted_features(self.clip, layout, images, visual_prompts, hook=hook)
        wanted = set(layout.decoder_levels) | set(layout.memory_levels)
        start = layout.boundary + 1
        final, kept = self.clip.forward_vision(
            cached_tokens=cached_tokens,
            start_block=start,
            visual_prompts={j: p for j, p in visual_prompts.items() if j >= start},
            keep=sorted(l for l in wanted if l >= start),
            hook_block=layout.latent_block if layout.latent_block >= start else None,
            hook=hook,
        )
        levels = {l: t[:, 1:] for l, t in kept.items()}
        levels.update({l: t for l, t in (cached_levels or {}).items() if l in wanted and l < start})
        if layout.boundary in wanted and layout.boundary >= 1:
            levels[layout.boundary] = cached_tokens[:, 1:]
        return features_from_tokens(self.clip, layout, final, levels)

    def decode_logits(self, features: QueryFeatures, view: torch.Tensor | int, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits ``tau (<z_i, t_a> - <z_i, t_n>)`` ``(B, N)``."""
        text = self.text_features if text_features is None else text_features
        z = self.decoder([features.patches[l] for l in self.layout.decoder_levels], view)
        return anomaly_logit(z, text, self.tau)

    def decode(self, features: QueryFeatures, view: torch.Tensor | int, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder anomaly probabilities a_i = softmax(tau [<z_i, t_n>, <z_i, t_a>])[1], ``(B, N)``."""
        return torch.sigmoid(self.decode_logits(features, view, text_features))

    def global_logits(self, features: QueryFeatures, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 2)`` = tau [<g, t_n>, <g, t_a>]."""
        text = self.text_features if text_features is None else text_features
        return two_way_logits(features.image, text, self.tau)

    # ------------------------------------------------------------------ memory
    def memory_scores(
        self, memory: dict[int, torch.Tensor], exclude: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """M_mem ``(B, N)`` in [0, 1] against the bank, and for the deepest memory level the
        nearest bank row ``(B, N)`` and its cosine similarity ``(B, N)`` (ties: lowest row).

        ``exclude``: normal indices whose rows are left out (leave-one-out).
        """
        num_patches = self.clip.num_patches
        total = None
        nearest = similarity = None
        deepest = max(self.layout.memory_levels)
        for level in self.layout.memory_levels:
            bank = self.memory_bank(level)
            rows = torch.arange(bank.shape[0], device=bank.device)
            if exclude:
                keep = torch.ones(bank.shape[0], dtype=torch.bool, device=bank.device)
                for index in exclude:
                    keep[index * num_patches : (index + 1) * num_patches] = False
                rows = rows[keep]
                bank = bank[rows]
            sims = memory[level] @ bank.t()  # (B, N, M)
            best, where = sims.max(dim=-1)
            distance = ((1.0 - best) / 2.0).clamp_min(0.0)
            total = distance if total is None else total + distance
            if level == deepest:
                nearest, similarity = rows[where], best
        return total / len(self.layout.memory_levels), nearest, similarity

    def set_fitted_state(
        self,
        text_features: torch.Tensor,
        memory: dict[int, torch.Tensor],
        normal_text_scores: torch.Tensor,
        normal_decoder_maps: torch.Tensor,
    ) -> None:
        """Store what predict needs: t_n/t_a, the banks ``{l: (k*N, D_v)}`` and the
        normals' own p_text ``(k,)`` and M_dec ``(k, N)`` (for leave-one-out). Resets the
        parts' spreads to "not checked" until ``set_health``."""
        self.text_features = text_features.detach().clone()
        for level, bank in memory.items():
            setattr(self, f"memory_{level}", bank.detach().clone())
        self.normal_text_scores = normal_text_scores.detach().clone()
        self.normal_decoder_maps = normal_decoder_maps.detach().clone()
        self.set_health(PartHealth())

    def set_health(self, health: PartHealth) -> None:
        """Store the parts' spreads over the clean fit views (``part_spreads``)."""
        self.part_spreads = health.to_tensor().to(self.part_spreads.device)

    def resize_buffers_for(self, state: dict[str, torch.Tensor]) -> None:
        """Give the k-dependent buffers the shapes of a saved state before loading it."""
        for name in [f"memory_{l}" for l in self.layout.memory_levels] + ["normal_text_scores", "normal_decoder_maps"]:
            if name in state:
                current = getattr(self, name)
                if state[name].ndim == current.ndim and state[name].shape[1:] == current.shape[1:]:
                    setattr(self, name, torch.zeros_like(state[name], dtype=current.dtype, device=current.device))

    def leave_one_out_memory_maps(self) -> torch.Tensor | None:
        """``(k, N)`` M_mem of each normal's global view against the bank without its own
        patches; ``None`` for k < 2."""
        num_patches = self.clip.num_patches
        k = self.memory_bank(self.layout.memory_levels[0]).shape[0] // num_patches
        if k < 2:
            return None
        maps = []
        for index in range(k):
            rows = slice(index * num_patches, (index + 1) * num_patches)
            memory = {l: self.memory_bank(l)[rows].unsqueeze(0) for l in self.layout.memory_levels}
            maps.append(self.memory_scores(memory, exclude=[index])[0][0])
        return torch.stack(maps)

    def learned_parameters(self) -> list[nn.Parameter]:
        return list(self.learner.parameters()) + list(self.decoder.parameters())


def fused_outputs(
    p_text: torch.Tensor, decoder_map: torch.Tensor, memory_map: torch.Tensor, scoring: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score (B,), raw map (B, N))`` for ``scoring`` "full" | "prompt" | "memory".

    Args:
        p_text: ``(B,)`` prompt probabilities; decoder_map, memory_map: ``(B, N)`` in [0, 1].

    "full": ``((p_text + max M_mem) / 2, (M_dec + M_mem) / 2)``; "prompt": ``(p_text, M_dec)``;
    "memory": ``(max M_mem, M_mem)``. Every score and map lies in [0, 1].
    """
    memory_max = memory_map.amax(dim=-1)
    if scoring == "full":
        return mean_fusion(p_text, memory_max), mean_fusion(decoder_map, memory_map)
    if scoring == "prompt":
        return p_text, decoder_map
    if scoring == "memory":
        return memory_max, memory_map
    raise ValueError(f"scoring must be 'full', 'prompt' or 'memory', got {scoring!r}")
