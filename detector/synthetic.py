"""Deterministic synthetic textures with drawn defects and exact ground-truth masks.

Used by the tests, the examples, the benchmarks and ``python -m detector make-dataset``:
real inspection datasets (MVTec AD, VisA) cannot be shipped.

* A texture *family* is a pair (kind, seed). ``texture(kind, seed, size, index)`` gives
  different samples of one family for different ``index``: each is a window, at an
  index-dependent offset, of one endless procedural pattern defined by the family, plus
  a little per-sample pixel noise. Samples of one family therefore look alike, as the
  normal images of one inspected product do.
* ``add_defect`` draws a scratch, spot, crack or missing patch with OpenCV in a colour
  that contrasts with the surface and returns the mask of exactly the pixels it changed.
* ``write_mvtec_dataset`` / ``write_folder_dataset`` write the two dataset layouts the
  evaluation tools read (see ``docs/evaluation.md`` §1 and §6.1).

Everything random comes from ``numpy.random.default_rng`` seeded from the arguments;
no global random state is used or changed.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

#: Texture kinds ``texture`` can draw.
TEXTURE_KINDS: tuple[str, ...] = ("grating", "weave", "blobs", "grain")

#: Defect kinds ``add_defect`` can draw (also the defect folder names of the writers).
DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "crack", "missing")

#: Standard deviation of the per-sample pixel noise, in grey levels.
SAMPLE_NOISE = 3.0

#: Samples of one family are windows of an endless pattern within this many pixels.
_OFFSET_RANGE = 4096.0


def _code(name: str) -> int:
    """A stable integer for a name (part of seeds; Python's ``hash`` is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def _derived_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers, e.g. (dataset seed, category, image number)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        height = width = int(size)
    else:
        height, width = (int(v) for v in size)
    if height < 8 or width < 8:
        raise ValueError(f"size must be at least 8 x 8 pixels, got {size!r}")
    return height, width


def _check_kind(kind: str, valid: tuple[str, ...], what: str) -> str:
    if kind not in valid:
        raise ValueError(f"unknown {what} {kind!r}; valid ones: {', '.join(valid)}")
    return kind


# -- procedural building blocks -----------------------------------------------------------


def _random_colour(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """An RGB colour with channels in [low, high], float64 (3,)."""
    return rng.uniform(low, high, size=3)


def _wave_field(
    rng: np.random.Generator,
    ys: np.ndarray,
    xs: np.ndarray,
    *,
    components: int,
    wavelength: tuple[float, float],
) -> np.ndarray:
    """Smooth random field in about [-1, 1]: a sum of plane waves with random directions,
    wavelengths (pixels) and phases drawn from ``rng`` (the family), evaluated at absolute
    coordinates, so windows at different offsets are views of one endless field."""
    field = np.zeros(np.broadcast(ys, xs).shape, dtype=np.float64)
    angles = rng.uniform(0.0, np.pi, components)
    lengths = rng.uniform(*wavelength, components)
    phases = rng.uniform(0.0, 2.0 * np.pi, components)
    for angle, length, phase in zip(angles, lengths, phases):
        k = 2.0 * np.pi / length
        field += np.cos(k * (np.cos(angle) * xs + np.sin(angle) * ys) + phase)
    return field / np.sqrt(components / 2.0)


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two RGB colours: ``(H, W, 3)`` float64 for ``t`` of shape (H, W)."""
    t = t[..., None]
    return a * (1.0 - t) + b * t


def _grating(family: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Parallel stripes (like a grid or a brushed surface), slightly wavy."""
    angle = family.uniform(0.0, np.pi)
    period = family.uniform(7.0, 14.0)
    sharpness = family.uniform(1.5, 4.0)
    dark = _random_colour(family, 20, 110)
    light = _random_colour(family, 140, 240)
    warp = 1.5 * _wave_field(family, ys, xs, components=4, wavelength=(80.0, 200.0))
    u = np.cos(angle) * xs + np.sin(angle) * ys + warp
    t = 0.5 + 0.5 * np.tanh(sharpness * np.sin(2.0 * np.pi * u / period))
    return _mix(dark, light, t)


def _weave(family: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Plain weave: warp and weft threads passing over and under each other (a fabric)."""
    angle = family.uniform(-0.3, 0.3)
    period = family.uniform(8.0, 14.0)
    warp_colour = _random_colour(family, 90, 220)
    weft_colour = np.clip(warp_colour + family.uniform(-50, 50, 3), 30, 240)
    gap_colour = warp_colour * 0.25
    u = (np.cos(angle) * xs + np.sin(angle) * ys) / period
    v = (-np.sin(angle) * xs + np.cos(angle) * ys) / period
    cell_u = np.floor(u)
    cell_v = np.floor(v)
    fu = u - cell_u
    fv = v - cell_v
    # thread profiles across their width: 1 in the middle, 0 at the gaps
    across_u = np.clip(np.sin(np.pi * fu) * 1.6, 0.0, 1.0)
    across_v = np.clip(np.sin(np.pi * fv) * 1.6, 0.0, 1.0)
    warp_on_top = ((cell_u + cell_v) % 2) == 0
    # shading along the top thread: it bends down at both ends of the cell
    warp_shade = 0.75 + 0.25 * np.sin(np.pi * fv)
    weft_shade = 0.75 + 0.25 * np.sin(np.pi * fu)
    top_is_warp = warp_on_top[..., None]
    top_colour = np.where(top_is_warp, warp_colour * warp_shade[..., None], weft_colour * weft_shade[..., None])
    top_cover = np.where(warp_on_top, across_u, across_v)
    under_colour = np.where(top_is_warp, weft_colour * 0.6, warp_colour * 0.6)
    under_cover = np.where(warp_on_top, across_v, across_u)
    base = _mix(gap_colour, under_colour, under_cover)
    return base * (1.0 - top_cover[..., None]) + top_colour * top_cover[..., None]


def _blobs(family: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Rounded patches of one colour on another (like a mottled or leather-like surface)."""
    background = _random_colour(family, 60, 200)
    blob = np.clip(background + family.choice([-1.0, 1.0]) * family.uniform(40, 80, 3), 10, 245)
    level = family.uniform(-0.4, 0.4)
    field = _wave_field(family, ys, xs, components=10, wavelength=(18.0, 45.0))
    t = 0.5 + 0.5 * np.tanh(4.0 * (field - level))
    fine = 0.08 * _wave_field(family, ys, xs, components=8, wavelength=(3.0, 7.0))
    return _mix(background, blob, t) * (1.0 + fine[..., None])


def _grain(family: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Wood-like grain: long warped bands of varying width with fine fibres."""
    angle = family.uniform(0.0, np.pi)
    period = family.uniform(16.0, 30.0)
    earlywood = _random_colour(family, 130, 230)
    latewood = earlywood * family.uniform(0.45, 0.7)
    along = np.cos(angle) * xs + np.sin(angle) * ys
    across = -np.sin(angle) * xs + np.cos(angle) * ys
    warp = 6.0 * _wave_field(family, ys, xs, components=6, wavelength=(60.0, 160.0))
    phase = (across + warp) / period
    rings = np.abs(np.sin(np.pi * phase)) ** 3
    # fibres: fine variation that changes fast across and slowly along the grain
    fibre_angle = family.uniform(0.0, 2.0 * np.pi, 6)
    fibre_length = family.uniform(2.0, 5.0, 6)
    fibres = np.zeros_like(along)
    for a, length in zip(fibre_angle, fibre_length):
        fibres += np.cos(2.0 * np.pi * (across + warp) / length + 0.05 * along + a)
    fibres /= 6.0
    t = np.clip(rings + 0.15 * fibres, 0.0, 1.0)
    return _mix(earlywood, latewood, t)


_TEXTURES = {"grating": _grating, "weave": _weave, "blobs": _blobs, "grain": _grain}


def texture(kind: str, seed: int, size: int | tuple[int, int] = (128, 128), index: int = 0) -> np.ndarray:
    """One normal sample of the texture family (kind, seed).

    Args:
        kind: one of ``TEXTURE_KINDS``.
        seed: the family; equal (kind, seed) pairs share colours, scales and orientation.
        size: ``(H, W)`` or one side of a square, at least 8.
        index: which sample of the family (any int >= 0): a different window of the same
            endless pattern and different pixel noise.

    Returns:
        uint8 ``(H, W, 3)`` RGB.
    """
    _check_kind(kind, TEXTURE_KINDS, "texture kind")
    height, width = _size_hw(size)
    if int(index) < 0:
        raise ValueError(f"index must be >= 0, got {index!r}")
    sample = _rng(seed, _code(kind), index, 1)
    offset_y, offset_x = sample.uniform(0.0, _OFFSET_RANGE, 2)
    ys = (np.arange(height, dtype=np.float64) + offset_y)[:, None]
    xs = (np.arange(width, dtype=np.float64) + offset_x)[None, :]
    family = _rng(seed, _code(kind), 0)
    values = _TEXTURES[kind](family, ys, xs)
    values = values + sample.normal(0.0, SAMPLE_NOISE, size=(height, width, 1))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


# -- defects ------------------------------------------------------------------------------


def _contrast_colour(image: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour far from the image's mean colour: each channel pushed to the other extreme."""
    mean = image.reshape(-1, 3).mean(axis=0)
    colour = np.where(mean > 127.5, mean * 0.15, 255.0 - (255.0 - mean) * 0.15)
    colour = colour + rng.uniform(-10.0, 10.0, 3)
    return tuple(int(c) for c in np.clip(np.rint(colour), 0, 255))


def _point_inside(rng: np.random.Generator, height: int, width: int, margin: float) -> np.ndarray:
    return np.array(
        [rng.uniform(margin * width, (1 - margin) * width), rng.uniform(margin * height, (1 - margin) * height)]
    )


def _draw_scratch(canvas: np.ndarray, rng: np.random.Generator) -> None:
    height, width = canvas.shape
    side = min(height, width)
    start = _point_inside(rng, height, width, 0.15)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    length = rng.uniform(0.25, 0.5) * side
    bend = rng.uniform(-0.5, 0.5)
    steps = 12
    points = []
    for i in range(steps + 1):
        t = i / steps
        a = angle + bend * t
        points.append(start + t * length * np.array([np.cos(a), np.sin(a)]))
    pts = np.clip(np.rint(points), [0, 0], [width - 1, height - 1]).astype(np.int32)
    thickness = max(1, int(round(side * rng.uniform(0.008, 0.02))))
    cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], False, 255, thickness, lineType=cv2.LINE_8)


def _draw_spot(canvas: np.ndarray, rng: np.random.Generator) -> None:
    height, width = canvas.shape
    side = min(height, width)
    centre = _point_inside(rng, height, width, 0.2)
    axes = (
        max(2, int(round(side * rng.uniform(0.04, 0.1)))),
        max(2, int(round(side * rng.uniform(0.04, 0.1)))),
    )
    angle = float(rng.uniform(0.0, 180.0))
    cv2.ellipse(canvas, tuple(int(v) for v in np.rint(centre)), axes, angle, 0.0, 360.0, 255, -1, cv2.LINE_8)
    # a few satellite droplets around the stain
    for _ in range(int(rng.integers(0, 4))):
        offset = rng.normal(0.0, 1.6, 2) * max(axes)
        radius = max(1, int(round(min(axes) * rng.uniform(0.15, 0.35))))
        point = np.clip(np.rint(centre + offset), [0, 0], [width - 1, height - 1]).astype(int)
        cv2.circle(canvas, (int(point[0]), int(point[1])), radius, 255, -1, cv2.LINE_8)


def _draw_crack(canvas: np.ndarray, rng: np.random.Generator) -> None:
    height, width = canvas.shape
    side = min(height, width)
    thickness = max(1, int(round(side * rng.uniform(0.006, 0.015))))
    step = max(2.0, side * 0.03)

    def walk(start: np.ndarray, direction: float, steps: int) -> list[np.ndarray]:
        points = [start]
        for _ in range(steps):
            direction += rng.normal(0.0, 0.45)
            points.append(points[-1] + step * np.array([np.cos(direction), np.sin(direction)]))
        return points

    start = _point_inside(rng, height, width, 0.2)
    direction = rng.uniform(0.0, 2.0 * np.pi)
    main = walk(start, direction, int(rng.integers(8, 14)))
    branches = [main]
    for _ in range(int(rng.integers(1, 3))):
        fork = main[int(rng.integers(1, len(main) - 1))]
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2)
        branches.append(walk(fork, direction + turn, int(rng.integers(3, 7))))
    for points in branches:
        pts = np.clip(np.rint(points), [0, 0], [width - 1, height - 1]).astype(np.int32)
        cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], False, 255, thickness, lineType=cv2.LINE_8)


