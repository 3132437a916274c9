"""What the app keeps per browser session between events, besides Gradio's own state: the
background job that finishes the provisional calibrations of the session's last Run
(docs/api.md §14, "Results as each method finishes").

A Run's stream ends as soon as every method is shown; a method whose calibration costs
encoder forwards may be shown with its default calibration, marked provisional. Its final
calibration then runs as background work (``InspectionService.calibrate_in_background``),
outside the queue slot other Runs need, and the page's timer picks the final report up on
its next tick (``PendingCalibrations.landed``) and redraws.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class FinalCalibration:
    """One session's background calibration: its future (result: the final
    ``InspectionReport``) and the methods it makes final."""

    future: Future
    methods: tuple[str, ...]


class PendingCalibrations:
    """At most one ``FinalCalibration`` per session; thread-safe."""

    def __init__(self) -> None:
        self._jobs: dict[str, FinalCalibration] = {}
        self._lock = threading.Lock()

    def start(self, session: str, future: Future, methods: Sequence[str]) -> None:
        """Keep ``future`` as the session's job, replacing (and cancelling) an earlier one."""
        with self._lock:
            earlier = self._jobs.get(session)
            self._jobs[session] = FinalCalibration(future, tuple(methods))
        if earlier is not None:
            earlier.future.cancel()

    def drop(self, session: str) -> None:
        """Forget the session's job (a new Run, or the page closed). A job not yet started is
        cancelled; a running one finishes, since its calibration is kept for every caller
        of the same fit, but nothing is redrawn from it."""
        with self._lock:
            job = self._jobs.pop(session, None)
        if job is not None:
            job.future.cancel()

    def landed(self, session: str) -> FinalCalibration | None:
        """The session's job once it has ended (then forgotten), else ``None``."""
        with self._lock:
            job = self._jobs.get(session)
            if job is None or not job.future.done():
                return None
            del self._jobs[session]
        return job

    def future(self, session: str) -> Future | None:
        """The session's job's future while it is kept (benchmarks time its landing)."""
        with self._lock:
            job = self._jobs.get(session)
        return None if job is None else job.future

    def sessions(self) -> list[str]:
        """The sessions with a job (finished or not) still kept."""
        with self._lock:
            return list(self._jobs)
