"""``weights fetch | convert | push``: the steps behind ``python -m detector weights``
(docs/api.md §19). Method-agnostic: each method's sources, file rules and conversion come
from its ``Detector.artefacts`` / ``plan_downloads`` / ``convert_checkpoint`` hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

from .artefacts import AmbiguousListing, Converted, ConvertRequest, PlannedFile, RemoteFile, human_bytes, sha256_file
from .base import Detector
from .checkpoint_sets import method_home, read_manifest, record_file, weights_home
from .downloads import DownloadFailed, download_file, hub_download, list_drive_folder
from .registry import get_method, list_methods
from .weights import hub_location, is_offline

PROGRAM = "python -m detector weights"


@dataclass(frozen=True)
class ClipWeights:
    """One official CLIP backbone: open_clip model and tag, its Hub repository and file
    names, and the methods that use it."""

    model_name: str
    tag: str
    repo_id: str
    filenames: tuple[str, ...]
    methods: tuple[str, ...]


def official_clip_weights() -> list[ClipWeights]:
    """The CLIP weights every registered method's spec names, one entry per (model, tag)."""
    found: dict[tuple[str, str], list[str]] = {}
    for method in list_methods():
        spec = get_method(method).spec
        found.setdefault((spec.default_backbone, spec.default_weights), []).append(method)
    out = []
    for (model_name, tag), methods in found.items():
        location = hub_location(model_name, tag)
        if location is not None:
            out.append(ClipWeights(model_name, tag, location[0], tuple(location[1]), tuple(methods)))
    return out


def cached_clip_file(cls: type[Detector], model_name: str | None = None) -> tuple[Path | None, str]:
    """``(local file or None, "model / tag")`` of the method's official CLIP tag, from the
    Hugging Face cache only (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    model_name = model_name or cls.spec.default_backbone
    name = f"{model_name} / {cls.spec.default_weights}"
    try:
        location = hub_location(model_name, cls.spec.default_weights)
    except ValueError:
        return None, name
    if location is None:
        return None, name
    for filename in location[1]:
        hit = try_to_load_from_cache(location[0], filename)
        if isinstance(hit, str):
            return Path(hit), name
    return None, name


def by_hand_text(cls: type[Detector]) -> str:
    """What to download by hand and which ``convert`` command to run."""
    artefacts = cls.artefacts()
    values = {"shots": "K", "trained_on": "NAME"}
    needs = " ".join(f"--{need.replace('_', '-')} {values.get(need, 'VALUE')}" for need in (artefacts.convert_needs if artefacts else ()))
    page = artefacts.source.page if artefacts and artefacts.source else "the authors' page"
    return f"Download the file by hand from {page}, then run: {PROGRAM} convert {cls.name} FILE {needs}".rstrip()


def fetch_clip(out: TextIO, methods: Sequence[str] = ()) -> int:
    """Download the official CLIP weights of ``methods`` (all by default) into the Hugging
    Face cache; 1 when any is missing afterwards."""
    status = 0
    for item in official_clip_weights():
        if methods and not set(item.methods) & set(methods):
            continue
        by_hand = (
            f"Download {item.filenames[0]} from https://huggingface.co/{item.repo_id} on a machine with network and copy "
            "the Hugging Face cache (HF_HOME), or pass the file with --backbone-weights PATH"
        )
        try:
            path = hub_download(item.repo_id, item.filenames, by_hand=by_hand)
        except DownloadFailed as error:
            out.write(f"{item.model_name} / {item.tag}: {error}\n")
            status = 1
            continue
        out.write(f"{item.model_name} / {item.tag}: {path} ({human_bytes(path.stat().st_size)})\n")
    return status


def print_listing(out: TextIO, listing: Sequence[RemoteFile]) -> None:
    out.write("the folder holds:\n")
    for item in listing:
        out.write(f"  {item.file_id}  {item.path}\n")


def convert_file(
    cls: type[Detector], source: Path, *, shots: int | None, trained_on: str | None, out_dir: Path | None = None,
    backbone: str | None = None, reference: Path | None | str = "cached", source_name: str = "", record: str = "",
) -> Converted:
    """Convert one downloaded file into the cache (or ``out_dir``) and record it in the
    cache's manifest. ``reference``: the official CLIP file to compare with; ``"cached"`` =
    the method's tag from the Hugging Face cache when present."""
    reference_name = None
    if reference == "cached":
        reference, reference_name = cached_clip_file(cls, backbone)
    request = ConvertRequest(
        shots=shots, trained_on=trained_on, source_name=source_name or source.name, source_sha256=sha256_file(source),
        backbone=backbone, reference_weights=Path(reference) if reference else None, reference_name=reference_name,
    )
    target = Path(out_dir) if out_dir is not None else method_home(cls.name)
    converted = cls.convert_checkpoint(source, target, request)
    if out_dir is None:
        header = converted.header
        for file in (converted.heads, converted.clip):
            if file is not None:
                record_file(cls.name, file, sha256=sha256_file(file), source=record or request.source_name,
                            shots=header.get("shots") if file == converted.heads else None,  # type: ignore[arg-type]
                            trained_on=header.get("trained_on") if file == converted.heads else None)  # type: ignore[arg-type]
    return converted


