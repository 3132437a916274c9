"""Decoded uploads kept per file (``detector.image_cache``)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from detector.errors import InvalidImageError
from detector.image_cache import DecodedImageCache


def save(path, value, size=(40, 30)):
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return str(path)


def test_a_file_is_decoded_once_until_it_changes(tmp_path):
    cache = DecodedImageCache()
    path = save(tmp_path / "a.png", 10)
    first = cache.load(path)
    assert cache.load(path) is first and (cache.hits, cache.misses) == (1, 1)
    assert first.name == "a.png" and int(first.rgb[0, 0, 0]) == 10
    save(path, 200, size=(44, 30))  # rewritten in place: new size and time
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    changed = cache.load(path)
    assert changed is not first and int(changed.rgb[0, 0, 0]) == 200 and cache.misses == 2


def test_only_file_paths_are_kept_and_failures_never(tmp_path):
    cache = DecodedImageCache()
    array = np.zeros((20, 20, 3), np.uint8)
    assert cache.load(array) is not cache.load(array) and len(cache) == 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    for _ in range(2):
        with pytest.raises(InvalidImageError, match="broken.png"):
            cache.load(str(broken))
    with pytest.raises(InvalidImageError, match="not found"):
        cache.load(str(tmp_path / "missing.png"))
    assert len(cache) == 0 and cache.kept_bytes == 0


def test_the_kept_pixels_stay_within_the_byte_bound(tmp_path):
    one = 40 * 30 * 3
    cache = DecodedImageCache(max_bytes=2 * one)
    paths = [save(tmp_path / f"{i}.png", i) for i in range(3)]
    images = [cache.load(p) for p in paths]
    assert len(cache) == 2 and cache.kept_bytes == 2 * one  # the least recently used one went
    assert cache.load(paths[2]) is images[2] and cache.load(paths[0]) is not images[0]
    tiny = DecodedImageCache(max_bytes=one - 1)
    tiny.load(paths[0])
    assert len(tiny) == 0  # an image larger than the bound is decoded, never kept
