"""Safe reading of weight files: safetensors, or ``torch.load(weights_only=True)``.

No file is ever unpickled with arbitrary classes. Every method reads its checkpoints
through ``read_state_dict`` and checks them with ``check_keys``, so a file that does not
fit raises ``CheckpointError`` naming the problem.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import CheckpointError
from .weights import resolve_path

#: Keys that OpenAI's CLIP archives carry besides the weights.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
#: Containers in which training scripts nest their state dict.
NESTING_KEYS = ("state_dict", "model_state", "model")


def is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript zip (OpenAI's released CLIP ``.pt`` files)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_safetensors_header(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (empty for other files)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # not a safetensors file
        return {}


def read_state_dict(path: str | os.PathLike, *, nested: Iterable[str] = NESTING_KEYS) -> dict[str, torch.Tensor]:
    """Tensors of a weight file, flattened to ``{name: tensor}``.

    Accepts safetensors, ``torch.save`` files (read with ``weights_only=True``, memory
    mapped where possible) and TorchScript archives (their state dict only). A dict nested
    under one of ``nested`` (e.g. ``{"model_state": ...}``) is unwrapped, and a leading
    ``module.`` (DataParallel) is removed. Non-tensor entries are dropped.
    """
    file = resolve_path(path)
    try:
        if _is_safetensors(file):
            from safetensors.torch import load_file

            state: Any = load_file(str(file))
        elif is_torchscript_archive(file):
            state = torch.jit.load(str(file), map_location="cpu").state_dict()
        else:
            state = _torch_load(file)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{file.name} holds Python objects other than tensors and was not loaded "
            f"(only safetensors or plain tensor files are accepted): {error}"
        ) from error
    except Exception as error:
        raise CheckpointError(f"cannot read weights from {file.name}: {error}") from error
    return flatten_state(state, nested=nested, name=file.name)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a method says about one of its checkpoint files (``Detector.inspect_checkpoint``),
    read without building a model.

    Attributes:
        path: the file.
        layout: which of the method's layouts it is, e.g. ``"official full"``, ``"heads only"``.
        key_groups: tensors per key group, e.g. ``{"heads": 44, "clip": 301}``.
        carries_backbone: the file holds the CLIP weights itself.
        facts: what its header records (shots, training set, epoch, ...), JSON-able.
    """

    path: str
    layout: str
    key_groups: Mapping[str, int]
    carries_backbone: bool = False
    facts: Mapping[str, Any] = field(default_factory=dict)


def key_groups(keys: Iterable[str], prefixes: Mapping[str, tuple[str, ...]] | None = None) -> dict[str, int]:
    """Count keys per group: the first group whose prefixes match, else the first dotted part."""
    counts: Counter[str] = Counter()
    for key in keys:
        group = next((name for name, starts in (prefixes or {}).items() if key.startswith(starts)), key.split(".", 1)[0])
        counts[group] += 1
    return dict(counts)


def state_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a weight file without reading its tensors where the format
    allows (safetensors); other files are memory mapped by ``read_state_dict``."""
    file = resolve_path(path)
    if _is_safetensors(file):
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                return list(handle.keys())
        except Exception as error:
            raise CheckpointError(f"cannot read weights from {file.name}: {error}") from error
    return list(read_state_dict(file))


def flatten_state(state: Any, *, nested: Iterable[str] = NESTING_KEYS, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap one nesting level and keep only tensors; see ``read_state_dict``."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{name} does not hold a state dict (found {type(state).__name__})")
    for key in nested:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        groups = sorted(str(k) for k, v in state.items() if isinstance(v, Mapping))
        if groups:
            raise CheckpointError(
                f"{name} holds no tensors at its top level, only the group(s) {', '.join(map(repr, groups[:5]))}, "
                f"which this model does not read (expected one of {', '.join(map(repr, nested))} or plain "
                "tensors): it is probably a checkpoint of another method"
            )
        raise CheckpointError(f"{name} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def check_keys(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    *,
    what: str,
    optional: Iterable[str] = (),
) -> None:
    """Raise ``CheckpointError`` unless ``state`` has exactly the ``expected`` keys and shapes.

    Keys in ``optional`` may be missing. The message names missing and unexpected keys and
    shape mismatches (at most 10 of each).
    """
    optional = set(optional)
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:10]) + (f" (+{len(items) - 10} more)" if len(items) > 10 else "")
                parts.append(f"{label} ({len(items)}): {shown}")
        raise CheckpointError(f"the checkpoint does not fit {what}: " + "; ".join(parts))


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any]) -> Path:
    """Write ``tensors`` with a JSON ``header`` (stored as safetensors metadata ``"detector"``)."""
    from safetensors.torch import save_file

    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(file), metadata={"detector": json.dumps(dict(header), sort_keys=True)})
    return file


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header written by ``save_safetensors`` (empty dict for other files)."""
    metadata = read_safetensors_header(resolve_path(path))
    try:
        return dict(json.loads(metadata.get("detector", "{}")))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"malformed header in {path}: {error}") from error


def _is_safetensors(file: Path) -> bool:
    if file.suffix == ".safetensors":
        return True
    with open(file, "rb") as handle:
        head = handle.read(9)
    # safetensors files start with an 8-byte little-endian header length and then "{".
    return len(head) == 9 and head[8:9] == b"{"


def _torch_load(file: Path) -> Any:
    mmap = zipfile.is_zipfile(file)
    return torch.load(str(file), map_location="cpu", weights_only=True, mmap=mmap)
