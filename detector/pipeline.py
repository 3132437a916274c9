"""The records the shared pipeline hands between its stages (``detector.base``): a
preprocessed batch, one image's method output, and the backbone a method asks for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .geometry import Geometry
from .images import LoadedImage
from .timing import Stopwatch


@dataclass(frozen=True)
class PreparedBatch:
    """Images ready for a method's encoder.

    Attributes:
        pixels: float32 ``(B, 3, S, S)`` normalised input on the backbone's device.
        geometries: one per image: how its original frame maps onto the input.
        images: the loaded images (original pixels, warnings).
        stopwatch: the timings of this call; hooks may time their own sub-stages
            (``with batch.stopwatch("decode"): ...``), which then appear in the results.
    """

    pixels: torch.Tensor
    geometries: tuple[Geometry, ...]
    images: tuple[LoadedImage, ...]
    stopwatch: Stopwatch = field(default_factory=Stopwatch, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    def select(self, indices: Sequence[int]) -> "PreparedBatch":
        """The sub-batch of ``indices`` (in that order)."""
        index = list(indices)
        return PreparedBatch(
            self.pixels[index], tuple(self.geometries[i] for i in index), tuple(self.images[i] for i in index), self.stopwatch
        )


@dataclass
class MethodOutput:
    """What ``_score`` returns for one image, before the shared post-processing.

    Attributes:
        score: the image score.
        raw_map: float32 ``(h, w)`` patch-grid map.
        extras: plain values for ``DetectionResult.extras``.
        evidence: the method's own typed record for ``_explain_patch``.
        warnings: warnings of this result beyond the image's own.
    """

    score: float
    raw_map: np.ndarray
    extras: dict[str, Any] = field(default_factory=dict)
    evidence: Any = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackboneChoice:
    """Which backbone a method builds (``Detector._backbone_choice``).

    Attributes:
        model_name: open_clip model name.
        weights: ``"random"``, a tag, a file or ``hf-hub:`` address.
        image_size: input side; ``None`` keeps the model's.
        precision: ``"fp32"`` or ``"bf16"``.
        quick_gelu: ``None`` = QuickGELU exactly for OpenAI weights.
        ignore_prefixes: key prefixes of a weights file that are not CLIP's.
        description: says where the weights come from when the backbone's own
            description would mislead (e.g. "from checkpoint X").
    """

    model_name: str
    weights: str
    image_size: int | None = None
    precision: str = "fp32"
    quick_gelu: bool | None = None
    ignore_prefixes: tuple[str, ...] = ()
    description: str | None = None
