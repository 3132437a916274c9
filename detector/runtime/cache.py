"""The on-disk cache of converted image paths (OpenVINO IR files), in the user cache.

One entry per key (``CacheKey``: which path of which architecture at which input size, the
fingerprint of the weights it was exported with, and the versions of the runtimes that
made it). An entry is a directory ``<root>/<name>-<digest>/`` holding ``model.xml``,
``model.bin`` and ``entry.json``; ``entry.json`` records the key and the BLAKE2 digests of
the two model files. An entry is trusted only when all three files are present, the
recorded key equals the wanted one and both digests match: anything else (a stale key, a
truncated or edited file) is removed and rebuilt, never loaded.

Entries are written into a temporary directory beside the final one and renamed into
place, so a crash or a concurrent writer never leaves a half-written entry under the
final name. The root is ``DETECTOR_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME`` (or
``~/.cache``) ``/clip-anomaly-detector``, with ``openvino/`` under it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

#: Bumped when the layout of an entry or the meaning of a key changes.
FORMAT_VERSION = 1
MODEL_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
ENTRY_FILE = "entry.json"
_CHUNK = 1 << 22


def cache_root() -> Path:
    """The directory of converted models: ``DETECTOR_CACHE_DIR`` (or the user cache
    ``$XDG_CACHE_HOME/clip-anomaly-detector``, ``~/.cache/...`` by default) + ``openvino``.
    Read at every call: no state is kept."""
    override = os.environ.get("DETECTOR_CACHE_DIR", "").strip()
    if override:
        base = Path(override).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "clip-anomaly-detector"
    return base / "openvino"


@dataclass(frozen=True)
class CacheKey:
    """Everything a converted model depends on.

    Attributes:
        path: the method's name of the exported path (e.g. ``"inctrl.blocks-6-8-10"``).
        architecture: the backbone's open_clip model name and build facts (activation).
        image_size: input side in pixels.
        weights: ``weights_fingerprint`` of the exported module.
        runtime: versions of torch (the exporter) and OpenVINO (the converter), and
            ``FORMAT_VERSION``.
        inputs: the signature of the path's fixed-shape inputs after the images
            (``runtime.inputs_signature``); ``""`` for an images-only path, and then left
            out of ``record()`` (so entries of images-only paths keep their keys).
    """

    path: str
    architecture: str
    image_size: int
    weights: str
    runtime: str
    inputs: str = ""

    def record(self) -> dict[str, object]:
        """The key as recorded in ``entry.json`` and hashed into the directory name."""
        fields = asdict(self)
        if not self.inputs:
            fields.pop("inputs")
        return fields

    @property
    def digest(self) -> str:
        text = json.dumps(self.record(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]

    @property
    def directory_name(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{self.path}-{self.architecture}-{self.image_size}")
        return f"{safe}-{self.digest}"


def weights_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """BLAKE2b (128 bit) over the names, shapes, dtypes and bytes of ``tensors`` in order
    (a module's ``named_parameters`` then ``named_buffers``)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in tensors:
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(value.shape)}|{value.dtype}|".encode("utf-8"))
        if value.dtype == torch.bfloat16:
            value = value.view(torch.int16)
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """BLAKE2b (128 bit) of a file's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_directory(key: CacheKey, root: Path | None = None) -> Path:
    return (root or cache_root()) / key.directory_name


def valid_entry(key: CacheKey, root: Path | None = None) -> Path | None:
    """``model.xml`` of the entry for ``key`` when it can be trusted; otherwise the entry
    (if any) is removed and ``None`` returned."""
    directory = entry_directory(key, root)
    if not directory.exists():
        return None
    try:
        record = json.loads((directory / ENTRY_FILE).read_text(encoding="utf-8"))
        trusted = (
            record.get("format") == FORMAT_VERSION
            and record.get("key") == key.record()
            and record.get("files", {}).get(MODEL_FILE) == file_digest(directory / MODEL_FILE)
            and record.get("files", {}).get(WEIGHTS_FILE) == file_digest(directory / WEIGHTS_FILE)
        )
    except (OSError, ValueError, AttributeError):
        trusted = False
    if trusted:
        return directory / MODEL_FILE
    remove_entry(key, root)
    return None


def remove_entry(key: CacheKey, root: Path | None = None) -> None:
    shutil.rmtree(entry_directory(key, root), ignore_errors=True)


def write_entry(key: CacheKey, save: Callable[[Path], None], root: Path | None = None) -> Path:
    """Create the entry for ``key``: ``save(xml_path)`` writes ``model.xml``/``model.bin``
    into a temporary directory, which is then recorded and renamed into place. Returns the
    final ``model.xml`` (another process's complete entry wins a race)."""
    final = entry_directory(key, root)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=final.parent))
    try:
        save(staging / MODEL_FILE)
        record = {
            "format": FORMAT_VERSION,
            "key": key.record(),
            "files": {name: file_digest(staging / name) for name in (MODEL_FILE, WEIGHTS_FILE)},
        }
        (staging / ENTRY_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(staging, final)
        except OSError:  # a concurrent writer renamed its complete entry first
            existing = valid_entry(key, root)
            if existing is None:
                raise
            return existing
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final / MODEL_FILE
