"""Anomaly-map post-processing and display helpers (pure functions on numpy arrays).

Every method turns its native patch-grid map into a map at the query's original size
with ``upsample_map``; the app and the inspection tools use the colouring, masking and
coordinate helpers below. Conventions:

* maps are float32 ``(H, W)`` arrays, images are uint8 ``(H, W, 3)`` RGB arrays;
* boxes are ``(x0, y0, x1, y1)`` in pixels with ``x1``/``y1`` exclusive;
* colouring uses a fixed value range 0..1 (no per-image min-max) except ``grid_image``,
  which shows a raw map in its own range.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from .geometry import Geometry

#: Colormap names accepted by ``colorize``, ``overlay`` and ``grid_image``.
COLORMAPS: dict[str, int] = {
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS,
}

#: Kernel half-width in standard deviations, as ``scipy.ndimage.gaussian_filter``'s default.
GAUSSIAN_TRUNCATE = 4.0


def _as_map(values: np.ndarray, name: str = "map") -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (H, W), got shape {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    return array.astype(np.float32, copy=False)


def _as_image(image_rgb: np.ndarray) -> np.ndarray:
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}")
    return image


def _check_same_size(image: np.ndarray, other: np.ndarray, what: str) -> None:
    if image.shape[:2] != other.shape[:2]:
        raise ValueError(f"{what} of shape {other.shape[:2]} does not match the image's {image.shape[:2]}")


# -- smoothing and resampling ---------------------------------------------------------------


def gaussian_kernel(sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> np.ndarray:
    """Normalised 1-D Gaussian, float64 ``(2r + 1,)`` with radius ``r = int(truncate * sigma + 0.5)``."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / float(sigma)) ** 2)
    return kernel / kernel.sum()