def report_conversion(out: TextIO, converted: Converted) -> None:
    header = converted.header
    out.write(f"wrote {converted.heads} ({human_bytes(converted.heads.stat().st_size)})")
    if header.get("shots") is not None:
        out.write(f": k = {header['shots']}")
    if header.get("trained_on"):
        out.write(f", trained on {header['trained_on']}")
    out.write("\n")
    if converted.clip_matches_reference:
        out.write(f"  the file's CLIP part equals {header.get('clip_equals')}: only the heads are kept\n")
    elif converted.clip is not None:
        why = "differs from the official tag's weights" if converted.clip_matches_reference is False else "could not be compared (official tag not cached; run 'fetch clip' first)"
        out.write(f"  the file's CLIP part {why}: kept beside the heads as {converted.clip.name}\n")


def fetch_method(
    cls: type[Detector], out: TextIO, *, shots: Sequence[int] = (), trained_on: str | None = None, file_id: str | None = None,
    url: str | None = None, keep_original: bool = False, backbone: str | None = None,
) -> int:
    """``weights fetch <method>``: list, choose, download, convert, clean up. 0 on success,
    1 when a download failed, 2 when the listing is ambiguous or arguments are missing."""
    artefacts = cls.artefacts()
    source = artefacts.source if artefacts else None
    if source is None:
        out.write(f"{cls.spec.display_name} publishes no trained files; nothing to fetch\n")
        return 2
    by_hand = by_hand_text(cls)
    planned: list[PlannedFile]
    try:
        if file_id or url:
            item = RemoteFile(file_id or str(url), Path(str(url or file_id)).name)
            if file_id and any(need in artefacts.convert_needs for need in ("shots",)) and (len(shots) != 1 or not trained_on):
                out.write("--file-id needs --shots K (one value) and --trained-on NAME: the files record neither\n")
                return 2
            planned = [PlannedFile(item, shots[0] if shots else None, trained_on)]
        elif source.kind == "url":
            out.write(f"{cls.spec.display_name}: {source.note}. Find the link on {source.page}, then run: "
                      f"{PROGRAM} fetch {cls.name} --url URL_OR_DRIVE_ID [--trained-on NAME]\n")
            return 2
        else:
            listing = list_drive_folder(source.location, by_hand=by_hand)
            try:
                planned = cls.plan_downloads(listing, shots=shots, trained_on=trained_on)
            except AmbiguousListing as error:
                out.write(f"refusing to guess: {error.reason}\n")
                print_listing(out, error.listing)
                out.write(f"name one file by hand: {PROGRAM} fetch {cls.name} --file-id ID --shots K --trained-on NAME\n")
                return 2
        staging = weights_home() / ".downloads" / cls.name
        for plan in planned:
            name = Path(plan.remote.path).name or plan.remote.file_id
            target = staging / f"{plan.remote.file_id[:16]}-{name}".replace("/", "_")
            out.write(f"downloading {plan.remote.path} (k = {plan.shots}, trained on {plan.trained_on}) to {target}\n")
            download_file(plan.remote.file_id, target, by_hand=by_hand)
            converted = convert_file(cls, target, shots=plan.shots, trained_on=plan.trained_on, backbone=backbone,
                                     source_name=name, record=f"{source.page} {plan.remote.path}")
            report_conversion(out, converted)
            if not keep_original:
                target.unlink()
                out.write(f"  deleted the original ({name}); --keep-original keeps it\n")
    except DownloadFailed as error:
        out.write(f"{error}\n")
        return 1
    out.write(f"use it with checkpoint='official' (cache: {method_home(cls.name)})\n")
    return 0


