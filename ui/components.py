"""Gradio components of the page that differ from Gradio's own in one behaviour.

``ResultImage`` is ``gr.Image`` for the images the app draws (overlays, outlines, raw
grids, the comparison strip, the agreement and explanation views). Gradio encodes a numpy
output with PIL's PNG writer at zlib level 6: about 20 ms for a 256 x 320 overlay and 360 ms
for 1024 x 1280, repeated for every image of every Run (benchmarks/RESULTS.md, "first answer
in the browser"). ``ResultImage`` writes the same pixels as a lossless PNG with OpenCV at
``PNG_COMPRESSION`` (4-5x faster, files 10-20% larger) straight into Gradio's file cache,
in a folder named by the content's digest as Gradio does, so Gradio serves it without a copy
and deletes it with the rest of its cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import gradio as gr
import numpy as np

#: zlib level of the written PNGs (lossless at every level; 1 = fastest).
PNG_COMPRESSION = 1


def is_png_pixels(value: Any) -> bool:
    """``value`` is what ``png_bytes`` writes: a uint8 ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array."""
    return (
        isinstance(value, np.ndarray)
        and value.dtype == np.uint8
        and (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (3, 4)))
    )


def png_bytes(image: np.ndarray) -> bytes:
    """``(H, W)`` grey or ``(H, W, 3)`` RGB / ``(H, W, 4)`` RGBA uint8 -> PNG file bytes."""
    if not is_png_pixels(image):
        raise ValueError(
            "expected a uint8 (H, W), (H, W, 3) or (H, W, 4) image, got "
            f"{getattr(image, 'dtype', type(image).__name__)} of shape {getattr(image, 'shape', None)}"
        )
    pixels = np.ascontiguousarray(image)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR if pixels.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ValueError("OpenCV could not encode the image as PNG")
    return encoded.tobytes()


def png_in_cache(image: np.ndarray, cache_dir: str | Path) -> str:
    """Write ``image`` as ``<cache_dir>/<sha256>/image.png`` (once per content; written to a
    temporary name first, so a reader never sees half a file) and return its path."""
    data = png_bytes(image)
    folder = Path(cache_dir) / hashlib.sha256(data).hexdigest()
    path = folder / "image.png"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=folder, suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    return str(path)


class ResultImage(gr.Image):
    """``gr.Image`` whose numpy outputs are written by ``png_in_cache`` (the page shows the
    Svelte image component: ``is_template``)."""

    is_template = True

    def postprocess(self, value: Any) -> Any:
        """A uint8 grey / RGB / RGBA array goes through ``png_in_cache``; anything else (paths,
        PIL images, other dtypes) through ``gr.Image`` as it is."""
        if is_png_pixels(value):
            value = png_in_cache(value, self.GRADIO_CACHE)
        return super().postprocess(value)


__all__ = ["PNG_COMPRESSION", "ResultImage", "is_png_pixels", "png_bytes", "png_in_cache"]
