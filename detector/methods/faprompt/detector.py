"""The registered FAPrompt adapter: the shared pipeline's hooks around ``FAPromptModel``.

Zero-shot FAPrompt on OpenAI ``ViT-L-14-336`` at 518 px (docs/faprompt.md): the forward
lives in ``model.py``, the encoders in ``encoders.py``, the prompt state and its checkpoint
files in ``learner.py``, the prompts in ``prompts.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...base import BackboneChoice, Detector, MethodOutput, PreparedBatch, ProgressCallback
from ...artefacts import Converted, ConvertRequest, MethodArtefacts
from ...checkpoints import CheckpointInfo
from ...registry import register_method
from ...runtime import ImagePath
from ...results import Box, DetectionResult, Explanation, PromptSimilarity
from ...spec import MethodSpec, Option, RelativeCost
from ...weights import resolve_path
from .config import DEFAULT_BACKBONE, DEFAULT_SIGMA, DEFAULT_WEIGHTS, PRECISION_OPTIONS, PRIOR_OPTIONS, PROMPTS_OPTIONS
from .encoders import method_image_size, quick_gelu_for
from . import artefacts as published
from .learner import FAPromptLearner, inspect_checkpoint, load_learner_state, shared_learner
from .model import FAPromptImagePath, FAPromptModel, TextState
from .prompts import WORD_ABNORMALITY_PHRASES


@dataclass(frozen=True)
class PromptEvidence:
    """What ``explain`` reads: the query's V-V patch features ``(N, E)`` and the normalised
    prompt features ``(11, E)`` (row 0 normal, rows 1..10 the pass-2 abnormal prompts)."""

    patch_features: np.ndarray
    prompt_features: np.ndarray


@register_method("FAPrompt")
class FAPromptDetector(Detector):
    """Zero-shot FAPrompt (see the module docstring). ``fit`` is optional and never changes
    scores; normals given to it are only scored as queries for calibration."""

    spec = MethodSpec(
        display_name="FAPrompt",
        default_backbone=DEFAULT_BACKBONE,
        default_weights=DEFAULT_WEIGHTS,
        resize="squash",
        default_sigma=DEFAULT_SIGMA,
        needs_normals=False,
        trained_offline=True,
        training_module="detector.methods.faprompt.train",
        options={
            "prompts": Option("auto", PROMPTS_OPTIONS, help="learned prompts (auto = when a checkpoint is loaded) or word prompts"),
            "prior_patches": Option("first", PRIOR_OPTIONS, help="official first-ten-patches quirk or the corrected top-k"),
            "precision": Option("fp32", PRECISION_OPTIONS, help="fp32 (official numbers) or opt-in bf16"),
        },
        colour=(255, 160, 0),
        cost=RelativeCost(predict=19.0, fit_per_normal=0.0, calibration_per_normal=19.0),
        checkpoint_sets=True,
    )

    # -- construction hooks ---------------------------------------------------------------
    def _validate(self) -> None:
        if self.options["prompts"] == "learned" and self.checkpoint is None:
            raise ValueError("prompts='learned' needs a checkpoint (FAPrompt prompt-learner file)")

    def _backbone_choice(self, backbone: str | None, backbone_weights: str | None, artefact: Any) -> BackboneChoice:
        """The official backbone at 518 px (or the same enlargement of another model),
        QuickGELU on the official model and on tiny-test whatever the weights."""
        choice = super()._backbone_choice(backbone, backbone_weights, artefact)
        model_name = choice.model_name
        return BackboneChoice(
            model_name,
            choice.weights,
            image_size=method_image_size(model_name),
            precision=self.options["precision"],
            quick_gelu=quick_gelu_for(model_name),
        )

    @classmethod
    def inspect_checkpoint(cls, path: str | Path) -> CheckpointInfo:
        return inspect_checkpoint(resolve_path(path))

    @classmethod
    def artefacts(cls) -> MethodArtefacts:
        return published.artefacts()

    @classmethod
    def convert_checkpoint(cls, source: Path, out_dir: Path, request: ConvertRequest) -> Converted:
        return published.convert(source, out_dir, request, default_backbone=DEFAULT_BACKBONE)

    def _build(self, artefact: Path | None) -> None:
        visual = self.backbone.visual
        model_name = self.backbone.spec.model_name
        is_vit_clip = hasattr(visual, "transformer") and getattr(visual, "proj", None) is not None
        if not is_vit_clip or not hasattr(self.backbone.model, "token_embedding"):
            raise ValueError(
                f"FAPrompt needs a ViT CLIP with a projected CLS token and a text tower; {model_name} is not one"
            )
        self.precision = self.options["precision"]
        self.prior_patches = self.options["prior_patches"]
        what = f"the FAPrompt prompt learner of {model_name}"
        self.checkpoint_header: dict[str, Any] = {}
        self.learned = artefact is not None and self.options["prompts"] != "words"
        self.word_ids: dict[str, Any] | None = None
        if self.learned:
            learner, self.checkpoint_header = shared_learner(self.backbone, artefact, what=what)
        else:
            if artefact is not None:  # checked and described, though the word prompts run
                self.checkpoint_header = load_learner_state(FAPromptLearner.for_backbone(self.backbone), artefact, what=what)
            learner = FAPromptLearner.for_backbone(self.backbone)
            learner.set_template_buffers(self.backbone)
            self.word_ids = learner.set_word_context(self.backbone)
            learner.to(self.backbone.device, dtype=self.backbone.dtype).eval().requires_grad_(False)
        self.model = FAPromptModel(
            self.backbone, learner, use_deep_prompts=self.learned, use_prior=self.learned, prior_patches=self.prior_patches
        )
        self._text_state: TextState | None = None
        self._normals: PreparedBatch | None = None
        self._normal_outputs: list[MethodOutput] | None = None

    # -- description ---------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self.learned

    @property
    def mode(self) -> str:
        return "learned" if self.learned else "training-free"

    def _details(self) -> dict[str, Any]:
        return {
            "grid": list(self.grid),
            "prompts": "learned" if self.learned else "words",
            "prior_patches": self.prior_patches,
            "precision": self.precision,
            "vv_start_block": self.model.vision.vv_start,
            "deep_prompts": len(self.model.learner.compound_prompts_text) if self.learned else 0,
            "uses_normal_images": False,
            "trained_on": self.checkpoint_header.get("trained_on"),
        }

    # -- fit: nothing to learn -------------------------------------------------------------
    def _fit(self, normals: PreparedBatch, progress: ProgressCallback | None) -> None:
        """Keep the normals for calibration only (scored as queries on demand)."""
        self._normals = normals
        self._normal_outputs = None

    def _leave_one_out(self, progress: ProgressCallback | None = None) -> list[MethodOutput] | None:
        """The fitted normals scored as queries, one at a time as ``predict`` does
        (zero-shot: a normal's score never depends on the other normals); ``None`` with
        fewer than 2 normals. ``progress`` is called before each normal's encoder pass."""
        normals = self._normals
        if normals is None or len(normals) < 2:
            return None
        if self._normal_outputs is None:
            outputs = []
            for index in range(len(normals)):
                if progress is not None:
                    progress(index / len(normals), f"normal {index + 1} of {len(normals)}")
                one = normals.select([index])
                outputs.extend(self._score(self._encode(one), one))
            self._normal_outputs = outputs
        return list(self._normal_outputs)

    def warm_up(self) -> None:
        """The pass-1 text features of the prompts."""
        self.text_state()

    # -- prediction --------------------------------------------------------------------------
    def text_state(self) -> TextState:
        """Pass-1 text features, computed once per detector (prompt state)."""
        if self._text_state is None:
            with torch.inference_mode():
                self._text_state = self.model.text_state()
        return self._text_state

    def _image_path(self) -> ImagePath:
        """The dual-path (V-V) vision forward: normalised global feature and patch features."""
        name = f"faprompt.vv-from-{self.model.vision.vv_start}"
        return self.declare_image_path(name, FAPromptImagePath(self.model), ("global", "patches"))

    def _encode(self, batch: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``(global (B, E), patches (B, 1 + N, E))``."""
        global_features, patches = self.run_image_path(batch.pixels)
        return global_features, patches

    def _score(self, encoded: tuple[torch.Tensor, torch.Tensor], batch: PreparedBatch) -> list[MethodOutput]:
        state = self.text_state()
        global_features, patches = encoded
        out = self.model.score_features(global_features, patches, state)
        normal_prompt = F.normalize(state.normal, dim=-1)
        results = []
        for i in range(len(batch)):
            prompt_features = torch.cat([normal_prompt, F.normalize(out["abnormal2"][i], dim=-1)])
            extras = {
                "text_prob": float(out["text_prob"][i]),
                "max_patch_prob_pass1": float(out["pass1"][i, 1:, 1].max()),
                "max_patch_prob_pass2": float(out["pass2"][i, 1:, 1].max()),
                "mode": self.mode,
            }
            evidence = PromptEvidence(
                patch_features=patches[i, 1:].float().cpu().numpy().astype(np.float32),
                prompt_features=prompt_features.float().cpu().numpy().astype(np.float32),
            )
            raw_map = out["map"][i].reshape(self.grid).float().cpu().numpy().astype(np.float32)
            results.append(MethodOutput(float(out["score"][i]), raw_map, extras, evidence))
        return results

    # -- inspection ----------------------------------------------------------------------
    def prompt_label(self, index: int) -> str:
        """Readable name of prompt ``index`` (0 = normal): "abnormal 3 (hole)" in word mode."""
        if index == 0:
            return "normal"
        phrase = f" ({WORD_ABNORMALITY_PHRASES[index - 1]})" if not self.learned and index <= len(WORD_ABNORMALITY_PHRASES) else ""
        return f"abnormal {index}{phrase}"

    def _explain_patch(self, result: DetectionResult, row: int, col: int, query_box: Box) -> Explanation:
        """The cosine of the patch's V-V feature with the normal prompt and each abnormal
        prompt (pass-2 features)."""
        evidence: PromptEvidence = result.evidence
        cosines = evidence.prompt_features @ evidence.patch_features[row * self.grid[1] + col]
        prompts = tuple(
            PromptSimilarity("normal" if j == 0 else f"abnormal_{j}", self.prompt_label(j), float(c)) for j, c in enumerate(cosines)
        )
        return Explanation(patch=(row, col), value=float(result.raw_map[row, col]), query_box=query_box, prompts=prompts)
