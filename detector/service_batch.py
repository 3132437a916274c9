"""The service's batch loop: many queries scored with already fitted detectors, each
image loaded once, ranked per method (``InspectionService.batch`` fits, then calls this)."""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np

from . import maps
from .base import Detector
from .calibration import Calibration
from .errors import InvalidImageError
from .images import load_image
from .inspection.batch import BatchResult, BatchRow, rank_batch, verdict
from .inspection.drawing import thumbnail
from .progress import ProgressCallback
from .requests import check_batch_size


def _unpack(entry: Any) -> tuple[Detector, Calibration]:
    if isinstance(entry, tuple):
        return entry[0], entry[1]
    return entry.detector, entry.calibration


def run_batch(
    detectors: Mapping[str, Any],
    queries: Sequence[tuple[str, Any]],
    *,
    threshold: float = 0.5,
    keep_overlays: bool = True,
    alpha: float = 0.5,
    colormap: str = "jet",
    thumbnail_size: int = 96,
    progress: ProgressCallback | None = None,
) -> BatchResult:
    """Score many queries against one normal set with already fitted detectors.

    Args:
        detectors: method name -> ``(detector, calibration)`` or an object with
            ``.detector`` and ``.calibration`` (``service.FittedDetector``).
        queries: ``(image name, image)`` pairs; an image is anything ``load_image`` accepts.
        threshold: calibrated threshold for the verdicts.
        keep_overlays: keep one calibrated overlay per (image, method) for ``overlays_zip``.
        alpha, colormap: overlay look (``maps.overlay``).
        thumbnail_size: longer side of the thumbnail stored in each row.
        progress: ``progress(fraction, message)`` after each image and method.

    Returns:
        ``BatchResult`` with rows ranked by ``rank_batch``. An image that cannot be decoded
        (``InvalidImageError``) is listed in ``errors`` and skipped; other errors propagate.
        More than ``limits.MAX_BATCH_QUERIES`` queries raise ``ValueError`` before any work.
    """
    if not detectors:
        raise ValueError("choose at least one method")
    check_batch_size(len(queries))
    entries = {name: _unpack(entry) for name, entry in detectors.items()}
    rows: list[BatchRow] = []
    overlays: list[tuple[str, str, np.ndarray]] = []
    steps = max(1, len(queries) * len(entries))
    done = 0
    errors: list[tuple[str, str]] = []
    for image_name, source in queries:
        try:
            loaded = load_image(source)
        except InvalidImageError as error:
            errors.append((str(image_name), str(error)))
            done += len(entries)
            if progress is not None:
                progress(done / steps, f"skipped {image_name}: {error}")
            continue
        small = thumbnail(loaded.rgb, thumbnail_size)
        for method, (det, calibration) in entries.items():
            start = time.perf_counter()
            result = det.predict(loaded)
            seconds = time.perf_counter() - start
            calibrated = calibration.normalize_score(result.score)
            raw_threshold = calibration.image_threshold + (float(threshold) - 0.5) * (calibration.image_max - calibration.image_min)
            rows.append(
                BatchRow(
                    image=str(image_name),
                    method=method,
                    score=float(result.score),
                    calibrated=float(calibrated),
                    threshold=float(threshold),
                    verdict=verdict(calibrated, threshold),
                    seconds=float(seconds),
                    raw_threshold=float(raw_threshold),
                    thumbnail=small,
                )
            )
            if keep_overlays:
                overlays.append((str(image_name), method, maps.overlay(loaded.rgb, calibration.normalize_map(result.anomaly_map), alpha, colormap)))
            done += 1
            if progress is not None:
                progress(done / steps, f"{method}: {image_name}")
    return BatchResult(rank_batch(rows), overlays, errors)
