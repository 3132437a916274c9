"""Simulated anomalies for AnoPLe's training (docs/anople.md §3.1).

AnoPLe trains on normal images only, with anomalies simulated in pixel space and in
latent space ([paper] TL;DR). The pixel recipe follows DRAEM (Perlin masks, photometric
augmenters, beta blending); DTD textures are replaced by self-sourced crops of the
normals or procedural textures. The latent recipe adds feature-scaled Gaussian noise to
masked patch tokens (the SimpleNet form).

Every function here is pure: all randomness comes from the ``numpy.random.Generator`` or
``torch.Generator`` passed in, nothing global is read or changed.
"""

from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np
import torch

#: DRAEM draws the Perlin scale as (2**a, 2**b), a, b in {0, ..., 5}.
PERLIN_MAX_EXPONENT = 5
#: Threshold applied to the rotated Perlin field (DRAEM).
PERLIN_THRESHOLD = 0.5
#: DRAEM's blending factor beta ~ U(0, 0.8).
MAX_BETA = 0.8


# ----------------------------------------------------------------------------- Perlin
def perlin_noise(size: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise of ``size`` (H, W) with ``res`` (ry, rx) lattice cells.

    Random unit gradients sit on an (ry+1) x (rx+1) lattice; each pixel blends the dot
    products of its four corner gradients with the quintic fade 6t^5 - 15t^4 + 10t^3.
    Values lie roughly in [-1, 1]. Returns float32 (H, W).
    """
    height, width = size
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = 2.0 * math.pi * rng.random((ry + 1, rx + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys = np.arange(height, dtype=np.float64) * ry / height
    xs = np.arange(width, dtype=np.float64) * rx / width
    yi = np.floor(ys).astype(int)
    xi = np.floor(xs).astype(int)
    yf = (ys - yi)[:, None]
    xf = (xs - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[(yi + dy)[:, None], (xi + dx)[None, :]]
        return g[..., 0] * (yf - dy) + g[..., 1] * (xf - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)

    u, v = fade(xf), fade(yf)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return (math.sqrt(2.0) * (top * (1 - v) + bottom * v)).astype(np.float32)


def _rotate(array: np.ndarray, angle: float, border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    height, width = array.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle, 1.0)
    return cv2.warpAffine(array, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0)


def random_ellipse_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A filled ellipse at a random place, float32 (size, size) in {0, 1}; the fallback
    when Perlin thresholding gives an empty mask five times."""
    mask = np.zeros((size, size), np.uint8)
    center = (int(rng.integers(size // 4, 3 * size // 4 + 1)), int(rng.integers(size // 4, 3 * size // 4 + 1)))
    axes = (int(rng.integers(max(2, size // 16), max(3, size // 5) + 1)), int(rng.integers(max(2, size // 16), max(3, size // 5) + 1)))
    cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    return mask.astype(np.float32)


def perlin_mask(size: int, rng: np.random.Generator, *, max_tries: int = 5) -> np.ndarray:
    """DRAEM's anomaly mask: Perlin noise at scale (2**a, 2**b), a, b ~ U{0..5}, rotated by
    U(-90, 90) degrees, thresholded at 0.5. An empty mask is redrawn up to ``max_tries``
    times, then a random ellipse is used [choice: DRAEM would call the sample normal].

    Returns float32 (size, size) with values in {0, 1}, never empty.
    """
    for _ in range(max_tries):
        ry = 2 ** int(rng.integers(0, PERLIN_MAX_EXPONENT + 1))
        rx = 2 ** int(rng.integers(0, PERLIN_MAX_EXPONENT + 1))
        side_y = int(math.ceil(size / ry) * ry)
        side_x = int(math.ceil(size / rx) * rx)
        noise = perlin_noise((side_y, side_x), (ry, rx), rng)[:size, :size]
        noise = _rotate(noise, float(rng.uniform(-90.0, 90.0)))
        mask = (noise > PERLIN_THRESHOLD).astype(np.float32)
        if mask.any():
            return mask
    return random_ellipse_mask(size, rng)


def patch_targets(mask: np.ndarray, patch: int) -> np.ndarray:
    """Soft patch targets: the mean of ``mask`` (S, S) over each ``patch`` x ``patch`` cell,
    float32 (S/patch, S/patch), row-major like the ViT token order."""
    size = mask.shape[0]
    grid = size // patch
    return mask[: grid * patch, : grid * patch].reshape(grid, patch, grid, patch).mean(axis=(1, 3)).astype(np.float32)


# ------------------------------------------------------------------ source textures
def procedural_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A DTD stand-in: coloured Perlin noise plus random stripes, uint8 (size, size, 3)."""
    channels = []
    for _ in range(3):
        res = 2 ** int(rng.integers(1, 5))
        side = int(math.ceil(size / res) * res)
        channels.append(perlin_noise((side, side), (res, res), rng)[:size, :size])
    colour = np.stack(channels, axis=-1)
    colour = (colour - colour.min()) / max(float(np.ptp(colour)), 1e-6)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    period = rng.uniform(4.0, max(5.0, size / 4.0))
    stripes = (np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0).astype(np.float32)
    stripe_colour = rng.uniform(0, 1, size=3).astype(np.float32)
    weight = rng.uniform(0.3, 0.7)
    texture = (1 - weight) * colour + weight * stripes[..., None] * stripe_colour
    return np.clip(texture * 255.0, 0, 255).astype(np.uint8)


def self_source(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A CutPaste/NSA-style source: a random crop of a normal image (uint8 HxWx3), resized
    to ``size``, rotated, cyclically shifted and colour-jittered. Returns uint8 (size, size, 3)."""
    height, width = image.shape[:2]
    side = max(2, int(round(min(height, width) * rng.uniform(0.3, 1.0))))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = cv2.resize(np.ascontiguousarray(image[top : top + side, left : left + side]), (size, size), interpolation=cv2.INTER_LINEAR)
    crop = _rotate(crop, float(rng.uniform(-180, 180)), border=cv2.BORDER_REFLECT)
    crop = np.roll(crop, (int(rng.integers(0, size)), int(rng.integers(0, size))), axis=(0, 1))
    gain = rng.uniform(0.7, 1.3, size=3)
    offset = rng.uniform(-30, 30, size=3)
    return np.clip(crop.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)


# ------------------------------------------------------- DRAEM's photometric augmenters
def _gamma(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(0.5, 2.0, size=3)
    return np.clip(255.0 * (x.astype(np.float32) / 255.0) ** gamma, 0, 255).astype(np.uint8)


def _brightness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30), 0, 255).astype(np.uint8)


def _sharpen(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    alpha = rng.uniform(0.0, 1.0)
    kernel = np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], np.float32)
    sharp = cv2.filter2D(x.astype(np.float32), -1, kernel)
    return np.clip((1 - alpha) * x + alpha * sharp, 0, 255).astype(np.uint8)


def _hue_saturation(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _solarize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    threshold = int(rng.integers(32, 129))
    return np.where(x >= threshold, 255 - x, x).astype(np.uint8)


def _posterize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bits = int(rng.integers(1, 6))
    mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
    return (x & mask).astype(np.uint8)


def _invert(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (255 - x).astype(np.uint8)


def _autocontrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    low = x.reshape(-1, 3).min(axis=0).astype(np.float32)
    high = x.reshape(-1, 3).max(axis=0).astype(np.float32)
    return np.clip((x - low) * 255.0 / np.maximum(high - low, 1.0), 0, 255).astype(np.uint8)


def _equalize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(x[..., c])) for c in range(3)], axis=-1)


def _rotate_augmenter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _rotate(x, float(rng.uniform(-45, 45)), border=cv2.BORDER_REFLECT)


#: DRAEM's ten augmenters (imgaug there; OpenCV/numpy here), three applied per source.
AUGMENTERS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    _gamma,
    _brightness,
    _sharpen,
    _hue_saturation,
    _solarize,
    _posterize,
    _invert,
    _autocontrast,
    _equalize,
    _rotate_augmenter,
)


def augment_source(texture: np.ndarray, rng: np.random.Generator, count: int = 3) -> np.ndarray:
    """Apply ``count`` of the ten augmenters, chosen without replacement, in random order."""
    out = np.ascontiguousarray(texture)
    for index in rng.choice(len(AUGMENTERS), size=count, replace=False):
        out = np.ascontiguousarray(AUGMENTERS[int(index)](out, rng))
    return out


def draem_blend(image: np.ndarray, source: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """DRAEM's blend ``y = x (1 - m) + (1 - beta) src m + beta x m`` on uint8 (S, S, 3) images.

    Pixels with ``m == 0`` are copied from ``image`` bit for bit; the blended pixels are
    rounded to uint8. ``beta`` must lie in [0, 0.8] (DRAEM draws it from U(0, 0.8)).
    """
    if not 0.0 <= beta <= MAX_BETA:
        raise ValueError(f"beta must be in [0, {MAX_BETA}], got {beta}")
    m = mask.astype(np.float32)[..., None]
    x = image.astype(np.float32)
    blended = x * (1 - m) + (1 - beta) * source.astype(np.float32) * m + beta * x * m
    blended = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return np.where(m > 0, blended, image).astype(np.uint8)


def pixel_anomaly(
    view: np.ndarray,
    normals: list[np.ndarray],
    patch: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One DRAEM-style pseudo anomaly on a uint8 (S, S, 3) view.

    The source is, with equal probability, a self-sourced crop of one of the ``normals``
    or a procedural texture; three augmenters are applied; beta ~ U(0, 0.8).

    Returns ``(image uint8 (S, S, 3), mask float32 (S, S), patch targets (S/p, S/p), beta)``.
    """
    size = view.shape[0]
    mask = perlin_mask(size, rng)
    if rng.random() < 0.5:
        source = self_source(normals[int(rng.integers(0, len(normals)))], size, rng)
    else:
        source = procedural_texture(size, rng)
    source = augment_source(source, rng)
    beta = float(rng.uniform(0.0, MAX_BETA))
    return draem_blend(view, source, mask, beta), mask, patch_targets(mask, patch), beta


# ------------------------------------------------------------------ latent anomalies
def latent_patch_mask(grid: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Patch mask for a latent anomaly: a Perlin mask at ``image_size`` average-pooled to
    ``grid`` x ``grid`` and thresholded at 0.5; if empty, one random rectangle of 2..5
    patches per side. Returns bool (grid, grid)."""
    patch = image_size // grid
    pooled = patch_targets(perlin_mask(image_size, rng), patch)
    mask = pooled >= 0.5
    if not mask.any():
        height = int(rng.integers(2, 6))
        width = int(rng.integers(2, 6))
        height, width = min(height, grid), min(width, grid)
        top = int(rng.integers(0, grid - height + 1))
        left = int(rng.integers(0, grid - width + 1))
        mask[top : top + height, left : left + width] = True
    return mask


def latent_noise(
    tokens: torch.Tensor,
    patch_mask: torch.Tensor,
    channel_std: torch.Tensor,
    sigma: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Add ``sigma * channel_std * N(0, I)`` to the masked patch tokens (SimpleNet form).

    Args:
        tokens: ``(B, 1 + N, D)`` block outputs, CLS first.
        patch_mask: bool ``(B, N)``, which patch tokens become anomalous.
        channel_std: ``(D,)`` per-channel std of clean boundary tokens.
        sigma: relative noise scale (0.5 by default, docs/anople.md §3.1).
        generator: the only source of randomness.

    Returns a new tensor; CLS and unmasked tokens are bit-identical to the input.
    """
    batch, length, width = tokens.shape
    noise = torch.randn((batch, length - 1, width), generator=generator, device=tokens.device, dtype=tokens.dtype)
    noise = noise * (sigma * channel_std.to(tokens.dtype))
    patches = torch.where(patch_mask[..., None].to(tokens.device), tokens[:, 1:] + noise, tokens[:, 1:])
    return torch.cat([tokens[:, :1], patches], dim=1)
