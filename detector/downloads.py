"""The network side of ``python -m detector weights``: Google Drive through ``gdown``,
plain URLs, the Hugging Face Hub through ``huggingface_hub`` (docs/api.md §19).

Every call fails fast with ``DownloadFailed`` (a ``WeightsUnavailableError``) whose message
says what to download by hand: offline (``HF_HUB_OFFLINE=1``) nothing is attempted, and
network calls use a short connect/read timeout. Downloads resume a partial file left by an
earlier attempt (gdown keeps it as ``<name>XXXXXXXX.part`` beside the target) and show a
progress bar.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from .artefacts import RemoteFile
from .errors import WeightsUnavailableError
from .weights import is_offline

#: Seconds to wait for a server to answer or send the next bytes.
TIMEOUT_SECONDS = 10.0
DRIVE_ID = re.compile(r"^[A-Za-z0-9_-]{20,}$")
_QUOTA_WORDS = ("too many users", "quota", "cannot retrieve the public link", "rate limit")


class DownloadFailed(WeightsUnavailableError):
    """A download that did not happen; the message says what to do by hand."""


def check_online(what: str, by_hand: str) -> None:
    """``DownloadFailed`` at once when ``HF_HUB_OFFLINE`` is set."""
    if is_offline():
        raise DownloadFailed(f"HF_HUB_OFFLINE is set, so {what} was not attempted. {by_hand}")


def drive_file_id(text: str) -> str | None:
    """The Drive file id in a share link (``/file/d/<id>/``, ``?id=<id>``) or a bare id;
    ``None`` for any other URL."""
    match = re.search(r"/file/d/([A-Za-z0-9_-]+)", text) or re.search(r"[?&]id=([A-Za-z0-9_-]+)", text)
    if match:
        return match.group(1)
    return text if DRIVE_ID.match(text) else None


def _failure(what: str, error: Exception, by_hand: str) -> DownloadFailed:
    text = f"{type(error).__name__}: {error}"
    if any(word in text.lower() for word in _QUOTA_WORDS):
        reason = "Google Drive refused it (download quota exceeded or link not public; try again later)"
    else:
        reason = f"it failed ({text.splitlines()[0][:300]})"
    return DownloadFailed(f"{what}: {reason}. {by_hand}")


def list_drive_folder(folder_id: str, *, by_hand: str, timeout: float = TIMEOUT_SECONDS) -> list[RemoteFile]:
    """Every file of a public Drive folder (recursively) as ``RemoteFile(id, path)``,
    without downloading any (``gdown.download_folder(skip_download=True)``)."""
    check_online(f"listing the Google Drive folder {folder_id}", by_hand)
    import gdown

    try:
        items = gdown.download_folder(id=folder_id, skip_download=True, quiet=True, use_cookies=False, timeout=timeout)
    except Exception as error:  # gdown raises many kinds: network, parsing, quota
        raise _failure(f"listing the Google Drive folder {folder_id}", error, by_hand) from error
    return [RemoteFile(str(item.id), str(item.path).replace("\\", "/")) for item in items or []]


def download_file(source: str, target: Path, *, by_hand: str, timeout: float = TIMEOUT_SECONDS, quiet: bool = False) -> Path:
    """Download a Drive file id or a URL to ``target``, resuming a partial file, with a
    progress bar (unless ``quiet``). An existing complete ``target`` is kept as it is."""
    check_online(f"downloading {source}", by_hand)
    import gdown

    target.parent.mkdir(parents=True, exist_ok=True)
    file_id = drive_file_id(source) if not source.startswith(("http://", "https://")) or "drive.google" in source else None
    kwargs = {"id": file_id} if file_id else {"url": source}
    try:
        result = gdown.download(output=str(target), resume=True, quiet=quiet, use_cookies=False, timeout=timeout, retries=2, **kwargs)
    except Exception as error:
        raise _failure(f"downloading {source}", error, by_hand) from error
    if not result or not target.is_file():
        raise DownloadFailed(f"downloading {source} gave no file. {by_hand}")
    return target


def hub_download(repo_id: str, filenames: Sequence[str], *, by_hand: str) -> Path:
    """The first of ``filenames`` in ``repo_id`` that the Hub serves, through the Hugging
    Face cache (``detector.weights.hub_file``: cached files are not downloaded again)."""
    from .weights import hub_file

    errors = []
    for name in filenames:
        try:
            return hub_file(repo_id, name)
        except WeightsUnavailableError as error:
            errors.append(str(error).split(". ")[0])
    raise DownloadFailed(f"{repo_id}: {'; '.join(errors)}. {by_hand}")


def partial_files(folder: Path) -> list[Path]:
    """Partial downloads (gdown's ``*.part``) under ``folder``."""
    return sorted(folder.rglob("*.part")) if folder.is_dir() else []
