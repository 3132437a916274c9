"""AnoPLe's predict-time image path: the prompted vision pass as a module for the runtime.

At predict time AnoPLe runs one prompted pass of the frozen vision tower over each query
(``model.prompted_features``). What a fit learns enters that pass only through the
effective visual prompts ``P^v_j`` (``(n_v, D_v)`` per prompted block j), so the module
takes them as inputs next to the images instead of holding them: the exported model does
not depend on a fit, and a new fit (new prompts) runs on the model already converted.
Its weights are the vision tower's alone (the learner, decoder and memory bank stay in
PyTorch, outside the path).

Signature, in ``layout`` order::

    forward(images (B, 3, S, S), P^v_j (n_v, D_v) for j in visual_blocks)
      -> (g (B, E) unit,
          u_l (B, N, E) for l in decoder_levels,
          f^l (B, N, D_v) unit for l in memory_levels)

``split_outputs`` turns that tuple back into ``QueryFeatures``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ...runtime import TensorInput
from .config import BlockLayout
from .encoders import PromptedCLIP
from .model import QueryFeatures, prompted_features


def path_name(layout: BlockLayout) -> str:
    """The image path's name: which blocks take prompts and which levels it returns."""

    def blocks(values: Sequence[int]) -> str:
        return "-".join(str(int(v)) for v in values) or "none"

    return (
        f"anople.prompted-v{blocks(layout.visual_blocks)}"
        f".dec{blocks(layout.decoder_levels)}.mem{blocks(layout.memory_levels)}"
    )


def output_names(layout: BlockLayout) -> tuple[str, ...]:
    """Names of the outputs, in order: ``image``, ``patches_<l>``..., ``memory_<l>``..."""
    return ("image", *(f"patches_{l}" for l in layout.decoder_levels), *(f"memory_{l}" for l in layout.memory_levels))


def split_outputs(layout: BlockLayout, outputs: Sequence[torch.Tensor]) -> QueryFeatures:
    """``QueryFeatures`` from the path's output tuple (``output_names`` order)."""
    decoder, memory = layout.decoder_levels, layout.memory_levels
    if len(outputs) != 1 + len(decoder) + len(memory):
        raise ValueError(f"AnoPLe's image path gives {1 + len(decoder) + len(memory)} outputs, got {len(outputs)}")
    patches = dict(zip(decoder, outputs[1 : 1 + len(decoder)]))
    return QueryFeatures(image=outputs[0], patches=patches, memory=dict(zip(memory, outputs[1 + len(decoder) :])))


class AnoPLeImagePath(nn.Module):
    """The prompted vision pass with a fixed signature (module docstring).

    The vision tower is registered (its weights are the module's parameters, for export
    and the weights fingerprint); nothing of it is modified and nothing learned is held.

    Args:
        clip: the prompted wrapper of the frozen, shared CLIP.
        layout: the block layout of the detector's preset on this backbone.
        n_visual: visual context length n_v (rows of each prompt).
    """

    def __init__(self, clip: PromptedCLIP, layout: BlockLayout, n_visual: int) -> None:
        super().__init__()
        self.visual = clip.visual
        self.__dict__["clip"] = clip
        self.layout = layout
        self.prompt_shape = (int(n_visual), int(clip.visual.conv1.out_channels))

    def inputs(self) -> tuple[TensorInput, ...]:
        """One ``(n_v, D_v)`` input per prompted block, in block order."""
        return tuple(TensorInput(f"visual_prompt_{j}", self.prompt_shape) for j in self.layout.visual_blocks)

    def forward(self, images: torch.Tensor, *prompts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``images (B, 3, S, S)``, ``prompts`` ``(n_v, D_v)`` each -> the outputs above."""
        if len(prompts) != len(self.layout.visual_blocks):
            raise ValueError(f"AnoPLe's image path takes {len(self.layout.visual_blocks)} prompts, got {len(prompts)}")
        features = prompted_features(self.clip, self.layout, images, dict(zip(self.layout.visual_blocks, prompts)))
        return (
            features.image,
            *(features.patches[l] for l in self.layout.decoder_levels),
            *(features.memory[l] for l in self.layout.memory_levels),
        )
