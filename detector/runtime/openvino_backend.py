"""OpenVINO for one frozen image path: export, convert, save, load, compile, run.

``torch.export.export`` traces the method's wrapper module with a dynamic batch dimension
(example batch 2, so the batch is never specialised to 1) on the images and static shapes
on the path's extra inputs (``input_shapes``: fixed-shape tensors after the images, which
stay inputs of the model, e.g. learned prompts), ``openvino.convert_model``
turns the exported program into an OpenVINO model, ``openvino.save_model`` (weights kept in
fp32, no fp16 compression) writes it into the disk cache (``cache.py``), and the saved
model is read back, fixed to ``(-1, 3, S, S)`` and compiled for the CPU with
``INFERENCE_PRECISION_HINT=f32`` (no bf16/fp16 execution, no dynamic quantisation) and the
thread count given (torch's). The OpenVINO compile cache (``CACHE_DIR``) lives inside the
entry, so it is dropped with it.

A freshly converted model is compiled from its saved files and checked against the torch
module on the export example; a conversion that runs but computes something else is a
failure (its entry is removed), not a model.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import cache

#: Largest difference (max abs, any output) tolerated by the conversion check.
CHECK_TOLERANCE = 1e-3
EXAMPLE_BATCH = 2
MAX_BATCH = 256

#: ``(d1, d2, ...)`` shapes of a path's extra inputs, in ``forward``'s order after the images.
Shapes = tuple[tuple[int, ...], ...]
#: ``run(pixels (B, 3, S, S), *inputs) -> tuple of float32 tensors``.
Run = Callable[..., tuple[torch.Tensor, ...]]

def runtime_version() -> str:
    """Versions a converted model depends on (part of its cache key)."""
    import openvino

    return f"torch {torch.__version__} | openvino {openvino.get_version()} | format {cache.FORMAT_VERSION}"


@dataclass(frozen=True)
class Compiled:
    """A compiled image path.

    Attributes:
        run: ``(pixels (B, 3, S, S) float32, *inputs) -> tuple of float32 tensors`` (the
            module's outputs).
        source: ``"converted"`` (exported and converted in this process) or ``"cache"``
            (read from the disk cache).
        seconds: export + conversion + save + compile time (``converted``) or load +
            compile time (``cache``).
        model_file: the ``model.xml`` it was compiled from.
    """

    run: Run
    source: str
    seconds: float
    model_file: Path


def export_and_convert(module: torch.nn.Module, image_size: int, input_shapes: Shapes = ()) -> "object":
    """``openvino.Model`` of ``module`` (``forward(images (B, 3, S, S), *inputs)``), batch
    dynamic, the extra inputs of the fixed ``input_shapes``."""
    import openvino

    example = _example(image_size, input_shapes)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if input_shapes:  # one signature whatever the module's: (images, *inputs), inputs static
        exported: torch.nn.Module = _Positional(module)
        dynamic: tuple[object, ...] = ({0: batch}, (None,) * len(input_shapes))
    else:
        exported, dynamic = module, ({0: batch},)
    with torch.no_grad():
        program = torch.export.export(exported, example, dynamic_shapes=dynamic, strict=False)
    model = openvino.convert_model(program)
    if len(model.inputs) != 1 + len(input_shapes):
        raise RuntimeError(f"the converted model has {len(model.inputs)} inputs, expected {1 + len(input_shapes)}")
    shapes = {model.inputs[0]: openvino.PartialShape([-1, 3, image_size, image_size])}
    shapes.update({model.inputs[1 + i]: openvino.PartialShape(list(shape)) for i, shape in enumerate(input_shapes)})
    model.reshape(shapes)
    return model


class _Positional(torch.nn.Module):
    """``forward(images, *inputs)`` calling ``module(images, *inputs)``: the extra inputs
    reach ``torch.export`` as one positional tuple, however ``module`` names them."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.module(images, *inputs)


def _example(image_size: int, input_shapes: Shapes = ()) -> tuple[torch.Tensor, ...]:
    """Images ``(2, 3, S, S)`` and one tensor per extra input, standard normal, seeded."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(EXAMPLE_BATCH, 3, image_size, image_size, generator=generator)
    return (images, *(torch.randn(*shape, generator=generator) for shape in input_shapes))


def compile_model(model_file: Path, threads: int) -> Run:
    """Read and compile a saved model; returns ``run(pixels, *inputs)``."""
    import openvino

    core = openvino.Core()
    blobs = model_file.parent / "compiled"
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": max(1, int(threads)),
    }
    try:
        core.set_property({"CACHE_DIR": str(blobs)})
        compiled = core.compile_model(str(model_file), "CPU", config)
    except Exception:  # an unusable compile-cache blob: compile again without it
        shutil.rmtree(blobs, ignore_errors=True)
        core = openvino.Core()
        compiled = core.compile_model(str(model_file), "CPU", config)
    outputs = len(compiled.outputs)
    expected_inputs = len(compiled.inputs)

    def as_array(tensor: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())

    def run(pixels: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(B, 3, S, S)`` and the extra inputs -> the module's outputs as torch tensors (copies)."""
        if 1 + len(inputs) != expected_inputs:
            raise ValueError(f"this model takes the images and {expected_inputs - 1} more inputs, got {len(inputs)}")
        request = compiled.create_infer_request()  # one per call: safe across threads
        request.infer({i: as_array(t) for i, t in enumerate((pixels, *inputs))})
        return tuple(torch.from_numpy(np.array(request.get_output_tensor(i).data, copy=True)) for i in range(outputs))

    return run


def check(module: torch.nn.Module, run: Run, image_size: int, input_shapes: Shapes = ()) -> float:
    """Largest difference between ``module`` and ``run`` on the export example; raises
    ``RuntimeError`` above ``CHECK_TOLERANCE`` or on mismatched outputs."""
    example = _example(image_size, input_shapes)
    with torch.inference_mode():
        expected = module(*example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = run(*example)
    if len(got) != len(expected) or any(tuple(g.shape) != tuple(e.shape) for g, e in zip(got, expected)):
        raise RuntimeError(
            f"the converted model returns {[tuple(g.shape) for g in got]}, torch {[tuple(e.shape) for e in expected]}"
        )
    worst = max(float((g - e.float()).abs().max()) for g, e in zip(got, expected))
    if not worst <= CHECK_TOLERANCE:
        raise RuntimeError(f"the converted model differs from torch by {worst:.3g} (tolerance {CHECK_TOLERANCE:g})")
    return worst


def build(
    module: torch.nn.Module,
    key: cache.CacheKey,
    image_size: int,
    threads: int,
    root: Path | None = None,
    *,
    input_shapes: Shapes = (),
) -> Compiled:
    """The compiled path for ``key``: from a trusted cache entry, else exported, converted,
    checked and saved first. A cached entry that cannot be compiled is removed and rebuilt.
    ``input_shapes``: the fixed shapes of the inputs after the images (``key.inputs``
    records them)."""
    import openvino

    start = time.perf_counter()
    model_file = cache.valid_entry(key, root)
    if model_file is not None:
        try:
            run = compile_model(model_file, threads)
            return Compiled(run, "cache", time.perf_counter() - start, model_file)
        except Exception:
            cache.remove_entry(key, root)
    model = export_and_convert(module, image_size, input_shapes)

    def save(path: Path) -> None:
        openvino.save_model(model, str(path), compress_to_fp16=False)

    model_file = cache.write_entry(key, save, root)
    try:
        run = compile_model(model_file, threads)
        check(module, run, image_size, input_shapes)
    except Exception:
        cache.remove_entry(key, root)
        raise
    return Compiled(run, "converted", time.perf_counter() - start, model_file)
