"""Files in and out of the app: the paths inside Gradio's upload values, and the folder of
files offered for download."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

#: Files written for downloads (reports, CSV, ZIP) kept per app before the oldest is removed.
MAX_DOWNLOAD_FILES = 48


class DownloadFolder:
    """Files offered for download (reports, CSV, ZIP), one sub-folder each so the file keeps
    its name; beyond ``limit`` files the oldest are removed. Created on first use."""

    def __init__(self, limit: int = MAX_DOWNLOAD_FILES) -> None:
        self.limit = int(limit)
        self.root: Path | None = None
        self._folders: deque[Path] = deque()
        self._lock = threading.Lock()
        self._count = 0

    def new_path(self, name: str) -> Path:
        with self._lock:
            if self.root is None:
                self.root = Path(tempfile.mkdtemp(prefix="detector-app-"))
            self._count += 1
            folder = self.root / str(self._count)
            folder.mkdir()
            self._folders.append(folder)
            while len(self._folders) > self.limit:
                shutil.rmtree(self._folders.popleft(), ignore_errors=True)
        return folder / name


def gallery_paths(gallery: Any) -> list[str]:
    """Paths from a Gallery value: ``None`` or a list of ``(path, caption)`` / paths / dicts."""
    paths = []
    for item in gallery or []:
        if isinstance(item, (list, tuple)):
            item = item[0]
        if isinstance(item, dict):
            item = (item.get("image") or {}).get("path") if isinstance(item.get("image"), dict) else item.get("path")
        if item is not None:
            paths.append(str(item))
    return paths


def file_paths(files: Any) -> list[str]:
    """Paths from a multi-file ``gr.File`` value."""
    return [str(item.get("path") if isinstance(item, dict) else item) for item in files or [] if item]
