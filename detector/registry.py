"""Method registry: ``register_method``, ``create_detector`` and ``list_methods``.

A method is one ``Detector`` subclass decorated with ``@register_method("name")`` in a
module under ``detector/methods``; nothing else needs to change to add one.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

from .api import Detector

#: Options every method accepts (api.md, "Method options").
COMMON_OPTIONS = ("class_name", "sigma", "seed")

_METHODS: dict[str, type[Detector]] = {}
D = TypeVar("D", bound=type[Detector])


def register_method(name: str) -> Callable[[D], D]:
    """Class decorator registering a ``Detector`` subclass under ``name`` (lower case)."""
    key = name.lower()

    def decorate(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Detector)):
            raise TypeError(f"{cls!r} is not a Detector subclass")
        if key in _METHODS and _METHODS[key] is not cls:
            raise ValueError(f"a method named {key!r} is already registered")
        cls.name = key
        if not cls.display_name:
            cls.display_name = name
        _METHODS[key] = cls
        return cls

    return decorate


def _load_builtin_methods() -> None:
    importlib.import_module("detector.methods")


def list_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    _load_builtin_methods()
    return list(_METHODS)


def get_method(name: str) -> type[Detector]:
    """The ``Detector`` class registered as ``name`` (case-insensitive)."""
    _load_builtin_methods()
    key = str(name).strip().lower()
    if key not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_METHODS) or 'none'}")
    return _METHODS[key]


def method_options(name: str) -> dict[str, Any]:
    """Every keyword option ``create_detector(name, ...)`` accepts, with its default."""
    cls = get_method(name)
    defaults: dict[str, Any] = {"class_name": "object", "sigma": None, "seed": 0}
    defaults.update(cls.method_options)
    return defaults


def create_detector(
    name: str,
    backbone: str | None = None,
    backbone_weights: str | None = None,
    checkpoint: str | None = None,
    device: str = "cpu",
    **method_options_: Any,
) -> Detector:
    """Build the detector registered as ``name`` (api.md, "Construction").

    Unknown keyword options raise ``TypeError`` listing the valid ones.
    """
    cls = get_method(name)
    valid = method_options(name)
    unknown = sorted(set(method_options_) - set(valid))
    if unknown:
        raise TypeError(
            f"{cls.display_name} got unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(valid))}"
        )
    return cls(backbone=backbone, backbone_weights=backbone_weights, checkpoint=checkpoint, device=device, **method_options_)
