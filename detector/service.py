"""Run several methods on one query, reusing fitted detectors across queries.

The app, the ``predict`` command line and scripts share this logic; the app only draws.

``InspectionService`` keeps a bounded, thread-safe LRU cache of fitted detectors keyed by
``(method, options incl. class_name, images.fingerprint(normals))``: a new query with the
same normal images reuses the encoded normals (and AnoPLe's learned prompts) instead of
fitting again, and a different normal set never sees another set's state. Each cache entry
also holds the detector's calibration (``det.calibrate()``: leave-one-out over the normals
when k >= 2, else the method's default), computed once per normal set.

When a method's pretrained backbone weights cannot be obtained (``WeightsUnavailableError``,
e.g. offline without a filled Hugging Face cache), the service can fall back to the same
architecture with random weights; the outcome then carries a warning that its scores are
meaningless (``weights_fallback``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

from . import limits
from .answer_order import fastest_first
from .base import Detector, check_normal_count, set_arguments
from .checkpoint_sets import checkpoint_in_use
from .errors import RequestTimeoutError, WeightsUnavailableError
from .images import fingerprint, load_image
from .inspection.batch import BatchResult
from .service_batch import run_batch
from .outcomes import FittedDetector, InspectionReport, MethodOutcome, is_meaningless, weights_text
from .progress import ProgressCallback, scaled
from .prefetch import Prefetcher
from .scheduler import CancelToken, CpuScheduler
from .registry import create_detector, get_method, method_options
from .report_steps import report_steps
from .requests import check_batch_size, methods_and_normals
from .service_config import ServiceConfig
from .status import MethodStatus, method_status

__all__ = [
    "FittedDetector", "InspectionReport", "InspectionService", "MethodOutcome", "MethodStatus",
    "RequestTimeoutError", "ServiceConfig", "is_meaningless", "weights_text",
]

LOG = logging.getLogger(__name__)

DetectorFactory = Callable[..., Detector]

RANDOM_FALLBACK_WARNING = (
    "pretrained weights unavailable ({reason}); running the same architecture with RANDOM weights: "
    "scores and maps are meaningless"
)


def _freeze(value: Any) -> Hashable:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, float):
        return float(value)
    return value


class InspectionService:
    """Fitted-detector cache plus the "run these methods on this query" call.

    Thread-safe: the cache is guarded by a lock, and a per-key lock makes concurrent
    requests for the same (method, options, normals) fit only once.
    """

    def __init__(
        self,
        config: ServiceConfig | None = None,
        *,
        cache_size: int = limits.FITTED_DETECTOR_CACHE_SIZE,
        factory: DetectorFactory = create_detector,
        scheduler: CpuScheduler | None = None,
    ) -> None:
        if int(cache_size) < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size!r}")
        self.config = config or ServiceConfig()
        self.cache_size = int(cache_size)
        self.factory = factory
        self._cache: OrderedDict[tuple, FittedDetector] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}
        #: Callers inside ``fitted`` per key (a cancelled fit goes on while another waits).
        self._waiters: dict[tuple, int] = {}
        self.scheduler = scheduler or CpuScheduler()
        self.prefetcher = Prefetcher(self)
        #: Number of ``fit`` calls made (for tests and diagnostics).
        self.fit_count = 0
        #: Methods that fell back to random weights: method -> reason.
        self.fallbacks: dict[str, str] = {}

    # -- options and keys ------------------------------------------------------------------
    def options_for(self, method: str, class_name: str = "object", overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Keyword options for ``create_detector``: configured defaults, then ``overrides``
        restricted to what the method accepts (unknown keys are ignored), then ``class_name``."""
        name = get_method(method).name
        valid = method_options(name)
        options = {k: v for k, v in dict(self.config.method_options.get(name, {})).items() if k in valid}
        for key, value in dict(overrides or {}).items():
            if key in valid and value is not None:
                options[key] = value
        options["class_name"] = str(class_name or "object")
        return options

    def cache_key(self, method: str, options: Mapping[str, Any], normals_fingerprint: str, checkpoint: Hashable = None) -> tuple:
        """``(method, options, normals fingerprint, identity of the checkpoint file in use)``."""
        name = get_method(method).name
        return (name, _freeze(options), normals_fingerprint, checkpoint)

    def key_for(self, method: str, options: Mapping[str, Any], normals_fingerprint: str, normals_count: int) -> tuple:
        """The cache key ``fitted`` uses for these normals (with the checkpoint file a set
        would choose for that many normals)."""
        cls = get_method(method)
        in_use = checkpoint_in_use(self.config.checkpoints.get(cls.name), normals_count, **set_arguments(cls))
        return self.cache_key(cls.name, options, normals_fingerprint, in_use)

    def cached_keys(self) -> list[tuple]:
        """Keys in LRU order (least recently used first)."""
        with self._lock:
            return list(self._cache)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._key_locks.clear()

    # -- building and fitting --------------------------------------------------------------
    def _build(self, method: str, options: Mapping[str, Any]) -> tuple[Detector, str | None]:
        name = get_method(method).name
        kwargs = dict(
            backbone=self.config.backbone,
            backbone_weights=self.config.backbone_weights,
            checkpoint=self.config.checkpoints.get(name),
            device=self.config.device,
            **options,
        )
        try:
            return self.factory(name, **kwargs), None
        except WeightsUnavailableError as error:
            if not self.config.fallback_to_random:
                raise
            reason = str(error).split(". ")[0]
            LOG.warning("%s: pretrained weights unavailable, falling back to random weights: %s", name, error)
            kwargs["backbone_weights"] = "random"
            detector = self.factory(name, **kwargs)
            message = RANDOM_FALLBACK_WARNING.format(reason=reason)
            self.fallbacks[name] = message
            return detector, message

    def fitted(
        self,
        method: str,
        normals: Sequence[Any],
        *,
        options: Mapping[str, Any] | None = None,
        normals_fingerprint: str | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        defer_calibration: bool = False,
    ) -> tuple[FittedDetector, bool]:
        """The fitted detector for (method, options, normals), from the cache or new.

        Model work runs in the scheduler's slot. ``cancel`` (background work) is checked at
        every stage boundary and progress step, but never stops a fit someone else waits
        for; a cancelled or failed fit leaves nothing behind. With ``defer_calibration`` a
        method whose calibration costs encoder forwards is cached with its default
        calibration marked ``provisional`` (``calibrate_entry`` finishes it).

        Returns ``(entry, reused)``. Raises ``ValueError`` for a normal-image count the
        method does not accept, ``InvalidImageError`` for an unusable image.
        """
        cls = get_method(method)
        options = dict(options if options is not None else self.options_for(cls.name))
        loaded = [load_image(image) for image in normals]
        check_normal_count(len(loaded), cls.display_name, required=cls.requires_fit)
        key = self.key_for(cls.name, options, normals_fingerprint or fingerprint(loaded), len(loaded))
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
            self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            with key_lock:
                with self._lock:
                    entry = self._cache.get(key)
                    if entry is not None:
                        self._cache.move_to_end(key)
                if entry is None:
                    return self._fit_new(cls, key, options, loaded, progress, cancel, defer_calibration), False
            if not defer_calibration and entry.provisional:
                entry = self.calibrate_entry(entry)
            return entry, True
        finally:
            with self._lock:
                self._waiters[key] -= 1
                if not self._waiters[key]:
                    del self._waiters[key]

    def _stage(self, key: tuple, cancel: CancelToken | None, progress: ProgressCallback | None) -> ProgressCallback:
        """The progress callback of a fit (``_guarded``), shared while others wait on ``key``."""
        return self._guarded(lambda: self._waiters.get(key, 0) > 1, cancel, progress)

    def _guarded(self, shared: Callable[[], bool], cancel: CancelToken | None, progress: ProgressCallback | None) -> ProgressCallback:
        """A progress callback for work at its stage boundaries: stop if cancelled, unless
        another caller waits on the same work (``shared()``, asked under the service's lock),
        hand the CPU to a waiting request, then report."""

        def report(fraction: float, message: str) -> None:
            if cancel is not None and cancel.cancelled:
                with self._lock:
                    waited_on = shared()
                if not waited_on:
                    cancel.check(message)
            self.scheduler.yield_to_foreground()
            if progress is not None:
                progress(fraction, message)

        return report

    def _fit_new(self, cls, key, options, loaded, progress, cancel, defer_calibration) -> FittedDetector:
        stage = self._stage(key, cancel, progress)
        try:
            with self.scheduler.slot(f"fit {cls.name}"):
                stage(0.0, f"loading {cls.display_name}")
                detector, fallback = self._build(cls.name, options)
                start = time.perf_counter()
                detector.fit(loaded, progress=scaled(stage, 0.05, 0.9, f"fitting {cls.display_name}"))
                # what every predict of this detector reuses (e.g. FAPrompt's text features)
                # comes with the fit, so a prefetched fit leaves none of it to the Run
                detector.warm_up()
                fit_seconds = time.perf_counter() - start
                provisional = defer_calibration and cls.spec.cost.defers_calibration and detector.num_normals >= 2
                stage(0.9, f"calibrating {cls.display_name}")
                calibration = (
                    detector.default_calibration()
                    if provisional
                    else detector.calibrate(progress=scaled(stage, 0.9, 1.0, f"calibrating {cls.display_name}"))
                )
        except BaseException:
            # Nothing is cached for a failed or cancelled fit: drop its lock too, so failing
            # requests leave nothing behind.
            with self._lock:
                if key not in self._cache and not self._waiters.get(key, 0) > 1:
                    self._key_locks.pop(key, None)
            raise
        entry = FittedDetector(
            method=cls.name,
            detector=detector,
            calibration=calibration,
            description=dict(detector.describe()),
            weights_fallback=fallback,
            fit_seconds=fit_seconds,
            provisional=provisional,
        )
        with self._lock:
            self.fit_count += 1
            self._cache[key] = entry
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                dropped, _ = self._cache.popitem(last=False)
                if dropped not in self._waiters:
                    self._key_locks.pop(dropped, None)
        return entry

    def calibrate_entry(
        self, entry: FittedDetector, *, progress: ProgressCallback | None = None, cancel: CancelToken | None = None
    ) -> FittedDetector:
        """A provisional entry's final calibration (computed once, under the entry's lock).
        As background work it hands the slot to waiting requests between encoder passes.
        ``cancel`` is checked at each pass, but never stops a calibration another caller
        waits for; a cancelled calibration leaves the entry as it was (provisional, with its
        default calibration) for whoever calibrates it next."""
        step = self._guarded(lambda: entry.calibration_callers > 1, cancel, progress)
        self.scheduler.wait_for_requests()  # as background work: after every request in flight
        with self._lock:
            entry.calibration_callers += 1
        try:
            with entry.lock:
                if entry.provisional:
                    with self.scheduler.slot(f"calibrate {entry.method}"):
                        entry.calibration = entry.detector.calibrate(progress=step)
                    entry.provisional = False
        finally:
            with self._lock:
                entry.calibration_callers -= 1
        return entry

    # -- one query, several methods --------------------------------------------------------
    def batch(
        self,
        methods: Sequence[str],
        normals: Sequence[Any],
        queries: Sequence[tuple[str, Any]],
        *,
        class_name: str = "object",
        options: Mapping[str, Mapping[str, Any]] | None = None,
        threshold: float = 0.5,
        alpha: float = 0.5,
        colormap: str = "jet",
        progress: ProgressCallback | None = None,
    ) -> BatchResult:
        """Many queries against one normal set: each method is fitted once (or taken from the
        cache), then ``service_batch.run_batch`` scores every query.

        ``queries`` are ``(name, image)`` pairs. Raises ``ValueError`` for more than
        ``limits.MAX_BATCH_QUERIES`` queries before any fitting, and as ``inspect`` does for
        methods and normal images.
        """
        check_batch_size(len(queries))
        names, loaded_normals = methods_and_normals(methods, normals)
        digest = fingerprint(loaded_normals)
        fitted: dict[str, FittedDetector] = {}
        fit_share = 0.3 / len(names)
        for index, name in enumerate(names):
            cls = get_method(name)
            fitted[name], _ = self.fitted(
                name,
                loaded_normals,
                options=self.options_for(name, class_name, (options or {}).get(name)),
                normals_fingerprint=digest,
                progress=scaled(progress, index * fit_share, (index + 1) * fit_share, cls.display_name),
            )
        return run_batch(
            fitted,
            queries,
            threshold=threshold,
            alpha=alpha,
            colormap=colormap,
            progress=scaled(progress, 0.3, 1.0, "scoring"),
        )

    def inspect(self, methods: Sequence[str], normals: Sequence[Any], query: Any, **kwargs: Any) -> InspectionReport:
        """Run ``methods`` on ``query`` against ``normals`` and return the final report
        (every calibration done); the arguments are those of ``iter_inspect``."""
        report = None
        for report in self.iter_inspect(methods, normals, query, **kwargs):
            pass
        assert report is not None
        return report

    def order_methods(self, methods: Sequence[str], normals_count: int, fitted: Mapping[str, bool]) -> list[str]:
        """``methods`` fastest first (``answer_order.fastest_first``)."""
        return fastest_first(methods, normals_count, fitted)

    def iter_inspect(
        self,
        methods: Sequence[str],
        normals: Sequence[Any],
        query: Any,
        *,
        class_name: str = "object",
        options: Mapping[str, Mapping[str, Any]] | None = None,
        progress: ProgressCallback | None = None,
        method_progress: Callable[[str, str], None] | None = None,
        timeout: float | None = None,
        defer_final_calibration: bool = False,
        coalesce_within: float = 0.0,
    ) -> Iterator[InspectionReport]:
        """Run ``methods`` on ``query`` against ``normals``, yielding the report each time a
        method finishes (fastest first, ``answer_order.fastest_first``). A method whose calibration costs encoder forwards
        (``RelativeCost.defers_calibration``) is first yielded with its default calibration
        marked ``provisional``; the last report has every calibration final, unless
        ``defer_final_calibration`` leaves it to the caller (``calibrate_in_background``).

        Args:
            methods: method names (any case); duplicates are ignored.
            normals: 0..8 normal images (paths, PIL, arrays, ``LoadedImage``).
            query: the query image.
            class_name: object word for text prompts, passed to every method.
            options: per-method option overrides, e.g. ``{"anople": {"preset": "fast"}}``.
            progress: ``progress(fraction, message)`` over the whole call.
            method_progress: ``method_progress(method, message)`` per method.
            timeout: seconds the whole call may take (``None`` = no limit); checked before
                each fit and prediction and at every fit progress step.
            defer_final_calibration: end after every method is shown, provisional ones
                included (the app then calibrates them as background work).
            coalesce_within: a finished method's report is held back while the next method
                is expected to answer within this many B forwards (``answer_order.due_within``),
                so answers that close together come as one report; if the next one fails, the
                held report still comes before the error. 0 = one report per method.

        Raises:
            RequestTimeoutError: ``timeout`` passed; nothing half-fitted is cached.
            ValueError: no method, an unknown method, or a normal count a method refuses.
            InvalidImageError: a normal or query image that cannot be used.
        """
        with self.scheduler.request():  # background calibrations wait until it ends
            yield from report_steps(
                self, methods, normals, query, class_name=class_name, options=options, progress=progress,
                method_progress=method_progress, timeout=timeout, defer_final_calibration=defer_final_calibration,
                coalesce_within=coalesce_within,
            )

    def final_outcome(self, outcome: MethodOutcome) -> MethodOutcome:
        """``outcome`` with its entry's final calibration (computed now when still provisional)."""
        if not outcome.provisional or outcome.entry is None:
            return outcome
        entry = self.calibrate_entry(outcome.entry)
        return dataclasses.replace(outcome, calibration=entry.calibration, provisional=False)

    def calibrate_report(self, report: InspectionReport) -> InspectionReport:
        """``report`` with every provisional calibration made final (each cache entry's
        leave-one-out calibration is computed once and kept for later queries)."""
        return dataclasses.replace(report, outcomes=tuple(self.final_outcome(o) for o in report.outcomes))

    def calibrate_in_background(self, report: InspectionReport) -> Future | None:
        """``calibrate_report`` as background work (after every request's own work, in the
        bounded pool); the future's result is the final report. ``None`` when nothing in
        ``report`` is provisional."""
        if not any(o.provisional for o in report.outcomes):
            return None
        return self.scheduler.submit(self.calibrate_report, report)


    def warm_start(self, methods: Sequence[str]) -> Future:
        """Build ``methods`` with the configured options and let each compute what later
        calls reuse (``Detector.warm_up``, the runtime's conversion), as background work;
        returns its future."""
        names = [get_method(m).name for m in methods]

        def run() -> None:
            for name in names:
                with self.scheduler.slot(f"warm start {name}"):
                    detector, _ = self._build(name, self.options_for(name))
                    detector.warm_up()
                    detector.prepare_runtime()  # converts or loads the OpenVINO model once

        return self.scheduler.submit(run)

    # -- start-up facts ----------------------------------------------------------------------
    def method_status(self, method: str) -> MethodStatus:
        """Without building anything: which weights ``method`` will run on, and what is
        missing (the app's start-up banner draws this)."""
        return method_status(self.config, method, self.fallbacks)

    def weights_status(self, method: str) -> tuple[str, str | None]:
        """``(model_name, problem)``: ``method_status`` as plain values (``problem`` = why the
        pretrained weights are not available locally, ``None`` when nothing is missing)."""
        status = self.method_status(method)
        return status.model_name, None if status.missing is None else status.missing.message
