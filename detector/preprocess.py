"""Model input from a loaded image, described by data (:class:`Preprocess`).

One code path for every method: torchvision's PIL-based ``resize`` (antialiased bicubic),
``center_crop``, ``to_tensor`` and ``normalize``, so it equals the official pipelines
exactly. The :class:`~detector.geometry.Geometry` of each input says where it sits in the
original frame (``detector.maps`` undoes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .geometry import Geometry, ResizeMode, input_geometry
from .images import LoadedImage, to_rgb_pixels

#: Mean and standard deviation of OpenAI CLIP's input normalisation (RGB order).
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """How a method turns an image into its square model input.

    Attributes:
        size: side of the square input in pixels.
        resize: ``"shorter"`` = torchvision ``Resize(size)`` (shorter side to ``size``,
            bicubic, antialiased) then ``CenterCrop(size)``; ``"squash"`` =
            ``Resize((size, size))``, aspect ratio not kept.
        mean, std: per-channel normalisation after ``ToTensor`` (OpenAI CLIP's by default).
    """

    size: int
    resize: ResizeMode
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise ValueError(f"Preprocess.size must be a positive integer, got {self.size!r}")
        if self.resize not in ("shorter", "squash"):
            raise ValueError(f"Preprocess.resize must be 'shorter' or 'squash', got {self.resize!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("Preprocess.mean and Preprocess.std need three values (R, G, B)")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"Preprocess.std values must be > 0, got {self.std!r}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))




def preprocess(image: LoadedImage | np.ndarray, spec: Preprocess) -> tuple[torch.Tensor, Geometry]:
    """Model input for one image and where it sits in the original frame.

    Runs torchvision's functional transforms on a PIL RGB image (the PIL path, so the
    bicubic resize is antialiased), exactly as the official pipelines do:
    ``resize`` -> ``center_crop`` (``"shorter"`` only) -> ``to_tensor`` -> ``normalize``.

    Args:
        image: a :class:`LoadedImage`, or an array converted by the rules of
            :func:`load_image` (the size limits are not applied to arrays here).
        spec: the method's :class:`Preprocess`.

    Returns:
        A float32 ``(3, size, size)`` tensor and the :class:`~detector.geometry.Geometry`
        of the resize and crop.
    """
    rgb = to_rgb_pixels(image)
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    pil = Image.fromarray(rgb)
    if spec.resize == "shorter":
        pil = TF.resize(pil, spec.size, interpolation=InterpolationMode.BICUBIC)
        pil = TF.center_crop(pil, [spec.size, spec.size])
    else:
        pil = TF.resize(pil, [spec.size, spec.size], interpolation=InterpolationMode.BICUBIC)
    tensor = TF.normalize(TF.to_tensor(pil), list(spec.mean), list(spec.std))
    return tensor, input_geometry(height, width, spec.size, spec.resize)


def preprocess_batch(
    images: Sequence[LoadedImage | np.ndarray], spec: Preprocess
) -> tuple[torch.Tensor, list[Geometry]]:
    """:func:`preprocess` for several images: a float32 ``(B, 3, size, size)`` tensor and the geometries."""
    tensors: list[torch.Tensor] = []
    geometries: list[Geometry] = []
    for image in images:
        tensor, geometry = preprocess(image, spec)
        tensors.append(tensor)
        geometries.append(geometry)
    if not tensors:
        return torch.empty((0, 3, spec.size, spec.size), dtype=torch.float32), []
    return torch.stack(tensors), geometries
