"""Few-shot and zero-shot visual anomaly detection with CLIP: InCTRL, AnoPLe, FAPrompt.

The public interface (README "Python API")::

    from detector import create_detector, list_methods, DetectionResult
    det = create_detector("inctrl", backbone="tiny-test")
    det.fit(normal_images)
    result = det.predict(query_image)
"""

from .base import Detector
from .calibration import Calibration
from .errors import CheckpointError, DetectorError, InvalidImageError, WeightsUnavailableError
from .registry import create_detector, get_method, get_spec, list_methods, method_options, register_method
from .results import DetectionResult, Description, Explanation
from .spec import MethodSpec, Option

__all__ = [
    "Calibration",
    "CheckpointError",
    "DetectionResult",
    "Description",
    "Detector",
    "DetectorError",
    "Explanation",
    "InvalidImageError",
    "MethodSpec",
    "Option",
    "WeightsUnavailableError",
    "create_detector",
    "get_method",
    "get_spec",
    "list_methods",
    "method_options",
    "register_method",
]

__version__ = "0.1.0"
