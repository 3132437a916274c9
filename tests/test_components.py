"""The page's result images: lossless PNGs written once into Gradio's cache."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ui.components import ResultImage, png_bytes, png_in_cache


def decoded(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


@pytest.mark.parametrize("shape", [(37, 53), (37, 53, 3), (37, 53, 4)])
def test_png_is_lossless_for_grey_rgb_and_rgba(shape):
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    np.testing.assert_array_equal(decoded(png_bytes(pixels)), pixels)  # channel order kept (RGB, not BGR)


def test_png_rejects_what_is_not_an_image():
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        png_bytes(np.zeros((4, 4, 2), np.uint8))


def test_cache_file_is_named_by_content_and_written_once(tmp_path):
    image = np.full((8, 9, 3), 200, np.uint8)
    first = Path(png_in_cache(image, tmp_path))
    again = Path(png_in_cache(image.copy(), tmp_path))
    other = Path(png_in_cache(image // 2, tmp_path))
    assert first == again != other
    assert first.parent.parent == tmp_path and first.name == "image.png"
    np.testing.assert_array_equal(decoded(first.read_bytes()), image)
    assert not list(tmp_path.rglob("*.partial"))  # nothing half-written is left


def test_result_image_serves_the_written_file_from_gradios_cache():
    component = ResultImage(format="png", interactive=False)
    image = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    data = component.postprocess(image)
    path = Path(data.path)
    assert path.is_relative_to(Path(component.GRADIO_CACHE)) and path.suffix == ".png"
    np.testing.assert_array_equal(decoded(path.read_bytes()), image)
    assert component.get_block_name() == "image"  # the page draws Gradio's image component
    assert component.postprocess(None) is None
    floats = component.postprocess(image.astype(np.float32) / 255.0)  # other arrays: Gradio's own path
    assert Path(floats.path).exists()
