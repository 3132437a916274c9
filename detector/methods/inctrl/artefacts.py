"""InCTRL's published files as data, the rules that say what each one is, and ``convert``
(docs/inctrl.md §5, §11).

The authors publish one model per shot count (k = 2, 4, 8) in a Google Drive folder. The
files are ``torch.save``d 345-key state dicts (CLIP ``ViT-B-16-plus-240`` + 44 head keys,
about 835 MB) that record neither k nor the training set, so both come from the file's
name and path in the folder (``plan_downloads``) or from the user (``--shots``,
``--trained-on``). ``convert`` keeps the 44 head keys with a JSON header; the CLIP part is
dropped when it equals the official tag's weights and kept beside the heads otherwise.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from ...artefacts import (
    converted_header,
    AmbiguousListing,
    Converted,
    ConvertRequest,
    KnownArtefact,
    MethodArtefacts,
    PlannedFile,
    RemoteFile,
    WeightsSource,
    set_slug,
    tensor_digest,
)
from ...checkpoints import check_keys, read_state_dict, save_safetensors
from ...errors import CheckpointError
from .checkpoint import METHOD_NAME, head_state_shapes, split_checkpoint
from .model import InCTRLHeads

#: The authors' "Pre-train Models" folder, linked from the official README.
DRIVE_FOLDER_ID = "1McmfxF8_H0BeRvcJ_poGIB-ATQCDDEIa"
SOURCE = WeightsSource(
    kind="google-drive-folder",
    location=DRIVE_FOLDER_ID,
    page=f"https://drive.google.com/drive/folders/{DRIVE_FOLDER_ID}",
    licence="Apache-2.0 (the licence of mala-lab/InCTRL; no separate licence is stated for the weights)",
    licence_id="apache-2.0",
    note="the authors' 'Pre-train Models' folder linked from https://github.com/mala-lab/InCTRL",
)
#: Shot counts the authors publish.
PUBLISHED_SHOTS = (2, 4, 8)
#: Training sets: cache set name -> name for people, and the spellings accepted for each.
TRAINING_SETS = {"mvtec": "MVTec AD", "visa": "VisA"}
ALIASES = {"mvtec": "mvtec", "mvtecad": "mvtec", "visa": "visa"}
#: ``checkpoint="official"`` with several sets cached: the paper's model for targets other
#: than MVTec AD is the one trained on MVTec AD.
DEFAULT_SET = "mvtec"
PUBLISHED_BYTES = 835_000_000
HEADS_BYTES = 1_400_000
MODEL_SUFFIXES = (".pyth", ".pth", ".pt", ".bin", ".safetensors")

_SHOT_PATTERNS = (
    re.compile(r"(?<![0-9])([0-9]+)[-_ ]?shots?(?![a-z])"),
    re.compile(r"(?<![a-z])shots?[-_ ]?([0-9]+)(?![0-9])"),
    re.compile(r"(?<![a-z0-9])k[-_ =]?([0-9]+)(?![0-9])"),
)
_TRAINED_PATTERN = re.compile(r"train(?:ed)?[-_ ]?(?:on[-_ ])?([a-z]+)")


def artefacts() -> MethodArtefacts:
    known = tuple(
        KnownArtefact(
            name=f"heads, {k}-shot, trained on {people}",
            set_name=key,
            shots=k,
            trained_on=people,
            published_bytes=PUBLISHED_BYTES,
            stored_bytes=HEADS_BYTES,
        )
        for key, people in TRAINING_SETS.items()
        for k in PUBLISHED_SHOTS
    )
    return MethodArtefacts(source=SOURCE, known=known, default_set=DEFAULT_SET, convert_needs=("shots", "trained_on"))


def training_set(name: str) -> tuple[str, str]:
    """``(cache set name, name for people)`` of a training set given in any spelling
    (``"mvtec"``, ``"MVTec AD"``, ``"mvtec_ad"``); other names are kept as given."""
    key = ALIASES.get(set_slug(name), set_slug(name))
    return key, TRAINING_SETS.get(key, str(name))


def shots_in(path: str) -> set[int]:
    """Shot counts a path names: ``8-shot``, ``shot_8``, ``k8`` or a folder called ``8``."""
    lower = path.lower()
    found = {int(m.group(1)) for pattern in _SHOT_PATTERNS for m in pattern.finditer(lower)}
    found |= {int(part) for part in re.split(r"[/\\]", lower)[:-1] if part.isdigit()}
    return found


def trained_on_in(path: str) -> tuple[set[str], set[str]]:
    """``(explicit, bare)`` training-set names in a path: ``trained_on_visa`` is explicit;
    a bare ``visa`` may name the training set or the target, so it decides nothing."""
    lower = path.lower().replace(" ", "")
    explicit = {ALIASES[m.group(1)] for m in _TRAINED_PATTERN.finditer(lower) if m.group(1) in ALIASES}
    bare = {ALIASES[token] for token in re.findall(r"[a-z]+", lower) if token in ALIASES}
    return explicit, bare - explicit


def plan_downloads(listing: Sequence[RemoteFile], *, shots: Sequence[int] = (), trained_on: str | None = None) -> list[PlannedFile]:
    """Each model file of the listing as (shots, trained on); ``AmbiguousListing`` when a
    file's shot count or training set cannot be read from its path (and ``trained_on`` is
    not given), or two files map to the same pair."""
    models = [item for item in listing if item.path.lower().endswith(MODEL_SUFFIXES)]
    if not models:
        raise AmbiguousListing("the listing holds no model files (.pyth, .pth, .pt)", listing)
    given = training_set(trained_on) if trained_on else None
    planned, problems = [], []
    for item in models:
        counts = shots_in(item.path)
        explicit, bare = trained_on_in(item.path)
        if len(counts) != 1:
            problems.append(f"{item.path}: shot count {'not named' if not counts else 'unclear ' + str(sorted(counts))}")
            continue
        if given is not None:
            key, people = given
        elif len(explicit) == 1:
            key, people = training_set(next(iter(explicit)))
        else:
            why = f"names {', '.join(sorted(bare | explicit))} but not as the training set" if bare | explicit else "does not name the training set"
            problems.append(f"{item.path}: {why} (pass --trained-on NAME)")
            continue
        planned.append(PlannedFile(item, next(iter(counts)), people, key))
    if problems:
        raise AmbiguousListing("cannot tell what these files are: " + "; ".join(problems), listing)
    if shots:
        planned = [p for p in planned if p.shots in set(int(k) for k in shots)]
    twice = [pair for pair, n in Counter((p.shots, p.set_name) for p in planned).items() if n > 1]
    if twice:
        shown = ", ".join(f"k = {k} ({s})" for k, s in sorted(twice))
        raise AmbiguousListing(f"several files for {shown}: choose one with --file-id ID --shots K --trained-on NAME", listing)
    return planned


def convert(source: Path, out_dir: Path, request: ConvertRequest, *, default_backbone: str) -> Converted:
    """Write ``source`` (official ``.pyth``, heads-only file or our output) as
    ``out_dir/<set>/inctrl_<set>_<k>shot.safetensors`` (44 head keys and a JSON header:
    method, backbone, shots, trained_on, source file and sha256, the CLIP part's digest).

    The CLIP part, when the file has one, is compared with ``request.reference_weights``
    (``artefacts.tensor_digest`` of the same keys); unless equal it is kept beside the heads
    as ``clip-<digest12>.clip.safetensors`` (shared by every file with the same CLIP part),
    and the header names it. The file is read with ``read_state_dict`` only (no pickled code).
    """
    if request.shots is None or not request.trained_on:
        raise CheckpointError(
            f"{source.name} does not record its shot count or training set: pass --shots K --trained-on NAME "
            f"(published: k = {', '.join(map(str, PUBLISHED_SHOTS))}; sets: {', '.join(TRAINING_SETS)})"
        )
    key, people = training_set(request.trained_on)
    heads, clip = split_checkpoint(read_state_dict(source))
    if "adapter.fc.0.weight" not in heads or "diff_head.projection1.weight" not in heads:
        raise CheckpointError(f"{source.name} holds no InCTRL heads (adapter.*, diff_head.*, diff_head_ref.*)")
    embed_dim = int(heads["adapter.fc.0.weight"].shape[1])
    num_patches = int(heads["diff_head.projection1.weight"].shape[1])
    check_keys(heads, head_state_shapes(InCTRLHeads(embed_dim, num_patches)), what="InCTRL's heads")
    header: dict[str, Any] = converted_header(
        METHOD_NAME, request, source, default_backbone=default_backbone, trained_on=people, trained_on_set=key,
        layout="heads only, converted from the published file", epoch_pattern=r"checkpoint_([0-9]+)", shots=int(request.shots),
    )
    folder = Path(out_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    clip_file, matches = None, None
    if clip:
        digest = tensor_digest(clip)
        header["clip_sha256"] = digest
        if request.reference_weights is not None:
            reference = read_state_dict(request.reference_weights)
            matches = set(clip) <= set(reference) and tensor_digest({k: reference[k] for k in clip}) == digest
            del reference
        if matches:
            header["clip_equals"] = request.reference_name or str(request.reference_weights)
        else:
            clip_file = folder / f"clip-{digest[:12]}.clip.safetensors"
            if not clip_file.is_file():
                save_safetensors(clip_file, clip, {"part": "CLIP weights kept beside InCTRL heads", "backbone": header["backbone"], "clip_sha256": digest})
            header["clip_file"] = clip_file.name
    heads_file = save_safetensors(folder / f"{METHOD_NAME}_{key}_{int(request.shots)}shot.safetensors", heads, header)
    return Converted(heads_file, clip_file, matches, header)
