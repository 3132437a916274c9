"""What the app keeps per browser session between events, besides Gradio's own state: the
background job that finishes the provisional calibrations of the session's last Run
(docs/api.md §14, "Results as each method finishes").

A Run's stream ends as soon as every method is shown; a method whose calibration costs
encoder forwards may be shown with its default calibration, marked provisional. Its final
calibration then runs as background work (``InspectionService.calibrate_in_background``),
outside the queue slot other Runs need, and the page's timer picks the final report up on
its next tick (``PendingCalibrations.landed``) and redraws. The timer runs only while a
session has such work: ``IdleTicks`` counts the ticks that found none.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterator, Sequence

#: Ticks in a row that find no background work before the page's timer stops; more than one,
#: so a tick answered just before an upload's background work started cannot stop it.
IDLE_TICKS_BEFORE_STOP = 2


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


class IdleTicks:
    """Per session, the timer ticks in a row that found nothing running; thread-safe."""

    def __init__(self, limit: int = IDLE_TICKS_BEFORE_STOP) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, session: str, busy: bool) -> bool:
        """Count one tick of ``session``; ``True`` when the timer should stop now (the
        ``limit``-th idle tick in a row), after which the count starts again."""
        with self._lock:
            if busy:
                self._counts.pop(session, None)
                return False
            idle = self._counts.get(session, 0) + 1
            if idle >= self.limit:
                self._counts.pop(session, None)
                return True
            self._counts[session] = idle
            return False

    def drop(self, session: str) -> None:
        """Forget the session (its page closed)."""
        with self._lock:
            self._counts.pop(session, None)

    def sessions(self) -> list[str]:
        """The sessions with idle ticks counted."""
        with self._lock:
            return list(self._counts)


class StreamingRuns:
    """The sessions with a Run streaming now (a count each); thread-safe."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def running(self, session: str) -> Iterator[None]:
        """Count a Run of ``session`` for the duration of the block."""
        with self._lock:
            self._counts[session] = self._counts.get(session, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[session] -= 1
                if not self._counts[session]:
                    del self._counts[session]

    def __contains__(self, session: object) -> bool:
        with self._lock:
            return session in self._counts
