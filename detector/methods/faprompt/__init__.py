"""FAPrompt (ICCV 2025): fine-grained abnormality prompts for zero-shot anomaly detection.

``model.py`` holds the two-pass forward shared by inference and training, ``encoders.py`` the
V-V vision path and the prompted text tower, ``learner.py`` the learned prompt state (official
key layout) and its checkpoint files, ``prompts.py`` the templates and word prompts,
``config.py`` the official numbers, ``detector.py`` the registered adapter and ``train.py`` the
training command. Importing this package registers the ``"faprompt"`` method.
"""

from .config import DEFAULT_BACKBONE, DEFAULT_SIGMA, DEFAULT_WEIGHTS, OFFICIAL_IMAGE_SIZE, TEMPERATURE
from .detector import FAPromptDetector, PromptEvidence
from .encoders import DualPathVisionEncoder, PromptTextEncoder, dual_attention, method_image_size, num_deep_prompts, vv_start_block
from .learner import FAPromptLearner, expected_shapes, load_learner_state, shared_learner
from .model import (
    FAPromptModel,
    TextState,
    class_probabilities,
    class_text_features,
    combined_map,
    image_score,
    select_prior_tokens,
)
from .prompts import ABNORMAL_TEMPLATE, NORMAL_TEMPLATE, WORD_ABNORMALITY_PHRASES, WORD_NORMAL_PHRASE

__all__ = [
    "ABNORMAL_TEMPLATE",
    "DEFAULT_BACKBONE",
    "DEFAULT_SIGMA",
    "DEFAULT_WEIGHTS",
    "NORMAL_TEMPLATE",
    "OFFICIAL_IMAGE_SIZE",
    "TEMPERATURE",
    "WORD_ABNORMALITY_PHRASES",
    "WORD_NORMAL_PHRASE",
    "DualPathVisionEncoder",
    "FAPromptDetector",
    "FAPromptLearner",
    "FAPromptModel",
    "PromptEvidence",
    "PromptTextEncoder",
    "TextState",
    "class_probabilities",
    "class_text_features",
    "combined_map",
    "dual_attention",
    "expected_shapes",
    "image_score",
    "load_learner_state",
    "method_image_size",
    "num_deep_prompts",
    "select_prior_tokens",
    "shared_learner",
    "vv_start_block",
]
