"""Tests of detector.maps: smoothing, upsampling, coordinates, colouring, masks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from detector import maps
from detector.geometry import Geometry, input_geometry


# -- smooth -------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 4.0])
@pytest.mark.parametrize("shape", [(64, 64), (37, 53)])
def test_smooth_matches_scipy(rng, sigma, shape):
    values = rng.random(shape, dtype=np.float32)
    ours = maps.smooth(values, sigma)
    ref = scipy.ndimage.gaussian_filter(values.astype(np.float64), sigma, mode="reflect", truncate=4.0)
    assert ours.dtype == np.float32 and ours.shape == shape
    assert np.abs(ours - ref).max() < 1e-5


def test_smooth_map_smaller_than_kernel_matches_scipy(rng):
    values = rng.random((5, 7), dtype=np.float32)
    ours = maps.smooth(values, 4.0)  # radius 16 > the map's sides
    ref = scipy.ndimage.gaussian_filter(values.astype(np.float64), 4.0, mode="reflect", truncate=4.0)
    assert np.abs(ours - ref).max() < 1e-5


def test_smooth_zero_sigma_is_a_copy(rng):
    values = rng.random((8, 8)).astype(np.float32)
    out = maps.smooth(values, 0)
    np.testing.assert_array_equal(out, values)
    assert out is not values
    out[0, 0] = 7
    assert values[0, 0] != 7


def test_smooth_keeps_constant_and_rejects_negative_sigma():
    np.testing.assert_allclose(maps.smooth(np.full((9, 9), 0.25), 2.0), 0.25, atol=1e-6)
    with pytest.raises(ValueError):
        maps.smooth(np.zeros((4, 4)), -1.0)
    with pytest.raises(ValueError):
        maps.smooth(np.zeros((4, 4, 3)), 1.0)


def test_gaussian_kernel_radius_like_scipy():
    assert maps.gaussian_kernel(4.0).size == 2 * 16 + 1
    assert maps.gaussian_kernel(1.1).size == 2 * 4 + 1
    assert maps.gaussian_kernel(2.0).sum() == pytest.approx(1.0)


# -- upsampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("grid,size", [((8, 8), 64), ((15, 15), 240), ((7, 9), 50), ((37, 37), 518)])
def test_to_input_frame_matches_torch_bilinear(rng, grid, size):
    raw = rng.random(grid, dtype=np.float32)
    ours = maps.to_input_frame(raw, size)
    ref = F.interpolate(torch.from_numpy(raw)[None, None], size=(size, size), mode="bilinear", align_corners=False)
    assert ours.shape == (size, size) and ours.dtype == np.float32
    assert np.abs(ours - ref[0, 0].numpy()).max() < 1e-5


def _hot_patch_map(grid: tuple[int, int], row: int, col: int) -> np.ndarray:
    raw = np.zeros(grid, dtype=np.float32)
    raw[row, col] = 1.0
    return raw


GEOMETRIES = [
    input_geometry(300, 200, 64, "shorter"),
    input_geometry(200, 300, 64, "shorter"),
    input_geometry(300, 200, 64, "squash"),
    input_geometry(200, 300, 64, "squash"),
    input_geometry(480, 640, 240, "shorter"),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g.original}->{g.resized}")
@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_hot_patch_lands_in_its_box(geometry, sigma):
    grid = (8, 8)
    for row, col in [(2, 5), (4, 1), (6, 6), (1, 3)]:
        out = maps.upsample_map(_hot_patch_map(grid, row, col), geometry, sigma=sigma)
        assert out.shape == geometry.original and out.dtype == np.float32
        y, x = np.unravel_index(np.argmax(out), out.shape)
        x0, y0, x1, y1 = maps.patch_box(geometry, grid, row, col)
        assert x0 <= x < x1 and y0 <= y < y1, (row, col, (x, y), (x0, y0, x1, y1))
        assert out[(y0 + y1) // 2, (x0 + x1) // 2] >= 0.9 * out.max()


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g.original}->{g.resized}")
def test_hot_corner_patch_peaks_in_its_box(geometry):
    # A corner patch's value is replicated into the cut-away border, so the maximum is
    # not unique; it must still be reached inside the patch's box.
    grid = (8, 8)
    for row, col in [(0, 0), (7, 7), (0, 7)]:
        out = maps.upsample_map(_hot_patch_map(grid, row, col), geometry)
        x0, y0, x1, y1 = maps.patch_box(geometry, grid, row, col)
        assert out[y0:y1, x0:x1].max() == pytest.approx(out.max(), abs=1e-6)
        assert out.max() > 0.9


def test_shorter_resize_crop_shifts_the_map():
    # 300 (H) x 200 (W): resized to 96 x 64, crop rows 16..80; the top sixth of the
    # original is cut away and filled with the first row's values.
    geometry = input_geometry(300, 200, 64, "shorter")
    assert geometry == Geometry((300, 200), (96, 64), 16, 0, 64)
    raw = np.zeros((8, 8), np.float32)
    raw[0, :] = 1.0
    out = maps.upsample_map(raw, geometry)
    assert out.shape == (300, 200)
    np.testing.assert_allclose(out[:45, :], 1.0, atol=1e-6)  # cut-away band (0..50 rows) replicated
    assert out[-40:, :].max() < 1e-6


def test_squash_geometry_is_a_plain_resize(rng):
    geometry = input_geometry(30, 50, 16, "squash")
    raw = rng.random((4, 4), dtype=np.float32)
    out = maps.upsample_map(raw, geometry)
    ref = F.interpolate(torch.from_numpy(raw)[None, None], size=(16, 16), mode="bilinear", align_corners=False)
    ref = F.interpolate(ref, size=(30, 50), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.abs(out - ref).max() < 1e-5


def test_upsample_smooths_at_input_scale(rng):
    geometry = input_geometry(128, 128, 64, "shorter")
    raw = rng.random((8, 8), dtype=np.float32)
    expected_input = maps.smooth(maps.to_input_frame(raw, 64), 3.0)
    expected = maps.to_original_frame(expected_input, geometry)
    np.testing.assert_array_equal(maps.upsample_map(raw, geometry, sigma=3.0), expected)


def test_to_original_frame_rejects_wrong_size():
    with pytest.raises(ValueError):
        maps.to_original_frame(np.zeros((10, 10)), input_geometry(20, 20, 16, "squash"))


# -- patch coordinates --------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g.original}->{g.resized}")
def test_patch_box_and_pixel_to_patch_round_trip(geometry):
    grid = (8, 8)
    for row in range(8):
        for col in range(8):
            x0, y0, x1, y1 = maps.patch_box(geometry, grid, row, col)
            assert 0 <= x0 < x1 <= geometry.original[1] and 0 <= y0 < y1 <= geometry.original[0]
            assert maps.pixel_to_patch(geometry, grid, (x0 + x1) // 2, (y0 + y1) // 2) == (row, col)


def test_every_pixel_inside_the_crop_lies_in_its_patch_box():
    geometry = input_geometry(200, 300, 64, "shorter")  # crop cuts columns at left and right
    grid = (8, 8)
    boxes = {(r, c): maps.patch_box(geometry, grid, r, c) for r in range(8) for c in range(8)}
    left = boxes[(0, 0)][0]
    right = boxes[(0, 7)][2]
    assert left > 0 and right < 300
    for y in range(0, 200, 7):
        for x in range(left + 1, right - 1, 5):
            r, c = maps.pixel_to_patch(geometry, grid, x, y)
            x0, y0, x1, y1 = boxes[(r, c)]
            assert x0 <= x < x1 and y0 <= y < y1


def test_patch_box_exact_values():
    geometry = input_geometry(300, 200, 64, "shorter")  # resized (96, 64), crop_top 16
    # patch (0, 0) covers input rows 0..8 -> resized rows 16..24 -> original 50..75
    assert maps.patch_box(geometry, (8, 8), 0, 0) == (0, 50, 25, 75)
    assert maps.patch_box(geometry, (8, 8), 7, 7) == (175, 225, 200, 250)
    # pixels cut away by the crop belong to the nearest edge patch
    assert maps.pixel_to_patch(geometry, (8, 8), 10, 0) == (0, 0)
    assert maps.pixel_to_patch(geometry, (8, 8), 199, 299) == (7, 7)
    with pytest.raises(IndexError):
        maps.pixel_to_patch(geometry, (8, 8), 200, 0)
    with pytest.raises(IndexError):
        maps.patch_box(geometry, (8, 8), 8, 0)


# -- colouring ----------------------------------------------------------------------------


def test_colorize_jet_end_colours_are_rgb():
    out = maps.colorize(np.array([[0.0, 1.0, -3.0, 5.0]], np.float32))
    assert out.dtype == np.uint8 and out.shape == (1, 4, 3)
    assert out[0, 0].tolist() == [0, 0, 128]  # dark blue
    assert out[0, 1].tolist() == [128, 0, 0]  # dark red
    assert out[0, 2].tolist() == [0, 0, 128]  # clipped to 0
    assert out[0, 3].tolist() == [128, 0, 0]  # clipped to 1


def test_colorize_fixed_range_no_per_image_normalisation():
    low = maps.colorize(np.full((2, 2), 0.1, np.float32))
    high = maps.colorize(np.full((2, 2), 0.9, np.float32))
    assert (low[..., 2] > low[..., 0]).all()  # blue-ish, not stretched to full range
    assert (high[..., 0] > high[..., 2]).all()  # red-ish


@pytest.mark.parametrize("name", ["jet", "turbo", "inferno", "viridis", "JET"])
def test_colorize_known_colormaps(name):
    out = maps.colorize(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), name)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert len({tuple(p) for p in out.reshape(-1, 3)}) > 8


def test_colorize_viridis_ends():
    out = maps.colorize(np.array([[0.0, 1.0]], np.float32), "viridis")
    # viridis goes from dark purple (68, 1, 84) to yellow (253, 231, 37)
    assert out[0, 0].tolist() == pytest.approx([68, 1, 84], abs=2)
    assert out[0, 1].tolist() == pytest.approx([253, 231, 37], abs=2)


def test_colorize_unknown_colormap_lists_valid_ones():
    with pytest.raises(ValueError, match="jet.*turbo.*inferno.*viridis"):
        maps.colorize(np.zeros((2, 2)), "rainbow")


def test_overlay_alpha_extremes(rng):
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    values = rng.random((12, 10), dtype=np.float32)
    np.testing.assert_array_equal(maps.overlay(image, values, alpha=0.0), image)
    np.testing.assert_array_equal(maps.overlay(image, values, alpha=1.0), maps.colorize(values))
    half = maps.overlay(image, values, alpha=0.5, colormap="turbo")
    expected = (image.astype(np.float32) + maps.colorize(values, "turbo").astype(np.float32)) / 2
    assert np.abs(half.astype(np.float32) - expected).max() <= 0.5
    assert half.dtype == np.uint8 and half.shape == image.shape
    third = maps.overlay(image, values, alpha=0.3)
    exact = 0.7 * image.astype(np.float64) + 0.3 * maps.colorize(values).astype(np.float64)
    assert np.abs(third.astype(np.float64) - exact).max() <= 1.0  # within one grey level
    with pytest.raises(ValueError):
        maps.overlay(image, values[:5], alpha=0.5)
    with pytest.raises(ValueError):
        maps.overlay(image, values, alpha=1.5)


def test_threshold_mask():
    values = np.array([[0.1, 0.5], [0.7, np.nan]], np.float32)
    mask = maps.threshold_mask(values, 0.5)
    assert mask.dtype == bool
    assert mask.tolist() == [[False, True], [True, False]]


def test_draw_contours_thin_line_is_exactly_the_mask_border():
    image = np.full((40, 50, 3), 100, np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[10:30, 15:35] = True
    out = maps.draw_contours(image, mask, color=(255, 0, 0), thickness=1)
    assert out is not image and (image == 100).all()
    changed = (out != image).any(axis=2)
    interior = np.zeros_like(mask)
    interior[11:29, 16:34] = True
    np.testing.assert_array_equal(changed, mask & ~interior)
    assert (out[changed] == [255, 0, 0]).all()


def test_draw_contours_thick_line_hugs_the_border():
    image = np.zeros((60, 60, 3), np.uint8)
    yy, xx = np.mgrid[:60, :60]
    mask = (yy - 30) ** 2 + (xx - 28) ** 2 <= 15**2
    mask[27:33, 25:31] = False  # a hole is outlined too
    out = maps.draw_contours(image, mask, color=(0, 255, 0), thickness=2)
    changed = (out != image).any(axis=2)
    assert changed.any() and (out[changed] == [0, 255, 0]).all()
    border = mask & ~scipy.ndimage.binary_erosion(mask)
    distance_to_border = scipy.ndimage.distance_transform_edt(~border)
    assert distance_to_border[changed].max() <= 2.0
    assert (border <= changed).all()
    assert changed[27:33, 25:31].any()  # the hole's edge
    assert not changed[:5].any() and not changed[30, 20]  # far from any border


def test_draw_contours_empty_mask_returns_copy():
    image = np.full((8, 8, 3), 7, np.uint8)
    out = maps.draw_contours(image, np.zeros((8, 8), bool))
    np.testing.assert_array_equal(out, image)
    assert out is not image


def test_grid_image_nearest_blocks_and_own_range():
    raw = np.array([[2.0, 4.0], [6.0, 10.0]], np.float32)
    out = maps.grid_image(raw, (40, 60))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 0, 128]  # map minimum -> lowest jet colour
    assert out[39, 59].tolist() == [128, 0, 0]  # map maximum -> highest jet colour
    blocks = [out[:20, :30], out[:20, 30:], out[20:, :30], out[20:, 30:]]
    for block in blocks:
        assert (block == block[0, 0]).all()
    assert len({tuple(b[0, 0]) for b in blocks}) == 4
    fixed = maps.grid_image(raw, (2, 2), vmin=0.0, vmax=20.0)
    np.testing.assert_array_equal(fixed, maps.colorize(raw / 20.0))
    flat = maps.grid_image(np.full((3, 3), 5.0), (6, 6))
    assert (flat == [0, 0, 128]).all()


def test_agreement_map_counts():
    a = np.array([[1, 0], [1, 1]], bool)
    b = np.array([[1, 0], [0, 1]], bool)
    c = np.array([[1, 1], [0, 0]], bool)
    counts = maps.agreement_map([a, b, c])
    assert np.issubdtype(counts.dtype, np.integer)
    assert counts.tolist() == [[3, 1], [1, 2]]
    with pytest.raises(ValueError):
        maps.agreement_map([])
    with pytest.raises(ValueError):
        maps.agreement_map([a, np.zeros((3, 3), bool)])