def model_card(cls: type[Detector], repo_id: str, files: Sequence[tuple[str, dict]]) -> str:
    """The README.md of a pushed repository: licence, source, files, how to use (the Space route)."""
    artefacts = cls.artefacts()
    source = artefacts.source if artefacts else None
    licence_id = source.licence_id if source else "other"
    lines = ["---", f"license: {licence_id}", "tags:", "- anomaly-detection", f"- {cls.name}", "library_name: detector", "---", "",
             f"# {cls.spec.display_name} weights, converted", ""]
    if source is not None:
        lines += [f"Converted from the files the authors publish at {source.page} ({source.note}).",
                  f"Licence: {source.licence}. These files are a mirror in a safer format (safetensors, heads only); "
                  "the authors own the weights.", ""]
    lines += ["| file | k | trained on | sha256 | converted from |", "|---|---|---|---|---|"]
    for name, facts in files:
        lines.append(f"| `{name}` | {facts.get('shots', '')} | {facts.get('trained_on', '')} | `{facts.get('sha256', '')}` | "
                     f"{facts.get('source_file', '')} (sha256 `{facts.get('source_sha256', '')}`) |")
    prefix = cls.name.upper().replace("-", "_")
    lines += ["", "## Use", "", "```bash", f"{prefix}_CHECKPOINT=hf-hub:{repo_id} python app.py", "```", "",
              "On a Hugging Face Space, list the files under `preload_from_hub` in the Space's README header and set the "
              f"variable `{prefix}_CHECKPOINT=hf-hub:{repo_id}`:", "", "```yaml", "preload_from_hub:",
              f"  - {repo_id} {','.join(name for name, _ in files)}", "```", ""]
    return "\n".join(lines)


def push(cls: type[Detector], repo_id: str, out: TextIO, *, set_name: str | None = None, private: bool = False, dry_run: bool = False) -> int:
    """Upload one cached set of converted files with a model card to ``repo_id``."""
    entries = read_manifest(cls.name)
    sets = sorted({key.split("/", 1)[0] for key in entries})
    artefacts = cls.artefacts()
    chosen = set_name or (sets[0] if len(sets) == 1 else (artefacts.default_set if artefacts else None))
    files = [(key, entry) for key, entry in sorted(entries.items()) if key.split("/", 1)[0] == chosen]
    if not files:
        out.write(f"nothing to push: no converted {cls.name} files for set {chosen!r} in {method_home(cls.name)} (sets: {', '.join(sets) or 'none'})\n")
        return 2
    home = method_home(cls.name)
    from .checkpoints import read_header

    described = []
    for key, entry in files:
        facts = {"sha256": entry.sha256, "shots": entry.shots, "trained_on": entry.trained_on}
        facts.update({k: v for k, v in read_header(home / key).items() if k in ("source_file", "source_sha256")})
        described.append((Path(key).name, facts))
    card = model_card(cls, repo_id, described)
    if dry_run:
        out.write(card)
        return 0
    if is_offline():
        out.write(f"HF_HUB_OFFLINE is set: nothing was uploaded. Unset it, log in (hf auth login) and run again; "
                  f"or upload {home / str(chosen)} and this model card by hand ({PROGRAM} push {repo_id} --dry-run prints it)\n")
        return 1
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        for key, _ in files:
            api.upload_file(path_or_fileobj=str(home / key), path_in_repo=Path(key).name, repo_id=repo_id)
        api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id)
    except Exception as error:
        out.write(f"upload to {repo_id} failed ({type(error).__name__}: {error})\n")
        return 1
    out.write(f"pushed {len(files)} file(s) to https://huggingface.co/{repo_id}\n")
    return 0
