"""``python -m detector weights list | fetch | convert | verify | push`` (docs/api.md §19).

* ``list``: every artefact each method can use, its source, whether it is cached, size, sha256;
* ``fetch clip`` / ``fetch <method>``: download into the Hugging Face cache / the weights cache;
* ``convert <method> FILE``: a file downloaded by hand into the weights cache;
* ``verify``: re-hash both caches, remove what is corrupt or truncated;
* ``push REPO_ID``: upload converted files with a model card (the Space route).

The command names no method: everything comes from the registry and each method's hooks.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Sequence, TextIO

from .artefacts import human_bytes, sha256_file
from .checkpoint_sets import MANIFEST_NAME, is_member_name, method_home, read_manifest, weights_home, write_manifest
from .downloads import partial_files
from .errors import CheckpointError
from .registry import get_method, list_methods
from .weights_fetch import PROGRAM, convert_file, fetch_clip, fetch_method, official_clip_weights, push, report_conversion

CLIP = "clip"
SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")


def _hub_cached(repo_id: str, filenames: Sequence[str]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _blob_sha(path: Path) -> str | None:
    """The sha256 the Hugging Face cache names an LFS blob by (``None`` for other blobs)."""
    name = Path(os.path.realpath(path)).name
    return name if SHA256_NAME.match(name) else None


def list_artefacts(out: TextIO) -> int:
    out.write("CLIP weights (Hugging Face cache, fetch with: weights fetch clip)\n")
    for item in official_clip_weights():
        cached = _hub_cached(item.repo_id, item.filenames)
        state = f"cached, {human_bytes(cached.stat().st_size)}, sha256 {_blob_sha(cached) or '?'}" if cached else "not cached"
        out.write(f"  {item.model_name} / {item.tag}  hf-hub:{item.repo_id}  for {', '.join(item.methods)}: {state}\n")
    for method in list_methods():
        cls = get_method(method)
        artefacts = cls.artefacts()
        if artefacts is None or artefacts.source is None:
            continue
        source = artefacts.source
        out.write(f"{cls.spec.display_name} ({source.kind} {source.location or source.page}; {source.licence})\n")
        entries = read_manifest(method)
        shown = set()
        for known in artefacts.known:
            hits = [(k, e) for k, e in entries.items() if k.startswith(known.set_name + "/") and e.shots == known.shots and is_member_name(k)]
            if hits:
                key, entry = hits[0]
                shown.add(key)
                state = f"cached {key}, {human_bytes(entry.size)}, sha256 {entry.sha256}"
            else:
                state = f"not cached (published {human_bytes(known.published_bytes)}, {human_bytes(known.stored_bytes)} after convert)"
            out.write(f"  {known.name}: {state}\n")
        for key, entry in sorted(entries.items()):
            if key not in shown:
                out.write(f"  {key}: cached, {human_bytes(entry.size)}, sha256 {entry.sha256}\n")
    out.write(f"weights cache: {weights_home()}\n")
    return 0


def verify(out: TextIO, *, remove: bool = True) -> int:
    """Re-hash every recorded file of the weights cache and every cached official CLIP file;
    report (and unless ``remove`` is false, delete) missing, truncated and corrupt ones.
    Returns the number of problems (capped at 1 for the exit status by ``main``)."""
    problems = 0
    for method in list_methods():
        entries = read_manifest(method)
        kept = dict(entries)
        home = method_home(method)
        for key, entry in sorted(entries.items()):
            file = home / key
            if not file.is_file():
                verdict = "missing"
            elif file.stat().st_size != entry.size:
                verdict = f"truncated or grown ({file.stat().st_size} bytes, recorded {entry.size})"
            elif sha256_file(file) != entry.sha256:
                verdict = "corrupt (sha256 does not match)"
            else:
                out.write(f"ok       {method}/{key}\n")
                continue
            problems += 1
            out.write(f"BAD      {method}/{key}: {verdict}" + ("; removed" if remove else "") + "\n")
            if remove:
                kept.pop(key)
                if file.is_file():
                    file.unlink()
        if remove and kept != entries:
            write_manifest(method, kept)
        if home.is_dir():
            for file in sorted(p for p in home.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
                if file.relative_to(home).as_posix() not in kept:
                    out.write(f"unknown  {file} (not recorded by fetch/convert; left alone)\n")
    for part in partial_files(weights_home() / ".downloads"):
        out.write(f"partial  {part} ({human_bytes(part.stat().st_size)}; the next fetch resumes it)\n")
    for item in official_clip_weights():
        cached = _hub_cached(item.repo_id, item.filenames)
        expected = _blob_sha(cached) if cached else None
        if cached is None or expected is None:
            continue
        if sha256_file(cached) == expected:
            out.write(f"ok       hf-hub:{item.repo_id}/{cached.name}\n")
            continue
        problems += 1
        out.write(f"BAD      hf-hub:{item.repo_id}/{cached.name}: corrupt (sha256 does not match its blob name)"
                  + ("; removed" if remove else "") + "\n")
        if remove:
            blob = Path(os.path.realpath(cached))
            cached.unlink()
            blob.unlink(missing_ok=True)
    out.write(f"{problems} problem(s)\n")
    return problems


def build_parser() -> argparse.ArgumentParser:
    methods = ", ".join(list_methods())
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every artefact, its source, cached or not, size, sha256")
    fetch = commands.add_parser("fetch", help=f"download: '{CLIP}' (the official CLIP weights) or a method ({methods})")
    fetch.add_argument("what", help=f"'{CLIP}' or a method name")
    fetch.add_argument("--shots", type=int, nargs="+", default=[], help="only these shot counts (with --file-id: the file's k)")
    fetch.add_argument("--trained-on", default=None, help="the training set, when the listing does not say (e.g. mvtec, visa)")
    fetch.add_argument("--file-id", default=None, help="one Drive file by id (with --shots K --trained-on NAME)")
    fetch.add_argument("--url", default=None, help="the file's URL or Drive id (for methods whose link moves)")
    fetch.add_argument("--keep-original", action="store_true", help="keep the published file after converting it")
    fetch.add_argument("--backbone", default=None, help="open_clip model the file belongs to (default: the method's)")
    convert = commands.add_parser("convert", help="convert a file downloaded by hand into the weights cache")
    convert.add_argument("method")
    convert.add_argument("file")
    convert.add_argument("--shots", type=int, default=None)
    convert.add_argument("--trained-on", default=None)
    convert.add_argument("--out", default=None, help="write here instead of the weights cache")
    convert.add_argument("--backbone", default=None)
    convert.add_argument("--clip-reference", default="cached", help="CLIP file to compare the file's CLIP part with (default: the official tag, if cached; 'none')")
    check = commands.add_parser("verify", help="re-hash the caches; remove corrupt or truncated files")
    check.add_argument("--keep", action="store_true", help="report only, remove nothing")
    upload = commands.add_parser("push", help="upload converted files with a model card to your Hugging Face repo")
    upload.add_argument("repo_id")
    upload.add_argument("--method", default=None, help=f"which method's files (default: the only method with files; {methods})")
    upload.add_argument("--set", dest="set_name", default=None, help="which cached set (default: the only one, or the method's default)")
    upload.add_argument("--private", action="store_true")
    upload.add_argument("--dry-run", action="store_true", help="print the model card, upload nothing")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "list":
            return list_artefacts(out)
        if args.command == "verify":
            return 1 if verify(out, remove=not args.keep) else 0
        if args.command == "fetch":
            if args.what.lower() == CLIP:
                return fetch_clip(out)
            return fetch_method(get_method(args.what), out, shots=args.shots, trained_on=args.trained_on, file_id=args.file_id,
                                url=args.url, keep_original=args.keep_original, backbone=args.backbone)
        if args.command == "convert":
            reference = None if args.clip_reference.lower() == "none" else args.clip_reference
            converted = convert_file(get_method(args.method), Path(args.file), shots=args.shots, trained_on=args.trained_on,
                                     out_dir=Path(args.out) if args.out else None, backbone=args.backbone, reference=reference)
            report_conversion(out, converted)
            return 0
        if args.command == "push":
            method = args.method or next((m for m in list_methods() if read_manifest(m)), None)
            if method is None:
                out.write(f"nothing to push: the weights cache {weights_home()} holds no converted files\n")
                return 2
            return push(get_method(method), args.repo_id, out, set_name=args.set_name, private=args.private, dry_run=args.dry_run)
    except (CheckpointError, ValueError) as error:
        out.write(f"error: {error}\n")
        return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
