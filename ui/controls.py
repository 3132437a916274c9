"""The app's method controls, built from the registry, and the input order of its endpoints.

Each option a method's spec lists in ``app_options`` becomes one control; its API parameter
is ``<method>_<option>`` (e.g. a method ``m`` with option ``steps`` gives ``m_steps``). The
``/detect`` endpoint's inputs keep their published order: the five main inputs, ``alpha``,
``colormap``, the first method control, ``sigma``, then every further method control in
registration order, so controls of methods registered later are appended, never inserted.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from detector.registry import get_spec, list_methods
from detector.spec import Option

#: The five main inputs of ``/detect`` and of the batch run (after its files), in order.
MAIN_INPUTS = ("normals", "query", "methods", "object_name", "threshold")


@dataclass(frozen=True)
class MethodControl:
    """One method option shown in the Advanced panel."""

    method: str
    option: str
    spec: Option
    display_name: str

    @property
    def name(self) -> str:
        """The API parameter name, ``<method>_<option>``."""
        return f"{self.method}_{self.option}".replace("-", "_")

    @property
    def label(self) -> str:
        return self.spec.label or f"{self.display_name} {self.option}"

    @property
    def choices(self) -> list[Any]:
        return [c for c in (self.spec.choices or ()) if c is not None]


def method_controls(methods: Sequence[str] | None = None) -> list[MethodControl]:
    """Controls of ``methods`` (default: every registered method), in registration order."""
    controls = []
    for method in methods if methods is not None else list_methods():
        spec = get_spec(method)
        for option in spec.app_options:
            controls.append(MethodControl(method, option, spec.options[option], spec.display_name))
    return controls


def advanced_names(controls: Sequence[MethodControl]) -> list[str]:
    """Names of the Advanced inputs in endpoint order (see the module docstring)."""
    names = [c.name for c in controls]
    return ["alpha", "colormap", *names[:1], "sigma", *names[1:]]


def advanced_parameters(controls: Sequence[MethodControl], defaults: Mapping[str, Any] | None = None) -> list[inspect.Parameter]:
    """``inspect.Parameter``s of the Advanced inputs (keyword-capable, with defaults)."""
    values = {"alpha": 0.5, "colormap": "jet", "sigma": None, **{c.name: None for c in controls}, **dict(defaults or {})}
    return [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=values[name]) for name in advanced_names(controls)]


def form_values(controls: Sequence[MethodControl], values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{method: {option: value}}`` of the controls' values in ``values`` (by API name)."""
    form: dict[str, dict[str, Any]] = {}
    for control in controls:
        form.setdefault(control.method, {})[control.option] = values.get(control.name)
    return form


def with_signature(function: Callable[..., Any], parameters: Sequence[inspect.Parameter]) -> Callable[..., Any]:
    """``function(**arguments)`` behind the given parameters: Gradio reads the endpoint's
    parameter names from this signature and calls it positionally; Python callers may pass
    keywords."""
    signature = inspect.Signature(list(parameters))

    def arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            yield from function(**arguments(args, kwargs))

    else:

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            return function(**arguments(args, kwargs))

    call.__signature__ = signature  # type: ignore[attr-defined]
    # Gradio finds injected arguments (``gr.Request``) from the annotations.
    call.__annotations__ = {p.name: p.annotation for p in parameters if p.annotation is not inspect.Parameter.empty}
    return call


def leading_parameters(names: Sequence[str], defaults: Mapping[str, Any] | None = None) -> list[inspect.Parameter]:
    """Parameters ``names`` in order, with the given defaults (none for the others)."""
    values = dict(defaults or {})
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return [inspect.Parameter(name, positional, default=values.get(name, inspect.Parameter.empty)) for name in names]
