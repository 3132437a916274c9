"""Calibration records: reference ranges and thresholds that put every method on one scale.

Sources, in order (``Detector.calibrate``, docs/calibration.md §3):

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

A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

#: Fraction of the method's range added above the highest normal value.
MARGIN = 0.02


def normalize(values: np.ndarray | np.floating, lower: float, upper: float, threshold: float) -> np.ndarray:
    """anomalib's min-max-threshold normalisation: the threshold lands on 0.5.

    ``clip((x - threshold) / (upper - lower) + 0.5, 0, 1)``; a zero range is treated as 1e-12.
    """
    span = max(float(upper) - float(lower), 1e-12)
    out = (np.asarray(values, dtype=np.float32) - np.float32(threshold)) / np.float32(span) + np.float32(0.5)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Calibration:
    """Reference values that put a method's scores and maps on a common scale.

    ``normalize_*`` follow anomalib: ``clip((x - threshold) / (max - min) + 0.5, 0, 1)``,
    so 0.5 means "at the threshold" for every method.
    """

    image_min: float
    image_max: float
    image_threshold: float
    pixel_min: float
    pixel_max: float
    pixel_threshold: float
    source: str

    def normalize_score(self, score: float) -> float:
        """Calibrated image score in [0, 1]."""
        return float(normalize(np.float32(score), self.image_min, self.image_max, self.image_threshold))

    def normalize_map(self, anomaly_map: np.ndarray) -> np.ndarray:
        """Calibrated map in [0, 1], float32, same shape."""
        return normalize(anomaly_map, self.pixel_min, self.pixel_max, self.pixel_threshold)

    def raw_image_threshold(self, calibrated_threshold: float) -> float:
        """The method's own score that a calibrated threshold (0.5 = its own) corresponds to:
        the inverse of ``normalize_score`` inside the clipped range."""
        return float(self.image_threshold + (float(calibrated_threshold) - 0.5) * (self.image_max - self.image_min))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fixed_calibration(lower: float, upper: float, threshold: float, source: str = "default") -> Calibration:
    """The same fixed range and threshold for scores and maps."""
    return Calibration(lower, upper, threshold, lower, upper, threshold, source)


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
    return Calibration(image_min, image_max, image_threshold, pixel_min, pixel_max, pixel_threshold, source)
