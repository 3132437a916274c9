"""Work that starts before Run: fits, memory banks and calibrations of a session's normal
images, computed in the background as soon as the normals, methods, object name or options
are known (docs/api.md §14).

One ``PrefetchJob`` per session: a new request for a session cancels its previous job
(unless it asks for the same work); the job runs through the service's ``fitted`` in the
scheduler's background pool, so a request's own work always goes first, a fit another
caller waits on is never stopped, and a cancelled or failed fit leaves nothing behind.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Protocol, Sequence

from .errors import CancelledError
from .images import fingerprint, load_image
from .registry import get_method
from .requests import resolve_methods
from .scheduler import CancelToken, CpuScheduler


class FittingService(Protocol):
    """What a prefetcher needs of the service (``detector.service.InspectionService``)."""

    scheduler: CpuScheduler

    def options_for(self, method: str, class_name: str = ..., overrides: Mapping[str, Any] | None = ...) -> dict[str, Any]: ...

    def key_for(self, method: str, options: Mapping[str, Any], normals_fingerprint: str, normals_count: int) -> tuple: ...

    def order_methods(self, methods: Sequence[str], normals_count: int, fitted: Mapping[str, bool]) -> list[str]: ...

    def fitted(self, method: str, normals: Sequence[Any], **kwargs: Any) -> tuple[Any, bool]: ...

    def calibrate_entry(self, entry: Any, **kwargs: Any) -> Any: ...


@dataclass
class PrefetchJob:
    """The background work of one session's current inputs."""

    session: Hashable
    methods: tuple[str, ...]
    signature: Hashable
    normals_count: int = 0
    token: CancelToken = field(default_factory=CancelToken)
    future: Future | None = None
    messages: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def tell(self, method: str, message: str) -> None:
        with self._lock:
            self.messages[method] = message

    @property
    def done(self) -> bool:
        return self.future is not None and self.future.done()

    def wait(self, timeout: float | None = None) -> None:
        """Until the job ends (``concurrent.futures.TimeoutError`` after ``timeout``)."""
        if self.future is not None:
            self.future.result(timeout=timeout)

    def status(self) -> str:
        """One line: ``"<methods> on <n> normals: ready"`` when all is done (so a page can tell
        this job's answer from an earlier one's), else what each method is doing."""
        if self.token.cancelled:
            return "cancelled"
        with self._lock:
            messages, errors = dict(self.messages), dict(self.errors)
        if self.done and not errors:
            names = ", ".join(get_method(method).display_name for method in self.methods)
            plural = "" if self.normals_count == 1 else "s"
            return f"{names} on {self.normals_count} normal{plural}: ready"
        parts = []
        for method in self.methods:
            name = get_method(method).display_name
            if method in errors:
                parts.append(f"{name}: failed ({errors[method]})")
            else:
                parts.append(messages.get(method, f"{name}: queued"))
        return " · ".join(parts)


class Prefetcher:
    """Starts, replaces and cancels the prefetch jobs of sessions."""

    def __init__(self, service: FittingService) -> None:
        self.service = service
        self._jobs: dict[Hashable, PrefetchJob] = {}
        self._lock = threading.Lock()

    def start(
        self,
        session: Hashable,
        methods: Sequence[str],
        normals: Sequence[Any],
        *,
        class_name: str = "object",
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> PrefetchJob:
        """Fit (and calibrate) ``methods`` on ``normals`` in the background for ``session``.

        Methods that cannot use these normals (e.g. a few-shot method without any) are left
        out; an unusable image raises at once. Returns the session's job.
        """
        names = resolve_methods(list(methods)) if methods else []
        loaded = [load_image(image) for image in normals or []]
        digest = fingerprint(loaded)
        usable = tuple(n for n in names if loaded or not get_method(n).spec.needs_normals)
        per_method = {n: self.service.options_for(n, class_name, (options or {}).get(n)) for n in usable}
        signature = tuple(self.service.key_for(n, per_method[n], digest, len(loaded)) for n in usable)
        with self._lock:
            current = self._jobs.get(session)
            if current is not None and current.signature == signature and not current.token.cancelled and not current.errors:
                return current
            if current is not None:
                current.token.cancel()
            job = PrefetchJob(session, usable, signature, normals_count=len(loaded))
            self._jobs[session] = job
        order = self.service.order_methods(list(usable), len(loaded), {})
        job.future = self.service.scheduler.submit(self._run, job, order, loaded, digest, per_method)
        return job

    def _run(self, job: PrefetchJob, order: list[str], loaded: list, digest: str, per_method: Mapping[str, dict]) -> None:
        """Every fit first, each with its default calibration when the final one costs encoder
        passes (``MethodSpec.cost.defers_calibration``); those calibrations last. A Run that
        starts meanwhile then waits for no calibration (it shows such a method provisional)."""
        deferred = []
        for method in order:
            if job.token.cancelled:
                return
            name = get_method(method).display_name
            try:
                entry, _ = self.service.fitted(
                    method,
                    loaded,
                    options=per_method[method],
                    normals_fingerprint=digest,
                    progress=lambda fraction, message, m=method: job.tell(m, message),
                    cancel=job.token,
                    defer_calibration=True,
                )
            except CancelledError:
                return
            except Exception as error:  # reported in the status; the Run reports it again
                job.errors[method] = str(error) or type(error).__name__
                continue
            if entry.provisional:
                job.tell(method, f"{name}: fitted, calibration queued")
                deferred.append((method, entry))
            else:
                job.tell(method, f"{name}: ready")
        for method, entry in deferred:
            name = get_method(method).display_name
            job.tell(method, f"calibrating {name}")
            try:
                self.service.calibrate_entry(
                    entry, progress=lambda fraction, message, m=method, n=name: job.tell(m, f"calibrating {n}: {message}"),
                    cancel=job.token,
                )
            except CancelledError:
                return
            except Exception as error:
                job.errors[method] = str(error) or type(error).__name__
                continue
            job.tell(method, f"{name}: ready")

    def job(self, session: Hashable) -> PrefetchJob | None:
        with self._lock:
            return self._jobs.get(session)

    def cancel(self, session: Hashable) -> None:
        """Cancel and forget the session's job (its page closed)."""
        with self._lock:
            job = self._jobs.pop(session, None)
        if job is not None:
            job.token.cancel()
