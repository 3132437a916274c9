"""What the service returns: one method's outcome for one query, all methods' report, and the
sentences that say which weights a method ran on."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .base import Detector
from .calibration import Calibration
from .images import LoadedImage
from .registry import get_method
from .results import DetectionResult
from .status import fetch_hint


@dataclass
class FittedDetector:
    """One cache entry: a fitted detector, its calibration and its description.

    ``provisional``: the calibration is the method's default until its leave-one-out
    calibration lands (``InspectionService.calibrate_entry``).
    """

    method: str
    detector: Detector
    calibration: Calibration
    description: dict[str, Any]
    weights_fallback: str | None = None
    fit_seconds: float = 0.0
    provisional: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    #: Callers in ``calibrate_entry`` now, waiting or calibrating (guarded by the service's lock).
    calibration_callers: int = field(default=0, repr=False, compare=False)


@dataclass(frozen=True)
class MethodOutcome:
    """One method's answer to one query."""

    method: str
    display_name: str
    result: DetectionResult
    calibration: Calibration
    description: dict[str, Any]
    seconds: float
    warnings: tuple[str, ...] = ()
    weights_fallback: str | None = None
    reused_fit: bool = False
    #: The fitted detector that produced ``result`` (for explanations from its cached
    #: features); not part of equality.
    detector: Detector | None = field(default=None, compare=False, repr=False)
    #: The calibration is the method's default while its own is still being computed.
    provisional: bool = False
    #: The cache entry behind ``result``, whose final calibration a provisional outcome
    #: waits for (``InspectionService.calibrate_report``); not part of equality.
    entry: FittedDetector | None = field(default=None, compare=False, repr=False)

    @property
    def calibrated_score(self) -> float:
        return self.calibration.normalize_score(self.result.score)

    def calibrated_map(self) -> np.ndarray:
        """``anomaly_map`` on the calibrated 0..1 scale (0.5 = the method's threshold)."""
        return self.calibration.normalize_map(self.result.anomaly_map)

    def raw_threshold(self, threshold: float) -> float:
        """The method's own score that a calibrated ``threshold`` corresponds to."""
        return self.calibration.raw_image_threshold(threshold)

    def is_anomalous(self, threshold: float) -> bool:
        return self.calibrated_score >= float(threshold)

    def summary(self, threshold: float) -> dict[str, Any]:
        """JSON-able facts for one method at a calibrated ``threshold``."""
        return {
            "method": self.method,
            "display_name": self.display_name,
            "score": float(self.result.score),
            "calibrated_score": float(self.calibrated_score),
            "threshold": float(self.raw_threshold(threshold)),
            "threshold_calibrated": float(threshold),
            "verdict": "anomalous" if self.is_anomalous(threshold) else "normal",
            "seconds": float(self.seconds),
            "weights": weights_text(self.description, trained_offline=get_method(self.method).spec.trained_offline),
            "trained": bool(self.description.get("trained", False)),
            "mode": self.description.get("mode"),
            "calibration": self.calibration.source,
            "calibration_values": self.calibration.to_dict(),
            "reused_fit": self.reused_fit,
            "provisional": self.provisional,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class InspectionReport:
    """All methods' outcomes for one query."""

    outcomes: tuple[MethodOutcome, ...]
    query: LoadedImage
    num_normals: int
    normals_fingerprint: str
    #: The normal images in fit order (what an explanation's nearest patch refers to).
    normals: tuple[LoadedImage, ...] = field(default=(), compare=False, repr=False)

    def outcome(self, method: str) -> MethodOutcome | None:
        """The outcome of ``method`` (any case), or ``None`` when it was not run."""
        name = get_method(method).name
        return next((o for o in self.outcomes if o.method == name), None)

    def summary(self, threshold: float) -> dict[str, Any]:
        height, width = self.query.size
        return {
            "query": {"name": self.query.name, "height": height, "width": width, "warnings": list(self.query.warnings)},
            "num_normals": self.num_normals,
            "threshold_calibrated": float(threshold),
            "methods": {o.method: o.summary(threshold) for o in self.outcomes},
        }


@dataclass(frozen=True)
class WeightsFacts:
    """Which weights a method runs on, from its ``describe()``: the one source of every
    "which weights" sentence (service summaries, the app's panel and table, evaluation).

    ``trained_offline`` (from the method's spec) says whether a missing checkpoint is worth
    mentioning.
    """

    backbone: str
    weights: str
    image_size: Any
    checkpoint: str | None
    mode: str | None
    trained: bool
    trained_offline: bool = True
    checkpoint_file: str | None = None
    checkpoint_shots: int | None = None
    trained_on: str | None = None

    @classmethod
    def from_description(cls, description: Mapping[str, Any], *, trained_offline: bool = True) -> "WeightsFacts":
        return cls(
            backbone=str(description.get("backbone", "?")),
            weights=str(description.get("backbone_weights", "?")),
            image_size=description.get("image_size"),
            checkpoint=description.get("checkpoint") or None,
            mode=description.get("mode"),
            trained=bool(description.get("trained", False)),
            trained_offline=trained_offline,
            checkpoint_file=description.get("checkpoint_file") or None,
            checkpoint_shots=description.get("checkpoint_shots"),
            trained_on=description.get("trained_on"),
        )

    @property
    def random(self) -> bool:
        return "random" in self.weights.lower()

    def state(self) -> str:
        """What runs, in one phrase: ``"trained (k = 4, MVTec AD)"``, ``"training-free"``,
        ``"learned at fit"``, with ``"; random backbone"`` when the backbone is random."""
        if self.trained and self.trained_offline:
            facts = [f"k = {self.checkpoint_shots}"] if self.checkpoint_shots is not None else []
            facts += [self.trained_on] if self.trained_on else []
            text = "trained" + (f" ({', '.join(facts)})" if facts else "")
        elif self.trained_offline:
            text = "training-free"
        else:
            text = "learned at fit" if self.trained else "untrained"
        return text + ("; random backbone" if self.random else "")

    def sentence(self) -> str:
        """``"<backbone>: <weights>; checkpoint <file> | no checkpoint; mode <mode>"``."""
        parts = [f"{self.backbone}: {self.weights}"]
        if self.checkpoint:
            parts.append(f"checkpoint {self.checkpoint}")
        elif self.trained_offline:
            parts.append("no checkpoint")
        if self.mode:
            parts.append(f"mode {self.mode}")
        return "; ".join(parts)

    def short(self) -> str:
        """Compact form for tables: ``backbone / weights · mode · checkpoint``."""
        weights = "random" if self.random else self.weights.split(" / ", 1)[-1]
        checkpoint = "checkpoint" if self.checkpoint else "no checkpoint"
        return f"{self.backbone} / {weights} · {self.mode} · {checkpoint}"


def weights_text(description: Mapping[str, Any], *, trained_offline: bool = True) -> str:
    """``WeightsFacts(...).sentence()`` of a ``describe()`` dict."""
    return WeightsFacts.from_description(description, trained_offline=trained_offline).sentence()


def is_meaningless(description: Mapping[str, Any]) -> bool:
    """True when the backbone runs on random weights."""
    return "random" in str(description.get("backbone_weights", "")).lower()


def outcome_of(cls: type[Detector], entry: FittedDetector, result: DetectionResult, seconds: float, reused: bool) -> MethodOutcome:
    """One method's outcome from its cache entry and result, with the warnings a person
    should read beside it (random weights, training-free mode and how to change it)."""
    warnings = list(result.warnings)
    if entry.weights_fallback:
        warnings.append(entry.weights_fallback)
    elif is_meaningless(entry.description):
        warnings.append("backbone runs on random weights: scores and maps are meaningless")
    if cls.spec.trained_offline and not entry.description.get("trained", True):
        warnings.append(f"{cls.display_name} runs in its training-free mode (no trained checkpoint{fetch_hint(cls)})")
    return MethodOutcome(
        method=cls.name,
        display_name=cls.display_name,
        result=result,
        calibration=entry.calibration,
        description=entry.description,
        seconds=seconds,
        warnings=tuple(dict.fromkeys(warnings)),
        weights_fallback=entry.weights_fallback,
        reused_fit=reused,
        detector=entry.detector,
        provisional=entry.provisional,
        entry=entry,
    )
