"""Where pretrained weights come from, in one place (docs/api.md §11).

* ``resolve_default_weights``: the tag to use when a caller leaves ``backbone_weights`` unset;
* ``weights_file``: the local file behind a tag, a path or an ``hf-hub:`` address, from the
  Hugging Face cache or downloaded when the network allows;
* ``availability_problem``: without downloading or building anything, why weights would
  not be available (what the app's start-up banner says).

Offline (``HF_HUB_OFFLINE=1``) or unreachable, a tag that is not cached raises
``WeightsUnavailableError`` at once, saying how to provide the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import open_clip

from .errors import CheckpointError, WeightsUnavailableError

#: The package's tiny random CLIP (registered with open_clip by ``detector.backbone``).
TINY_TEST = "tiny-test"
#: File names open_clip uses inside a Hugging Face repository, in the order tried.
HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: Endings that mark a weights argument as a file name even when it does not exist.
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".pyth")
RANDOM = "random"

HOW_TO_PROVIDE = (
    "Provide the weights in one of these ways: run once with network access so the file lands in the "
    "Hugging Face cache (HF_HOME), pass a local file with backbone_weights=PATH (--backbone-weights PATH), "
    "or use backbone_weights='random' for a run whose scores mean nothing."
)


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


def is_random(weights: str | os.PathLike | None) -> bool:
    return str(weights).lower() == RANDOM


def hub_file(repo_id: str, filename: str) -> Path:
    """A file from the Hugging Face cache, downloaded if the network allows.

    Honours ``HF_HUB_OFFLINE``; raises ``WeightsUnavailableError`` with instructions when
    the file is neither cached nor reachable.
    """
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:
        pass
    if is_offline():
        raise WeightsUnavailableError(
            f"{repo_id}/{filename} is not in the Hugging Face cache and HF_HUB_OFFLINE is set. " + HOW_TO_PROVIDE
        )
    try:
        return Path(hf_hub_download(repo_id, filename, etag_timeout=5))
    except Exception as error:
        raise WeightsUnavailableError(
            f"could not download {repo_id}/{filename} ({type(error).__name__}: {error}). " + HOW_TO_PROVIDE
        ) from error


def split_hub_address(address: str) -> tuple[str, str]:
    """``"hf-hub:<org>/<repo>/<file>"`` -> ``(repo_id, filename)``; ``CheckpointError`` otherwise."""
    repo_id, _, filename = address[len("hf-hub:"):].rpartition("/")
    if not address.startswith("hf-hub:") or not repo_id or "/" not in repo_id or not filename:
        raise CheckpointError(f"expected 'hf-hub:<org>/<repo>/<file>', got {address!r}")
    return repo_id, filename


def resolve_path(path: str | os.PathLike) -> Path:
    """A local file path, or a file fetched through the Hugging Face cache for
    ``"hf-hub:<org>/<repo>/<file>"``. A missing local file raises ``CheckpointError``."""
    text = str(path)
    if text.startswith("hf-hub:"):
        return hub_file(*split_hub_address(text))
    file = Path(text).expanduser()
    if not file.is_file():
        raise CheckpointError(f"checkpoint file not found: {file}")
    return file


def _config_name(model_name: str) -> str:
    return model_name[: -len("-quickgelu")] if model_name.endswith("-quickgelu") else model_name


def hub_location(model_name: str, tag: str) -> tuple[str, tuple[str, ...]] | None:
    """``(repo_id, candidate file names)`` of an open_clip pretrained tag, ``None`` when
    the tag has no Hugging Face source. ``ValueError`` for a tag open_clip does not know."""
    config_name = _config_name(model_name)
    cfg = open_clip.get_pretrained_cfg(config_name, tag) or open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(config_name)
        raise ValueError(
            f"{tag!r} is neither a file nor a pretrained tag of {model_name}; known tags: {tags or 'none'}, or 'random'"
        )
    hub_id = str(cfg.get("hf_hub", "")).rstrip("/")
    if not hub_id:
        return None
    if hub_id.count("/") >= 2:
        repo_id, filename = hub_id.rsplit("/", 1)
        return repo_id, (filename,)
    return hub_id, HUB_WEIGHT_FILES


def _names_a_file(weights: str) -> bool:
    return weights.startswith("hf-hub:") or any(sep in weights for sep in ("/", "\\")) or Path(weights).suffix in WEIGHT_FILE_SUFFIXES


def weights_file(model_name: str, weights: str) -> Path:
    """Local path of the weights named by a tag, a file path or ``hf-hub:``."""
    if weights.startswith("hf-hub:"):
        return resolve_path(weights)
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if _names_a_file(weights):
        raise CheckpointError(f"backbone weights file not found: {path}")
    location = hub_location(model_name, weights)
    if location is None:
        raise WeightsUnavailableError(f"{model_name}/{weights} has no Hugging Face source. " + HOW_TO_PROVIDE)
    repo_id, candidates = location
    errors = []
    for candidate in candidates:
        try:
            return hub_file(repo_id, candidate)
        except WeightsUnavailableError as error:
            errors.append(error)
    raise errors[-1]


def resolve_default_weights(model_name: str, weights: str | None, *, default_model: str, default_weights: str) -> str:
    """The weights to use when the caller left ``backbone_weights`` as ``None``.

    The method's official tag for its official model; ``"random"`` for ``tiny-test``
    (it has no pretrained weights); the official tag for another model if open_clip knows
    that tag for it; otherwise a ``ValueError`` asking for explicit weights.
    """
    if weights is not None:
        return str(weights)
    if model_name == TINY_TEST:
        return RANDOM
    if model_name == default_model or open_clip.get_pretrained_cfg(model_name, default_weights):
        return default_weights
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise ValueError(
        f"no default weights for backbone {model_name!r}: pass backbone_weights "
        f"(one of {tags or 'no known tags'}, a file path, or 'random')"
    )


@dataclass(frozen=True)
class MissingWeights:
    """Pretrained weights that are not in the local cache.

    Attributes:
        message: what is missing, for people.
        blocking: they cannot be had now (offline, or the cache cannot be read), so a
            run falls back to random weights; otherwise they download on first use.
    """

    message: str
    blocking: bool

    def __str__(self) -> str:
        return self.message


def availability_problem(model_name: str, weights: str) -> MissingWeights | None:
    """Why ``weights`` of ``model_name`` are not available without a download, or ``None``
    (random, a file, an ``hf-hub:`` address, or a tag whose file is in the cache)."""
    if is_random(weights) or _names_a_file(str(weights)) or os.path.isfile(os.path.expanduser(str(weights))):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        try:
            location = hub_location(model_name, str(weights))
        except ValueError:  # an unknown tag: building the backbone says so clearly
            return None
        if location is None:
            return None
        repo_id, candidates = location
        if any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in candidates):
            return None
    except Exception as error:  # a broken cache must not stop start-up
        return MissingWeights(f"could not check the cache ({type(error).__name__})", blocking=True)
    if is_offline():
        return MissingWeights(f"{model_name} / {weights} is not in the Hugging Face cache and HF_HUB_OFFLINE is set", True)
    return MissingWeights(f"{model_name} / {weights} is not in the Hugging Face cache yet (download on first use)", False)
