"""What the methods return: detection results, explanations of one patch, descriptions.

Typed records that the pipeline, the service and the inspection tools read by attribute.
``Explanation.to_dict`` and ``Description.to_dict`` give the plain dicts of the public
``explain()`` and ``describe()`` calls (docs/api.md §5, §7, §8). A leaf module apart from the
``Geometry`` record it carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .geometry import Geometry

#: A box ``(x0, y0, x1, y1)`` in original-image pixels, exclusive ends.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class DetectionResult:
    """What ``Detector.predict`` returns for one query image.

    Attributes:
        method: registered method name, e.g. ``"inctrl"``.
        score: image-level anomaly score, the method's own output.
        anomaly_map: float32 ``(H, W)`` at the query's original size, after the method's
            own upsampling and smoothing.
        raw_map: float32 ``(h, w)``, the method's native patch-grid map.
        timings: seconds per stage: ``encode`` (preprocessing and encoder), ``score``,
            ``post`` (upsampling, smoothing), and any sub-stage a method adds.
        extras: method-specific parts (component scores, intermediate maps), plain values.
        warnings: things the user should know about this result.
        geometry: how the query's original frame maps onto the model input (``None`` only
            for results built outside the pipeline).
        evidence: the method's own record of what ``explain`` needs (cached patch features,
            nearest-normal indices, ...); read only by the method that produced it.
    """

    method: str
    score: float
    anomaly_map: np.ndarray
    raw_map: np.ndarray
    timings: dict[str, float]
    extras: dict[str, Any]
    warnings: tuple[str, ...] = ()
    geometry: Geometry | None = field(default=None, compare=False)
    evidence: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class NearestNormalPatch:
    """The normal patch most similar to an explained query patch.

    Attributes:
        normal_index: which fitted normal image (fit order, 0-based).
        patch: ``(row, col)`` on that normal's patch grid.
        box: the patch in that normal's original pixels.
        similarity: cosine similarity of the two patch features.
        layer: the block whose features were compared.
    """

    normal_index: int
    patch: tuple[int, int]
    box: Box
    similarity: float
    layer: int


@dataclass(frozen=True)
class PromptSimilarity:
    """Cosine of a patch feature with one text prompt.

    ``key`` is stable (``"normal"``, ``"abnormal_3"``); ``label`` is for people
    (``"abnormal 3 (hole)"``).
    """

    key: str
    label: str
    cosine: float


@dataclass(frozen=True)
class Explanation:
    """Why one patch of a query got its value (``Detector.explanation``).

    Attributes:
        patch: ``(row, col)`` of the explained patch on the query's patch grid.
        value: ``raw_map`` at that patch.
        query_box: the patch in the query's original pixels.
        nearest: for methods that compare with normal patches, the nearest one.
        prompts: for methods that compare with text prompts, one entry per prompt.
        parts: values of the method's map components at the patch (e.g. decoder, memory).
    """

    patch: tuple[int, int]
    value: float
    query_box: Box
    nearest: NearestNormalPatch | None = None
    prompts: tuple[PromptSimilarity, ...] = ()
    parts: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The public ``explain()`` dict: ``patch``, ``value``, the part values, and either
        the nearest normal patch (``normal_index``, ``normal_patch``, ``box`` in the
        normal's pixels, ``similarity``, ``layer``) or ``box`` (the query's) and
        ``prompt_similarities`` ``{key: cosine}``."""
        out: dict[str, Any] = {"patch": tuple(self.patch), "value": self.value, **dict(self.parts)}
        if self.nearest is not None:
            nearest = self.nearest
            out.update(
                normal_index=nearest.normal_index,
                normal_patch=tuple(nearest.patch),
                box=tuple(nearest.box),
                similarity=nearest.similarity,
                layer=nearest.layer,
            )
        else:
            out["box"] = tuple(self.query_box)
        if self.prompts:
            out["prompt_similarities"] = {p.key: p.cosine for p in self.prompts}
        return out


@dataclass(frozen=True)
class Description:
    """What ``describe()`` reports: the facts every method has, then its own.

    Attributes:
        method: registered name.
        display_name: name for people.
        backbone: open_clip model name.
        backbone_weights: where the backbone's weights come from.
        image_size: model input side in pixels.
        checkpoint: the method checkpoint given, if any (a file or a set).
        checkpoint_file: the file in use (for a set: the member chosen at ``fit``).
        trained: whether the learned parts are trained (or, for methods that learn at
            ``fit``, fitted).
        mode: the method's mode, e.g. ``"trained"`` or ``"training-free"``.
        sigma: Gaussian smoothing of ``anomaly_map`` in model-input pixels.
        class_name: the object word of the text prompts.
        num_normals: normal images of the last ``fit``.
        details: the method-specific part (open: later additions go here).
        runtime: what runs the frozen image path: ``"torch"`` or ``"openvino"``.
        runtime_details: ``runtime_requested``, and where it applies ``runtime_source``
            (``"converted"``/``"cache"``), ``runtime_seconds``, ``runtime_warning`` (a
            requested OpenVINO runtime that is not used, and why), ``runtime_note``.
    """

    method: str
    display_name: str
    backbone: str
    backbone_weights: str
    image_size: int
    checkpoint: str | None
    checkpoint_file: str | None
    trained: bool
    mode: str
    sigma: float
    class_name: str
    num_normals: int
    details: Mapping[str, Any] = field(default_factory=dict)
    runtime: str = "torch"
    runtime_details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def runs_on_random_weights(self) -> bool:
        return "random" in self.backbone_weights.lower()

    def to_dict(self) -> dict[str, Any]:
        common = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("details", "runtime_details")}
        return {**common, **dict(self.runtime_details), **dict(self.details)}
