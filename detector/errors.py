"""The package's own exceptions. A leaf module: it imports nothing from the package."""

from __future__ import annotations


class DetectorError(Exception):
    """Base class of the package's own errors."""


class CheckpointError(DetectorError, ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class InvalidImageError(DetectorError, ValueError):
    """An image that cannot be used: unreadable, truncated, too large or too small."""


class WeightsUnavailableError(DetectorError, RuntimeError):
    """Pretrained weights that cannot be found locally nor downloaded."""


class RequestTimeoutError(DetectorError):
    """A request ran past its time limit (the app uses ``limits.REQUEST_TIMEOUT_SECONDS``)."""


class CancelledError(DetectorError):
    """Background work that was cancelled (a new upload, or its session closed)."""
