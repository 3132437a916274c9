"""Checkpoint sets: several files of one method for different shot counts (docs/api.md §19).

A checkpoint argument names a set when it is

* a folder;
* ``"official"`` or ``"official:<set>"``: the local weights cache filled by
  ``python -m detector weights fetch|convert`` (``weights_home()/<method>/<set>/``);
* ``"hf-hub:<org>/<repo>"`` (no file part): every heads file in that repository.

Each member records its shot count in its header (``shots``). At ``fit(k normals)`` the
detector uses the member whose shot count is k, else the nearest (ties: the larger)
(``CheckpointSet.choose``). The cache keeps a ``manifest.json`` per method with each file's
size and sha256, which ``weights verify`` re-checks.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .artefacts import set_slug
from .checkpoints import CheckpointInfo
from .errors import CheckpointError
from .weights import hub_file, is_offline

WEIGHTS_HOME_VARIABLE = "DETECTOR_WEIGHTS_HOME"
OFFICIAL = "official"
MANIFEST_NAME = "manifest.json"
#: Files a set may hold; ``*.clip.safetensors`` are CLIP parts kept beside heads files.
MEMBER_SUFFIXES = (".safetensors", ".pyth", ".pth", ".pt", ".bin")
CLIP_PART_SUFFIX = ".clip.safetensors"

Inspect = Callable[[Path], CheckpointInfo]


def weights_home() -> Path:
    """The local weights cache: ``$DETECTOR_WEIGHTS_HOME``, else
    ``$XDG_CACHE_HOME/detector/weights``, else ``~/.cache/detector/weights``."""
    explicit = os.environ.get(WEIGHTS_HOME_VARIABLE, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return Path(base).expanduser() / "detector" / "weights"


def method_home(method: str) -> Path:
    return weights_home() / str(method).lower()


# -- manifest ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestEntry:
    """One cached file: ``path`` relative to the method's folder, its size and sha256 when
    written, where it came from and what it is."""

    path: str
    size: int
    sha256: str
    source: str = ""
    shots: int | None = None
    trained_on: str | None = None


def read_manifest(method: str) -> dict[str, ManifestEntry]:
    file = method_home(method) / MANIFEST_NAME
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
        return {key: ManifestEntry(**value) for key, value in dict(data).items()}
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"the weights manifest {file} is unreadable ({error}); delete it and fetch again") from error


def write_manifest(method: str, entries: Mapping[str, ManifestEntry]) -> Path:
    home = method_home(method)
    home.mkdir(parents=True, exist_ok=True)
    file = home / MANIFEST_NAME
    partial = file.with_suffix(".json.tmp")
    partial.write_text(json.dumps({k: asdict(v) for k, v in sorted(entries.items())}, indent=1))
    partial.replace(file)
    return file


def record_file(method: str, path: Path, *, sha256: str, source: str = "", shots: int | None = None, trained_on: str | None = None) -> ManifestEntry:
    """Add (or replace) ``path`` (inside ``method_home(method)``) in the manifest."""
    relative = Path(path).resolve().relative_to(method_home(method).resolve()).as_posix()
    entry = ManifestEntry(relative, Path(path).stat().st_size, sha256, source, shots, trained_on)
    entries = read_manifest(method)
    entries[relative] = entry
    write_manifest(method, entries)
    return entry


# -- sets ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetMember:
    """One file of a set: its path, the shot count and training set its header records."""

    path: Path
    shots: int
    trained_on: str | None = None


@dataclass(frozen=True)
class CheckpointSet:
    """The members of a set, sorted by shot count (at most one per shot count)."""

    address: str
    members: tuple[SetMember, ...]

    @property
    def shots(self) -> tuple[int, ...]:
        return tuple(m.shots for m in self.members)

    def choose(self, k: int) -> SetMember:
        """The member trained for ``k`` shots, else the nearest (ties: the larger)."""
        return min(self.members, key=lambda m: (abs(m.shots - int(k)), -m.shots))

    def summary(self) -> str:
        """``"k = 2, 4, 8 (MVTec AD)"`` (zero-shot sets: the training set alone)."""
        trained = ", ".join(sorted({m.trained_on for m in self.members if m.trained_on}))
        if self.shots == (0,):
            return f"trained on {trained}" if trained else "1 file"
        shots = ", ".join(str(s) for s in self.shots)
        return f"k = {shots}" + (f" ({trained})" if trained else "")


def is_set_address(checkpoint: str | os.PathLike | None) -> bool:
    """True when ``checkpoint`` names a set rather than one file (module docstring)."""
    if checkpoint is None:
        return False
    text = str(checkpoint)
    if text == OFFICIAL or text.startswith(OFFICIAL + ":"):
        return True
    if text.startswith("hf-hub:"):
        return text[len("hf-hub:"):].strip("/").count("/") == 1
    return Path(text).expanduser().is_dir()


def is_member_name(name: str) -> bool:
    return name.endswith(MEMBER_SUFFIXES) and not name.endswith(CLIP_PART_SUFFIX)


def resolve_set(
    checkpoint: str, *, method: str, inspect: Inspect, default_set: str | None = None, by_shots: bool = True
) -> CheckpointSet:
    """The members of the set ``checkpoint`` names; ``CheckpointError`` when it holds no
    member, a member does not record its shot count, or two members share one. A zero-shot
    method (``by_shots=False``) takes a set of exactly one file (shot count 0)."""
    text = str(checkpoint)
    if text == OFFICIAL or text.startswith(OFFICIAL + ":"):
        files = _official_files(method, text.partition(":")[2], default_set)
    elif text.startswith("hf-hub:"):
        files = _hub_files(text[len("hf-hub:"):].strip("/"), inspect)
    else:
        folder = Path(text).expanduser()
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_member_name(p.name))
    members: dict[int, SetMember] = {}
    for file in files:
        facts = dict(inspect(file).facts)
        if not by_shots:
            facts["shots"] = 0
        if facts.get("shots") is None:
            raise CheckpointError(
                f"{file.name} in {text} does not record its shot count; convert it with "
                "'python -m detector weights convert METHOD FILE --shots K --trained-on NAME'"
            )
        member = SetMember(Path(file), int(facts["shots"]), facts.get("trained_on"))
        if member.shots in members:
            raise CheckpointError(
                f"{text} holds two files" + (f" for k = {member.shots}" if by_shots else "") + f" ({members[member.shots].path.name}, {file.name}); "
                "keep one, or name a set of one training set (official:<set>)"
            )
        members[member.shots] = member
    if not members:
        raise CheckpointError(f"the checkpoint set {text} holds no checkpoint files" + _how_to_fill(text, method))
    return CheckpointSet(text, tuple(members[k] for k in sorted(members)))


def official_sets(method: str) -> list[str]:
    """Names of the sets in the local cache that hold at least one file."""
    home = method_home(method)
    if not home.is_dir():
        return []
    return sorted(p.name for p in home.iterdir() if p.is_dir() and any(is_member_name(f.name) for f in p.iterdir()))


def _official_files(method: str, name: str, default_set: str | None) -> list[Path]:
    sets = official_sets(method)
    if name:
        chosen = set_slug(name)
    elif len(sets) == 1:
        chosen = sets[0]
    elif default_set and set_slug(default_set) in sets:
        chosen = set_slug(default_set)
    elif sets:
        raise CheckpointError(f"the local cache holds several {method} sets ({', '.join(sets)}): name one, e.g. official:{sets[0]}")
    else:
        chosen = ""
    folder = method_home(method) / chosen
    if not chosen or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_member_name(p.name))


def _hub_files(repo_id: str, inspect: Inspect) -> list[Path]:
    """Every member file of a Hub repository (from the cache when offline), with the CLIP
    parts their headers name downloaded beside them."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
        names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    except Exception:
        if is_offline():
            raise CheckpointError(f"hf-hub:{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
        from huggingface_hub import list_repo_files

        try:
            names = list(list_repo_files(repo_id))
        except Exception as error:
            raise CheckpointError(f"cannot list hf-hub:{repo_id} ({type(error).__name__}: {error})") from error
    files = []
    for name in sorted(n for n in names if is_member_name(n)):
        local = hub_file(repo_id, name)
        clip_part = dict(inspect(local).facts).get("clip_file")
        if clip_part:
            hub_file(repo_id, str(Path(name).parent / str(clip_part)) if Path(name).parent != Path(".") else str(clip_part))
        files.append(local)
    return files


def _how_to_fill(text: str, method: str) -> str:
    if text == OFFICIAL or text.startswith(OFFICIAL + ":"):
        return f" (looked in {method_home(method)}); fetch them with 'python -m detector weights fetch {method}'"
    return ""


def file_identity(path: str | os.PathLike) -> tuple[Any, ...]:
    """``(resolved path, size, mtime_ns)``: changes when the file is replaced."""
    file = Path(path).expanduser()
    try:
        stat = file.stat()
    except OSError:
        return (str(path),)
    return (str(file.resolve()), stat.st_size, stat.st_mtime_ns)


def checkpoint_in_use(checkpoint: str | None, k: int, **set_arguments: Any) -> tuple[Any, ...] | None:
    """The identity of the file a detector built with ``checkpoint`` uses after
    ``fit(k normals)`` (for the service's cache key); ``None`` without a checkpoint. An
    ``hf-hub:`` file is identified by its address; a set that cannot be resolved by its
    address (building the detector then reports the problem). ``set_arguments`` as for
    ``resolve_set`` (``detector.base.set_arguments``)."""
    if not checkpoint:
        return None
    text = str(checkpoint)
    if is_set_address(text):
        try:
            return file_identity(resolve_set(text, **set_arguments).choose(k).path)
        except Exception:
            return (text,)
    if text.startswith("hf-hub:"):
        return (text,)
    return file_identity(text)
