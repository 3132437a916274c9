"""How a method's square model input relates to the original image.

Preprocessing resizes the original (H, W) image to ``resized`` and then takes a
``size`` x ``size`` crop at (``crop_top``, ``crop_left``). Maps computed on the crop are
brought back to the original frame by undoing both steps (see ``detector.maps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ResizeMode = Literal["shorter", "squash"]


@dataclass(frozen=True)
class Geometry:
    """Frames of one preprocessed image, all in pixels as (height, width)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    crop_top: int
    crop_left: int
    size: int


def input_geometry(height: int, width: int, size: int, resize: ResizeMode) -> Geometry:
    """Geometry of torchvision's ``Resize`` + ``CenterCrop(size)``, as the methods use them.

    ``"shorter"``: ``Resize(size)`` scales the shorter side to ``size`` and the longer
    one to ``int(size * long / short)`` (torchvision's rule), then a centred crop whose
    offset is ``int(round((resized - size) / 2))``. ``"squash"``: ``Resize((size, size))``,
    the aspect ratio is not kept and no crop happens.
    """
    if resize == "squash":
        return Geometry((height, width), (size, size), 0, 0, size)
    if resize != "shorter":
        raise ValueError(f"unknown resize mode {resize!r}; expected 'shorter' or 'squash'")
    if height <= width:
        resized = (size, int(size * width / height))
    else:
        resized = (int(size * height / width), size)
    crop_top = int(round((resized[0] - size) / 2.0))
    crop_left = int(round((resized[1] - size) / 2.0))
    return Geometry((height, width), resized, crop_top, crop_left, size)
