"""What InCTRL knows about its checkpoint files (docs/inctrl.md §5).

The official files are ``torch.save``d flat state dicts of 345 keys: the CLIP
``ViT-B-16-plus-240`` weights plus the 44 head keys under ``adapter.``, ``diff_head.`` and
``diff_head_ref.`` (sometimes nested under ``model_state``). Our own training output holds the
head keys alone, as safetensors with a JSON header (``checkpoint_header``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...calibration import Calibration
from ...checkpoints import CheckpointInfo, key_groups, read_header, read_state_dict, state_keys
from ...errors import CheckpointError
from .model import InCTRLHeads

#: Registered name (the ``method`` field of our checkpoint headers).
METHOD_NAME = "inctrl"
#: Key prefixes of the learned parts inside an official checkpoint.
HEAD_PREFIXES = ("adapter.", "diff_head.", "diff_head_ref.")
#: Header entries ``inspect_checkpoint`` reports (training output and converted files).
FACT_KEYS = (
    "shots", "dataset", "categories", "epoch", "backbone", "trained_on", "trained_on_set",
    "source_file", "source_sha256", "clip_sha256", "clip_file", "clip_equals",
)


@dataclass(frozen=True)
class InCTRLCheckpoint:
    """What an InCTRL checkpoint holds: its header, the 44 head tensors, whether the file
    also carries CLIP weights (the official full files do), and a stored calibration."""

    path: Path
    header: dict[str, Any]
    head_state: dict[str, torch.Tensor]
    carries_clip: bool
    calibration: Calibration | None = None


def head_state_shapes(heads: InCTRLHeads) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in heads.state_dict().items()}


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(head keys, other keys)`` of a checkpoint state dict."""
    heads = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    others = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    return heads, others


def checkpoint_header(
    *, backbone: str, shots: int, epoch: int, calibration: Calibration | None = None, **extra: Any
) -> dict[str, Any]:
    """JSON header of our own InCTRL training output."""
    header: dict[str, Any] = {"method": METHOD_NAME, "backbone": backbone, "shots": int(shots), "epoch": int(epoch)}
    if calibration is not None:
        header["calibration"] = calibration.to_dict()
    header.update(extra)
    return header


def read_checkpoint(path: Path) -> InCTRLCheckpoint:
    """Read an official or own InCTRL file; ``CheckpointError`` for another method's file or
    a file without head keys."""
    header = read_header(path)
    if header and header.get("method", METHOD_NAME) != METHOD_NAME:
        raise CheckpointError(f"{path.name} was written for method {header.get('method')!r}, not {METHOD_NAME!r}")
    head_state, clip_state = split_checkpoint(read_state_dict(path))
    if not head_state:
        shown = ", ".join(sorted(clip_state)[:10])
        raise CheckpointError(
            f"{path.name} holds no InCTRL head keys (adapter.*, diff_head.*, diff_head_ref.*); "
            f"found {len(clip_state)} other keys: {shown}"
        )
    calibration = Calibration(**{**header["calibration"], "source": "stored"}) if "calibration" in header else None
    return InCTRLCheckpoint(path, header, head_state, carries_clip=bool(clip_state), calibration=calibration)


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Layout, key groups and header facts of an InCTRL file, from its keys alone."""
    groups = key_groups(state_keys(path), {"heads": HEAD_PREFIXES})
    carries_clip = any(name != "heads" for name in groups)
    header = read_header(path)
    if carries_clip:
        layout = "official full (CLIP + heads)"
    elif header.get("source_file"):
        layout = "heads with header (converted from " + str(header["source_file"]) + ")"
    elif header:
        layout = "heads with header (own training output)"
    else:
        layout = "heads only"
    facts = {key: header[key] for key in FACT_KEYS if key in header}
    return CheckpointInfo(str(path), layout, groups, carries_clip, facts)
