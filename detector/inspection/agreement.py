"""Where the methods agree: the pixels their calibrated maps flag together, as a count map, a
colour picture and a one-line summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import cv2
import numpy as np

from .. import maps
from .drawing import rgb_array

#: Agreement colours: one method (yellow) ... all methods (red), interpolated in between.
AGREEMENT_ONE_COLOR = (255, 215, 0)
AGREEMENT_ALL_COLOR = (220, 0, 0)



@dataclass(frozen=True)
class Agreement:
    """Where the methods' calibrated maps agree.

    Attributes:
        methods: method names in the order given.
        threshold: calibrated threshold used for every method.
        counts: int32 ``(H, W)``, how many methods flag each pixel.
        image: uint8 ``(H, W, 3)``: pixels flagged by no method keep the base image (or
            stay black), one method = yellow ... all methods = red.
        summary: one sentence, e.g. "2 of 3 methods (InCTRL, AnoPLe) flag the region near (120, 45)".
        level: number of methods flagging the summarised region (0 = nothing flagged).
        location: ``(x, y)`` centroid of the summarised region in original pixels, or ``None``.
        region_methods: the methods that flag (most of) the summarised region.
        region_area: pixels in the summarised region.
    """

    methods: tuple[str, ...]
    threshold: float
    counts: np.ndarray
    image: np.ndarray
    summary: str
    level: int
    location: tuple[int, int] | None
    region_methods: tuple[str, ...]
    region_area: int


def agreement_colors(num_methods: int) -> dict[int, tuple[int, int, int]]:
    """RGB colour per count 1..n: yellow for one method, red for all, interpolated between."""
    if num_methods < 1:
        raise ValueError("at least one method is needed")
    colors = {}
    for count in range(1, num_methods + 1):
        t = 1.0 if num_methods == 1 else (count - 1) / (num_methods - 1)
        colors[count] = tuple(
            int(round((1 - t) * a + t * b)) for a, b in zip(AGREEMENT_ONE_COLOR, AGREEMENT_ALL_COLOR)
        )
    return colors


def agreement(
    calibrated_maps: Mapping[str, np.ndarray],
    threshold: float = 0.5,
    *,
    base_image: Any | None = None,
    alpha: float = 0.6,
) -> Agreement:
    """Combine the calibrated maps (0.5 = each method's threshold) of the methods run.

    A method flags a pixel when its calibrated map is >= ``threshold``. The summary names
    the largest connected region (8-connectivity) flagged by all methods, else by as many
    as any pixel gets; its location is the region's centroid. Ties between equally large
    regions go to the first one in raster order.

    Args:
        calibrated_maps: method name -> float ``(H, W)`` map on the calibrated scale.
        threshold: calibrated decision threshold.
        base_image: optional uint8 ``(H, W, 3)`` (e.g. the query) under the colours.
        alpha: opacity of the colours over ``base_image``.
    """
    if not calibrated_maps:
        raise ValueError("agreement needs at least one method's map")
    names = tuple(str(name) for name in calibrated_maps)
    masks = [maps.threshold_mask(np.asarray(m), threshold) for m in calibrated_maps.values()]
    counts = maps.agreement_map(masks)
    total = len(names)
    height, width = counts.shape
    if base_image is None:
        image = np.zeros((height, width, 3), dtype=np.uint8)
        weight = 1.0
    else:
        image = np.array(rgb_array(base_image), copy=True)
        if image.shape[:2] != counts.shape:
            raise ValueError(f"base image of size {image.shape[1]}x{image.shape[0]} does not match the {width}x{height} maps")
        weight = float(alpha)
    for count, color in agreement_colors(total).items():
        where = counts == count
        if where.any():
            blended = (1.0 - weight) * image[where].astype(np.float32) + weight * np.asarray(color, np.float32)
            image[where] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    level = int(counts.max())
    if level == 0:
        summary = f"None of the {total} method{'s' if total != 1 else ''} flags any region at threshold {threshold:.2f}"
        return Agreement(names, float(threshold), counts, image, summary, 0, None, (), 0)
    region = (counts == level).astype(np.uint8)
    _, labels, stats, centroids = cv2.connectedComponentsWithStats(region, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    label = 1 + int(np.argmax(areas))  # first maximum: first region in raster order
    cx, cy = centroids[label]
    location = (int(round(cx)), int(round(cy)))
    in_region = labels == label
    coverage = [float(mask[in_region].mean()) for mask in masks]
    order = sorted(range(total), key=lambda i: (-coverage[i], i))[:level]
    region_methods = tuple(names[i] for i in sorted(order))
    verb = "flags" if level == 1 else "flag"
    summary = f"{level} of {total} method{'s' if total != 1 else ''} ({', '.join(region_methods)}) {verb} the region near {location}"
    return Agreement(names, float(threshold), counts, image, summary, level, location, region_methods, int(areas[label - 1]))
