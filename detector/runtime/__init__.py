"""Which runtime runs a method's frozen image path: PyTorch or OpenVINO (docs/api.md §3).

A method declares the frozen, no-gradient image path it reads at predict time as an
``ImagePath`` (``Detector._image_path``): a small wrapper ``nn.Module`` whose
``forward(images, *inputs)`` takes normalised pixels ``(B, 3, S, S)``, then one tensor of
fixed shape per declared ``TensorInput`` (state a method computes outside the path and
that changes without changing the path, e.g. prompts learned at ``fit``; no batch
dimension), and returns a tuple of float32 tensors with the batch first. Because such state
is an input of the exported model, not a constant baked into it, new values need no new
conversion. ``choose_runtime`` turns the ``runtime`` option into a ``RuntimeChoice`` whose
``run`` the method calls in its ``_encode``:

* ``"torch"``: ``run`` is the wrapper module itself (today's computation, unchanged);
* ``"openvino"``: the path exported, converted and compiled by ``openvino_backend`` (read
  from the disk cache when a trusted entry exists);
* ``"auto"``: OpenVINO on the CPU when the conversion succeeds, PyTorch otherwise, on other
  devices and for paths that are not fp32.

A conversion that fails falls back to PyTorch; the choice then carries a ``warning`` that
every result and ``describe()`` repeat. Nothing raises. Compiled paths are kept per process
(``functools.lru_cache``, keyed by the path's identity and the thread count), so detectors
on the same backbone share one compiled model and nothing is converted twice.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import cache
from .cache import CacheKey, cache_root, weights_fingerprint

LOG = logging.getLogger(__name__)

RUNTIMES = ("torch", "openvino", "auto")
#: Environment variable giving the default of the ``runtime`` option.
RUNTIME_VARIABLE = "DETECTOR_RUNTIME"
DEFAULT_RUNTIME = "auto"
COMPILED_CACHE_SIZE = 8

#: ``run(pixels (B, 3, S, S), *inputs) -> tuple of (B, ...) tensors``.
Run = Callable[..., tuple[torch.Tensor, ...]]


def default_runtime() -> str:
    """``DETECTOR_RUNTIME`` when set to one of ``RUNTIMES``, else ``"auto"``."""
    value = os.environ.get(RUNTIME_VARIABLE, "").strip().lower()
    return value if value in RUNTIMES else DEFAULT_RUNTIME


def check_runtime(value: str | None) -> str:
    """The runtime option's value (``None`` = ``default_runtime()``); ``ValueError`` otherwise."""
    if value is None:
        return default_runtime()
    text = str(value).strip().lower()
    if text not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {value!r}")
    return text


@dataclass(frozen=True)
class TensorInput:
    """A fixed-shape float32 input of an image path, after the images.

    Attributes:
        name: what it is (documentation, error messages and the cache key).
        shape: its full shape; it has no batch dimension and is the same for every image
            of a call (e.g. ``(n_v, D_v)`` prompt tokens).
    """

    name: str
    shape: tuple[int, ...]

    def signature(self) -> str:
        """``name:d1xd2...`` (part of the cache key)."""
        return f"{self.name}:{'x'.join(str(int(d)) for d in self.shape)}"


def inputs_signature(inputs: Sequence[TensorInput]) -> str:
    """The cache-key text of a path's extra inputs (``""`` when it has none)."""
    return ",".join(item.signature() for item in inputs)


