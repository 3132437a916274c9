"""Building open_clip backbones: weights resolution, input resolution, intermediate tokens.

Weights are resolved in one place (docs/api.md §11):

* ``"random"``: the architecture at a fixed random initialisation (seed 0);
* a pretrained tag of open_clip (e.g. ``"laion400m_e32"``, ``"openai"``): the file comes
  from the Hugging Face cache, or is downloaded when the network allows; offline
  (``HF_HUB_OFFLINE=1``) or unreachable it raises ``WeightsUnavailableError`` at once;
* a local file (open_clip or OpenAI key layout; ``.pt``, ``.pth``, ``.bin``,
  ``.safetensors``, any extension; OpenAI TorchScript archives included);
* ``"hf-hub:<org>/<repo>/<file>"``: a file through the Hugging Face cache.

The temperature ``logit_scale`` starts at ``ln 100``, the value every released CLIP
checkpoint holds (training clamps it there), instead of open_clip's ``ln(1/0.07)`` for a
fresh model: a random backbone, or a weights file without ``logit_scale``, then scores at
the temperature a method meets with real weights. No other parameter depends on it.

Built backbones are cached per process (keyed by name, weights, size, device and
precision) and shared read-only: every parameter has ``requires_grad=False`` and the
model is in eval mode. Methods never modify a shared backbone.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F

from . import limits
from .artefacts import tensor_digest
from .checkpoints import OPENAI_META_KEYS, check_keys, read_state_dict
from .weights import TINY_TEST, is_random as is_random_weights, weights_file

_CONFIG_DIR = Path(__file__).parent / "configs"
TRAINED_LOGIT_SCALE = math.log(100.0)
"""``logit_scale`` of every released CLIP checkpoint: tau = exp(logit_scale) = 100."""


def register_model_configs() -> None:
    """Make the package's own open_clip configs (``tiny-test``) known to open_clip."""
    if TINY_TEST not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


