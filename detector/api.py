"""The public types of the package: results, calibration records, errors and the
``Detector`` base class every method derives from (see ``shared/specs/api.md``)."""

from __future__ import annotations

import abc
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np

from . import limits

ProgressCallback = Callable[[float, str], None]


class DetectorError(Exception):
    """Base class of the package's own errors."""


class CheckpointError(DetectorError, ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class InvalidImageError(DetectorError, ValueError):
    """An image that cannot be used: unreadable, truncated, too large or too small."""


class WeightsUnavailableError(DetectorError, RuntimeError):
    """Pretrained weights that cannot be found locally nor downloaded."""


@dataclass(frozen=True)
class DetectionResult:
    """What ``Detector.predict`` returns for one query image.

    Attributes:
        method: registered method name, e.g. ``"inctrl"``.
        score: image-level anomaly score, the method's own output.
        anomaly_map: float32 ``(H, W)`` at the query's original size, after the method's
            own upsampling and smoothing.
        raw_map: float32 ``(h, w)``, the method's native patch-grid map.
        timings: seconds per stage.
        extras: method-specific parts (component scores, intermediate maps).
        warnings: things the user should know about this result.
    """

    method: str
    score: float
    anomaly_map: np.ndarray
    raw_map: np.ndarray
    timings: dict[str, float]
    extras: dict[str, Any]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Calibration:
    """Reference values that put a method's scores and maps on a common scale.

    ``normalize`` follows anomalib: ``clip((x - threshold) / (max - min) + 0.5, 0, 1)``,
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

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def normalize(values: np.ndarray | np.floating, lower: float, upper: float, threshold: float) -> np.ndarray:
    """anomalib's min-max-threshold normalisation: the threshold lands on 0.5.

    ``clip((x - threshold) / (upper - lower) + 0.5, 0, 1)``; a zero range is treated as 1e-12.
    """
    span = max(float(upper) - float(lower), 1e-12)
    out = (np.asarray(values, dtype=np.float32) - np.float32(threshold)) / np.float32(span) + np.float32(0.5)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass
class Stopwatch:
    """Collects seconds per named stage: ``with watch("encode"): ...``."""

    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


class Detector(abc.ABC):
    """Base class of every method: validation, image loading and the public calls.

    A subclass sets the class attributes below, implements ``_fit`` and ``_predict`` on
    already loaded images (``LoadedImage``), and ``describe``. Registration happens with
    ``detector.registry.register_method``.
    """

    #: Registered name, set by ``register_method``.
    name: ClassVar[str] = ""
    #: Human-readable name for displays.
    display_name: ClassVar[str] = ""
    #: Whether ``predict`` needs ``fit`` first (few-shot methods).
    requires_fit: ClassVar[bool] = True
    #: The method-specific keyword options ``create_detector`` accepts, with defaults.
    method_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, device: str = "cpu", class_name: str = "object", sigma: float | None = None, seed: int = 0) -> None:
        if sigma is not None and (not np.isfinite(sigma) or sigma < 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        self.device = device
        self.class_name = str(class_name)
        self.sigma = sigma
        self.seed = int(seed)
        self._fitted = False
        self._num_normals = 0

    # -- public API -----------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self._fitted

    @property
    def num_normals(self) -> int:
        return self._num_normals

    def fit(self, normal_images: Sequence[Any] | None, progress: ProgressCallback | None = None) -> "Detector":
        """Cache what the method needs from 0..N normal images; returns ``self``.

        Raises ``ValueError`` for zero images on a few-shot method or more than
        ``limits.MAX_NORMAL_IMAGES``; ``InvalidImageError`` for an unusable image.
        """
        from .images import load_image

        images = list(normal_images or [])
        check_normal_count(len(images), self.display_name or self.name, required=self.requires_fit)
        loaded = [load_image(img) for img in images]
        self._fit(loaded, progress)
        self._fitted = True
        self._num_normals = len(loaded)
        if progress is not None:
            progress(1.0, "done")
        return self

    def predict(self, query_image: Any) -> DetectionResult:
        """Score one query image (path, bytes, PIL image or HxWx3 uint8 array)."""
        from .images import load_image

        self._check_ready()
        return self._predict(load_image(query_image))

    def predict_batch(self, query_images: Sequence[Any]) -> list[DetectionResult]:
        """Score several queries; each result equals ``predict`` on that query alone."""
        return [self.predict(image) for image in query_images]

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """A short dict: method, backbone, image size, weights in use, trained or not."""

    def calibrate(self, normals: Sequence[Any] | None = None) -> Calibration:
        """Reference range and threshold for this method (see api.md, Calibration)."""
        from .calibration import calibrate

        return calibrate(self, normals)

    def default_calibration(self) -> Calibration:
        """The method's documented fixed range and threshold (scores and maps in [0, 1],
        threshold 0.5, unless a method says otherwise)."""
        from .calibration import fixed_calibration

        return fixed_calibration(0.0, 1.0, 0.5)

    def leave_one_out(self) -> list[tuple[float, np.ndarray]] | None:
        """(score, anomaly_map) of each fitted normal scored against the others, from
        cached features; ``None`` when the method cannot do it (fewer than 2 normals)."""
        return None

    def explain(self, result: DetectionResult, x: int, y: int) -> dict[str, Any]:
        """Why the pixel (x, y) of the query's original image got its value."""
        raise NotImplementedError(f"{self.name} has no explanation tool")

    # -- for subclasses ---------------------------------------------------------------
    @abc.abstractmethod
    def _fit(self, images: list, progress: ProgressCallback | None) -> None:
        """Method-specific fit on loaded images (``list[LoadedImage]``, may be empty)."""

    @abc.abstractmethod
    def _predict(self, image) -> DetectionResult:
        """Method-specific prediction on one ``LoadedImage``."""

    def _check_ready(self) -> None:
        if self.requires_fit and not self._fitted:
            raise RuntimeError(
                f"{self.display_name or self.name} is a few-shot method: call fit() with normal images first"
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def check_normal_count(count: int, method: str, *, required: bool) -> None:
    """Raise ``ValueError`` when ``count`` normal images are not acceptable."""
    if count > limits.MAX_NORMAL_IMAGES:
        raise ValueError(
            f"{method}: {count} normal images given, at most {limits.MAX_NORMAL_IMAGES} are accepted"
        )
    if required and count < limits.MIN_NORMAL_IMAGES:
        raise ValueError(f"{method} needs at least {limits.MIN_NORMAL_IMAGES} normal image(s); none were given")
