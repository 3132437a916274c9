"""What each method will run on, known before anything is built: the app's start-up banner
and the ``weights`` facts of the service (docs/api.md §11)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Mapping

from .base import Detector, set_arguments
from .checkpoint_sets import is_set_address, resolve_set
from .registry import get_method
from .service_config import ServiceConfig
from .weights import MissingWeights, availability_problem, is_random as is_random_weights, resolve_default_weights

LOG = logging.getLogger(__name__)


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


def method_status(config: ServiceConfig, method: str, fallbacks: Mapping[str, str] | None = None) -> MethodStatus:
    """Without building anything: which weights ``method`` will run on, and what is
    missing (the app's start-up banner draws this)."""
    cls = get_method(method)
    spec = cls.spec
    model_name = config.backbone or spec.default_backbone
    checkpoint = config.checkpoints.get(cls.name)
    status = MethodStatus(
        method=cls.name,
        display_name=spec.display_name,
        model_name=model_name,
        fallback=(fallbacks or {}).get(cls.name),
        training_free=spec.trained_offline and not checkpoint,
        checkpoint_summary=_checkpoint_summary(cls, checkpoint) if checkpoint else None,
    )
    if checkpoint and _supplies_backbone(cls, checkpoint):
        return status
    try:
        weights = resolve_default_weights(
            model_name, config.backbone_weights, default_model=spec.default_backbone, default_weights=spec.default_weights
        )
    except ValueError:  # no default for this model: building it says so clearly
        return status
    if is_random_weights(weights):
        return dataclasses.replace(status, random_by_choice=True)
    return dataclasses.replace(status, missing=availability_problem(model_name, weights))


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
