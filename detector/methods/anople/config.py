"""AnoPLe's presets and how their layer indices land on a given backbone (docs/anople.md §2, §3.3).

Block indices are written for a 12-block ViT-B/16 (1-based, inclusive ranges). On other
depths every index is a fraction of depth rounded half up: 6 -> L/2, 9 -> 3L/4, 12 -> L.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

#: Depth the indices below are written for (ViT-B/16 and its text tower).
REFERENCE_DEPTH = 12
PRESETS = ("fast", "faithful", "text_only")
SCORINGS = ("full", "prompt", "memory")
COUPLINGS = ("bidirectional", "none")


@dataclass(frozen=True)
class AnoPLeConfig:
    """Every number of one preset (docs/anople.md §3.3). ``None`` block ranges mean "no prompts"."""

    preset: str
    n_text: int = 2
    n_visual: int = 2
    text_blocks: tuple[int, int] | None = (1, 12)
    #: Fast preset: block 12 only (one prompted block halves the backward pass).
    visual_blocks: tuple[int, int] | None = (12, 12)
    coupling: str = "bidirectional"
    decoder_levels: tuple[int, ...] = (6, 9, 12)
    memory_levels: tuple[int, ...] = (6, 9)
    #: Latent anomalies are added to the output of this block (with a cached pool: at most
    #: the block before the first prompted one, i.e. on the cached tokens).
    latent_block: int = 11
    #: Fast path: encode a fixed pool once up to the cache boundary.
    cached_pool: bool = True
    #: Pool size clamp(pool_per_shot * k, pool_min, pool_max): half clean (each normal's
    #: global view, then local crops), half pixel-anomalous.
    pool_per_shot: int = 4
    pool_min: int = 16
    pool_max: int = 32
    batch_size: int = 4
    #: Fast preset: 12 steps at twice the former learning rates (the fit budget, docs/anople.md §5: the
    #: former 30 steps at 2e-3 / 1e-3 cost about 40 encoder forwards on their own).
    steps: int = 12
    optimizer: str = "adamw"
    lr_prompts: float = 4e-3
    lr_decoder: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_fraction: float = 0.0
    warmup_lr: float = 1e-5
    #: Random resized crop (scale 0.8..1) of the normals before the view crops (faithful).
    resized_crop: bool = False
    decoder_width: int = 256
    decoder_heads: int = 4
    decoder_mlp_ratio: float = 2.0
    sigma_latent: float = 0.5
    latent_probability: float = 1.0 / 3.0
    align_weight: float = 0.5
    focal_gamma: float = 2.0
    local_crop_fraction: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AnoPLeConfig":
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        for key in ("text_blocks", "visual_blocks", "decoder_levels", "memory_levels"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)


def preset_config(preset: str, *, steps: int | None = None, coupling: str | None = None) -> AnoPLeConfig:
    """The configuration of ``preset`` with optional ``steps`` / ``coupling`` overrides."""
    if preset == "fast":
        config = AnoPLeConfig(preset="fast")
    elif preset == "faithful":
        config = AnoPLeConfig(
            preset="faithful",
            text_blocks=(1, 9),
            visual_blocks=(1, 9),
            latent_block=10,
            cached_pool=False,
            steps=500,
            optimizer="sgd",
            lr_prompts=0.0035,
            lr_decoder=0.0035,
            weight_decay=5e-4,
            warmup_fraction=0.2,
            resized_crop=True,
        )
    elif preset == "text_only":
        config = AnoPLeConfig(preset="text_only", visual_blocks=None, coupling="none")
    else:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if steps is not None:
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        config = replace(config, steps=int(steps))
    if coupling is not None:
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        config = replace(config, coupling=coupling if config.visual_blocks is not None else "none")
    return config


def scale_block(index: int, depth: int) -> int:
    """A 1-based block index of the 12-block reference mapped onto ``depth`` blocks,
    rounded half up and clamped to 1..depth."""
    if depth == REFERENCE_DEPTH:
        return int(index)
    return max(1, min(depth, int(math.floor(index * depth / REFERENCE_DEPTH + 0.5))))


@dataclass(frozen=True)
class BlockLayout:
    """The preset's blocks on a concrete backbone (all 1-based)."""

    text_blocks: tuple[int, ...]
    visual_blocks: tuple[int, ...]
    coupled: tuple[tuple[int, int], ...]
    decoder_levels: tuple[int, ...]
    memory_levels: tuple[int, ...]
    latent_block: int
    #: Output of this vision block is the fast path's cache (nothing learned before it).
    boundary: int
    vision_depth: int
    text_depth: int

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _scaled_range(blocks: tuple[int, int] | None, depth: int) -> tuple[int, ...]:
    if blocks is None:
        return ()
    first, last = scale_block(blocks[0], depth), scale_block(blocks[1], depth)
    return tuple(range(first, last + 1))


def block_layout(config: AnoPLeConfig, vision_depth: int, text_depth: int) -> BlockLayout:
    """Map ``config``'s reference indices onto a backbone's depths.

    Coupled pairs: each prompted vision block j_v is paired with the text block of the
    same relative depth when that block is prompted (first vision block wins on ties).
    """
    text_blocks = _scaled_range(config.text_blocks, text_depth)
    visual_blocks = _scaled_range(config.visual_blocks, vision_depth)
    coupled: list[tuple[int, int]] = []
    if config.coupling == "bidirectional":
        used: set[int] = set()
        for jv in visual_blocks:
            jt = jv if text_depth == vision_depth else max(1, min(text_depth, int(math.floor(jv * text_depth / vision_depth + 0.5))))
            if jt in text_blocks and jt not in used:
                coupled.append((jt, jv))
                used.add(jt)
    decoder_levels = tuple(sorted({scale_block(l, vision_depth) for l in config.decoder_levels}))
    memory_levels = tuple(sorted({scale_block(l, vision_depth) for l in config.memory_levels}))
    latent_block = scale_block(config.latent_block, vision_depth)
    first_prompted = min(visual_blocks) if visual_blocks else vision_depth + 1
    if config.cached_pool:
        latent_block = min(latent_block, first_prompted - 1)
    boundary = min(first_prompted - 1, latent_block)
    return BlockLayout(
        text_blocks=text_blocks,
        visual_blocks=visual_blocks,
        coupled=tuple(coupled),
        decoder_levels=decoder_levels,
        memory_levels=memory_levels,
        latent_block=latent_block,
        boundary=boundary,
        vision_depth=vision_depth,
        text_depth=text_depth,
    )
