"""Decoded images of files, kept so that the same file is decoded once (docs/api.md §14).

A Run decodes its normal images to hash their pixels (the fit cache's key) even when their
fit is cached, and the upload's background work decoded them already: for camera photos
that is a noticeable part of what a person waits for. ``DecodedImageCache.load`` returns the
kept ``LoadedImage`` of a file path whose size and modification time are unchanged, and
decodes (``images.load_image``) otherwise. Other inputs (arrays, bytes, PIL images) are
decoded every time. Entries are dropped least recently used first beyond ``max_bytes`` of
pixels; a file that fails to decode is never kept.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

from . import limits
from .images import LoadedImage, load_image


class DecodedImageCache:
    """``load(source)`` with the decoded pixels of file paths kept (thread-safe)."""

    def __init__(self, max_bytes: int = limits.DECODED_IMAGE_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, LoadedImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        #: Loads answered from the cache and loads that decoded (diagnostics, tests).
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(source: Any) -> tuple | None:
        if not isinstance(source, (str, os.PathLike)) or not str(source):
            return None
        try:
            stat = os.stat(source)
        except OSError:
            return None  # load_image says what is wrong with it
        return (os.path.realpath(source), stat.st_size, stat.st_mtime_ns)

    def load(self, source: Any) -> LoadedImage:
        """The ``LoadedImage`` of ``source``; raises as ``images.load_image`` does."""
        key = self._key(source)
        if key is not None:
            with self._lock:
                kept = self._entries.get(key)
                if kept is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return kept
        image = load_image(source)
        if key is None:
            return image
        size = image.rgb.nbytes
        with self._lock:
            self.misses += 1
            if size <= self.max_bytes and key not in self._entries:
                self._entries[key] = image
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, dropped = self._entries.popitem(last=False)
                    self._bytes -= dropped.rgb.nbytes
        return image

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
