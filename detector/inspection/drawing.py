"""Small drawing helpers shared by the inspection tools (uint8 ``(H, W, 3)`` RGB arrays; boxes
``(x0, y0, x1, y1)`` with exclusive ends, in original-image pixels as in ``detector.maps``)."""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from ..images import load_image

#: Colour of the clicked patch's box on the query and of the nearest patch on the normal.
QUERY_BOX_COLOR = (0, 200, 255)
NORMAL_BOX_COLOR = (0, 220, 0)


def rgb_array(image: Any) -> np.ndarray:
    """A uint8 ``(H, W, 3)`` array from an array or anything ``load_image`` accepts."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    return load_image(image).rgb


def line_width(image: np.ndarray) -> int:
    return max(1, int(round(min(image.shape[:2]) / 150)))


def draw_box(image_rgb: np.ndarray, box: Sequence[int], color: tuple[int, int, int], thickness: int | None = None) -> np.ndarray:
    """A copy of the image with the box ``(x0, y0, x1, y1)`` (exclusive ends) outlined."""
    out = np.ascontiguousarray(np.array(rgb_array(image_rgb), copy=True))
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = out.shape[:2]
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {tuple(box)} does not fit in a {width}x{height} image")
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), tuple(int(c) for c in color), thickness or line_width(out))
    return out


def thumbnail(image_rgb: Any, size: int = 96) -> np.ndarray:
    """The image scaled so its longer side is ``size`` pixels (never enlarged)."""
    image = rgb_array(image_rgb)
    height, width = image.shape[:2]
    scale = min(1.0, float(size) / max(height, width))
    if scale >= 1.0:
        return image.copy()
    new = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    return cv2.resize(image, new, interpolation=cv2.INTER_AREA)
