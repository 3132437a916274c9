"""AnoPLe's training views (docs/anople.md §3.1, §3.3): the normals, global / local views with
DRAEM pseudo anomalies, and the layout of the fast preset's fixed pool (its encoding and
the optimisation loop are in ``fitting.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .anomalies import pixel_anomaly
from .config import AnoPLeConfig
from .decoder import GLOBAL_VIEW, LOCAL_VIEW

Progress = Callable[[float, str], None]


def pool_size(k: int, config: AnoPLeConfig) -> int:
    """clamp(per_shot * k, min, max) views (fast preset: clamp(4k, 16, 32))."""
    return int(min(config.pool_max, max(config.pool_min, config.pool_per_shot * k)))


@dataclass
class NormalImage:
    """One fitted normal: its RGB pixels and its global-view model input (the same tensor
    a query of that image gets)."""

    rgb: np.ndarray
    global_input: torch.Tensor  # (3, S, S)


@dataclass
class ViewBatch:
    """Views ready for the encoder.

    Attributes:
        images: ``(B, 3, S, S)`` normalised inputs.
        labels: ``(B,)`` long, 1 = pixel-anomalous.
        targets: ``(B, N)`` soft patch targets.
        views: ``(B,)`` long view ids (0 global, 1 local).
        shots: index of the normal each view comes from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    views: torch.Tensor
    shots: list[int]


@dataclass
class EncodedPool(ViewBatch):
    """A ``ViewBatch`` encoded up to the cache boundary.

    Attributes:
        boundary_tokens: ``(P, 1 + N, D_v)`` output of block ``layout.boundary``.
        levels: ``{l: (P, N, D_v)}`` patch rows of the kept blocks below the boundary.
    """

    boundary_tokens: torch.Tensor = None
    levels: dict[int, torch.Tensor] = field(default_factory=dict)


class ViewMaker:
    """Builds global / local views and DRAEM pseudo anomalies from the normals.

    Args:
        normals: the fitted normals.
        size: model input side S.
        patch: ViT patch size.
        to_input: uint8 (S, S, 3) view -> normalised (3, S, S) tensor (the query
            preprocessing; an S x S view is not resized again).
        rng: numpy generator for every random choice.
        resized_crop: apply a random resized crop (area 0.8..1) first (faithful preset).
        local_fraction: side of the local crop relative to min(H, W) (0.5: a 2x zoom).
    """

    def __init__(
        self,
        normals: list[NormalImage],
        size: int,
        patch: int,
        to_input: Callable[[np.ndarray], torch.Tensor],
        rng: np.random.Generator,
        *,
        resized_crop: bool = False,
        local_fraction: float = 0.5,
    ) -> None:
        self.normals = normals
        self.size = size
        self.patch = patch
        self.to_input = to_input
        self.rng = rng
        self.resized_crop = resized_crop
        self.local_fraction = local_fraction
        self.grid = size // patch

    def _resize(self, rgb: np.ndarray) -> np.ndarray:
        """Bicubic (antialiased, PIL) resize to S x S, as the query preprocessing does."""
        return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((self.size, self.size), Image.BICUBIC))

    def _source_image(self, shot: int) -> np.ndarray:
        rgb = self.normals[shot].rgb
        if not self.resized_crop:
            return rgb
        height, width = rgb.shape[:2]
        scale = math.sqrt(self.rng.uniform(0.8, 1.0))
        crop_h, crop_w = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
        top = int(self.rng.integers(0, height - crop_h + 1))
        left = int(self.rng.integers(0, width - crop_w + 1))
        return rgb[top : top + crop_h, left : left + crop_w]

    def view_pixels(self, shot: int, local: bool) -> np.ndarray:
        """uint8 (S, S, 3): the whole image (global) or a random square crop of side
        ``local_fraction * min(H, W)`` of the original-resolution image (local)."""
        rgb = self._source_image(shot)
        if not local:
            return self._resize(rgb)
        height, width = rgb.shape[:2]
        side = max(1, int(round(self.local_fraction * min(height, width))))
        top = int(self.rng.integers(0, height - side + 1))
        left = int(self.rng.integers(0, width - side + 1))
        return self._resize(rgb[top : top + side, left : left + side])

    def make(self, shot: int, local: bool, pixel: bool) -> tuple[torch.Tensor, int, np.ndarray]:
        """One view: ``(input (3, S, S), label, patch targets (N,))``.

        The clean global view without resized crop is the normal's own query input.
        """
        if not local and not pixel and not self.resized_crop:
            return self.normals[shot].global_input, 0, np.zeros(self.grid * self.grid, np.float32)
        view = self.view_pixels(shot, local)
        if not pixel:
            return self.to_input(view), 0, np.zeros(self.grid * self.grid, np.float32)
        sources = [n.rgb for n in self.normals]
        image, _, targets, _ = pixel_anomaly(view, sources, self.patch, self.rng)
        return self.to_input(image), 1, targets.reshape(-1)

    def batch(self, items: list[tuple[int, bool, bool]]) -> ViewBatch:
        """Views for ``(shot, local, pixel)`` triples."""
        inputs, labels, targets, views, shots = [], [], [], [], []
        for shot, local, pixel in items:
            tensor, label, target = self.make(shot, local, pixel)
            inputs.append(tensor)
            labels.append(label)
            targets.append(torch.from_numpy(target))
            views.append(LOCAL_VIEW if local else GLOBAL_VIEW)
            shots.append(shot)
        return ViewBatch(
            images=torch.stack(inputs),
            labels=torch.tensor(labels, dtype=torch.long),
            targets=torch.stack(targets),
            views=torch.tensor(views, dtype=torch.long),
            shots=shots,
        )


def pool_items(k: int, size: int) -> list[tuple[int, bool, bool]]:
    """The cached pool as ``(shot, local, pixel)`` triples: half clean, half pixel-anomalous
    (DRAEM's 50 % no-anomaly draw).

    Clean half: every normal's own global view first (the memory bank and the query-like
    views come free from the cache), then local crops, shots cycled. Pixel half: global and
    local pseudo-anomalous views alternating, shots cycled."""
    clean_count = size // 2
    clean = [(shot, False, False) for shot in range(min(k, clean_count))]
    clean += [(index % k, True, False) for index in range(clean_count - len(clean))]
    # global / local alternate along the pool and flip each round of shots, so that every
    # shot gets both kinds whatever k is
    pixel = [(index % k, (index // k + index % k) % 2 == 1, True) for index in range(size - clean_count)]
    return clean + pixel