def smooth(anomaly_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a map, as ``scipy.ndimage.gaussian_filter(m, sigma, mode="reflect",
    truncate=4.0)``.

    Args:
        anomaly_map: ``(H, W)`` map, any real dtype.
        sigma: standard deviation in pixels, >= 0; 0 returns an unchanged copy.

    Returns:
        float32 ``(H, W)``.

    The border is mirrored including the edge pixel (scipy's ``"reflect"``, OpenCV's
    ``BORDER_REFLECT``); the padding is done with ``np.pad(mode="symmetric")`` so maps
    smaller than the kernel radius are mirrored repeatedly, exactly like scipy.
    """
    values = _as_map(anomaly_map, "anomaly_map")
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if sigma == 0:
        return values.copy()
    kernel = gaussian_kernel(sigma)
    radius = kernel.size // 2
    if radius == 0:
        return values.copy()
    padded = np.pad(values, radius, mode="symmetric")
    blurred = cv2.sepFilter2D(padded, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    return np.ascontiguousarray(blurred[radius:-radius, radius:-radius], dtype=np.float32)


def _resize_bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (torch ``align_corners=False``, no antialias)."""
    if values.shape == (height, width):
        return values.copy()
    return cv2.resize(values, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


def to_input_frame(raw_map: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a patch-grid map to the model-input frame.

    Args:
        raw_map: ``(h, w)`` patch-grid map.
        size: side of the square model input, or ``(height, width)``.

    Returns:
        float32 ``(size, size)``, equal to ``F.interpolate(mode="bilinear",
        align_corners=False)`` to float32 rounding.
    """
    values = _as_map(raw_map, "raw_map")
    height, width = (size, size) if isinstance(size, (int, np.integer)) else size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return _resize_bilinear(values, int(height), int(width))


def to_original_frame(input_map: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Undo preprocessing: a map on the ``size`` x ``size`` model input to the original image.

    The crop is placed at (``crop_top``, ``crop_left``) in the ``resized`` frame, the
    cut-away borders are filled by edge replication, and the frame is resized
    bilinearly to ``original``.

    Args:
        input_map: ``(size, size)`` map on the model input.
        geometry: the query's preprocessing geometry.

    Returns:
        float32 ``(H, W)`` = ``geometry.original``.
    """
    values = _as_map(input_map, "input_map")
    size = geometry.size
    if values.shape != (size, size):
        raise ValueError(f"input_map has shape {values.shape}, expected ({size}, {size}) for this geometry")
    resized_h, resized_w = geometry.resized
    bottom = resized_h - size - geometry.crop_top
    right = resized_w - size - geometry.crop_left
    if min(geometry.crop_top, geometry.crop_left, bottom, right) < 0:
        raise ValueError(f"inconsistent geometry: a {size}px crop does not fit in {geometry.resized}: {geometry}")
    if geometry.crop_top or geometry.crop_left or bottom or right:
        values = cv2.copyMakeBorder(
            values, geometry.crop_top, bottom, geometry.crop_left, right, borderType=cv2.BORDER_REPLICATE
        )
    height, width = geometry.original
    return np.ascontiguousarray(_resize_bilinear(values, height, width), dtype=np.float32)


def upsample_map(raw_map: np.ndarray, geometry: Geometry, *, sigma: float = 0.0) -> np.ndarray:
    """The project's one post-processing of a patch-grid map.

    1. bilinear upsampling to the ``size`` x ``size`` model input (``to_input_frame``);
    2. Gaussian smoothing with ``sigma`` pixels at model-input scale (``smooth``);
    3. + 4. back to the original image (``to_original_frame``).

    Args:
        raw_map: ``(h, w)`` native map of the method.
        geometry: the query's preprocessing geometry.
        sigma: Gaussian standard deviation in model-input pixels (0 = none).

    Returns:
        float32 ``(H, W)`` = ``geometry.original``.
    """
    input_map = to_input_frame(raw_map, geometry.size)
    if sigma:
        input_map = smooth(input_map, sigma)
    return to_original_frame(input_map, geometry)


# -- patch coordinates --------------------------------------------------------------------


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    rows, cols = int(grid[0]), int(grid[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must have positive sides, got {grid!r}")
    return rows, cols


def patch_box(geometry: Geometry, grid: tuple[int, int], row: int, col: int) -> tuple[int, int, int, int]:
    """Box ``(x0, y0, x1, y1)`` (exclusive ends) of grid patch (row, col) in original-image pixels.

    The grid ``(rows, cols)`` tiles the ``size`` x ``size`` model input; the box is the
    smallest pixel box covering the patch once mapped to the original image, clipped to it.
    """
    rows, cols = _check_grid(grid)
    if not (0 <= row < rows and 0 <= col < cols):
        raise IndexError(f"patch ({row}, {col}) is outside the {rows}x{cols} grid")
    height, width = geometry.original
    resized_h, resized_w = geometry.resized
    scale_y = height / resized_h
    scale_x = width / resized_w
    patch_h = geometry.size / rows
    patch_w = geometry.size / cols
    top = (geometry.crop_top + row * patch_h) * scale_y
    bottom = (geometry.crop_top + (row + 1) * patch_h) * scale_y
    left = (geometry.crop_left + col * patch_w) * scale_x
    right = (geometry.crop_left + (col + 1) * patch_w) * scale_x
    eps = 1e-9
    x0 = min(max(int(math.floor(left + eps)), 0), width - 1)
    y0 = min(max(int(math.floor(top + eps)), 0), height - 1)
    x1 = max(min(int(math.ceil(right - eps)), width), x0 + 1)
    y1 = max(min(int(math.ceil(bottom - eps)), height), y0 + 1)
    return x0, y0, x1, y1


def pixel_to_patch(geometry: Geometry, grid: tuple[int, int], x: float, y: float) -> tuple[int, int]:
    """Grid patch ``(row, col)`` whose area holds the centre of original pixel (x, y).

    Pixels cut away by the crop map to the nearest edge patch (their map values are
    the edge patch's, by edge replication). Inverse of ``patch_box`` for pixels inside
    the crop, as long as a patch spans at least one original pixel (on tiny originals
    several patches share a pixel, which then names one of them).
    """
    rows, cols = _check_grid(grid)
    height, width = geometry.original
    if not (0 <= x < width and 0 <= y < height):
        raise IndexError(f"pixel ({x}, {y}) is outside the {width}x{height} image")
    resized_h, resized_w = geometry.resized
    v = (float(y) + 0.5) * resized_h / height - geometry.crop_top
    u = (float(x) + 0.5) * resized_w / width - geometry.crop_left
    row = int(math.floor(v * rows / geometry.size))
    col = int(math.floor(u * cols / geometry.size))
    return min(max(row, 0), rows - 1), min(max(col, 0), cols - 1)


# -- display ------------------------------------------------------------------------------


def _colormap_code(colormap: str) -> int:
    try:
        return COLORMAPS[str(colormap).lower()]
    except KeyError:
        raise ValueError(f"unknown colormap {colormap!r}; valid ones: {', '.join(COLORMAPS)}") from None


def _apply_colormap(values01: np.ndarray, colormap: str) -> np.ndarray:
    code = _colormap_code(colormap)
    clean = np.nan_to_num(values01.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
    levels = np.rint(np.clip(clean, 0.0, 1.0) * 255.0).astype(np.uint8)
    bgr = cv2.applyColorMap(levels, code)
    return np.ascontiguousarray(bgr[..., ::-1])


def colorize(map01: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """Colour a map whose values are on a fixed 0..1 scale (values outside are clipped).

    Args:
        map01: ``(H, W)`` map; NaN is shown as 0.
        colormap: one of ``COLORMAPS`` ("jet", "turbo", "inferno", "viridis").

    Returns:
        uint8 ``(H, W, 3)`` RGB.
    """
    return _apply_colormap(_as_map(map01, "map01"), colormap)


def overlay(image_rgb: np.ndarray, map01: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Alpha-blend the coloured map over the image: ``(1 - alpha) * image + alpha * colour``,
    rounded to the nearest grey level (OpenCV's ``addWeighted``, within one level of the
    exact blend; the app draws this for every method and query).

    Args:
        image_rgb: uint8 ``(H, W, 3)``.
        map01: ``(H, W)`` map on the 0..1 scale.
        alpha: weight of the colour map in [0, 1].
        colormap: see ``colorize``.

    Returns:
        uint8 ``(H, W, 3)`` RGB.
    """
    image = _as_image(image_rgb)
    values = _as_map(map01, "map01")
    _check_same_size(image, values, "map01")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    colours = colorize(values, colormap)
    return cv2.addWeighted(np.ascontiguousarray(image), 1.0 - alpha, colours, alpha, 0.0)


def threshold_mask(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels at or above the threshold: bool ``(H, W)`` (NaN counts as below)."""
    values = _as_map(anomaly_map, "anomaly_map")
    with np.errstate(invalid="ignore"):
        return values >= np.float32(threshold)


def draw_contours(
    image_rgb: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = (255, 0, 0),
    thickness: int = 2,
) -> np.ndarray:
    """Outline the regions of a mask (outer borders and holes) on a copy of the image.

    Args:
        image_rgb: uint8 ``(H, W, 3)``.
        mask: bool ``(H, W)``.
        color: RGB colour of the outline.
        thickness: line width in pixels (>= 1), centred on the mask's border pixels.

    Returns:
        uint8 ``(H, W, 3)`` copy.
    """
    image = _as_image(image_rgb)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D array (H, W), got shape {mask.shape}")
    _check_same_size(image, mask, "mask")
    if int(thickness) < 1:
        raise ValueError(f"thickness must be >= 1, got {thickness!r}")
    out = np.ascontiguousarray(image.copy())
    binary = np.ascontiguousarray(mask.astype(bool).astype(np.uint8))
    contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if contours:
        rgb = tuple(int(c) for c in color)
        cv2.drawContours(out, contours, -1, rgb, int(thickness), lineType=cv2.LINE_8)
    return out


def grid_image(
    raw_map: np.ndarray,
    size: tuple[int, int],
    colormap: str = "jet",
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """The raw patch-grid map as a picture: own value range, nearest-neighbour upscaling.

    Args:
        raw_map: ``(h, w)`` native map.
        size: output ``(H, W)``.
        colormap: see ``colorize``.
        vmin, vmax: value range shown from the lowest to the highest colour; default the
            map's own finite min and max. A zero range shows the lowest colour.

    Returns:
        uint8 ``(H, W, 3)`` RGB where each patch is a block of one colour.
    """
    values = _as_map(raw_map, "raw_map")
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    finite = values[np.isfinite(values)]
    lower = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    upper = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    span = upper - lower
    scaled = (values - np.float32(lower)) / np.float32(span) if span > 0 else np.zeros_like(values)
    colours = _apply_colormap(scaled, colormap)
    return cv2.resize(colours, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


def agreement_map(masks: Sequence[np.ndarray]) -> np.ndarray:
    """How many of the masks flag each pixel: int32 ``(H, W)`` with values 0..len(masks)."""
    masks = list(masks)
    if not masks:
        raise ValueError("agreement_map needs at least one mask")
    shape = np.asarray(masks[0]).shape
    if len(shape) != 2:
        raise ValueError(f"masks must be 2-D arrays (H, W), got shape {shape}")
    counts = np.zeros(shape, dtype=np.int32)
    for index, mask in enumerate(masks):
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"mask {index} has shape {mask.shape}, expected {shape}")
        counts += mask.astype(bool)
    return counts
