"""``MethodSpec``: what a method declares as data instead of code.

Each registered ``Detector`` subclass sets ``spec = MethodSpec(...)``. The pipeline in
``detector.base``, the registry, the service and the command lines read these fields, so
code outside ``detector/methods`` never needs to know a method by name (in the spirit of
timm's pretrained configs and open_clip's model configs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .calibration import Calibration, fixed_calibration
from .geometry import ResizeMode
from .preprocess import OPENAI_MEAN, OPENAI_STD


@dataclass(frozen=True)
class Option:
    """One keyword option of ``create_detector`` for a method.

    Attributes:
        default: the value used when the option is not given.
        choices: the accepted values, or ``None`` for any value of ``kind``.
        kind: the Python type of a value given on a command line (``str``, ``int``,
            ``float``, ``bool``); ``None`` values are always accepted where the default is
            ``None``.
        help: one line for command-line help.
        label: the label of the option's control in the app (``help`` when empty).
    """

    default: Any
    choices: tuple[Any, ...] | None = None
    kind: type = str
    help: str = ""
    label: str = ""

    def check(self, name: str, value: Any) -> Any:
        """``value`` when acceptable; ``ValueError`` naming the choices otherwise."""
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        return value


@dataclass(frozen=True)
class RelativeCost:
    """Rough cost of a method's stages in forwards of one ViT-B-16-plus-240 image encoder at
    240 px (the benchmark's unit), used to run the fastest methods first and to decide which
    calibrations are worth deferring. Measured ratios, not promises.

    Attributes:
        predict: one query.
        fit_per_normal: ``fit`` per normal image (prompt learning included).
        calibration_per_normal: leave-one-out calibration per normal image.
    """

    predict: float = 1.0
    fit_per_normal: float = 1.0
    calibration_per_normal: float = 0.0

    def first_answer(self, normals: int, *, fitted: bool) -> float:
        """Cost until a first answer: the fit when not cached, then one prediction."""
        return self.predict + (0.0 if fitted else self.fit_per_normal * normals)

    @property
    def defers_calibration(self) -> bool:
        """Calibration costs encoder forwards: show the answer first, calibrate after."""
        return self.calibration_per_normal >= 1.0


@dataclass(frozen=True)
class MethodSpec:
    """Everything about a method that is data, read by the shared pipeline.

    Attributes:
        display_name: name for people, e.g. ``"InCTRL"``.
        default_backbone: the official open_clip model name.
        default_weights: the official open_clip pretrained tag of that model.
        resize: how the input is made square (``"shorter"`` = resize + centre crop,
            ``"squash"`` = plain resize), see ``detector.preprocess.Preprocess``.
        mean, std: input normalisation.
        default_sigma: Gaussian smoothing of ``anomaly_map`` in model-input pixels.
        sigma_reference_size: when set, ``default_sigma`` is given at this input side and
            scales with the actual one (``sigma * size / reference``).
        needs_normals: few-shot (``fit`` needs 1..8 normal images) or zero-shot.
        trained_offline: the learned parts come from a checkpoint trained on auxiliary
            data (so "no checkpoint" is worth saying); methods that learn at ``fit`` do not.
        training_module: module with ``configure_parser(parser)`` and ``run(args)`` for
            ``python -m detector.train <method>``; ``None`` = no training command.
        options: the method's own keyword options.
        batch_size: queries encoded together by ``predict_batch`` (results equal single
            predictions either way).
        default_calibration: fixed range and threshold when nothing better is known.
        colour: RGB of the method's contour in the app's comparison strip (``None`` = a
            colour from the app's fallback list).
        app_options: the options the app offers as controls, in order.
        cost: rough stage costs (``RelativeCost``).
        checkpoint_sets: ``checkpoint=`` may name a set of files for several shot counts
            (a folder, ``"official[:<set>]"``, ``"hf-hub:<org>/<repo>"``); the file is chosen
            at ``fit`` (docs/api.md §19).
        quick_options: options that make a smoke run short on the tiny backbone (fewer
            prompt-learning steps); the benchmarks' ``--quick`` uses them. Results under them
            are not representative.
    """

    display_name: str
    default_backbone: str
    default_weights: str
    resize: ResizeMode
    default_sigma: float
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    sigma_reference_size: int | None = None
    needs_normals: bool = True
    trained_offline: bool = False
    training_module: str | None = None
    options: Mapping[str, Option] = field(default_factory=dict)
    batch_size: int = 1
    default_calibration: Calibration = field(default_factory=lambda: fixed_calibration(0.0, 1.0, 0.5))
    colour: tuple[int, int, int] | None = None
    app_options: tuple[str, ...] = ()
    cost: RelativeCost = field(default_factory=RelativeCost)
    checkpoint_sets: bool = False
    quick_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for field_name in ("app_options", "quick_options"):
            unknown = [name for name in getattr(self, field_name) if name not in self.options]
            if unknown:
                raise ValueError(f"{self.display_name}: {field_name} {unknown} are not among its options")

    def sigma_at(self, image_size: int) -> float:
        """The default sigma at an input side of ``image_size`` pixels."""
        if self.sigma_reference_size is None:
            return float(self.default_sigma)
        return float(self.default_sigma) * image_size / self.sigma_reference_size

    def option_defaults(self) -> dict[str, Any]:
        return {name: option.default for name, option in self.options.items()}
