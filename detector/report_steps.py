"""One query, several methods: the reports ``InspectionService.iter_inspect`` yields.

The methods run fastest first (``answer_order``); each one's fit comes from the service's
cache or is made now, then its predict runs in the scheduler's slot and a report with every
answer so far is yielded. A method whose calibration is deferred is first shown with its
default calibration (``MethodOutcome.provisional``); unless the caller takes that over, the
final calibrations follow and a last report carries them.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

from .answer_order import due_within
from .images import fingerprint, load_image
from .outcomes import FittedDetector, InspectionReport, MethodOutcome, outcome_of
from .progress import Deadline, ProgressCallback, method_reporter
from .registry import get_method
from .requests import methods_and_normals
from .scheduler import CpuScheduler


class InspectingService(Protocol):
    """What the steps need of the service (``detector.service.InspectionService``)."""

    scheduler: CpuScheduler

    def options_for(self, method: str, class_name: str = ..., overrides: Mapping[str, Any] | None = ...) -> dict[str, Any]: ...

    def cached_keys(self) -> list[tuple]: ...

    def key_for(self, method: str, options: Mapping[str, Any], normals_fingerprint: str, normals_count: int) -> tuple: ...

    def order_methods(self, methods: Sequence[str], normals_count: int, fitted: Mapping[str, bool]) -> list[str]: ...

    def fitted(self, method: str, normals: Sequence[Any], **kwargs: Any) -> tuple[FittedDetector, bool]: ...

    def final_outcome(self, outcome: MethodOutcome) -> MethodOutcome: ...


def report_steps(
    service: InspectingService,
    methods: Sequence[str],
    normals: Sequence[Any],
    query: Any,
    *,
    class_name: str,
    options: Mapping[str, Mapping[str, Any]] | None,
    progress: ProgressCallback | None,
    method_progress: Callable[[str, str], None] | None,
    timeout: float | None,
    defer_final_calibration: bool,
    coalesce_within: float,
) -> Iterator[InspectionReport]:
    """The reports of ``InspectionService.iter_inspect`` (its docstring has the arguments)."""
    if query is None:
        raise ValueError("no query image given")
    names, loaded_normals = methods_and_normals(methods, normals)
    loaded_query = load_image(query)
    digest = fingerprint(loaded_normals)
    count = len(loaded_normals)
    deadline = Deadline(timeout)
    per_method = {name: service.options_for(name, class_name, (options or {}).get(name)) for name in names}
    cached = set(service.cached_keys())
    requested = list(names)  # the report lists the methods in the order asked for
    was_fitted = {n: service.key_for(n, per_method[n], digest, count) in cached for n in names}
    names = service.order_methods(names, count, was_fitted)
    outcomes: dict[str, MethodOutcome] = {}
    share = 1.0 / len(names)

    def report() -> InspectionReport:
        return InspectionReport(
            outcomes=tuple(outcomes[n] for n in requested if n in outcomes),
            query=loaded_query,
            num_normals=count,
            normals_fingerprint=digest,
            normals=tuple(loaded_normals),
        )

    held = False  # the last answer waits to come with the next one (``coalesce_within``)
    for index, name in enumerate(names):
        cls = get_method(name)
        tell = method_reporter(name, cls.display_name, progress, method_progress, index * share, share)
        try:
            deadline.check(f"before {cls.display_name}")
            entry, reused = service.fitted(
                name,
                loaded_normals,
                options=per_method[name],
                normals_fingerprint=digest,
                progress=deadline.guard(tell, cls.display_name),
                defer_calibration=True,
            )
            deadline.check(f"before scoring with {cls.display_name}")
            tell(0.8, "scoring the query")
            start = time.perf_counter()
            with service.scheduler.slot(f"predict {name}"):
                result = entry.detector.predict(loaded_query)
        except Exception:
            if held:  # what is answered is shown before the error
                yield report()
            raise
        outcomes[name] = outcome_of(cls, entry, result, time.perf_counter() - start, reused)
        tell(1.0, "provisional (calibrating)" if entry.provisional else "done")
        following = names[index + 1] if index + 1 < len(names) else None
        held = following is not None and due_within(following, count, was_fitted[following], coalesce_within)
        if not held:
            yield report()
    pending = [] if defer_final_calibration else [n for n in names if outcomes[n].provisional]
    for name in pending:
        deadline.check(f"before calibrating {get_method(name).display_name}")
        outcomes[name] = service.final_outcome(outcomes[name])
        if method_progress is not None:
            method_progress(name, f"{get_method(name).display_name}: done")
    if progress is not None:
        progress(1.0, "done")
    if pending:
        yield report()
