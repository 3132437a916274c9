"""How the service builds detectors: backbone, weights, checkpoints and default options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


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
