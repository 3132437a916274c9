"""Method registry: ``register_method``, ``create_detector`` and ``list_methods``.

A method is one ``Detector`` subclass with a ``spec`` (``detector.spec.MethodSpec``),
decorated with ``@register_method("Name")`` in a module under ``detector/methods``;
nothing else needs to change to add one (README "Adding a method").
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

from .base import COMMON_OPTIONS, Detector
from .spec import MethodSpec

_METHODS: dict[str, type[Detector]] = {}
D = TypeVar("D", bound=type[Detector])


def register_method(name: str) -> Callable[[D], D]:
    """Class decorator registering a ``Detector`` subclass under ``name`` (lower case).

    The class must declare ``spec = MethodSpec(...)``; ``display_name`` and
    ``requires_fit`` are taken from it.
    """
    key = name.lower()

    def decorate(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Detector)):
            raise TypeError(f"{cls!r} is not a Detector subclass")
        if not isinstance(getattr(cls, "spec", None), MethodSpec):
            raise TypeError(f"{cls.__name__} declares no spec = MethodSpec(...)")
        if key in _METHODS and _METHODS[key] is not cls:
            raise ValueError(f"a method named {key!r} is already registered")
        cls.name = key
        cls.display_name = cls.spec.display_name or name
        cls.requires_fit = cls.spec.needs_normals
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
    """The ``Detector`` class registered as ``name``, or whose display name is ``name``
    (both case-insensitive; the app's method list shows display names)."""
    _load_builtin_methods()
    key = str(name).strip().lower()
    if key not in _METHODS:
        key = next((k for k, cls in _METHODS.items() if cls.display_name.lower() == key), key)
    if key not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_METHODS) or 'none'}")
    return _METHODS[key]


def get_spec(name: str) -> MethodSpec:
    """The ``MethodSpec`` of the method registered as ``name``."""
    return get_method(name).spec


def method_options(name: str) -> dict[str, Any]:
    """Every keyword option ``create_detector(name, ...)`` accepts, with its default."""
    return {**COMMON_OPTIONS, **get_method(name).spec.option_defaults()}


def create_detector(
    name: str,
    backbone: str | None = None,
    backbone_weights: str | None = None,
    checkpoint: str | None = None,
    device: str = "cpu",
    **method_options_: Any,
) -> Detector:
    """Build the detector registered as ``name`` (docs/api.md §1).

    Unknown keyword options raise ``TypeError`` listing the valid ones; a value outside an
    option's choices raises ``ValueError``.
    """
    cls = get_method(name)
    return cls(backbone=backbone, backbone_weights=backbone_weights, checkpoint=checkpoint, device=device, **method_options_)