@dataclass(frozen=True)
class ImagePath:
    """A method's frozen image path, ready to be compiled.

    Two paths are the same (and share one compiled model) when ``name``, ``architecture``,
    ``image_size``, ``identity`` and ``inputs`` are equal; ``module`` does not take part.

    Attributes:
        name: the method's name of the path, with what selects it (e.g.
            ``"inctrl.blocks-6-8-10"``).
        architecture: open_clip model name and build facts of the backbone.
        image_size: input side ``S``.
        identity: hashable identity of the weights object in this process (the shared
            backbone), so the weights fingerprint is computed once per process.
        module: the wrapper; ``forward(images (B, 3, S, S), *inputs) -> tuple of (B, ...)
            tensors``. Its parameters and buffers are the weights baked into the model
            (fingerprinted); the extra inputs are not.
        outputs: names of the outputs, in order (documentation and error messages).
        inputs: the fixed-shape inputs after the images, in ``forward``'s order.
    """

    name: str
    architecture: str
    image_size: int
    identity: object
    module: torch.nn.Module = field(compare=False, hash=False, repr=False)
    outputs: tuple[str, ...] = field(default=(), compare=False)
    inputs: tuple[TensorInput, ...] = ()


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime a detector runs its image path on.

    Attributes:
        requested: the option as given (``"torch"``, ``"openvino"``, ``"auto"``).
        runtime: the one in use: ``"torch"`` or ``"openvino"``.
        run: ``(pixels (B, 3, S, S), *inputs) -> outputs``; ``None`` when the method has
            no path.
        source: ``"converted"``, ``"cache"`` (OpenVINO), else ``None``.
        seconds: conversion (or cache load) and compile time.
        warning: why a requested OpenVINO runtime is not used, for every result.
        note: why ``auto`` chose PyTorch (informational, not a warning).
    """

    requested: str
    runtime: str
    run: Run | None = field(default=None, compare=False, repr=False)
    source: str | None = None
    seconds: float = 0.0
    warning: str | None = None
    note: str | None = None

    def facts(self) -> dict[str, object]:
        """The plain facts ``describe()`` reports."""
        facts: dict[str, object] = {"runtime": self.runtime, "runtime_requested": self.requested}
        if self.source is not None:
            facts["runtime_source"] = self.source
            facts["runtime_seconds"] = round(self.seconds, 3)
        if self.warning:
            facts["runtime_warning"] = self.warning
        if self.note:
            facts["runtime_note"] = self.note
        return facts


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except Exception:
        return False
    return True


def choose_runtime(
    requested: str,
    path: ImagePath | None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[float, str], None] | None = None,
) -> RuntimeChoice:
    """Resolve ``requested`` for ``path`` (see the module docstring); never raises for a
    conversion problem (the choice then runs torch and carries a warning)."""
    torch_run = path.module if path is not None else None
    if requested == "torch":
        return RuntimeChoice(requested, "torch", torch_run)
    reason = _unsupported(path, device, dtype)
    if reason is not None:
        return _torch_instead(requested, torch_run, reason)
    assert path is not None
    if progress is not None:
        progress(0.0, "preparing the OpenVINO image encoder (converted once, then cached)")
    outcome = _compiled(path, torch.get_num_threads(), str(cache_root()))
    if isinstance(outcome, str):
        LOG.warning("OpenVINO conversion of %s failed, running PyTorch: %s", path.name, outcome)
        return RuntimeChoice(requested, "torch", torch_run, warning=f"OpenVINO conversion failed ({outcome}); running PyTorch")
    return RuntimeChoice(requested, "openvino", outcome.run, source=outcome.source, seconds=outcome.seconds)


def _unsupported(path: ImagePath | None, device: str, dtype: torch.dtype) -> str | None:
    if path is None:
        return "this method has no OpenVINO image path"
    if torch.device(device).type != "cpu":
        return f"OpenVINO runs on the CPU only (device {device})"
    if dtype != torch.float32:
        return f"OpenVINO runs fp32 paths only (this one is {str(dtype).replace('torch.', '')})"
    if not openvino_available():
        return "the openvino package is not installed"
    return None


def _torch_instead(requested: str, run: Run | None, reason: str) -> RuntimeChoice:
    if requested == "openvino":
        return RuntimeChoice(requested, "torch", run, warning=f"runtime 'openvino' not used: {reason}; running PyTorch")
    return RuntimeChoice(requested, "torch", run, note=reason)


@functools.lru_cache(maxsize=64)
def path_fingerprint(path: ImagePath) -> str:
    """``weights_fingerprint`` of the path's module (parameters, then buffers), once per
    process per path."""
    module = path.module
    return weights_fingerprint([*module.named_parameters(), *module.named_buffers()])


def cache_key(path: ImagePath) -> CacheKey:
    from .openvino_backend import runtime_version

    return CacheKey(
        path.name, path.architecture, int(path.image_size), path_fingerprint(path), runtime_version(), inputs_signature(path.inputs)
    )


@functools.lru_cache(maxsize=COMPILED_CACHE_SIZE)
def _compiled(path: ImagePath, threads: int, root: str) -> "object | str":
    """The ``openvino_backend.Compiled`` path (compiled for ``threads`` threads, cached
    under ``root``), or the reason it failed (failures are kept too, so a failing
    conversion is not retried by every detector)."""
    from pathlib import Path

    from .openvino_backend import build

    try:
        return build(path.module, cache_key(path), int(path.image_size), threads, Path(root), input_shapes=tuple(i.shape for i in path.inputs))
    except Exception as error:  # any failure means: run PyTorch
        text = f"{type(error).__name__}: {error}".strip()
        return text.splitlines()[0][:300]


def clear_runtime_cache() -> None:
    """Forget every compiled path and fingerprint of this process (tests, long-running tools)."""
    _compiled.cache_clear()
    path_fingerprint.cache_clear()


__all__: Sequence[str] = (
    "CacheKey",
    "DEFAULT_RUNTIME",
    "ImagePath",
    "RUNTIMES",
    "RUNTIME_VARIABLE",
    "RuntimeChoice",
    "TensorInput",
    "cache",
    "cache_key",
    "cache_root",
    "check_runtime",
    "choose_runtime",
    "clear_runtime_cache",
    "default_runtime",
    "inputs_signature",
    "openvino_available",
    "path_fingerprint",
)
