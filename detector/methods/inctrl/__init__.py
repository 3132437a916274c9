"""InCTRL (CVPR 2024): in-context residual learning with few-shot normal prompts.

``model.py`` holds the ``nn.Module``s and the forward shared by inference and training,
``detector.py`` the registered adapter, ``prompts.py`` the text prompts, ``checkpoint.py``
the checkpoint layouts and ``train.py`` the training command. Importing this package
registers the ``"inctrl"`` method.
"""

from .checkpoint import HEAD_PREFIXES, InCTRLCheckpoint, checkpoint_header, head_state_shapes, split_checkpoint
from .detector import DEFAULT_BACKBONE, DEFAULT_WEIGHTS, OFFICIAL_IMAGE_SIZE, InCTRLDetector
from .model import (
    Adapter,
    InCTRLHeads,
    InCTRLModel,
    InCTRLScores,
    TransformerBasicHead,
    block_indices,
    encode_images,
    encode_texts,
    l2_normalize,
    patch_residual,
    patch_residual_map,
    pool_normals,
    text_prior_features,
    text_prior_score,
    training_free_score,
)
from .prompts import prompt_texts

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_WEIGHTS",
    "HEAD_PREFIXES",
    "OFFICIAL_IMAGE_SIZE",
    "Adapter",
    "InCTRLCheckpoint",
    "InCTRLDetector",
    "InCTRLHeads",
    "InCTRLModel",
    "InCTRLScores",
    "TransformerBasicHead",
    "block_indices",
    "checkpoint_header",
    "encode_images",
    "encode_texts",
    "head_state_shapes",
    "l2_normalize",
    "patch_residual",
    "patch_residual_map",
    "pool_normals",
    "prompt_texts",
    "split_checkpoint",
    "text_prior_features",
    "text_prior_score",
    "training_free_score",
]
