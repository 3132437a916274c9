"""What an inspection request asks for, checked before any work is done.

The app, the command lines and the service share these rules: which methods (registered
names, once each), how many normal images each method accepts, the method options a form
gives (checked against each ``MethodSpec``), and unique names for a batch of query files.
Messages are written for the person who made the request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from . import limits
from .base import check_normal_count as check_method_normal_count
from .images import LoadedImage, load_image
from .registry import get_method, get_spec, list_methods


def resolve_methods(requested: Sequence[str] | None) -> list[str]:
    """Registered method names (lower case, once each, in the given order); ``None``, an
    empty list or ``["all"]`` mean every registered method."""
    known = list_methods()
    if not requested or [str(m).lower() for m in requested] == ["all"]:
        return known
    names: list[str] = []
    for name in requested:
        key = get_method(name).name  # unknown names: ValueError listing the known ones
        if key not in names:
            names.append(key)
    return names


def in_registry_order(methods: Sequence[str]) -> list[str]:
    """``methods`` (any case, duplicates dropped) in registration order."""
    chosen = set(resolve_methods(methods)) if methods else set()
    return [name for name in list_methods() if name in chosen]


def _joined(names: Sequence[str]) -> str:
    return " and ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " and " + names[-1]


def check_normal_count(methods: Sequence[str], count: int, *, noun: str = "given") -> None:
    """``ValueError`` when ``count`` normal images do not suit every method of ``methods``:
    more than ``limits.MAX_NORMAL_IMAGES``, or none for a few-shot method. ``noun`` says
    how the images came (``"given"``, ``"uploaded"``)."""
    if count > limits.MAX_NORMAL_IMAGES:
        raise ValueError(
            f"{count} normal images {noun}, at most {limits.MAX_NORMAL_IMAGES} are accepted: "
            f"remove {count - limits.MAX_NORMAL_IMAGES} of them."
        )
    if count >= limits.MIN_NORMAL_IMAGES:
        return
    few_shot = [get_spec(m).display_name for m in methods if get_spec(m).needs_normals]
    if not few_shot:
        return
    zero_shot = [get_spec(m).display_name for m in list_methods() if not get_spec(m).needs_normals]
    one = len(few_shot) == 1
    hint = f" ({_joined(zero_shot)} work{'s' if len(zero_shot) == 1 else ''} without normal images)" if zero_shot else ""
    raise ValueError(
        f"{_joined(few_shot)} need{'s' if one else ''} {limits.MIN_NORMAL_IMAGES}–{limits.MAX_NORMAL_IMAGES} normal images: "
        f"upload images of defect-free parts, or untick {'it' if one else 'them'}{hint}."
    )


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def form_options(
    values: Mapping[str, Mapping[str, Any]], sigma: Any = None, *, methods: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Method options from a form: ``values`` is ``{method: {option: value}}``.

    A blank value (and 0 for an integer option whose default is ``None``, e.g. "the
    preset's steps") means the default and is left out; other values are converted to the
    option's kind and checked against its choices (``ValueError`` naming them). ``sigma``
    (blank = each method's default, else a number >= 0) goes to every method of
    ``methods`` (default: all registered ones).
    """
    options: dict[str, dict[str, Any]] = {}
    for method, given in values.items():
        spec = get_spec(method)
        name = get_method(method).name
        for key, value in given.items():
            option = spec.options[key]
            if _blank(value):
                continue
            if option.kind in (int, float) and not isinstance(value, bool):
                value = option.kind(float(value))
                if value == 0 and option.default is None:
                    continue
            label = option.label or f"{spec.display_name} {key}"
            try:
                option.check(key, value)
            except ValueError:
                raise ValueError(f"{label} must be one of {', '.join(map(str, option.choices or ()))}, got {value!r}") from None
            options.setdefault(name, {})[key] = value
    if not _blank(sigma):
        value = float(sigma)
        if not value >= 0:
            raise ValueError(f"smoothing sigma must be >= 0 (empty = each method's default), got {sigma}")
        for method in methods if methods is not None else list_methods():
            options.setdefault(get_method(method).name, {})["sigma"] = value
    return options


def unique_names(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(name, path)`` per file, names made unique by a counter: ``a.png``, ``a (2).png``."""
    named: dict[str, str] = {}
    for path in paths:
        file = Path(path)
        name, number = file.name, 1
        while name in named:
            number += 1
            name = f"{file.stem} ({number}){file.suffix}"
        named[name] = str(path)
    return list(named.items())


def check_batch_size(count: int, *, noun: str = "given") -> None:
    """``ValueError`` for no query image or more than ``limits.MAX_BATCH_QUERIES``."""
    if count > limits.MAX_BATCH_QUERIES:
        raise ValueError(
            f"{count} query images {noun}, at most {limits.MAX_BATCH_QUERIES} are accepted in one batch: "
            f"remove {count - limits.MAX_BATCH_QUERIES} of them."
        )


def methods_and_normals(methods: Sequence[str], normals: Sequence[Any] | None) -> tuple[list[str], list[LoadedImage]]:
    """Registered names of ``methods`` (deduplicated, in order) and the loaded normals,
    after checking that every method accepts that many normal images (the service's rule:
    ``ValueError`` naming the method)."""
    names = list(dict.fromkeys(get_method(method).name for method in methods))
    if not names:
        raise ValueError(f"choose at least one method ({', '.join(list_methods())})")
    loaded_normals = [load_image(image) for image in (normals or [])]
    for name in names:
        cls = get_method(name)
        check_method_normal_count(len(loaded_normals), cls.display_name, required=cls.requires_fit)
    return names, loaded_normals