def _draw_missing(canvas: np.ndarray, rng: np.random.Generator) -> None:
    height, width = canvas.shape
    side = min(height, width)
    centre = _point_inside(rng, height, width, 0.2)
    corners = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, corners))
    radii = side * rng.uniform(0.07, 0.16, corners)
    points = centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    pts = np.clip(np.rint(points), [0, 0], [width - 1, height - 1]).astype(np.int32)
    cv2.fillPoly(canvas, [pts.reshape(-1, 1, 2)], 255, lineType=cv2.LINE_8)


_DEFECTS = {"scratch": _draw_scratch, "spot": _draw_spot, "crack": _draw_crack, "missing": _draw_missing}


def add_defect(image: np.ndarray, seed: int, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect on a copy of an image.

    Args:
        image: uint8 ``(H, W, 3)`` RGB, at least 8 x 8.
        seed: decides the shape, place and colour (and the kind when ``kind`` is None).
        kind: one of ``DEFECT_KINDS``: "scratch" (thin bright or dark line), "spot" (a
            stain with droplets, blended at 70..100 %), "crack" (jagged branching line),
            "missing" (an irregular hole filled with a flat dark or bright colour).

    Returns:
        ``(defective, mask)``: uint8 ``(H, W, 3)`` and bool ``(H, W)``. The mask holds
        exactly the pixels whose value changed, all of them inside the drawn shape.
    """
    source = np.asarray(image)
    if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 (H, W, 3) RGB array, got {source.dtype} {source.shape}")
    _size_hw(source.shape[:2])
    rng = _rng(seed, 2)
    if kind is None:
        kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    _check_kind(kind, DEFECT_KINDS, "defect kind")
    rng = _rng(seed, _code(kind), 3)
    height, width = source.shape[:2]
    for _ in range(8):
        canvas = np.zeros((height, width), dtype=np.uint8)
        _DEFECTS[kind](canvas, rng)
        drawn = canvas > 0
        region = cv2.dilate(canvas, np.ones((9, 9), np.uint8)) > 0
        colour = np.array(_contrast_colour(source[region], rng), dtype=np.float64)
        strength = rng.uniform(0.7, 1.0) if kind == "spot" else 1.0
        out = source.copy()
        painted = source[drawn].astype(np.float64) * (1.0 - strength) + colour * strength
        out[drawn] = np.clip(np.rint(painted), 0, 255).astype(np.uint8)
        mask = (out != source).any(axis=2)
        if mask.sum() >= max(4, drawn.sum() // 2):
            return out, mask
    return out, mask


# -- dataset writers ----------------------------------------------------------------------


def _save_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path, format="PNG")


def _save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path, format="PNG")


def _defect_plan(n_defect: int, defect_kinds: tuple[str, ...]) -> list[tuple[str, int]]:
    """(defect kind, number within that kind's folder) for defective images 0..n-1,
    kinds taken in turn."""
    kinds = tuple(defect_kinds)
    if not kinds:
        raise ValueError("defect_kinds must name at least one defect kind")
    for kind in kinds:
        _check_kind(kind, DEFECT_KINDS, "defect kind")
    counts = {kind: 0 for kind in kinds}
    plan = []
    for i in range(n_defect):
        kind = kinds[i % len(kinds)]
        plan.append((kind, counts[kind]))
        counts[kind] += 1
    return plan


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def write_mvtec_dataset(
    root: str | Path,
    *,
    categories: tuple[str, ...] = ("grating", "blobs"),
    n_train: int = 6,
    n_test_good: int = 4,
    n_test_defect: int = 4,
    size: int = 128,
    seed: int = 0,
    defect_kinds: tuple[str, ...] = DEFECT_KINDS,
) -> Path:
    """Write a synthetic dataset in the MVTec AD layout and return ``root``.

    Each category is a texture kind (one family per category, derived from ``seed``)::

        <root>/<category>/train/good/000.png ...            n_train normals
        <root>/<category>/test/good/000.png ...             n_test_good normals
        <root>/<category>/test/<defect>/000.png ...         n_test_defect images in all,
                                                            defect kinds taken in turn
        <root>/<category>/ground_truth/<defect>/000_mask.png   0/255 masks

    Images are ``size`` x ``size`` RGB PNGs; the same arguments write the same files.
    """
    root = Path(root)
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect)
    plan = _defect_plan(int(n_test_defect), tuple(defect_kinds))
    for category in categories:
        _check_kind(category, TEXTURE_KINDS, "category (texture kind)")
    for category in categories:
        family = _derived_seed(seed, _code(category))
        base = root / category
        index = 0
        for i in range(int(n_train)):
            _save_rgb(base / "train" / "good" / f"{i:03d}.png", texture(category, family, size, index))
            index += 1
        for i in range(int(n_test_good)):
            _save_rgb(base / "test" / "good" / f"{i:03d}.png", texture(category, family, size, index))
            index += 1
        for i, (kind, number) in enumerate(plan):
            image, mask = add_defect(
                texture(category, family, size, index), _derived_seed(seed, _code(category), i, 7), kind
            )
            index += 1
            _save_rgb(base / "test" / kind / f"{number:03d}.png", image)
            _save_mask(base / "ground_truth" / kind / f"{number:03d}_mask.png", mask)
    return root


def write_folder_dataset(
    root: str | Path,
    *,
    kind: str = "grating",
    n_good: int = 8,
    n_defect: int = 4,
    size: int = 128,
    seed: int = 0,
    defect_kinds: tuple[str, ...] = DEFECT_KINDS,
) -> Path:
    """Write one synthetic category in the plain folder layout and return ``root``::

        <root>/good/000.png ...                     n_good normals
        <root>/<defect>/000.png ...                 n_defect images in all, kinds in turn
        <root>/masks/<defect>/000.png               0/255 masks (same stem as the image)

    Images are ``size`` x ``size`` RGB PNGs of the texture ``kind``; deterministic.
    """
    root = Path(root)
    _check_kind(kind, TEXTURE_KINDS, "texture kind")
    _check_counts(n_good=n_good, n_defect=n_defect)
    plan = _defect_plan(int(n_defect), tuple(defect_kinds))
    family = _derived_seed(seed, _code(kind))
    index = 0
    for i in range(int(n_good)):
        _save_rgb(root / "good" / f"{i:03d}.png", texture(kind, family, size, index))
        index += 1
    for i, (defect, number) in enumerate(plan):
        image, mask = add_defect(texture(kind, family, size, index), _derived_seed(seed, _code(kind), i, 7), defect)
        index += 1
        _save_rgb(root / defect / f"{number:03d}.png", image)
        _save_mask(root / "masks" / defect / f"{number:03d}.png", mask)
    return root
