"""FAPrompt's official numbers as data: backbone, sizes, block ranges, prompt shapes, options
(facts from the official code, docs/faprompt.md)."""

from __future__ import annotations

#: Official backbone: open_clip model name, pretrained tag and input side.
DEFAULT_BACKBONE = "ViT-L-14-336"
DEFAULT_WEIGHTS = "openai"
OFFICIAL_IMAGE_SIZE = 518
OFFICIAL_CONFIG_SIZE = 336
#: V-V attention from this 0-based block of the official 24-block vision tower on
#: (``DAPM_replace(DPAM_layer=20)`` replaces the last 19 blocks).
OFFICIAL_VV_START = 5
OFFICIAL_VISION_BLOCKS = 24
#: Deep text prompts: ``depth=9`` gives 8 tensors for text blocks 1..8 of 12.
OFFICIAL_DEEP_PROMPTS = 8
OFFICIAL_TEXT_BLOCKS = 12
#: Tokens per deep prompt (``t_n_ctx``), written at token positions 1..4.
DEEP_PROMPT_TOKENS = 4
#: Learned context tokens: 5 normal ones (all prompts), 2 per abnormal prompt, 10 abnormal prompts.
NORMAL_CONTEXT_TOKENS = 5
ABNORMAL_CONTEXT_TOKENS = 2
NUM_ABNORMAL_PROMPTS = 10
#: Patches fed to the abnormality prior (``k``).
PRIOR_PATCHES = 10
#: Width of the unused ``compound_prompt_projections`` (hard-coded in the official code).
UNUSED_PROJECTION_WIDTH = 896
#: Fixed softmax temperature of every similarity (not CLIP's ``logit_scale``).
TEMPERATURE = 0.07
#: Default Gaussian sigma of ``anomaly_map`` in model-input pixels (official ``--sigma 10``).
DEFAULT_SIGMA = 10.0
PROMPTS_OPTIONS = ("auto", "learned", "words")
PRIOR_OPTIONS = ("first", "topk")
#: ``"fp32"`` (default, the official numbers) or ``"bf16"`` (opt-in: backbone and prompt state
#: in bfloat16; changes the numbers, and is only faster on CPUs with native bf16 matmuls).
PRECISION_OPTIONS = ("fp32", "bf16")
#: Registered name (the ``method`` field of our checkpoint headers).
METHOD_NAME = "faprompt"
