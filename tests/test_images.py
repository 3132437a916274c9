"""Tests of detector.images: loading, validation, conversion, preprocessing, fingerprints.

Every image file is generated here (PIL / numpy into memory or tmp_path).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from detector import limits
from detector.errors import InvalidImageError
from detector.geometry import input_geometry
from detector.images import LoadedImage, fingerprint, load_image
from detector.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess, preprocess, preprocess_batch


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims ``width`` x ``height`` (CRC fixed up)."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (10, 20, 30)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def jpeg_with_header_size(width: int, height: int) -> bytes:
    """A small baseline JPEG whose SOF0 segment claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (10, 20, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_with_header_size(width: int, height: int) -> bytes:
    """A small GIF whose logical screen claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("P", (16, 16), 1), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_rgb48(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one) from a ``(H, W, 3)`` uint16 array."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def assert_invalid(source, *words: str) -> str:
    with pytest.raises(InvalidImageError) as info:
        load_image(source)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), message
    return message


# ---------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------
def test_load_png_path_keeps_pixels_and_name(tmp_path, rng):
    rgb = random_rgb(rng, 20, 30)
    path = write(tmp_path, "part.png", encode(Image.fromarray(rgb), "PNG"))
    for source in (path, str(path)):
        image = load_image(source)
        assert image.name == "part.png"
        assert image.size == (20, 30)
        assert image.rgb.dtype == np.uint8 and image.rgb.shape == (20, 30, 3)
        assert image.rgb.flags.c_contiguous
        assert image.warnings == ()
        np.testing.assert_array_equal(image.rgb, rgb)


def test_load_bytes_like_and_pil(rng):
    rgb = random_rgb(rng, 12, 9)
    data = encode(Image.fromarray(rgb), "PNG")
    for source in (data, bytearray(data), memoryview(data), Image.fromarray(rgb), Image.open(io.BytesIO(data))):
        image = load_image(source)
        assert image.name is None
        np.testing.assert_array_equal(image.rgb, rgb)


def test_loaded_image_is_returned_as_is(rng):
    image = load_image(random_rgb(rng, 10, 10))
    assert load_image(image) is image


def test_array_input_is_copied(rng):
    rgb = random_rgb(rng, 10, 11)
    image = load_image(rgb)
    assert not np.shares_memory(image.rgb, rgb)
    rgb[0, 0] = 0
    image_before = image.rgb[0, 0].copy()
    rgb[0, 0] = 255
    np.testing.assert_array_equal(image.rgb[0, 0], image_before)


def test_non_contiguous_array_becomes_contiguous(rng):
    rgb = random_rgb(rng, 20, 20)[:, ::2]
    image = load_image(rgb)
    assert image.rgb.flags.c_contiguous
    np.testing.assert_array_equal(image.rgb, rgb)


def test_loaded_image_validates_its_array():
    with pytest.raises(InvalidImageError, match="uint8"):
        LoadedImage(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(InvalidImageError, match=r"\(H, W, 3\)"):
        LoadedImage(np.zeros((8, 8), dtype=np.uint8))
    image = LoadedImage(np.zeros((8, 16, 3), dtype=np.uint8)[:, ::2], warnings=["a"])
    assert image.rgb.flags.c_contiguous and image.warnings == ("a",)


# ---------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------
def marked_image() -> np.ndarray:
    """40 rows x 24 columns, white, with a black 8x8 block at the top-left corner."""
    rgb = np.full((40, 24, 3), 255, dtype=np.uint8)
    rgb[:8, :8] = 0
    return rgb


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_jpeg_exif_orientation_moves_the_marked_block(tmp_path):
    # Orientation 6: the stored image must be turned 90 degrees clockwise for display,
    # so the top-left block ends up at the top-right and the frame becomes 24 x 40.
    data = encode(Image.fromarray(marked_image()), "JPEG", quality=95, exif=exif_bytes(6))
    image = load_image(write(tmp_path, "photo.jpg", data))
    assert image.size == (24, 40)
    top_right = image.rgb[:8, -8:].mean()
    top_left = image.rgb[:8, :8].mean()
    assert top_right < 40 and top_left > 215
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(image.rgb, np.rot90(stored, k=-1))
    assert image.rgb.flags.c_contiguous


@pytest.mark.parametrize(
    "orientation, expected",
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: a[::-1, ::-1]),
        (4, lambda a: a[::-1, :]),
        (5, lambda a: a.transpose(1, 0, 2)),
        (6, lambda a: np.rot90(a, k=-1)),
        (7, lambda a: a.transpose(1, 0, 2)[::-1, ::-1]),
        (8, lambda a: np.rot90(a, k=1)),
    ],
)
def test_every_exif_orientation_on_png(orientation, expected, rng):
    rgb = random_rgb(rng, 12, 9)
    data = encode(Image.fromarray(rgb), "PNG", exif=exif_bytes(orientation))
    np.testing.assert_array_equal(load_image(data).rgb, expected(rgb))


def test_pil_image_input_gets_orientation_applied():
    data = encode(Image.fromarray(marked_image()), "PNG", exif=exif_bytes(8))
    opened = Image.open(io.BytesIO(data))
    image = load_image(opened)
    np.testing.assert_array_equal(image.rgb, np.rot90(marked_image(), k=1))
    assert opened.size == (24, 40)  # the caller's image is not modified


# ---------------------------------------------------------------------------------------
# mode conversion
# ---------------------------------------------------------------------------------------
def test_rgba_is_composited_on_white():
    rgba = np.zeros((8, 12, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere
    rgba[:, :4, 3] = 0  # fully transparent
    rgba[:, 4:8, 3] = 128  # half
    rgba[:, 8:, 3] = 255  # opaque
    image = load_image(encode(Image.fromarray(rgba), "PNG"))
    assert tuple(image.rgb[0, 0]) == (255, 255, 255)
    assert tuple(image.rgb[0, 5]) == (255, 127, 127)
    assert tuple(image.rgb[0, 10]) == (255, 0, 0)
    # The same through an array and a PIL image.
    np.testing.assert_array_equal(load_image(rgba).rgb, image.rgb)
    np.testing.assert_array_equal(load_image(Image.fromarray(rgba)).rgb, image.rgb)


def test_la_is_composited_on_white():
    gray = Image.new("LA", (8, 8), (0, 0))
    gray.paste((0, 255), (0, 0, 4, 8))
    image = load_image(encode(gray, "PNG"))
    assert tuple(image.rgb[0, 0]) == (0, 0, 0)
    assert tuple(image.rgb[0, 7]) == (255, 255, 255)


def palette_image(transparent_index: int | None = None) -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([200, 10, 20, 0, 128, 255] + [0] * (256 * 3 - 6))
    image.paste(1, (4, 0, 8, 8))
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def test_palette_without_transparency():
    image = load_image(encode(palette_image(), "PNG"))
    assert tuple(image.rgb[0, 0]) == (200, 10, 20)
    assert tuple(image.rgb[0, 7]) == (0, 128, 255)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt):
    data = encode(palette_image(), fmt, transparency=0)
    image = load_image(data)
    assert tuple(image.rgb[0, 0]) == (255, 255, 255)
    assert tuple(image.rgb[0, 7]) == (0, 128, 255)


def test_rgb_colour_key_transparency_becomes_white():
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:, :4] = (1, 2, 3)
    rgb[:, 4:] = (90, 80, 70)
    image = load_image(encode(Image.fromarray(rgb), "PNG", transparency=(1, 2, 3)))
    assert tuple(image.rgb[0, 0]) == (255, 255, 255)
    assert tuple(image.rgb[0, 7]) == (90, 80, 70)


def test_grey_and_bilevel():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    image = load_image(encode(Image.fromarray(gray), "PNG"))
    np.testing.assert_array_equal(image.rgb, np.repeat(gray[:, :, None], 3, axis=2))
    bits = Image.new("1", (8, 8), 0)
    bits.paste(1, (0, 0, 8, 4))
    image = load_image(encode(bits, "PNG"))
    assert tuple(image.rgb[0, 0]) == (255, 255, 255)
    assert tuple(image.rgb[7, 0]) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_is_scaled_not_clipped(fmt):
    values = np.array([0, 128, 129, 257, 1000, 32768, 65534, 65535], dtype=np.uint16)
    data16 = np.tile(values, (8, 1))
    pil16 = Image.fromarray(data16)
    assert pil16.mode == "I;16"
    image = load_image(encode(pil16, fmt))
    assert image.rgb[0, :, 0].tolist() == [0, 0, 1, 1, 4, 128, 255, 255]
    assert np.all(image.rgb[..., 0] == image.rgb[..., 2])
    # uint16 arrays follow the same rule
    np.testing.assert_array_equal(load_image(data16).rgb, image.rgb)


def test_48_bit_rgb_png_is_reduced_to_8_bits():
    values = np.array([0, 1000, 32768, 65535], dtype=np.uint16)
    pixels = np.zeros((8, 8, 3), dtype=np.uint16)
    pixels[:, :4, 0] = values
    pixels[:, :4, 2] = values[::-1]
    image = load_image(png_rgb48(pixels))
    assert image.rgb[0, :4, 0].tolist() == [0, 3, 128, 255]
    assert image.rgb[0, :4, 2].tolist() == [255, 128, 3, 0]
    assert np.all(image.rgb[:, :, 1] == 0)


def test_32_bit_integer_image():
    small = np.tile(np.arange(0, 256, 32, dtype=np.int32), (8, 1))
    image = load_image(encode(Image.fromarray(small), "TIFF"))
    assert image.rgb[0, :, 1].tolist() == list(range(0, 256, 32))
    assert image.warnings == ()
    wide = np.tile(np.array([-100, 0, 100, 400, 900], dtype=np.int32), (8, 2))
    image = load_image(encode(Image.fromarray(wide), "TIFF"))
    assert image.rgb[0, :5, 0].tolist() == [0, 26, 51, 128, 255]
    assert any("min-max" in w for w in image.warnings)


def test_float_tiff_in_unit_range_is_scaled_with_warning(tmp_path):
    values = np.tile(np.array([0.0, 0.25, 0.5, 1.0], dtype=np.float32), (8, 2))
    pil = Image.fromarray(values)
    assert pil.mode == "F"
    image = load_image(write(tmp_path, "depth.tif", encode(pil, "TIFF")))
    assert image.rgb[0, :4, 0].tolist() == [0, 64, 128, 255]
    assert len(image.warnings) == 1 and "float" in image.warnings[0] and "255" in image.warnings[0]


def test_float_tiff_outside_unit_range_is_min_max_mapped_with_warning():
    values = np.tile(np.array([-2.0, 0.0, 3.0, 8.0], dtype=np.float32), (8, 2))
    image = load_image(encode(Image.fromarray(values), "TIFF"))
    assert image.rgb[0, :4, 0].tolist() == [0, 51, 128, 255]
    assert any("min-max" in w and "float" in w for w in image.warnings)


def test_float_with_nan_is_refused():
    values = np.ones((8, 8), dtype=np.float32)
    values[3, 3] = np.nan
    assert_invalid(encode(Image.fromarray(values), "TIFF"), "NaN")
    assert_invalid(values, "NaN")


def test_cmyk_tiff_exact_and_jpeg_close():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    cmyk.paste((0, 0, 0, 255), (8, 0, 16, 16))  # black
    image = load_image(encode(cmyk, "TIFF"))
    assert tuple(image.rgb[0, 0]) == (255, 0, 0)
    assert tuple(image.rgb[0, 15]) == (0, 0, 0)
    image = load_image(encode(cmyk, "JPEG", quality=95))
    red = image.rgb[4, 2].astype(int)
    assert red[0] > 230 and red[1] < 30 and red[2] < 30
    assert image.rgb[4, 13].max() < 30


def test_other_colour_spaces_through_pil():
    assert tuple(load_image(Image.new("HSV", (8, 8), (0, 255, 255))).rgb[0, 0]) == (255, 0, 0)
    assert tuple(load_image(Image.new("HSV", (8, 8), (85, 255, 255))).rgb[0, 0]) == (0, 255, 0)
    ycbcr = load_image(Image.new("YCbCr", (8, 8), (76, 85, 255))).rgb[0, 0].astype(int)
    assert ycbcr[0] > 245 and ycbcr[1] < 10 and ycbcr[2] < 10
    white = load_image(Image.new("LAB", (8, 8), (255, 128, 128))).rgb[0, 0]
    black = load_image(Image.new("LAB", (8, 8), (0, 128, 128))).rgb[0, 0]
    assert white.min() > 245 and black.max() < 10
    rgbx = load_image(Image.new("RGBX", (8, 8), (1, 2, 3, 4))).rgb[0, 0]
    assert tuple(rgbx) == (1, 2, 3)


# ---------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------
def test_array_shapes_and_dtypes():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    expected = np.repeat(gray[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(load_image(gray).rgb, expected)
    np.testing.assert_array_equal(load_image(gray[:, :, None]).rgb, expected)
    mask = np.zeros((8, 8), dtype=bool)
    mask[2, 3] = True
    rgb = load_image(mask).rgb
    assert tuple(rgb[2, 3]) == (255, 255, 255) and rgb.sum() == 3 * 255
    floats = np.full((8, 8, 3), 0.5, dtype=np.float64)
    image = load_image(floats)
    assert np.all(image.rgb == 128) and image.warnings
    ints = np.full((8, 8, 3), 77, dtype=np.int64)
    image = load_image(ints)
    assert np.all(image.rgb == 77) and image.warnings == ()
    ramp = np.tile(np.array([0, 500, 1000], dtype=np.int64), (8, 3))
    image = load_image(ramp)
    assert image.rgb[0, :3, 0].tolist() == [0, 128, 255] and "min-max" in image.warnings[0]


@pytest.mark.parametrize(
    "array, word",
    [
        (np.zeros((8, 8, 2), dtype=np.uint8), "shape"),
        (np.zeros((3, 16, 16), dtype=np.uint8), "channels-first"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "shape"),
        (np.zeros(64, dtype=np.uint8), "shape"),
        (np.zeros((0, 8, 3), dtype=np.uint8), "empty"),
        (np.zeros((8, 8, 3), dtype=np.complex64), "dtype"),
        (np.zeros((8, 8, 3), dtype=object), "dtype"),
        (np.full((8, 8, 3), "a"), "dtype"),
    ],
)
def test_bad_arrays_are_refused(array, word):
    assert_invalid(array, word)


# ---------------------------------------------------------------------------------------
# animation and frames
# ---------------------------------------------------------------------------------------
def frames() -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF", "WEBP"])
def test_multi_frame_uses_first_frame_with_warning(fmt):
    first, *rest = frames()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(first, fmt, save_all=True, append_images=rest, **kwargs)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    image = load_image(data)
    assert tuple(image.rgb[8, 8]) == (255, 0, 0)
    assert len(image.warnings) == 1
    assert "first frame" in image.warnings[0] and fmt in image.warnings[0]


def test_multi_picture_jpeg_from_a_camera_uses_its_primary_image_silently():
    first, second, _ = frames()
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    image = load_image(data)
    assert image.warnings == ()
    red = image.rgb[8, 8].astype(int)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_single_frame_gif_has_no_warning():
    assert load_image(encode(frames()[0], "GIF")).warnings == ()


# ---------------------------------------------------------------------------------------
# refused input
# ---------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    assert_invalid(tmp_path / "nope.png", "not found")


def test_directory(tmp_path):
    assert_invalid(tmp_path, "directory")


def test_empty_file_and_bytes(tmp_path):
    assert_invalid(write(tmp_path, "empty.png", b""), "empty")
    assert_invalid(b"", "empty")


def test_text_renamed_png(tmp_path):
    path = write(tmp_path, "notes.png", b"this is a text file, not a picture\n" * 10)
    message = assert_invalid(path, "not a recognised image", "notes.png")
    assert "PNG" in message  # lists the accepted formats


def test_random_bytes(rng):
    assert_invalid(rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "not a recognised image")


def test_refused_format(rng):
    assert_invalid(encode(Image.fromarray(random_rgb(rng, 16, 16)), "PCX"), "not a recognised image")


@pytest.mark.parametrize("source", [12, 3.5, None, [1, 2, 3], {"a": 1}, torch.zeros(3, 8, 8)])
def test_unsupported_type(source):
    assert_invalid(source, "unsupported")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("fraction", [0.4, 0.8, 0.97])
def test_truncated_files(fmt, fraction, tmp_path, rng):
    data = encode(Image.fromarray(random_rgb(rng, 64, 64)), fmt)
    path = write(tmp_path, f"cut.{fmt.lower()}", data[: int(len(data) * fraction)])
    assert_invalid(path, "truncated", f"cut.{fmt.lower()}")


def test_truncated_lazily_opened_pil_image(rng):
    data = encode(Image.fromarray(random_rgb(rng, 64, 64)), "PNG")
    assert_invalid(Image.open(io.BytesIO(data[: len(data) // 2])), "truncated")


@pytest.mark.parametrize(
    "make", [png_with_header_size, jpeg_with_header_size, gif_with_header_size], ids=["png", "jpeg", "gif"]
)
@pytest.mark.parametrize("side", [7_000, 10_000, 30_000])
def test_decompression_bombs_refused_from_header(make, side):
    # 7000^2 is above our limit only, 10000^2 above PIL's warning level, 30000^2 above
    # PIL's error level. The files are tiny: decoding them would fail differently.
    data = make(side, side)
    assert len(data) < 2_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        message = assert_invalid(data, "too large", f"{limits.MAX_IMAGE_PIXELS:,}")
    assert "truncated" not in message


def test_decompression_bomb_warning_as_error_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_invalid(png_with_header_size(10_000, 10_000), "too large")


def test_oversized_pil_and_array_inputs_refused_without_decoding():
    lazy = Image.open(io.BytesIO(png_with_header_size(7_000, 7_000)))
    assert_invalid(lazy, "too large")
    huge_view = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (7_000, 7_000, 3))
    assert_invalid(huge_view, "too large", "pixels")


@pytest.mark.parametrize("side", [1, limits.MIN_IMAGE_SIDE - 1])
def test_too_small(side, tmp_path):
    small = Image.new("RGB", (side, side), (1, 2, 3))
    assert_invalid(write(tmp_path, "tiny.png", encode(small, "PNG")), "too small", str(limits.MIN_IMAGE_SIDE))
    assert_invalid(small, "too small")
    assert_invalid(np.zeros((side, side, 3), dtype=np.uint8), "too small")


def test_smallest_accepted_side():
    side = limits.MIN_IMAGE_SIDE
    assert load_image(np.zeros((side, side, 3), dtype=np.uint8)).size == (side, side)


def test_aspect_ratio_limit():
    wide = load_image(encode(Image.new("RGB", (5000, 50), (5, 6, 7)), "PNG"))
    assert wide.size == (50, 5000)
    short = 10
    long = int(short * limits.MAX_ASPECT_RATIO) + 10
    for width, height in ((long, short), (short, long)):
        assert_invalid(encode(Image.new("L", (width, height)), "PNG"), "aspect ratio", f"{limits.MAX_ASPECT_RATIO:g}")


@pytest.mark.filterwarnings("ignore")  # PIL warns about some damaged headers before failing
def test_damaged_files_only_raise_invalid_image_error():
    rng = np.random.default_rng(7)
    base = Image.fromarray(random_rgb(rng, 24, 24))
    sources = [
        encode(base, "PNG"),
        encode(base, "JPEG"),
        encode(base.convert("P"), "GIF"),
        encode(base, "TIFF"),
        encode(base, "BMP"),
        encode(base, "WEBP"),
    ]
    loaded = refused = 0
    for data in sources:
        for _ in range(40):
            damaged = bytearray(data)
            for position in rng.integers(0, len(damaged), size=int(rng.integers(1, 6))):
                damaged[position] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                damaged = damaged[: int(rng.integers(1, len(damaged)))]
            try:
                image = load_image(bytes(damaged))
            except InvalidImageError as exc:
                assert str(exc)
                refused += 1
            else:
                assert image.rgb.dtype == np.uint8 and image.rgb.ndim == 3 and image.rgb.shape[2] == 3
                loaded += 1
    assert refused > 0


# ---------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------
def official_shorter(size: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )


def official_squash(size: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )


SHAPES = [(300, 451), (451, 300), (240, 240), (97, 131), (333, 250)]


def test_openai_constants():
    assert OPENAI_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_STD == (0.26862954, 0.26130258, 0.27577711)
    spec = Preprocess(240, "shorter")
    assert spec.mean == OPENAI_MEAN and spec.std == OPENAI_STD


@pytest.mark.parametrize("shape", SHAPES)
def test_shorter_side_equals_inctrl_pipeline(shape, rng):
    rgb = random_rgb(rng, *shape)
    tensor, geometry = preprocess(load_image(rgb), Preprocess(240, "shorter"))
    expected = official_shorter(240)(Image.fromarray(rgb))
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 240, 240)
    assert torch.equal(tensor, expected)
    assert geometry == input_geometry(shape[0], shape[1], 240, "shorter")


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_squash_equals_faprompt_pipeline(shape, rng):
    rgb = random_rgb(rng, *shape)
    tensor, geometry = preprocess(load_image(rgb), Preprocess(518, "squash"))
    expected = official_squash(518)(Image.fromarray(rgb))
    assert tensor.shape == (3, 518, 518)
    assert torch.equal(tensor, expected)
    assert geometry == input_geometry(shape[0], shape[1], 518, "squash")
    assert geometry.resized == (518, 518) and geometry.crop_top == geometry.crop_left == 0


@pytest.mark.parametrize("shape", [(97, 131), (131, 97), (50, 203), (64, 64)])
def test_geometry_matches_the_actual_resize_and_crop(shape, rng):
    size = 64
    rgb = random_rgb(rng, *shape)
    tensor, geometry = preprocess(rgb, Preprocess(size, "shorter"))
    resized = transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC)(Image.fromarray(rgb))
    assert (resized.height, resized.width) == geometry.resized
    crop = np.asarray(resized)[
        geometry.crop_top : geometry.crop_top + size, geometry.crop_left : geometry.crop_left + size
    ]
    from_crop = transforms.Normalize(OPENAI_MEAN, OPENAI_STD)(transforms.ToTensor()(Image.fromarray(crop)))
    assert torch.equal(tensor, from_crop)
    if shape[0] != shape[1]:
        assert max(geometry.crop_top, geometry.crop_left) > 0


def test_preprocess_accepts_arrays_and_custom_normalisation(rng):
    rgb = random_rgb(rng, 40, 30)
    spec = Preprocess(16, "squash", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    from_array, _ = preprocess(rgb, spec)
    from_loaded, _ = preprocess(load_image(rgb), spec)
    assert torch.equal(from_array, from_loaded)
    assert from_array.min() >= -1.0 and from_array.max() <= 1.0
    gray, _ = preprocess(rgb[:, :, 0], spec)
    assert torch.equal(gray[0], gray[1])


def test_preprocess_batch(rng):
    images = [load_image(random_rgb(rng, h, w)) for h, w in ((30, 40), (50, 20), (32, 32))]
    spec = Preprocess(24, "shorter")
    batch, geometries = preprocess_batch(images, spec)
    assert batch.shape == (3, 3, 24, 24) and batch.dtype == torch.float32
    for index, image in enumerate(images):
        single, geometry = preprocess(image, spec)
        assert torch.equal(batch[index], single)
        assert geometries[index] == geometry
    empty, none = preprocess_batch([], spec)
    assert empty.shape == (0, 3, 24, 24) and none == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0, "resize": "shorter"},
        {"size": 2.5, "resize": "shorter"},
        {"size": 32, "resize": "crop"},
        {"size": 32, "resize": "squash", "std": (0.5, 0.0, 0.5)},
        {"size": 32, "resize": "squash", "mean": (0.5, 0.5)},
    ],
)
def test_preprocess_spec_validation(kwargs):
    with pytest.raises(ValueError):
        Preprocess(**kwargs)


# ---------------------------------------------------------------------------------------
# fingerprint
# ---------------------------------------------------------------------------------------
def test_fingerprint(tmp_path, rng):
    a, b = random_rgb(rng, 16, 16), random_rgb(rng, 16, 16)
    from_png = load_image(write(tmp_path, "a.png", encode(Image.fromarray(a), "PNG")))
    from_bmp = load_image(write(tmp_path, "a.bmp", encode(Image.fromarray(a), "BMP")))
    first = fingerprint([from_png, load_image(b)])
    assert len(first) == 64 and int(first, 16) >= 0
    assert fingerprint([from_bmp, load_image(b)]) == first  # same pixels, other encoding
    assert fingerprint([load_image(b), from_png]) != first  # order matters
    changed = a.copy()
    changed[3, 3, 1] ^= 1
    assert fingerprint([load_image(changed), load_image(b)]) != first
    assert fingerprint([from_png]) != first
    # same bytes, different shape
    flat = random_rgb(rng, 8, 32)
    assert fingerprint([load_image(flat)]) != fingerprint([load_image(flat.reshape(32, 8, 3))])
    assert fingerprint([]) == fingerprint([])
