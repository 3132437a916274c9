"""Image input: load, validate and convert every image.

Every image the package uses (app uploads, command-line files, Python API calls) enters
through :func:`load_image`, which returns a :class:`LoadedImage`: 8-bit RGB pixels with
the EXIF orientation applied, plus warnings the user should see. Input that cannot be
used raises :class:`detector.errors.InvalidImageError` with a message that says what was
wrong and which limit applies (see :mod:`detector.limits`).

Conversion rules (one set for files, PIL images and arrays):

* Transparency (RGBA, LA, PA, palette or colour-key transparency) is composited on white.
* Palette, grey, 1-bit, CMYK, YCbCr, LAB, HSV and other colour modes are converted to RGB
  by PIL.
* 16-bit data (``I;16`` images, ``uint16`` arrays) is scaled to 8 bits by
  ``round(value / 257)``, so 65535 becomes 255 and 32768 becomes 128; nothing is clipped.
* Floating-point data (``F`` images such as 32-bit float TIFFs, float arrays): values all
  in [0, 1] are multiplied by 255; otherwise the range is mapped min-max to 0..255. Both
  cases add a warning. NaN or infinite values are refused.
* Other integer data (``I`` images, ``int32`` arrays, ...): values all in 0..255 are used
  as they are; otherwise the range is mapped min-max to 0..255 with a warning.
* Boolean arrays become 0 / 255.
* Animated or multi-frame files (GIF, APNG, animated WebP, multi-page TIFF): the first
  frame is used and a warning says so.

Safety: only common raster formats are decoded (:data:`ACCEPTED_FORMATS`); image
dimensions are checked from the header before any pixel data is decoded, so a small file
claiming a huge size is refused without allocating it; truncated files are refused (PIL's
``LOAD_TRUNCATED_IMAGES`` stays off). PIL's global settings are never changed.

Turning a loaded image into a model input is :mod:`detector.preprocess`'s part.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from . import limits
from .errors import InvalidImageError

__all__ = [
    "ACCEPTED_FORMATS",
    "ImageSource",
    "LoadedImage",
    "fingerprint",
    "load_image",
    "to_rgb_pixels",
]

#: PIL format identifiers decoded from files and bytes. Other formats (EPS, PSD, WMF,
#: ...) are refused: some need external programs to decode, and none is a usual
#: inspection-camera output. JPEG includes multi-picture (MPO) files from phones.
ACCEPTED_FORMATS: tuple[str, ...] = (
    "PNG",
    "JPEG",
    "GIF",
    "BMP",
    "DIB",
    "TIFF",
    "WEBP",
    "PPM",
    "TGA",
    "JPEG2000",
    "AVIF",
    "QOI",
)

#: Formats whose extra frames are an animation; other multi-frame files are called
#: "multi-frame" in the warning.
_ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP", "AVIF"})

#: Modes whose alpha channel is composited on white.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

#: 16-bit single-channel PIL modes.
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

#: Longest part of a decoder's own message quoted in an error.
_MAX_DETAIL_CHARS = 160


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A decoded, validated image ready for any method.

    Attributes:
        rgb: ``uint8`` array of shape ``(H, W, 3)``, C-contiguous, EXIF orientation applied.
            Treat it as read-only: it is shared by everything that uses the image.
        warnings: things the user should know about the conversion (e.g. "animated image
            (GIF): first frame used").
        name: the file name when the image was loaded from a path, else ``None``.

    Equality is identity (arrays have no single truth value); compare pixels with
    :func:`fingerprint` or ``np.array_equal``.
    """

    rgb: np.ndarray
    warnings: tuple[str, ...] = ()
    name: str | None = None

    def __post_init__(self) -> None:
        rgb = self.rgb
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            shape = getattr(rgb, "shape", None)
            dtype = getattr(rgb, "dtype", type(rgb).__name__)
            raise InvalidImageError(
                f"LoadedImage.rgb must be a uint8 array of shape (H, W, 3); got shape {shape} and dtype {dtype}"
            )
        if not rgb.flags.c_contiguous:
            object.__setattr__(self, "rgb", np.ascontiguousarray(rgb))
        if not isinstance(self.warnings, tuple):
            object.__setattr__(self, "warnings", tuple(self.warnings))

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