register_model_configs()


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that identifies one built backbone.

    Attributes:
        model_name: open_clip model name, e.g. ``"ViT-B-16-plus-240"`` or ``"tiny-test"``.
        weights: ``"random"``, a pretrained tag, a file path or ``"hf-hub:..."``.
        image_size: input side in pixels; ``None`` keeps the config's. A different size
            resizes the positional embedding once (``pos_embed_mode``).
        device: torch device string.
        precision: ``"fp32"`` (default) or ``"bf16"`` (opt-in, changes numbers).
        quick_gelu: build with QuickGELU (always for OpenAI weights).
        pos_embed_mode: interpolation of the positional-embedding resize,
            ``"bilinear"`` (FAPrompt's official behaviour, align_corners=False, no antialias).
        ignore_prefixes: key prefixes of a weights file that belong to a method, not CLIP
            (e.g. InCTRL's heads inside its full checkpoint).
    """

    model_name: str
    weights: str = "random"
    image_size: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    quick_gelu: bool = False
    pos_embed_mode: str = "bilinear"
    ignore_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Backbone:
    """A built, frozen open_clip CLIP model with the facts methods need.

    Attributes:
        model: the ``open_clip.CLIP`` module (eval, no gradients).
        tokenizer: open_clip tokenizer of the model (context length 77).
        spec: how it was built.
        weights_description: human-readable origin of the weights.
        is_random: True when no pretrained weights are loaded.
    """

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    spec: BackboneSpec
    weights_description: str
    is_random: bool

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def image_size(self) -> int:
        return int(self.model.visual.image_size[0])

    @property
    def patch_size(self) -> int:
        return int(self.model.visual.patch_size[0])

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.model.visual.grid_size)

    @property
    def num_vision_blocks(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def num_text_blocks(self) -> int:
        return len(self.model.transformer.resblocks)

    @property
    def vision_width(self) -> int:
        return int(self.model.visual.conv1.out_channels)

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.embedding_dim)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    def map_block_index(self, index: int, official_blocks: int) -> int:
        """Map an official 0-based block index of an ``official_blocks``-block model onto
        this model: ``round(index * L / official_blocks)`` (docs/api.md §10)."""
        blocks = self.num_vision_blocks
        if blocks == official_blocks:
            return index
        return min(blocks - 1, int(round(index * blocks / official_blocks)))

    def map_text_block_index(self, index: int, official_blocks: int) -> int:
        """As ``map_block_index`` for the text tower."""
        blocks = self.num_text_blocks
        if blocks == official_blocks:
            return index
        return min(blocks - 1, int(round(index * blocks / official_blocks)))

    def intermediate_tokens(self, images: torch.Tensor, indices: Sequence[int]) -> dict[str, Any]:
        """Run the vision tower once, keeping the residual stream of chosen blocks.

        Args:
            images: ``(B, 3, S, S)`` normalised input at ``self.image_size``.
            indices: 0-based block indices.

        Returns:
            ``{"patch_tokens": [ (B, N, W) per index ], "cls_tokens": [ (B, 1, W) ],
            "image_features": (B, E)}`` where N = grid cells (row-major), W = vision width,
            E = joint embedding dim; tokens are raw (no ``ln_post``, no projection) and
            ``image_features`` is CLS -> ``ln_post`` -> ``proj``, not normalised.
        """
        out = self.model.visual.forward_intermediates(
            images.to(self.device, self.dtype),
            indices=list(indices),
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return {
            "patch_tokens": out["image_intermediates"],
            "cls_tokens": out["image_intermediates_prefix"],
            "image_features": out["image_features"],
        }

    def encode_text_to_end(self, token_ids: torch.Tensor) -> torch.Tensor:
        """open_clip's ``encode_text`` (not normalised) run only up to the batch's last
        end-of-text position: ``(T, 77)`` ids -> ``(T, E)``.

        The text tower's attention is causal, so the features at each prompt's end token do
        not depend on the positions after it; cutting them saves most of the work (the
        InCTRL prompts end by position 17 of 77). Pools at the end token (``argmax`` of the
        ids, open_clip's ``text_pool_type="argmax"``).
        """
        clip = self.model
        if getattr(clip, "text_pool_type", "argmax") != "argmax":
            return clip.encode_text(token_ids, normalize=False)
        cast_dtype = clip.transformer.get_cast_dtype()
        ends = token_ids.argmax(dim=-1)
        length = int(ends.max()) + 1
        x = clip.token_embedding(token_ids[:, :length]).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
        mask = clip.attn_mask[:length, :length] if getattr(clip, "attn_mask", None) is not None else None
        x = clip.ln_final(clip.transformer(x, attn_mask=mask))
        pooled = x[torch.arange(x.shape[0], device=x.device), ends]
        projection = clip.text_projection
        return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``(T, 77)`` on the backbone's device."""
        return self.tokenizer(list(texts)).to(self.device)


def is_openai_weights(weights: str | None) -> bool:
    return str(weights).lower() == "openai"


def load_backbone(
    model_name: str,
    weights: str | os.PathLike = "random",
    *,
    image_size: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
    pos_embed_mode: str = "bilinear",
    ignore_prefixes: Sequence[str] = (),
) -> Backbone:
    """Build (or fetch from the process cache) a frozen open_clip backbone.

    ``quick_gelu=None`` means: QuickGELU exactly when the weights are OpenAI's.
    Raises ``WeightsUnavailableError`` for a tag that is neither cached nor downloadable,
    ``CheckpointError`` for a weights file that does not fit, ``ValueError`` for an
    unknown model name or tag.
    """
    register_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown backbone {model_name!r}; open_clip knows e.g. {TINY_TEST!r}, 'ViT-B-16', 'ViT-L-14-336'")
    weights = str(weights)
    if quick_gelu is None:
        quick_gelu = is_openai_weights(weights) or model_name.endswith("-quickgelu")
    spec = BackboneSpec(
        model_name=model_name,
        weights=weights,
        image_size=image_size,
        device=str(device),
        precision=precision,
        quick_gelu=bool(quick_gelu),
        pos_embed_mode=pos_embed_mode,
        ignore_prefixes=tuple(ignore_prefixes),
    )
    return _build_cached(spec, _file_identity(weights))


def describe_weights(backbone: Backbone) -> str:
    return backbone.weights_description


def clear_backbone_cache() -> None:
    """Drop every cached backbone (tests and long-running tools)."""
    _build_cached.cache_clear()


def _file_identity(weights: str) -> tuple:
    """Part of the cache key that changes when a weights file changes on disk."""
    path = Path(weights).expanduser()
    if path.is_file():
        stat = path.stat()
        return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return ()


@functools.lru_cache(maxsize=limits.BACKBONE_CACHE_SIZE)
def _build_cached(spec: BackboneSpec, _identity: tuple) -> Backbone:
    model_name = spec.model_name
    weights = spec.weights
    is_random = is_random_weights(weights)
    # Resolve the weights before building, so a missing file fails fast.
    state = None if is_random else read_state_dict(weights_file(model_name, weights))
    create_kwargs = dict(
        precision="fp32",
        device="cpu",
        force_quick_gelu=spec.quick_gelu,
        pretrained_text=False,
        init_logit_scale=TRAINED_LOGIT_SCALE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(model_name, pretrained=None, **create_kwargs)

    if state is None:
        description = "random initialisation (seed 0): scores are meaningless"
    else:
        load_clip_state_dict(model, state, ignore_prefixes=spec.ignore_prefixes, source=str(weights))
        del state
        description = f"{model_name} / {weights}" if not Path(weights).expanduser().is_file() else f"{model_name} / file {weights}"

    if spec.image_size is not None and spec.image_size != model.visual.image_size[0]:
        resize_vision_input(model, spec.image_size, mode=spec.pos_embed_mode)
    model.to(device=spec.device)
    if spec.precision == "bf16":
        model.to(dtype=torch.bfloat16)
    elif spec.precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {spec.precision!r}")
    model.eval()
    model.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    return Backbone(model=model, tokenizer=tokenizer, spec=spec, weights_description=description, is_random=is_random)


def load_clip_state_dict(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    ignore_prefixes: Sequence[str] = (),
    source: str = "weights",
) -> None:
    """Load a CLIP state dict (open_clip or OpenAI key layout) strictly into ``model``.

    OpenAI's meta keys are dropped; keys under ``ignore_prefixes`` are skipped;
    ``logit_scale``/``logit_bias`` may be missing (some method files have none). A
    positional embedding saved at another grid is refused (the method resizes after
    loading). Anything else that does not fit raises ``CheckpointError``.
    """
    state = {
        k: v
        for k, v in state.items()
        if k not in OPENAI_META_KEYS and not any(k.startswith(p) for p in ignore_prefixes)
    }
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if "logit_scale" in state and state["logit_scale"].ndim != expected["logit_scale"].__len__():
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"])
    check_keys(state, expected, what=f"the {type(model).__name__} backbone ({source})", optional=("logit_scale", "logit_bias"))
    with torch.no_grad():
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


def resize_vision_input(model: torch.nn.Module, image_size: int, *, mode: str = "bilinear") -> None:
    """Let the vision tower take ``image_size`` inputs by resizing its positional embedding.

    The patch rows, laid out on the stored ``g x g`` grid, are interpolated to the new grid
    with ``F.interpolate(mode, align_corners=False)`` and no antialias, as FAPrompt's
    official code does on its first forward; the CLS row is kept. The parameter is replaced
    permanently (shape ``(1 + G*G, W)``).
    """
    visual = model.visual
    patch = int(visual.patch_size[0])
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    old_grid = int(visual.grid_size[0])
    new_grid = image_size // patch
    pos = visual.positional_embedding.data
    cls_row, patch_rows = pos[:1], pos[1:]
    width = patch_rows.shape[-1]
    if patch_rows.shape[0] != old_grid * old_grid:
        raise ValueError("positional embedding does not match the vision grid")
    grid = patch_rows.reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
    align = {} if mode in {"nearest", "area"} else {"align_corners": False}
    resized = F.interpolate(grid.float(), size=(new_grid, new_grid), mode=mode, **align)
    new_rows = resized.permute(0, 2, 3, 1).reshape(new_grid * new_grid, width).to(pos.dtype)
    visual.positional_embedding = torch.nn.Parameter(torch.cat([cls_row, new_rows], dim=0), requires_grad=False)
    visual.image_size = (image_size, image_size)
    visual.grid_size = (new_grid, new_grid)


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def grid_side(num_patches: int) -> int:
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    return side


@functools.lru_cache(maxsize=limits.BACKBONE_CACHE_SIZE)
def weights_digest(backbone: Backbone) -> str:
    """``artefacts.tensor_digest`` of the backbone's CLIP weights, computed once per built
    backbone (about 2 s for ``ViT-B-16-plus-240`` on 2 cores). Compared with the
    ``clip_sha256`` a converted checkpoint records (docs/inctrl.md §5)."""
    return tensor_digest(backbone.model.state_dict())
