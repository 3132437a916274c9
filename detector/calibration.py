"""Calibration: reference ranges and thresholds that put every method on one scale.

Sources, in order (api.md, "Calibration"):

1. ``stored``: a calibration record saved with the method's checkpoint;
2. ``held-out normals``: extra normal images passed to ``calibrate(normals)``, scored as
   queries against the fitted state;
3. ``leave-one-out``: with k >= 2 fitted normals, each normal scored against the others
   (the method's ``_leave_one_out`` hook, from cached features);
4. ``default``: the method's documented fixed range and threshold.

From normal images alone the upper end of the anomalous range is unknown, so
``image_max`` / ``pixel_max`` keep the method's documented range maximum, the lower ends
are the lowest normal values, and each threshold is the highest normal value plus
``MARGIN`` times the range (anomalib falls back to the highest normal score in the same
situation; the margin keeps the normals themselves just below 0.5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .api import Calibration

if TYPE_CHECKING:
    from .api import Detector

#: Fraction of the method's range added above the highest normal value.
MARGIN = 0.02


def calibration_from_normals(
    scores: Sequence[float],
    maps: Sequence[np.ndarray],
    default: Calibration,
    source: str,
    margin: float = MARGIN,
) -> Calibration:
    """Calibration from the scores and maps of normal images scored as queries."""
    scores_array = np.asarray(list(scores), dtype=np.float64)
    if scores_array.size == 0:
        return default
    pixel_values = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps]) if maps else np.zeros(0)
    image_min = min(float(scores_array.min()), default.image_min)
    image_max = max(default.image_max, float(scores_array.max()))
    image_threshold = float(scores_array.max()) + margin * (image_max - image_min)
    if pixel_values.size:
        pixel_min = min(float(pixel_values.min()), default.pixel_min)
        pixel_max = max(default.pixel_max, float(pixel_values.max()))
        pixel_threshold = float(pixel_values.max()) + margin * (pixel_max - pixel_min)
    else:
        pixel_min, pixel_max, pixel_threshold = default.pixel_min, default.pixel_max, default.pixel_threshold
    return Calibration(
        image_min=image_min,
        image_max=image_max,
        image_threshold=image_threshold,
        pixel_min=pixel_min,
        pixel_max=pixel_max,
        pixel_threshold=pixel_threshold,
        source=source,
    )


def fixed_calibration(lower: float, upper: float, threshold: float, source: str = "default") -> Calibration:
    """The same fixed range and threshold for scores and maps."""
    return Calibration(lower, upper, threshold, lower, upper, threshold, source)


def calibrate(detector: "Detector", normals: Sequence[Any] | None = None) -> Calibration:
    """Choose and compute the calibration of a detector (see the module docstring)."""
    stored = getattr(detector, "stored_calibration", None)
    if stored is not None:
        return stored
    default: Calibration = detector.default_calibration()
    if normals:
        results = [detector.predict(image) for image in normals]
        return calibration_from_normals(
            [r.score for r in results], [r.anomaly_map for r in results], default, f"{len(results)} held-out normals"
        )
    leave_one_out = detector.leave_one_out() if detector.is_fitted else None
    if leave_one_out:
        scores, maps = zip(*leave_one_out)
        return calibration_from_normals(scores, maps, default, f"leave-one-out over {len(scores)} normals")
    return default