#: Everything :func:`load_image` accepts.
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, LoadedImage]


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
def load_image(source: Any) -> LoadedImage:
    """Decode, validate and convert one image to 8-bit RGB.

    Args:
        source: a file path (``str`` or ``os.PathLike``), the bytes of an image file, a PIL
            image, a numpy array (``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``;
            ``uint8``, ``uint16``, other integers, floats or ``bool``), or a
            :class:`LoadedImage` (returned unchanged).

    Returns:
        The :class:`LoadedImage`. Its pixels never share memory with ``source``.

    Raises:
        InvalidImageError: the input is missing, not an image, truncated or corrupt, in a
            refused format, or outside the limits of :mod:`detector.limits` (too many
            pixels, a side too short, too elongated); or of an unsupported type.
    """
    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, np.ndarray):
        return _load_array(source)
    if isinstance(source, Image.Image):
        return _load_pil(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InvalidImageError("the image data is empty (0 bytes)")
        return _decode_file(io.BytesIO(data), name=None, label="image data")
    if isinstance(source, (str, os.PathLike)):
        return _load_path(source)
    raise InvalidImageError(
        f"unsupported image input of type {type(source).__name__}: expected a file path, the bytes of an "
        "image file, a PIL image, a numpy array or a LoadedImage"
    )


def _load_path(source: str | os.PathLike) -> LoadedImage:
    """Open a file path and decode it."""
    try:
        path = Path(os.fsdecode(source))
    except (TypeError, ValueError) as exc:
        raise InvalidImageError(f"invalid image path {source!r}: {exc}") from exc
    if not str(source):
        raise InvalidImageError("empty image path")
    label = f"image file '{path.name}'"
    try:
        if not path.exists():
            raise InvalidImageError(f"image file not found: {path}")
        if path.is_dir():
            raise InvalidImageError(f"{path} is a directory, not an image file")
        if path.stat().st_size == 0:
            raise InvalidImageError(f"{label} is empty (0 bytes)")
        with open(path, "rb") as handle:
            return _decode_file(handle, name=path.name, label=label)
    except InvalidImageError:
        raise
    except (OSError, ValueError) as exc:
        raise InvalidImageError(f"cannot read {label}: {_detail(exc)}") from exc


def _decode_file(handle: IO[bytes], *, name: str | None, label: str) -> LoadedImage:
    """Decode an open file or buffer: header checks first, then pixels, orientation, mode."""
    Image.init()
    formats = tuple(fmt for fmt in ACCEPTED_FORMATS if fmt in Image.OPEN)
    try:
        with Image.open(handle, formats=formats) as image:
            fmt = image.format or "unknown"
            # Header only so far: refuse bad sizes before any pixel data is decoded.
            _check_dimensions(image.size[0], image.size[1], label)
            notes: list[str] = []
            frame_note = _frame_warning(image, fmt, user_image=False)
            if frame_note:
                notes.append(frame_note)
                image.seek(0)
            image.load()
            rgb, more = _pil_to_rgb(_apply_orientation(image, notes), label)
    except InvalidImageError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"{label} is not a recognised image (accepted formats: {', '.join(ACCEPTED_FORMATS)})"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(_too_large(label, exc)) from exc
    except Exception as exc:  # decoders raise many types on hostile data; all mean "unusable"
        raise InvalidImageError(_decode_failure(label, exc)) from exc
    _check_dimensions(rgb.shape[1], rgb.shape[0], label)
    return LoadedImage(rgb=rgb, warnings=tuple(notes + more), name=name)


def _load_pil(image: Image.Image) -> LoadedImage:
    """Convert a PIL image given by the caller (its current frame is used)."""
    label = "image"
    _check_dimensions(image.size[0], image.size[1], label)
    notes: list[str] = []
    try:
        frame_note = _frame_warning(image, image.format or "image", user_image=True)
        if frame_note:
            notes.append(frame_note)
        image.load()
        rgb, more = _pil_to_rgb(_apply_orientation(image, notes), label)
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(_too_large(label, exc)) from exc
    except Exception as exc:  # a lazily opened image may still fail to decode
        raise InvalidImageError(_decode_failure(label, exc)) from exc
    _check_dimensions(rgb.shape[1], rgb.shape[0], label)
    return LoadedImage(rgb=rgb, warnings=tuple(notes + more), name=None)


def _load_array(array: np.ndarray) -> LoadedImage:
    """Validate and convert a numpy array."""
    _check_array_shape(array)
    _check_dimensions(array.shape[1], array.shape[0], "image array")
    rgb, notes = _array_to_rgb(array)
    return LoadedImage(rgb=rgb, warnings=tuple(notes), name=None)


def _frame_warning(image: Image.Image, fmt: str, *, user_image: bool) -> str | None:
    """A warning when the image has several frames (``None`` for single-frame images)."""
    try:
        animated = bool(getattr(image, "is_animated", False))
    except Exception:  # a corrupt later frame: the first one may still be fine
        animated = False
    if not animated or fmt == "MPO":  # MPO: the first picture is the primary one
        return None
    kind = "animated" if fmt in _ANIMATED_FORMATS else "multi-frame"
    if user_image and image.tell() != 0:
        return f"{kind} image ({fmt}): frame {image.tell()} used"
    return f"{kind} image ({fmt}): first frame used"


def _apply_orientation(image: Image.Image, notes: list[str]) -> Image.Image:
    """The image turned upright by its EXIF Orientation tag (a new image).

    Unreadable EXIF data is not fatal: the image is used as stored, with a warning.
    """
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF blocks raise various types
        notes.append(f"EXIF metadata unreadable ({type(exc).__name__}): orientation not applied")
        return image


def _check_dimensions(width: int, height: int, label: str) -> None:
    """Refuse sizes outside :mod:`detector.limits` (before decoding where possible)."""
    width, height = int(width), int(height)
    pixels = width * height
    if pixels > limits.MAX_IMAGE_PIXELS:
        raise InvalidImageError(
            f"{label} is too large: {width}x{height} = {pixels:,} pixels; "
            f"the limit is {limits.MAX_IMAGE_PIXELS:,} pixels"
        )
    if min(width, height) < limits.MIN_IMAGE_SIDE:
        raise InvalidImageError(
            f"{label} is too small: {width}x{height} pixels; "
            f"each side must be at least {limits.MIN_IMAGE_SIDE} pixels"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.MAX_ASPECT_RATIO:
        raise InvalidImageError(
            f"{label} is too elongated: {width}x{height} pixels has an aspect ratio of {ratio:.0f}:1; "
            f"the limit is {limits.MAX_ASPECT_RATIO:g}:1"
        )


def _detail(exc: BaseException) -> str:
    """A short one-line rendering of an exception message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _MAX_DETAIL_CHARS:
        text = text[: _MAX_DETAIL_CHARS - 3] + "..."
    return text


def _too_large(label: str, exc: BaseException) -> str:
    """Message for PIL's own decompression-bomb refusal (raised before our header check)."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return f"{label} is too large: {size}; the limit is {limits.MAX_IMAGE_PIXELS:,} pixels"


def _decode_failure(label: str, exc: BaseException) -> str:
    """Message for a decoder failure, naming truncation when that is the cause."""
    detail = _detail(exc)
    if "truncated" in detail.lower() or isinstance(exc, EOFError):
        return f"{label} is truncated: the data ends before the image is complete (was the file cut short?)"
    if isinstance(exc, MemoryError):
        return f"{label} could not be decoded: not enough memory"
    return f"{label} is corrupt or cannot be decoded ({type(exc).__name__}: {detail})"


# ---------------------------------------------------------------------------------------
# Pixel conversion
# ---------------------------------------------------------------------------------------
def _pil_to_rgb(image: Image.Image, label: str) -> tuple[np.ndarray, list[str]]:
    """8-bit RGB pixels of a decoded PIL image, and conversion warnings."""
    mode = image.mode
    if mode in _UINT16_MODES:
        return _gray_to_rgb(_uint16_to_uint8(np.asarray(image))), []
    if mode == "I":
        gray, notes = _integer_to_uint8(np.asarray(image), "32-bit integer image")
        return _gray_to_rgb(gray), notes
    if mode == "F":
        gray, notes = _float_to_uint8(np.asarray(image), "32-bit float image")
        return _gray_to_rgb(gray), notes
    if mode in _ALPHA_MODES or image.has_transparency_data:
        if mode == "La":
            image = image.convert("LA")
        try:
            rgba = np.asarray(image.convert("RGBA"))
        except ValueError as exc:
            raise InvalidImageError(f"{label} has an unsupported transparency mode {mode!r}: {_detail(exc)}") from exc
        return _composite_on_white(rgba), []
    if mode == "RGB":
        return np.array(image, dtype=np.uint8), []
    try:
        converted = image.convert("RGB")
    except ValueError as exc:
        raise InvalidImageError(f"{label} has an unsupported pixel mode {mode!r}: {_detail(exc)}") from exc
    return np.array(converted, dtype=np.uint8), []


def _array_to_rgb(array: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """8-bit RGB copy of an ``(H, W)`` / ``(H, W, C)`` array with ``C`` in 1, 3, 4."""
    array = np.asarray(array)
    _check_array_shape(array)
    if array.ndim == 2:
        array = array[:, :, None]
    dtype = array.dtype
    notes: list[str] = []
    if dtype == np.bool_:
        data = array.astype(np.uint8) * np.uint8(255)
    elif dtype == np.uint8:
        data = np.array(array, dtype=np.uint8, copy=True)
    elif dtype == np.uint16:
        data = _uint16_to_uint8(array)
    elif np.issubdtype(dtype, np.integer):
        data, notes = _integer_to_uint8(array, f"{dtype} image array")
    elif np.issubdtype(dtype, np.floating):
        data, notes = _float_to_uint8(array, f"{dtype} image array")
    else:
        raise InvalidImageError(
            f"image array has unsupported dtype {dtype}; expected uint8, uint16, another integer type, float or bool"
        )
    channels = data.shape[2]
    if channels == 1:
        rgb = np.repeat(data, 3, axis=2)
    elif channels == 4:
        rgb = _composite_on_white(data)
    else:
        rgb = data
    return np.ascontiguousarray(rgb), notes


def _check_array_shape(array: np.ndarray) -> None:
    """Refuse arrays that are not ``(H, W)`` or ``(H, W, C)`` with ``C`` in 1, 3, 4, or are empty."""
    accepted = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
    shape = tuple(int(side) for side in array.shape)
    if array.ndim not in (2, 3) or (array.ndim == 3 and shape[2] not in (1, 3, 4)):
        hint = ""
        if array.ndim == 3 and shape[0] in (1, 3, 4):
            hint = " (channels-first arrays must be transposed to channels-last)"
        raise InvalidImageError(f"image array has shape {shape}; expected {accepted}{hint}")
    if shape[0] == 0 or shape[1] == 0:
        raise InvalidImageError(f"image array is empty: shape {shape}")


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 to ``(H, W, 3)`` by repeating the channel."""
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite ``(H, W, 4)`` uint8 on white: ``(c*a + 255*(255-a)) / 255``, rounded."""
    color = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:4].astype(np.uint32)
    out = (color * alpha + 255 * (255 - alpha) + 127) // 255
    return np.ascontiguousarray(out.astype(np.uint8))


def _uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit to 8-bit by ``round(v / 257)``: 0 -> 0, 32768 -> 128, 65535 -> 255 (no clipping)."""
    wide = values.astype(np.uint32)
    return ((wide + 128) // 257).astype(np.uint8)


def _integer_to_uint8(values: np.ndarray, what: str) -> tuple[np.ndarray, list[str]]:
    """Integers in 0..255 as they are; any other range mapped min-max to 0..255 (warned)."""
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 255:
        return values.astype(np.uint8), []
    scaled = _min_max(values.astype(np.float64), float(low), float(high))
    return scaled, [f"{what} with values {low}..{high} mapped min-max to 0..255"]


def _float_to_uint8(values: np.ndarray, what: str) -> tuple[np.ndarray, list[str]]:
    """Floats in [0, 1] times 255; any other range mapped min-max to 0..255. Always warned."""
    data = values.astype(np.float64)
    if not np.all(np.isfinite(data)):
        raise InvalidImageError(f"{what} contains NaN or infinite values; only finite values can be shown as an image")
    low, high = float(data.min()), float(data.max())
    if low >= 0.0 and high <= 1.0:
        return np.floor(data * 255.0 + 0.5).astype(np.uint8), [f"{what}: values in [0, 1] scaled by 255 to 8 bits"]
    return _min_max(data, low, high), [f"{what} with values {low:g}..{high:g} mapped min-max to 0..255"]


def _min_max(data: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of ``[low, high]`` onto 0..255 (a constant image keeps its value, clipped)."""
    if high <= low:
        return np.full(data.shape, np.clip(np.floor(low + 0.5), 0, 255), dtype=np.uint8)
    return np.floor((data - low) * (255.0 / (high - low)) + 0.5).astype(np.uint8)


def to_rgb_pixels(image: Any) -> np.ndarray:
    """RGB uint8 pixels of a LoadedImage, an array (converted, no size limits) or any input of ``load_image``."""
    if isinstance(image, LoadedImage):
        return image.rgb
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)[0]
    return load_image(image).rgb


# ---------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------
def fingerprint(images: Sequence[LoadedImage]) -> str:
    """SHA-256 hex digest of the decoded pixels and shapes of ``images``, in order.

    Equal pixels give equal digests whatever the files' encodings or names; a different
    order gives a different digest. Items that are not :class:`LoadedImage` are loaded
    with :func:`load_image` first.
    """
    digest = hashlib.sha256(b"detector.images.fingerprint.v1")
    items = list(images)
    digest.update(f"|count={len(items)}".encode("ascii"))
    for item in items:
        rgb = load_image(item).rgb
        height, width = rgb.shape[:2]
        digest.update(f"|{height}x{width}x3|".encode("ascii"))
        digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()
