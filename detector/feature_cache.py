"""Text features kept on disk between runs, so a restart or a returning class name costs
nothing (docs/api.md §14).

An entry is one safetensors file named by a key: the SHA-256 of the text tower's weights
(its fingerprint), the method, the prompt set and anything else the features depend on.
The file's header repeats the key; an entry that cannot be read, is truncated or carries
another key is ignored, removed and rewritten, never trusted. Files are written to a
temporary name and renamed, so a reader never sees half a file.

The folder is ``DETECTOR_CACHE_DIR`` when set (``off`` disables the cache), else
``$XDG_CACHE_HOME/clip-anomaly-detector`` (default ``~/.cache/clip-anomaly-detector``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch

from .backbone import Backbone

LOG = logging.getLogger(__name__)
APP_FOLDER = "clip-anomaly-detector"


def cache_dir() -> Path | None:
    """The cache folder, or ``None`` when disabled (``DETECTOR_CACHE_DIR=off``)."""
    configured = os.environ.get("DETECTOR_CACHE_DIR", "").strip()
    if configured.lower() in {"off", "0", "none", "false"}:
        return None
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / APP_FOLDER


@functools.lru_cache(maxsize=8)
def text_tower_fingerprint(backbone: Backbone) -> str:
    """SHA-256 over the names, shapes and bytes of every text-tower tensor (the token
    embedding, positional embedding, blocks, final norm and projection); the vision tower
    is left out. Computed once per backbone."""
    digest = hashlib.sha256(b"detector.text-tower.v1")
    for name, tensor in sorted(backbone.model.state_dict().items()):
        if name.startswith("visual.") or name in ("logit_scale", "logit_bias"):
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"|{name}|{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.dtype != torch.bool else data.numpy().tobytes())
    return digest.hexdigest()


def entry_key(backbone: Backbone, method: str, parts: Iterable[str]) -> str:
    """The key of an entry: text tower, method and every string the features depend on."""
    digest = hashlib.sha256(text_tower_fingerprint(backbone).encode())
    for part in (method, *parts):
        digest.update(b"\x00" + str(part).encode("utf-8"))
    return digest.hexdigest()


def _read(path: Path, key: str) -> torch.Tensor | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("key") != key:
            return None
        return handle.get_tensor("features")


def load_or_compute(directory: Path | None, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The cached tensor for ``key``, or ``compute()`` (then saved). Without a folder the
    tensor is always computed; a bad entry is removed and rewritten."""
    if directory is None:
        return compute()
    path = directory / f"{key}.safetensors"
    if path.is_file():
        try:
            cached = _read(path, key)
            if cached is not None:
                return cached
        except Exception as error:  # a corrupt entry is never trusted
            LOG.warning("ignoring unreadable cache entry %s: %s", path.name, error)
        path.unlink(missing_ok=True)
    features = compute()
    try:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
        os.close(handle)
        save_file({"features": features.detach().to("cpu").contiguous()}, temporary, metadata={"key": key})
        os.replace(temporary, path)
    except OSError as error:  # a read-only or full disk only loses the cache
        LOG.warning("could not write the text-feature cache in %s: %s", directory, error)
    return features
