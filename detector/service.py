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
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

from . import limits
from .base import Detector, check_normal_count, set_arguments
from .checkpoint_sets import checkpoint_in_use, is_set_address, resolve_set
from .errors import RequestTimeoutError, WeightsUnavailableError
from .images import LoadedImage, fingerprint, load_image
from .inspection.batch import BatchResult, run_batch
from .outcomes import FittedDetector, InspectionReport, MethodOutcome, is_meaningless, weights_text
from .progress import Deadline, ProgressCallback, scaled
from .registry import create_detector, get_method, list_methods, method_options
from .requests import check_batch_size
from .weights import MissingWeights, availability_problem, is_random as is_random_weights, resolve_default_weights

__all__ = [
    "FittedDetector",
    "InspectionReport",
    "InspectionService",
    "MethodOutcome",
    "MethodStatus",
    "RequestTimeoutError",
    "ServiceConfig",
    "is_meaningless",
    "weights_text",
]

LOG = logging.getLogger(__name__)

DetectorFactory = Callable[..., Detector]

RANDOM_FALLBACK_WARNING = (
    "pretrained weights unavailable ({reason}); running the same architecture with RANDOM weights: "
    "scores and maps are meaningless"
)


@dataclass(frozen=True)
class ServiceConfig:
    """How detectors are built (docs/api.md §16).

    Attributes:
        backbone: open_clip model name for every method; ``None`` = each method's official one.
        backbone_weights: pretrained tag / file / ``"random"`` for every method; ``None`` =
            each method's official weights.
        checkpoints: per method name (lower case), a checkpoint path or ``hf-hub:`` address.
        method_options: per method name, default keyword options (e.g. ``{"anople":
            {"preset": "fast"}}``); request options override them.
        device: torch device string.
        fallback_to_random: on ``WeightsUnavailableError`` build the method with
            ``backbone_weights="random"`` instead of failing.
    """

    backbone: str | None = None
    backbone_weights: str | None = None
    checkpoints: Mapping[str, str | None] = field(default_factory=dict)
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    device: str = "cpu"
    fallback_to_random: bool = True


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
    ) -> None:
        if int(cache_size) < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size!r}")
        self.config = config or ServiceConfig()
        self.cache_size = int(cache_size)
        self.factory = factory
        self._cache: OrderedDict[tuple, FittedDetector] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}
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
    ) -> tuple[FittedDetector, bool]:
        """The fitted detector for (method, options, normals), from the cache or new.

        Returns ``(entry, reused)``. Raises ``ValueError`` for a normal-image count the
        method does not accept, ``InvalidImageError`` for an unusable image.
        """
        cls = get_method(method)
        options = dict(options if options is not None else self.options_for(cls.name))
        loaded = [load_image(image) for image in normals]
        check_normal_count(len(loaded), cls.display_name, required=cls.requires_fit)
        digest = normals_fingerprint or fingerprint(loaded)
        in_use = checkpoint_in_use(self.config.checkpoints.get(cls.name), len(loaded), **set_arguments(cls))
        key = self.cache_key(cls.name, options, digest, in_use)
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                entry = self._cache.get(key)
                if entry is not None:
                    self._cache.move_to_end(key)
                    return entry, True
            try:
                if progress is not None:
                    progress(0.0, f"loading {cls.display_name}")
                detector, fallback = self._build(cls.name, options)
                start = time.perf_counter()
                detector.fit(loaded, progress=scaled(progress, 0.05, 0.9, f"fitting {cls.display_name}"))
                fit_seconds = time.perf_counter() - start
                if progress is not None:
                    progress(0.9, f"calibrating {cls.display_name}")
                calibration = detector.calibrate()
            except BaseException:
                # Nothing is cached for a failed fit: drop its lock too, so failing requests
                # leave nothing behind.
                with self._lock:
                    if key not in self._cache:
                        self._key_locks.pop(key, None)
                raise
            entry = FittedDetector(
                method=cls.name,
                detector=detector,
                calibration=calibration,
                description=dict(detector.describe()),
                weights_fallback=fallback,
                fit_seconds=fit_seconds,
            )
            with self._lock:
                self.fit_count += 1
                self._cache[key] = entry
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    dropped, _ = self._cache.popitem(last=False)
                    self._key_locks.pop(dropped, None)
            return entry, False

    # -- one query, several methods --------------------------------------------------------
    @staticmethod
    def _methods_and_normals(methods: Sequence[str], normals: Sequence[Any] | None) -> tuple[list[str], list[LoadedImage]]:
        """Registered names of ``methods`` (deduplicated, in order) and the loaded normals,
        after checking that every method accepts that many normal images."""
        names: list[str] = []
        for method in methods:
            name = get_method(method).name
            if name not in names:
                names.append(name)
        if not names:
            raise ValueError(f"choose at least one method ({', '.join(list_methods())})")
        loaded_normals = [load_image(image) for image in (normals or [])]
        if len(loaded_normals) > limits.MAX_NORMAL_IMAGES:
            raise ValueError(
                f"{len(loaded_normals)} normal images given, at most {limits.MAX_NORMAL_IMAGES} are accepted"
            )
        for name in names:
            cls = get_method(name)
            check_normal_count(len(loaded_normals), cls.display_name, required=cls.requires_fit)
        return names, loaded_normals

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
        cache), then ``inspection.run_batch`` scores every query.

        ``queries`` are ``(name, image)`` pairs. Raises ``ValueError`` for more than
        ``limits.MAX_BATCH_QUERIES`` queries before any fitting, and as ``inspect`` does for
        methods and normal images.
        """
        check_batch_size(len(queries))
        names, loaded_normals = self._methods_and_normals(methods, normals)
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

    def inspect(
        self,
        methods: Sequence[str],
        normals: Sequence[Any],
        query: Any,
        *,
        class_name: str = "object",
        options: Mapping[str, Mapping[str, Any]] | None = None,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> InspectionReport:
        """Run ``methods`` on ``query`` against ``normals``; see the module docstring.

        Args:
            methods: method names (any case); duplicates are ignored.
            normals: 0..8 normal images (paths, PIL, arrays, ``LoadedImage``).
            query: the query image.
            class_name: object word for text prompts, passed to every method.
            options: per-method option overrides, e.g. ``{"anople": {"preset": "fast"}}``.
            progress: ``progress(fraction, message)``.
            timeout: seconds the whole call may take (``None`` = no limit); checked before
                each fit and prediction and at every fit progress step.

        Raises:
            RequestTimeoutError: ``timeout`` passed; nothing half-fitted is cached.
            ValueError: no method, an unknown method, or a normal count a method refuses.
            InvalidImageError: a normal or query image that cannot be used.
        """
        if query is None:
            raise ValueError("no query image given")
        names, loaded_normals = self._methods_and_normals(methods, normals)
        loaded_query = load_image(query)
        digest = fingerprint(loaded_normals)
        deadline = Deadline(timeout)
        outcomes = []
        share = 1.0 / len(names)
        for index, name in enumerate(names):
            cls = get_method(name)
            method_options = self.options_for(name, class_name, (options or {}).get(name))
            base = index * share
            deadline.check(f"before {cls.display_name}")
            entry, reused = self.fitted(
                name,
                loaded_normals,
                options=method_options,
                normals_fingerprint=digest,
                progress=deadline.guard(scaled(progress, base, base + 0.8 * share, cls.display_name), cls.display_name),
            )
            deadline.check(f"before scoring with {cls.display_name}")
            if progress is not None:
                progress(base + 0.8 * share, f"{cls.display_name}: scoring the query")
            start = time.perf_counter()
            result = entry.detector.predict(loaded_query)
            seconds = time.perf_counter() - start
            warnings = list(result.warnings)
            if entry.weights_fallback:
                warnings.append(entry.weights_fallback)
            elif is_meaningless(entry.description):
                warnings.append("backbone runs on random weights: scores and maps are meaningless")
            if cls.spec.trained_offline and not entry.description.get("trained", True):
                warnings.append(f"{cls.display_name} runs in its training-free mode (no trained checkpoint{fetch_hint(cls)})")
            outcomes.append(
                MethodOutcome(
                    method=name,
                    display_name=cls.display_name,
                    result=result,
                    calibration=entry.calibration,
                    description=entry.description,
                    seconds=seconds,
                    warnings=tuple(dict.fromkeys(warnings)),
                    weights_fallback=entry.weights_fallback,
                    reused_fit=reused,
                    detector=entry.detector,
                )
            )
        if progress is not None:
            progress(1.0, "done")
        return InspectionReport(
            outcomes=tuple(outcomes),
            query=loaded_query,
            num_normals=len(loaded_normals),
            normals_fingerprint=digest,
            normals=tuple(loaded_normals),
        )

    # -- start-up facts ----------------------------------------------------------------------
    def method_status(self, method: str) -> MethodStatus:
        """Without building anything: which weights ``method`` will run on, and what is
        missing (the app's start-up banner draws this)."""
        cls = get_method(method)
        spec = cls.spec
        model_name = self.config.backbone or spec.default_backbone
        checkpoint = self.config.checkpoints.get(cls.name)
        status = MethodStatus(
            method=cls.name,
            display_name=spec.display_name,
            model_name=model_name,
            fallback=self.fallbacks.get(cls.name),
            training_free=spec.trained_offline and not checkpoint,
            checkpoint_summary=_checkpoint_summary(cls, checkpoint) if checkpoint else None,
        )
        if checkpoint and _supplies_backbone(cls, checkpoint):
            return status
        try:
            weights = resolve_default_weights(
                model_name, self.config.backbone_weights, default_model=spec.default_backbone, default_weights=spec.default_weights
            )
        except ValueError:  # no default for this model: building it says so clearly
            return status
        if is_random_weights(weights):
            return dataclasses.replace(status, random_by_choice=True)
        return dataclasses.replace(status, missing=availability_problem(model_name, weights))

    def weights_status(self, method: str) -> tuple[str, str | None]:
        """``(model_name, problem)``: ``method_status`` as plain values (``problem`` = why the
        pretrained weights are not available locally, ``None`` when nothing is missing)."""
        status = self.method_status(method)
        return status.model_name, None if status.missing is None else status.missing.message


@dataclass(frozen=True)
class MethodStatus:
    """What a method will run on, known before it is built (``InspectionService.method_status``).

    Attributes:
        method, display_name: the method.
        model_name: its backbone.
        missing: pretrained weights not in the cache (``blocking``: a run falls back to
            random weights), or ``None``.
        random_by_choice: the configuration asks for random weights (tests, ``tiny-test``).
        fallback: the warning of a fall-back to random weights that already happened.
        training_free: a method trained offline runs without a checkpoint.
        checkpoint_summary: what the configured checkpoint holds, e.g. ``"k = 2, 4, 8
            (MVTec AD) from official"`` (``None`` without one).
    """

    method: str
    display_name: str
    model_name: str
    missing: MissingWeights | None = None
    random_by_choice: bool = False
    fallback: str | None = None
    training_free: bool = False
    checkpoint_summary: str | None = None


def fetch_hint(cls: type[Detector]) -> str:
    """``"; 'python -m detector weights fetch <method>' gets one"`` for methods that publish
    trained files, else empty."""
    artefacts = cls.artefacts()
    return f"; 'python -m detector weights fetch {cls.name}' gets one" if artefacts and artefacts.source else ""


def _checkpoint_file(cls: type[Detector], checkpoint: str) -> str:
    """The file a detector reads at construction (a set's member for the largest k)."""
    if is_set_address(checkpoint):
        return str(resolve_set(checkpoint, **set_arguments(cls)).members[-1].path)
    return checkpoint


def _checkpoint_summary(cls: type[Detector], checkpoint: str) -> str:
    """``"k = 2, 4, 8 (MVTec AD) from official"`` or ``"k = 4 (MVTec AD) from FILE"``; the
    problem when the checkpoint cannot be read now (building the detector reports it)."""
    try:
        if is_set_address(checkpoint):
            return f"{resolve_set(checkpoint, **set_arguments(cls)).summary()} from {checkpoint}"
        facts = dict(cls.inspect_checkpoint(checkpoint).facts)
    except Exception as error:  # start-up facts must never stop start-up
        return f"{checkpoint} cannot be read now ({type(error).__name__}: {str(error)[:200]})"
    parts = [f"k = {facts['shots']}"] if facts.get("shots") is not None else []
    parts += [str(facts["trained_on"])] if facts.get("trained_on") else []
    return (f"{', '.join(parts)} " if parts else "") + f"from {checkpoint}"


def _supplies_backbone(cls: type[Detector], checkpoint: str) -> bool:
    """The method's own answer (a heads file whose CLIP part was kept beside it counts);
    a file that cannot be read now counts as not supplying it (building the detector later
    reports the real problem)."""
    try:
        file = _checkpoint_file(cls, checkpoint)
        return bool(cls.checkpoint_supplies_backbone(file) or cls.inspect_checkpoint(file).facts.get("clip_file"))
    except Exception as error:  # start-up facts must never stop start-up
        LOG.warning("could not read checkpoint %s: %s", checkpoint, error)
        return False
