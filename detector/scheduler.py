"""One CPU scheduler for model work (docs/api.md §14).

On a small CPU, work running side by side only competes for the same cores, so model work
runs one piece at a time through one slot. A request's own work (the query's forwards and
the fits it needs now) is *foreground* and always goes before *background* work (another
session's prefetch, a warm start): a waiting foreground piece gets the slot as soon as the
running piece reaches a stage boundary, and background work hands the slot over at each of
its stage boundaries (``yield_to_foreground``) when foreground work waits. Background jobs
run in a bounded pool (``limits.MAX_BACKGROUND_JOBS``).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from . import limits
from .errors import CancelledError


class CancelToken:
    """Set by whoever cancels; checked by the work at its stage boundaries."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self, stage: str = "") -> None:
        if self.cancelled:
            raise CancelledError(f"cancelled{f' ({stage})' if stage else ''}")


class CpuScheduler:
    """The slot model work runs in, foreground before background, and the background pool."""

    def __init__(self, background_jobs: int = limits.MAX_BACKGROUND_JOBS) -> None:
        if int(background_jobs) < 1:
            raise ValueError(f"background_jobs must be >= 1, got {background_jobs!r}")
        self._condition = threading.Condition()
        self._holder: int | None = None
        self._depth = 0
        self._foreground_waiting = 0
        self._requests = 0
        self._background_jobs = int(background_jobs)
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        #: ``("foreground" | "background", label)`` of the latest slot grants, oldest first
        #: (diagnostics, tests); bounded so a long-running server does not grow it.
        self.grants: deque[tuple[str, str]] = deque(maxlen=limits.SCHEDULER_GRANTS_KEPT)

    @property
    def in_background(self) -> bool:
        """True inside a job started with ``submit``."""
        return bool(getattr(self._local, "background", False))

    @contextmanager
    def slot(self, label: str = "") -> Iterator[None]:
        """Hold the slot for a piece of model work; re-entrant within one thread."""
        me = threading.get_ident()
        foreground = not self.in_background
        with self._condition:
            if self._holder == me:
                self._depth += 1
            else:
                if foreground:
                    self._foreground_waiting += 1
                try:
                    while self._holder is not None or (not foreground and self._foreground_waiting):
                        self._condition.wait()
                finally:
                    if foreground:
                        self._foreground_waiting -= 1
                self._holder, self._depth = me, 1
                self.grants.append(("foreground" if foreground else "background", label))
        try:
            yield
        finally:
            with self._condition:
                self._depth -= 1
                if self._depth == 0:
                    self._holder = None
                    self._condition.notify_all()

    def yield_to_foreground(self) -> None:
        """At a stage boundary of background work: if foreground work waits, let it run first."""
        me = threading.get_ident()
        with self._condition:
            if not self.in_background or self._holder != me or not self._foreground_waiting:
                return
            depth, self._holder, self._depth = self._depth, None, 0
            self._condition.notify_all()
            while self._holder is not None or self._foreground_waiting:
                self._condition.wait()
            self._holder, self._depth = me, depth
            self.grants.append(("background", "resumed"))

    @contextmanager
    def request(self) -> Iterator[None]:
        """A request in flight for the duration of the block (from its first fit to its last
        answer, between slots too): background work that no request waits for
        (``wait_for_requests``) starts only when none is."""
        with self._condition:
            self._requests += 1
        try:
            yield
        finally:
            with self._condition:
                self._requests -= 1
                self._condition.notify_all()

    def wait_for_requests(self) -> None:
        """Before background work that no request waits for (a final calibration): wait
        until no request is in flight, so that a Run's next piece (after a fit it waited
        on) is not queued behind it. No-op outside background work. Call it holding no lock
        a request may need."""
        if not self.in_background:
            return
        with self._condition:
            while self._requests:
                self._condition.wait()

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``function`` as background work in the bounded pool."""
        with self._condition:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._background_jobs, thread_name_prefix="detector-background")
            pool = self._pool

        def run() -> Any:
            self._local.background = True
            try:
                return function(*args, **kwargs)
            finally:
                self._local.background = False

        return pool.submit(run)

    def shutdown(self) -> None:
        """Stop the pool (queued jobs are dropped; running ones finish)."""
        with self._condition:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["CancelToken", "CancelledError", "CpuScheduler"]
