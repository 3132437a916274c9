"""Progress reports and time limits of long requests (the service's fits and predictions).

``progress(fraction in [0, 1], message)`` is the callback form every long call accepts.
"""

from __future__ import annotations

import time
from typing import Callable

from .errors import RequestTimeoutError

#: ``progress(fraction in [0, 1], message)``.
ProgressCallback = Callable[[float, str], None]


class Deadline:
    """Cooperative time limit of one request.

    Checked before each method's fit and prediction and at every progress report inside a
    fit (AnoPLe reports each prompt-learning step), so a long request stops at the next
    such point. A fit stopped this way is not cached.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = None if seconds is None else float(seconds)
        self.end = None if seconds is None else time.monotonic() + float(seconds)

    def check(self, stage: str) -> None:
        if self.end is not None and time.monotonic() > self.end:
            raise RequestTimeoutError(
                f"the request ran longer than its time limit of {self.seconds:g} s and was stopped ({stage}); "
                "try fewer methods, fewer or smaller images, or fewer AnoPLe steps"
            )

    def guard(self, progress: ProgressCallback | None, stage: str) -> ProgressCallback | None:
        if self.end is None:
            return progress

        def report(fraction: float, message: str) -> None:
            self.check(f"{stage}: {message}" if message else stage)
            if progress is not None:
                progress(fraction, message)

        return report


def scaled(progress: ProgressCallback | None, start: float, stop: float, prefix: str) -> ProgressCallback | None:
    if progress is None:
        return None

    def report(fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        progress(start + (stop - start) * fraction, f"{prefix}: {message}" if message else prefix)

    return report


def method_reporter(
    name: str, display_name: str, progress: ProgressCallback | None, method_progress: Callable[[str, str], None] | None, base: float, share: float
) -> ProgressCallback:
    """One method's progress: its own message, and its share of the whole call's."""

    def tell(fraction: float, message: str) -> None:
        if method_progress is not None:
            method_progress(name, f"{display_name}: {message}" if message else display_name)
        if progress is not None:
            progress(base + share * min(max(float(fraction), 0.0), 1.0), f"{display_name}: {message}" if message else display_name)

    return tell
