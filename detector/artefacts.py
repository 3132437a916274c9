"""What a method can download and convert, as typed records (docs/api.md §19).

A method answers ``Detector.artefacts()`` with a ``MethodArtefacts`` record (where its
trained files come from, which ones are known, their licence), ``Detector.plan_downloads``
maps a remote listing onto ``PlannedFile``s, and ``Detector.convert_checkpoint`` turns one
downloaded file into the package's heads-only safetensors (``Converted``). The
``python -m detector weights`` command reads only these records, so it names no method.

Also here: content digests (``sha256_file`` of a file, ``tensor_digest`` of tensors, the
one definition used for "the CLIP weights a file held" and "the CLIP weights in use").
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping

import torch

from .errors import CheckpointError

SourceKind = Literal["google-drive-folder", "url", "hf-hub"]
#: Keys of a CLIP state dict that are not part of "the CLIP weights" for digests (not in
#: the official InCTRL files, or buffers rebuilt by open_clip).
DIGEST_IGNORED_KEYS = ("logit_scale", "logit_bias", "attn_mask")


@dataclass(frozen=True)
class WeightsSource:
    """Where a method's trained files are published.

    Attributes:
        kind: ``"google-drive-folder"`` (``location`` = folder id), ``"url"`` (the user
            passes the link: ``location`` is empty or a last known link), ``"hf-hub"``.
        location: folder id, URL or repository id.
        page: the page a person opens to download by hand.
        licence: the licence of the files as published, for people.
        licence_id: its Hugging Face / SPDX id for model cards (``"apache-2.0"``, ``"mit"``).
        note: one sentence about the source (e.g. "the authors' link moves").
    """

    kind: SourceKind
    location: str
    page: str
    licence: str
    licence_id: str = "other"
    note: str = ""


@dataclass(frozen=True)
class KnownArtefact:
    """One file a method can use, for ``weights list``.

    Attributes:
        name: short name, e.g. ``"heads, 4-shot, trained on MVTec AD"``.
        set_name: the checkpoint set it belongs to in the local cache (``official:<set>``).
        shots: the shot count it was trained for, if any.
        trained_on: the training set, for people (``"MVTec AD"``).
        published_bytes: approximate size of the published file.
        stored_bytes: approximate size after ``convert``.
    """

    name: str
    set_name: str
    shots: int | None = None
    trained_on: str | None = None
    published_bytes: int | None = None
    stored_bytes: int | None = None


@dataclass(frozen=True)
class MethodArtefacts:
    """A method's answer to ``Detector.artefacts()``.

    Attributes:
        source: where its trained files are published (``None`` = nowhere known).
        known: the files it knows of.
        default_set: the set ``checkpoint="official"`` means when several are cached.
        convert_needs: facts ``convert`` must be told because the files do not record them
            (e.g. ``("shots", "trained_on")``).
        write_random: ``(directory, model_name) -> path`` writes a file of the learned parts
            at random initialisation for that backbone, so benchmarks time the configuration
            the official code runs where running without a file would take a cheaper mode
            (``None`` = no such difference).
    """

    source: WeightsSource | None
    known: tuple[KnownArtefact, ...] = ()
    default_set: str | None = None
    convert_needs: tuple[str, ...] = ()
    write_random: Callable[[Path, str], Path] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RemoteFile:
    """One entry of a remote listing: its id (Drive file id or URL), its path inside the
    listed folder (``"8-shot/checkpoint_6.pyth"``) and its size when known."""

    file_id: str
    path: str
    size: int | None = None


@dataclass(frozen=True)
class PlannedFile:
    """A remote file mapped onto what it is (``Detector.plan_downloads``): its shot count,
    its training set for people (``"MVTec AD"``) and the cache set it goes to (``"mvtec"``)."""

    remote: RemoteFile
    shots: int | None
    trained_on: str | None
    set_name: str = "default"


class AmbiguousListing(CheckpointError):
    """A listing whose files cannot be told apart by the method's rules; ``listing`` holds
    every file, ``reason`` says what is ambiguous."""

    def __init__(self, reason: str, listing: Iterable[RemoteFile]) -> None:
        self.reason = reason
        self.listing = tuple(listing)
        super().__init__(reason)


@dataclass(frozen=True)
class ConvertRequest:
    """What ``convert`` is told about a downloaded file.

    Attributes:
        shots, trained_on: facts the file does not record (``None`` = not given).
        source_name: the published file name.
        source_sha256: sha256 of the published file.
        backbone: open_clip model name the file belongs to (``None`` = the method's).
        reference_weights: the local file of the official CLIP tag, to compare the file's
            CLIP part with (``None`` = not available: the CLIP part is kept).
        reference_name: how to name that reference (e.g. ``"ViT-B-16-plus-240 / laion400m_e32"``).
    """

    shots: int | None = None
    trained_on: str | None = None
    source_name: str = ""
    source_sha256: str = ""
    backbone: str | None = None
    reference_weights: Path | None = None
    reference_name: str | None = None


def converted_header(
    method: str,
    request: ConvertRequest,
    source: Path,
    *,
    default_backbone: str,
    trained_on: str | None,
    trained_on_set: str,
    layout: str,
    epoch_pattern: str,
    **facts: object,
) -> dict[str, object]:
    """The JSON header of a converted file: method, backbone, training set, the published
    file's name and sha256, the layout, the method's own ``facts`` (e.g. shots), and the
    epoch when the published name carries one (``epoch_pattern`` with one number group)."""
    header: dict[str, object] = {
        "method": method,
        "backbone": request.backbone or default_backbone,
        **facts,
        "trained_on": trained_on,
        "trained_on_set": trained_on_set,
        "source_file": request.source_name or source.name,
        "source_sha256": request.source_sha256,
        "format": layout,
    }
    epoch = re.search(epoch_pattern, source.name)
    if epoch:
        header["epoch"] = int(epoch.group(1))
    return header


@dataclass(frozen=True)
class Converted:
    """What ``convert`` wrote.

    Attributes:
        heads: the heads-only safetensors file (JSON header: ``header``).
        clip: the CLIP part kept beside it, or ``None`` when it equals the reference.
        clip_matches_reference: ``True`` / ``False``, or ``None`` when there was no
            reference to compare with.
        header: the JSON header of ``heads``.
    """

    heads: Path
    clip: Path | None
    clip_matches_reference: bool | None
    header: Mapping[str, object] = field(default_factory=dict)


def set_slug(name: str) -> str:
    """A set name as a folder name: lower case, letters and digits only (``"MVTec AD"`` ->
    ``"mvtecad"``)."""
    slug = re.sub(r"[^a-z0-9]+", "", str(name).lower())
    return slug or "default"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_digest(state: Mapping[str, torch.Tensor], ignored: Iterable[str] = DIGEST_IGNORED_KEYS) -> str:
    """Hex sha256 of tensors, independent of file format and key order.

    Each tensor (sorted by name, ``ignored`` names left out) contributes its name, shape and
    bytes; floating tensors are hashed as contiguous float32, others as int64. So the CLIP
    part of an official InCTRL ``.pyth`` and the same weights loaded into open_clip give
    the same digest (docs/inctrl.md §5).
    """
    skip = set(ignored)
    digest = hashlib.sha256()
    for name in sorted(k for k in state if k not in skip):
        tensor = state[name].detach().to("cpu")
        tensor = tensor.to(torch.float32) if tensor.is_floating_point() else tensor.to(torch.int64)
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def human_bytes(count: int | None) -> str:
    """``835000000`` -> ``"835 MB"`` (decimal units, as download pages show them)."""
    if count is None:
        return "?"
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit in ("B", "kB") or value >= 100 else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
