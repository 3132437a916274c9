"""Few-shot and zero-shot visual anomaly detection with CLIP: InCTRL, AnoPLe, FAPrompt.

The public interface (``shared/specs/api.md``)::

    from detector import create_detector, list_methods, DetectionResult
    det = create_detector("inctrl", backbone="tiny-test")
    det.fit(normal_images)
    result = det.predict(query_image)
"""

from .api import (
    Calibration,
    CheckpointError,
    DetectionResult,
    Detector,
    DetectorError,
    InvalidImageError,
    WeightsUnavailableError,
)
from .registry import create_detector, get_method, list_methods, method_options, register_method

__all__ = [
    "Calibration",
    "CheckpointError",
    "DetectionResult",
    "Detector",
    "DetectorError",
    "InvalidImageError",
    "WeightsUnavailableError",
    "create_detector",
    "get_method",
    "list_methods",
    "method_options",
    "register_method",
]

__version__ = "0.1.0"
