"""The ``Detector`` template: one pipeline for every method, each method's hooks beside it.

The base class owns what is common (README "Adding a method"):

* construction: the common arguments, option validation from ``spec.options``, the
  checkpoint path, the backbone (``load_backbone`` with the weights resolution order) and
  the input preprocessing built from the spec;
* ``fit``: load and validate 1..8 normal images, preprocess them, hand them to ``_fit``;
* ``predict`` / ``predict_batch``: load -> preprocess -> ``_encode`` -> ``_score`` ->
  upsample each raw map to the query's original frame (``maps.upsample_map`` with the
  method's sigma) -> ``DetectionResult``;
* calibration (stored record, held-out normals, leave-one-out, default), explanations
  (pixel -> patch, then ``_explain_patch``) and ``describe()``;
* the runtime of the frozen image path (``runtime`` option, ``detector.runtime``): a
  method declares the path in ``_image_path`` and calls ``run_image_path`` in ``_encode``.

A method declares ``spec = MethodSpec(...)`` and implements hooks: ``_encode`` and
``_score`` at least; ``_read_checkpoint``, ``_backbone_choice``, ``_build``, ``_fit``,
``_leave_one_out``, ``_explain_patch``, ``_details``, ``_image_path``, ``is_trained`` and
``mode`` where it has something of its own.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from . import limits, maps
from .backbone import Backbone, load_backbone
from .calibration import Calibration, calibration_from_normals
from .artefacts import Converted, ConvertRequest, MethodArtefacts, PlannedFile, RemoteFile, set_slug
from .checkpoint_sets import CheckpointSet, is_set_address, resolve_set
from .checkpoints import CheckpointInfo, key_groups, read_header, state_keys
from .errors import CheckpointError
from .geometry import Geometry, input_geometry
from .images import LoadedImage, load_image
from .preprocess import Preprocess, preprocess_batch
from .progress import ProgressCallback
from .results import Box, DetectionResult, Description, Explanation
from .runtime import ImagePath, RuntimeChoice, TensorInput, check_runtime, choose_runtime
from .spec import MethodSpec
from .pipeline import BackboneChoice, MethodOutput, PreparedBatch
from .timing import Stopwatch
from .weights import resolve_default_weights, resolve_path

#: Options every method accepts, with their defaults (docs/api.md §3). ``runtime=None``
#: means ``DETECTOR_RUNTIME`` when set, else ``"auto"`` (``detector.runtime``).
COMMON_OPTIONS: dict[str, Any] = {"class_name": "object", "sigma": None, "seed": 0, "runtime": None}


def set_arguments(cls: type["Detector"]) -> dict[str, Any]:
    """Keyword arguments of ``checkpoint_sets.resolve_set`` / ``checkpoint_in_use`` for a method."""
    artefacts = cls.artefacts()
    default_set = artefacts.default_set if artefacts else None
    return {"method": cls.name, "inspect": cls.inspect_checkpoint, "default_set": default_set, "by_shots": cls.spec.needs_normals}


def check_normal_count(count: int, method: str, *, required: bool) -> None:
    """Raise ``ValueError`` when ``count`` normal images are not acceptable."""
    if count > limits.MAX_NORMAL_IMAGES:
        raise ValueError(f"{method}: {count} normal images given, at most {limits.MAX_NORMAL_IMAGES} are accepted")
    if required and count < limits.MIN_NORMAL_IMAGES:
        raise ValueError(f"{method} needs at least {limits.MIN_NORMAL_IMAGES} normal image(s); none were given")


class Detector(abc.ABC):
    """Base class of every method; see the module docstring.

    Attributes set by the constructor (every method has them):
        backbone: the shared, frozen ``Backbone``.
        image_size: model input side in pixels.
        grid: ``(rows, cols)`` of the patch grid.
        preprocess_spec: the ``Preprocess`` built from the spec.
        options: the method's own options, defaults filled in.
        checkpoint: the checkpoint argument, or ``None``.
        checkpoint_set: the set ``checkpoint`` names, or ``None`` for one file.
        checkpoint_file: the file in use (for a set: the member chosen at ``fit``).
        stored_calibration: a calibration record that came with the checkpoint.
        normal_geometries: geometries of the fitted normal images, in fit order.
    """

    #: Registered name, set by ``register_method``.
    name: ClassVar[str] = ""
    #: What the method declares as data.
    spec: ClassVar[MethodSpec]
    #: ``spec.display_name`` and ``spec.needs_normals``, set by ``register_method``.
    display_name: ClassVar[str] = ""
    requires_fit: ClassVar[bool] = True

    def __init__(
        self,
        *,
        backbone: str | None = None,
        backbone_weights: str | None = None,
        checkpoint: str | None = None,
        device: str = "cpu",
        class_name: str = "object",
        sigma: float | None = None,
        seed: int = 0,
        runtime: str | None = None,
        **options: Any,
    ) -> None:
        if sigma is not None and (not np.isfinite(sigma) or sigma < 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        self.device = device
        self.class_name = str(class_name)
        self.sigma = sigma
        self.seed = int(seed)
        self.runtime_requested = check_runtime(runtime)
        self._runtime: RuntimeChoice | None = None
        self.options = self._checked_options(options)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.stored_calibration: Calibration | None = None
        self.normal_geometries: tuple[Geometry, ...] = ()
        self._fitted = False
        self._num_normals = 0
        self._validate()
        self.checkpoint_set: CheckpointSet | None = None
        self.checkpoint_file: str | None = None
        artefact = None
        if checkpoint is not None:
            path = self._first_checkpoint_file(str(checkpoint))
            self.checkpoint_file = str(path)
            artefact = self._read_checkpoint(path)
        choice = self._backbone_choice(backbone, backbone_weights, artefact)
        self.backbone: Backbone = load_backbone(
            choice.model_name,
            choice.weights,
            image_size=choice.image_size,
            device=device,
            precision=choice.precision,
            quick_gelu=choice.quick_gelu,
            ignore_prefixes=choice.ignore_prefixes,
        )
        self.backbone_weights_text = choice.description or self.backbone.weights_description
        self.image_size = self.backbone.image_size
        self.grid: tuple[int, int] = self.backbone.grid_size
        self.preprocess_spec = Preprocess(self.image_size, self.spec.resize, self.spec.mean, self.spec.std)
        self._build(artefact)

    def _first_checkpoint_file(self, checkpoint: str) -> Path:
        """The file itself, or for a set the member for the largest shot count (the one
        for the actual k is chosen at ``fit``)."""
        if not is_set_address(checkpoint):
            return resolve_path(checkpoint)
        if not self.spec.checkpoint_sets:
            raise CheckpointError(f"{self.display_name} takes one checkpoint file, not a set: {checkpoint}")
        self.checkpoint_set = resolve_set(checkpoint, **set_arguments(type(self)))
        return self.checkpoint_set.members[-1].path

    @classmethod
    def _checked_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        known = cls.spec.options
        unknown = sorted(set(given) - set(known))
        if unknown:
            valid = sorted({*COMMON_OPTIONS, *known})
            raise TypeError(
                f"{cls.spec.display_name} got unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}"
            )
        values = cls.spec.option_defaults()
        for key, value in given.items():
            values[key] = known[key].check(key, value)
        return values

    # -- hooks: construction -------------------------------------------------------------
    def _validate(self) -> None:
        """Check option combinations before anything is loaded (``self.options``, ``self.checkpoint``)."""

    def _read_checkpoint(self, path: Path) -> Any:
        """Read what must be known before the backbone is built; the result reaches
        ``_backbone_choice`` and ``_build``. Default: the path itself."""
        return path

    def _backbone_choice(self, backbone: str | None, backbone_weights: str | None, artefact: Any) -> BackboneChoice:
        """The official backbone and tag unless the caller named others."""
        model_name = backbone or self.spec.default_backbone
        weights = resolve_default_weights(
            model_name, backbone_weights, default_model=self.spec.default_backbone, default_weights=self.spec.default_weights
        )
        return BackboneChoice(model_name, weights)

    def _build(self, artefact: Any) -> None:
        """Build the method's own modules (and load the checkpoint read into ``artefact``)."""

    def _use_checkpoint(self, artefact: Any) -> None:
        """Load another member of the checkpoint set (from ``_read_checkpoint``) into the built modules."""
        raise NotImplementedError(f"{self.display_name} cannot switch checkpoints")

    # -- hooks: artefacts (python -m detector weights, docs/api.md §19) ---------------------
    @classmethod
    def artefacts(cls) -> MethodArtefacts | None:
        """Where the method's trained files come from and which are known; ``None`` =
        nothing to download besides the CLIP weights."""
        return None

    @classmethod
    def plan_downloads(cls, listing: Sequence[RemoteFile], *, shots: Sequence[int] = (), trained_on: str | None = None) -> list[PlannedFile]:
        """What each listed file is (``AmbiguousListing`` when the rules cannot tell); ``shots``
        keeps only those shot counts, ``trained_on`` names a set the listing does not."""
        return [PlannedFile(item, None, trained_on, set_slug(trained_on or "default")) for item in listing]

    @classmethod
    def convert_checkpoint(cls, source: Path, out_dir: Path, request: ConvertRequest) -> Converted:
        """Write a published file as the package's safetensors under ``out_dir`` (``CheckpointError`` if unfit)."""
        raise CheckpointError(f"{cls.spec.display_name} has no convert step")

    @classmethod
    def inspect_checkpoint(cls, path: str | Path) -> CheckpointInfo:
        """What this method knows about one of its checkpoint files (layout, key groups,
        whether it carries the CLIP weights, header facts), without building a model.
        Default: keys grouped by their first dotted part and the file's JSON header."""
        file = resolve_path(path)
        return CheckpointInfo(str(file), "state dict", key_groups(state_keys(file)), False, read_header(file))

    @classmethod
    def checkpoint_supplies_backbone(cls, path: str | Path) -> bool:
        """Whether this checkpoint file carries the CLIP weights itself (so no backbone
        weights need to be found)."""
        return cls.inspect_checkpoint(path).carries_backbone

    # -- hooks: fit and predict ------------------------------------------------------------
    def _fit(self, normals: PreparedBatch, progress: ProgressCallback | None) -> None:
        """Default fit: encode the normals once and keep them as ``self.normal_features``."""
        self.normal_features = self._encode(normals) if len(normals) else None

    @abc.abstractmethod
    def _encode(self, batch: PreparedBatch) -> Any:
        """Run the backbone on ``batch.pixels`` ``(B, 3, S, S)``; returns what ``_score`` reads."""

    @abc.abstractmethod
    def _score(self, encoded: Any, batch: PreparedBatch) -> list[MethodOutput]:
        """Scores and raw maps of every image of the batch, from ``_encode``'s output."""

    def _leave_one_out(self, progress: ProgressCallback | None = None) -> list[MethodOutput] | None:
        """Each fitted normal scored against the others, from cached features (raw maps
        on the grid); ``None`` when the method cannot (fewer than 2 normals). A method that
        runs its encoder again per normal calls ``progress(fraction, message)`` between the
        passes: a stage boundary where the service's scheduler lets waiting requests go first."""
        return None

    def _explain_patch(self, result: DetectionResult, row: int, col: int, query_box: Box) -> Explanation:
        raise NotImplementedError(f"{self.display_name} has no explanation tool")

    def warm_up(self) -> None:
        """Compute what every later call reuses (e.g. text features of the class name), so a
        warm start leaves nothing for the first request; the service also calls it after each
        fit, so a prefetched fit leaves nothing for the Run. Repeated calls cost nothing.
        Default: nothing."""

    def _result_warnings(self) -> tuple[str, ...]:
        """Warnings that hold for every result of this detector (e.g. a shot-count mismatch)."""
        return ()

    def _image_path(self) -> ImagePath | None:
        """The frozen, no-gradient image path ``_encode`` runs (``declare_image_path``), for
        the runtime to compile; ``None`` = the method always runs PyTorch."""
        return None

    # -- runtime ------------------------------------------------------------------------------
    def declare_image_path(
        self,
        name: str,
        module: torch.nn.Module,
        outputs: Sequence[str] = (),
        inputs: Sequence[TensorInput] = (),
    ) -> ImagePath:
        """An ``ImagePath`` of ``module`` (``forward(images (B, 3, S, S), *inputs)`` -> tuple
        of ``(B, ...)`` tensors) on this detector's backbone; ``name`` says which path it is.
        ``inputs``: fixed-shape tensors after the images that ``_encode`` passes to
        ``run_image_path`` (state that changes without changing the path, e.g. prompts
        learned at ``fit``); the converted model takes them as inputs."""
        spec = self.backbone.spec
        activation = "quickgelu" if spec.quick_gelu else "gelu"
        return ImagePath(
            name, f"{spec.model_name}+{activation}", self.image_size, self.backbone, module, tuple(outputs), tuple(inputs)
        )

    def prepare_runtime(self, progress: ProgressCallback | None = None) -> RuntimeChoice:
        """Resolve the ``runtime`` option once (converting or loading the OpenVINO model
        if needed; warm start calls this); later calls return the same choice."""
        if self._runtime is None:
            self._runtime = choose_runtime(
                self.runtime_requested, self._image_path(), device=self.device, dtype=self.backbone.dtype, progress=progress
            )
        return self._runtime

    @property
    def runtime(self) -> str:
        """The runtime in use: ``"torch"`` or ``"openvino"``."""
        return self.prepare_runtime().runtime

    def run_image_path(self, pixels: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The declared image path on ``pixels`` ``(B, 3, S, S)`` and the path's declared
        extra inputs (``TensorInput`` shapes, in order) in the runtime in use."""
        run = self.prepare_runtime().run
        if run is None:
            raise RuntimeError(f"{self.display_name} declares no image path (_image_path)")
        return tuple(run(pixels, *inputs))

    def _details(self) -> dict[str, Any]:
        """The method-specific part of ``describe()``."""
        return {}

    @property
    def is_trained(self) -> bool:
        """Whether the learned parts are in use (trained, or fitted for methods that learn at fit)."""
        return False

    @property
    def mode(self) -> str:
        return "trained" if self.is_trained else "training-free"

    # -- facts -------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self._fitted

    @property
    def num_normals(self) -> int:
        return self._num_normals

    @property
    def map_sigma(self) -> float:
        """Gaussian sigma of ``anomaly_map`` in model-input pixels: ``sigma`` when given,
        else the spec's default at this input size."""
        return float(self.sigma) if self.sigma is not None else self.spec.sigma_at(self.image_size)

    def geometry_of(self, height: int, width: int) -> Geometry:
        """The geometry the preprocessing gives an image of that size."""
        return input_geometry(height, width, self.image_size, self.spec.resize)

    # -- public calls -----------------------------------------------------------------------
    def prepare(self, images: Sequence[LoadedImage], stopwatch: Stopwatch | None = None) -> PreparedBatch:
        """Preprocess loaded images into a batch on the backbone's device."""
        pixels, geometries = preprocess_batch(list(images), self.preprocess_spec)
        return PreparedBatch(pixels.to(self.backbone.device), tuple(geometries), tuple(images), stopwatch or Stopwatch())

    def fit(self, normal_images: Sequence[Any] | None, progress: ProgressCallback | None = None) -> "Detector":
        """Cache what the method needs from 0..N normal images; returns ``self``.

        Raises ``ValueError`` for zero images on a few-shot method or more than
        ``limits.MAX_NORMAL_IMAGES``; ``InvalidImageError`` for an unusable image.
        """
        images = list(normal_images or [])
        check_normal_count(len(images), self.display_name, required=self.spec.needs_normals)
        batch = self.prepare([load_image(image) for image in images])
        if self.checkpoint_set is not None:
            member = self.checkpoint_set.choose(len(batch))
            if str(member.path) != self.checkpoint_file:
                self._use_checkpoint(self._read_checkpoint(member.path))
                self.checkpoint_file = str(member.path)
        self.prepare_runtime(progress)
        self._fit(batch, progress)
        self._fitted = True
        self._num_normals = len(batch)
        self.normal_geometries = batch.geometries
        if progress is not None:
            progress(1.0, "done")
        return self

    def predict(self, query_image: Any) -> DetectionResult:
        """Score one query image (path, bytes, PIL image or HxWx3 uint8 array)."""
        self._check_ready()
        return self._run([load_image(query_image)])[0]

    def predict_batch(self, query_images: Sequence[Any]) -> list[DetectionResult]:
        """Score several queries, ``spec.batch_size`` per encoder pass; each result equals
        ``predict`` on that query alone (queries never see each other)."""
        self._check_ready()
        loaded = [load_image(image) for image in query_images]
        size = max(1, int(self.spec.batch_size))
        results: list[DetectionResult] = []
        for start in range(0, len(loaded), size):
            results.extend(self._run(loaded[start : start + size]))
        return results

    def _run(self, images: list[LoadedImage]) -> list[DetectionResult]:
        watch = Stopwatch()
        with torch.inference_mode():
            with watch("encode"):  # image to features: preprocessing and the encoder
                batch = self.prepare(images, watch)
                encoded = self._encode(batch)
            with watch("score"):
                outputs = self._score(encoded, batch)
        shared = {stage: seconds / len(images) for stage, seconds in watch.timings.items()}
        runtime_warning = self.prepare_runtime().warning
        common_warnings = self._result_warnings() + ((runtime_warning,) if runtime_warning else ())
        results = []
        for image, geometry, output in zip(images, batch.geometries, outputs):
            post = Stopwatch()
            with post("post"):
                raw_map = np.asarray(output.raw_map, dtype=np.float32)
                anomaly_map = maps.upsample_map(raw_map, geometry, sigma=self.map_sigma).astype(np.float32, copy=False)
            results.append(
                DetectionResult(
                    method=self.name,
                    score=float(output.score),
                    anomaly_map=anomaly_map,
                    raw_map=raw_map,
                    timings={**shared, **post.timings},
                    extras=output.extras,
                    warnings=tuple(dict.fromkeys(image.warnings + output.warnings + common_warnings)),
                    geometry=geometry,
                    evidence=output.evidence,
                )
            )
        return results

    def _check_ready(self) -> None:
        if self.spec.needs_normals and not self._fitted:
            raise RuntimeError(f"{self.display_name} is a few-shot method: call fit() with normal images first")

    # -- calibration --------------------------------------------------------------------------
    def default_calibration(self) -> Calibration:
        """The method's documented fixed range and threshold."""
        return self.spec.default_calibration

    def leave_one_out(self, progress: ProgressCallback | None = None) -> list[tuple[float, np.ndarray]] | None:
        """``(score, anomaly_map at that normal's original size)`` of each fitted normal
        scored against the others; ``None`` when the method cannot (fewer than 2 normals)."""
        if not self._fitted:
            return None
        with torch.inference_mode():
            outputs = self._leave_one_out(progress)
        if not outputs:
            return None
        return [
            (float(out.score), maps.upsample_map(np.asarray(out.raw_map, np.float32), geometry, sigma=self.map_sigma).astype(np.float32))
            for out, geometry in zip(outputs, self.normal_geometries)
        ]

    def calibrate(self, normals: Sequence[Any] | None = None, *, progress: ProgressCallback | None = None) -> Calibration:
        """Reference range and threshold: the stored record, else held-out ``normals``
        scored as queries, else leave-one-out over the fitted normals, else the default
        (``detector.calibration``). ``progress(fraction, message)`` is called between the
        encoder passes of a leave-one-out that needs them."""
        if self.stored_calibration is not None:
            return self.stored_calibration
        default = self.default_calibration()
        if normals:
            results = [self.predict(image) for image in normals]
            return calibration_from_normals(
                [r.score for r in results], [r.anomaly_map for r in results], default, f"{len(results)} held-out normals"
            )
        leave_one_out = self.leave_one_out(progress)
        if leave_one_out:
            scores, maps_ = zip(*leave_one_out)
            return calibration_from_normals(scores, maps_, default, f"leave-one-out over {len(scores)} normals")
        return default

    # -- explanations and description -------------------------------------------------------
    def explanation(self, result: DetectionResult, x: int, y: int) -> Explanation:
        """Why the pixel (x, y) of the query's original image got its value (typed)."""
        self._check_ready()
        if result.geometry is None or result.evidence is None:
            raise ValueError("this result carries nothing to explain: pass a result of this detector's predict()")
        row, col = maps.pixel_to_patch(result.geometry, self.grid, x, y)
        query_box = maps.patch_box(result.geometry, self.grid, row, col)
        return self._explain_patch(result, int(row), int(col), tuple(int(v) for v in query_box))

    def explain(self, result: DetectionResult, x: int, y: int) -> dict[str, Any]:
        """``explanation(...)`` as the plain dict of the public API."""
        return self.explanation(result, x, y).to_dict()

    def description(self) -> Description:
        return Description(
            method=self.name,
            display_name=self.display_name,
            backbone=self.backbone.spec.model_name,
            backbone_weights=self.backbone_weights_text,
            image_size=self.image_size,
            checkpoint=self.checkpoint,
            checkpoint_file=self.checkpoint_file,
            trained=bool(self.is_trained),
            mode=self.mode,
            sigma=self.map_sigma,
            class_name=self.class_name,
            num_normals=self.num_normals,
            details=self._details(),
            runtime=self.runtime,
            runtime_details=self.prepare_runtime().facts(),
        )

    def describe(self) -> dict[str, Any]:
        """A short dict: method, backbone, image size, weights in use, trained or not, and
        the method's own facts."""
        return self.description().to_dict()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.backbone.spec.model_name}>"
