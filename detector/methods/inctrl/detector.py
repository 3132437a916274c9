"""The registered InCTRL adapter: the shared pipeline's hooks around ``InCTRLModel``.

InCTRL (CVPR 2024) on open_clip ``ViT-B-16-plus-240`` / ``laion400m_e32`` at 240 px; the
formulas live in ``model.py``, the prompts in ``prompts.py``, the checkpoint layouts in
``checkpoint.py`` (docs/inctrl.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from typing import Sequence

from ... import maps
from ...artefacts import Converted, ConvertRequest, MethodArtefacts, PlannedFile, RemoteFile
from ...backbone import weights_digest
from ...base import BackboneChoice, Detector, MethodOutput, PreparedBatch, ProgressCallback
from ...checkpoints import CheckpointInfo, check_keys
from ...errors import CheckpointError
from ...weights import resolve_path
from ...geometry import Geometry
from ...registry import register_method
from ...runtime import ImagePath
from ...results import Box, DetectionResult, Explanation, NearestNormalPatch
from ...spec import MethodSpec, Option, RelativeCost
from . import artefacts as published
from .checkpoint import HEAD_PREFIXES, InCTRLCheckpoint, head_state_shapes, inspect_checkpoint, read_checkpoint
from .model import (
    InCTRLHeads,
    InCTRLImagePath,
    InCTRLModel,
    InCTRLScores,
    block_indices,
    pool_normals,
    text_prior_features,
    text_prior_score,
)

#: Official backbone: open_clip model name and pretrained tag.
DEFAULT_BACKBONE = "ViT-B-16-plus-240"
DEFAULT_WEIGHTS = "laion400m_e32"
#: Official input side in pixels.
OFFICIAL_IMAGE_SIZE = 240
#: Gaussian sigma of ``anomaly_map`` in pixels at 240-px input scale (project choice).
DEFAULT_SIGMA_240 = 4.0
HEADS_OPTIONS = ("auto", "trained", "training-free")


@dataclass
class _NormalBank:
    """Cached features of the fitted normal images, kept once.

    ``pooled``: ``(L, k*N, D)`` L2-normalised patch tokens, shot-major (``pool_normals``);
    ``embeddings``: ``(k, E)``; ``geometries``: one per normal.
    """

    pooled: torch.Tensor
    embeddings: torch.Tensor
    geometries: tuple[Geometry, ...]

    @property
    def tokens(self) -> torch.Tensor:
        """``(k, L, N, D)``: the same tokens per shot (a view of ``pooled``)."""
        shots = self.embeddings.shape[0]
        return self.pooled.unflatten(1, (shots, -1)).movedim(1, 0)


@dataclass(frozen=True)
class PatchEvidence:
    """The query's deepest-layer patch tokens ``(N, D)``, L2-normalised (for ``explain``)."""

    tokens: np.ndarray


@register_method("InCTRL")
class InCTRLDetector(Detector):
    """InCTRL (CVPR 2024) on open_clip ``ViT-B-16-plus-240`` / ``laion400m_e32``.

    Options: ``heads`` = ``"auto"`` (trained when a checkpoint is loaded), ``"trained"``
    (requires one) or ``"training-free"`` (``score = (text_score + max(M)) / 2``).
    ``checkpoint`` accepts the official full 345-key ``.pyth`` (raw or ``{"model_state": ...}``;
    its CLIP weights replace ``backbone_weights``), the 44 head keys alone, our own
    safetensors training output, a converted file (``weights convert``), or a set of such
    files for several shot counts (a folder, ``"official[:<set>]"``, ``"hf-hub:<org>/<repo>"``;
    the file for k is chosen at ``fit``, docs/inctrl.md §11).
    """

    spec = MethodSpec(
        display_name="InCTRL",
        default_backbone=DEFAULT_BACKBONE,
        default_weights=DEFAULT_WEIGHTS,
        resize="shorter",
        default_sigma=DEFAULT_SIGMA_240,
        sigma_reference_size=OFFICIAL_IMAGE_SIZE,
        needs_normals=True,
        trained_offline=True,
        training_module="detector.methods.inctrl.train",
        options={
            "heads": Option("auto", HEADS_OPTIONS, help="trained heads (auto = when a checkpoint is loaded) or the training-free score"),
        },
        batch_size=8,
        colour=(255, 0, 255),
        cost=RelativeCost(predict=1.0, fit_per_normal=1.0),
        checkpoint_sets=True,
    )

    # -- construction hooks ---------------------------------------------------------------
    def _validate(self) -> None:
        if self.options["heads"] == "trained" and self.checkpoint is None:
            raise ValueError("heads='trained' needs a checkpoint with InCTRL's heads (checkpoint=PATH)")

    def _read_checkpoint(self, path: Path) -> InCTRLCheckpoint:
        artefact = read_checkpoint(path)
        self.stored_calibration = artefact.calibration
        return artefact

    def _backbone_choice(
        self, backbone: str | None, backbone_weights: str | None, artefact: InCTRLCheckpoint | None
    ) -> BackboneChoice:
        model_name = backbone or (artefact.header.get("backbone") if artefact else None) or DEFAULT_BACKBONE
        if artefact is not None and artefact.carries_clip:
            return BackboneChoice(
                model_name, str(artefact.path), ignore_prefixes=HEAD_PREFIXES, description=f"from checkpoint {self.checkpoint}"
            )
        clip_part = artefact.header.get("clip_file") if artefact is not None else None
        if clip_part and backbone_weights is None:
            # ``convert`` kept the file's CLIP part because it differs from the official tag.
            file = artefact.path.parent / str(clip_part)
            if not file.is_file():
                raise CheckpointError(f"{artefact.path.name} needs its CLIP part {clip_part} beside it, which is missing")
            return BackboneChoice(model_name, str(file), description=f"{model_name} / CLIP part kept with {artefact.path.name}")
        return super()._backbone_choice(model_name, backbone_weights, artefact)

    @classmethod
    def inspect_checkpoint(cls, path: str | Path) -> CheckpointInfo:
        return inspect_checkpoint(resolve_path(path))

    @classmethod
    def artefacts(cls) -> MethodArtefacts:
        return published.artefacts()

    @classmethod
    def plan_downloads(
        cls, listing: Sequence[RemoteFile], *, shots: Sequence[int] = (), trained_on: str | None = None
    ) -> list[PlannedFile]:
        return published.plan_downloads(listing, shots=shots, trained_on=trained_on)

    @classmethod
    def convert_checkpoint(cls, source: Path, out_dir: Path, request: ConvertRequest) -> Converted:
        return published.convert(source, out_dir, request, default_backbone=DEFAULT_BACKBONE)

    def _build(self, artefact: InCTRLCheckpoint | None) -> None:
        self.clip_from_checkpoint = bool(artefact and artefact.carries_clip)
        self.blocks = block_indices(self.backbone)
        rows, cols = self.grid
        with torch.random.fork_rng(devices=[]):
            # Initial head weights from ``seed`` (training starts from them), without touching
            # the caller's global random state.
            torch.manual_seed(self.seed)
            heads = InCTRLHeads(self.backbone.embed_dim, rows * cols)
        self.model = InCTRLModel(heads, False).to(self.device).eval().requires_grad_(False)
        self.header: dict[str, Any] = {}
        self.has_trained_heads = False
        self.clip_warning: str | None = None
        if artefact is not None:
            self._use_checkpoint(artefact)
        self._bank: _NormalBank | None = None

    def _use_checkpoint(self, artefact: InCTRLCheckpoint) -> None:
        """Load the heads of ``artefact`` (at construction, or another member of a set at
        ``fit``); note when the heads were trained with other CLIP weights than the ones in use."""
        heads = self.model.heads
        check_keys(artefact.head_state, head_state_shapes(heads), what="InCTRL's heads (adapter, diff_head, diff_head_ref)")
        heads.load_state_dict({k: v.float() for k, v in artefact.head_state.items()}, strict=True)
        self.header = artefact.header
        self.has_trained_heads = True
        self.model.use_heads = self.options["heads"] != "training-free"
        expected = self.header.get("clip_sha256")
        self.clip_warning = None
        if expected and not self.clip_from_checkpoint and not self.backbone.is_random and weights_digest(self.backbone) != expected:
            self.clip_warning = (
                f"the InCTRL heads in {artefact.path.name} were trained with other CLIP weights than the backbone in use "
                f"({self.backbone_weights_text}): scores may be off"
            )

    @property
    def heads(self) -> InCTRLHeads:
        """The learned parts (``adapter``, ``diff_head``, ``diff_head_ref``)."""
        return self.model.heads

    @property
    def use_heads(self) -> bool:
        return self.model.use_heads

    # -- facts ------------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self.use_heads

    def _details(self) -> dict[str, Any]:
        return {
            "heads": self.options["heads"],
            "blocks": list(self.blocks),
            "checkpoint_shots": self.header.get("shots"),
            "trained_on": self.header.get("trained_on"),
            "checkpoint_set_shots": list(self.checkpoint_set.shots) if self.checkpoint_set else None,
        }

    def warm_up(self) -> None:
        """The text prior of the class name (cached in memory and on disk)."""
        text_prior_features(self.backbone, self.class_name)

    def _result_warnings(self) -> tuple[str, ...]:
        warnings = []
        shots = self.header.get("shots")
        if shots is not None and int(shots) != self.num_normals:
            where = f" (the set {self.checkpoint} has k = {', '.join(map(str, self.checkpoint_set.shots))})" if self.checkpoint_set else ""
            warnings.append(
                f"the InCTRL checkpoint {Path(self.checkpoint_file or '').name} was trained with {int(shots)} normal images "
                f"per query, {self.num_normals} are fitted{where}"
            )
        if self.clip_warning:
            warnings.append(self.clip_warning)
        return tuple(warnings)

    # -- fit / predict hooks ----------------------------------------------------------------
    def _fit(self, normals: PreparedBatch, progress: ProgressCallback | None) -> None:
        if progress is not None:
            progress(0.1, "encoding normal images")
        with torch.inference_mode():
            tokens, embeddings = self._encode(normals)
            text_prior_features(self.backbone, self.class_name)
        self._bank = _NormalBank(pooled=pool_normals(tokens), embeddings=embeddings, geometries=normals.geometries)

    def _image_path(self) -> ImagePath:
        """The intermediate tokens of ``self.blocks`` and the image embedding (``encode_images``)."""
        name = "inctrl.blocks-" + "-".join(map(str, self.blocks))
        return self.declare_image_path(name, InCTRLImagePath(self.backbone, self.blocks), ("tokens", "embeddings"))

    def _encode(self, batch: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (B, L, N, D), embeddings (B, E))`` from one vision forward."""
        tokens, embeddings = self.run_image_path(batch.pixels)
        return tokens, embeddings

    def _scores(
        self, tokens: torch.Tensor, embeddings: torch.Tensor, normal_pooled: torch.Tensor, normal_embeddings: torch.Tensor
    ) -> InCTRLScores:
        """``InCTRLModel`` on independent queries against one set of normals."""
        text_score = text_prior_score(embeddings, text_prior_features(self.backbone, self.class_name))
        normals = normal_embeddings.unsqueeze(0).expand(len(embeddings), -1, -1)
        return self.model(tokens, embeddings, normal_pooled, normals, text_score)

    def _score(self, encoded: tuple[torch.Tensor, torch.Tensor], batch: PreparedBatch) -> list[MethodOutput]:
        assert self._bank is not None
        tokens, embeddings = encoded
        scores = self._scores(tokens, embeddings, self._bank.pooled, self._bank.embeddings)
        results = []
        for i in range(len(batch)):
            raw_map = scores.patch_map[i].reshape(self.grid).cpu().numpy().astype(np.float32)
            extras: dict[str, Any] = {
                "text_score": float(scores.text_score[i]),
                "max_patch_residual": float(raw_map.max()),
                "holistic_map": scores.holistic_map[i].reshape(self.grid).cpu().numpy().astype(np.float32),
            }
            if scores.image_residual_score is not None and scores.holistic_score is not None:
                extras["image_residual_score"] = float(scores.image_residual_score[i])
                extras["holistic_score"] = float(scores.holistic_score[i])
            evidence = PatchEvidence(tokens[i, -1].cpu().numpy().astype(np.float32))
            results.append(MethodOutput(float(scores.score[i]), raw_map, extras, evidence))
        return results

    # -- calibration and explanations ---------------------------------------------------------
    def _leave_one_out(self, progress: ProgressCallback | None = None) -> list[MethodOutput] | None:
        """Each fitted normal scored against the other ones, from cached features."""
        bank = self._bank
        if bank is None or len(bank.geometries) < 2:
            return None
        out = []
        for i in range(len(bank.geometries)):
            others = [j for j in range(len(bank.geometries)) if j != i]
            scores = self._scores(
                bank.tokens[i : i + 1], bank.embeddings[i : i + 1], pool_normals(bank.tokens[others]), bank.embeddings[others]
            )
            out.append(MethodOutput(float(scores.score[0]), scores.patch_map[0].reshape(self.grid).cpu().numpy().astype(np.float32)))
        return out

    def _explain_patch(self, result: DetectionResult, row: int, col: int, query_box: Box) -> Explanation:
        """The nearest normal patch in the deepest layer used (highest cosine; ties -> lowest
        normal index, then lowest patch index)."""
        bank = self._bank
        if bank is None:
            raise RuntimeError("call fit() with normal images first")
        query = np.asarray(result.evidence.tokens, dtype=np.float32)[row * self.grid[1] + col]
        normals = bank.tokens[:, -1].cpu().numpy().astype(np.float32)  # (k, N, D), normalised
        query = query / np.linalg.norm(query)
        similarity = normals.reshape(-1, normals.shape[-1]) @ query  # (k*N,)
        best = int(np.argmax(similarity))  # first maximum: lowest normal, then lowest patch
        normal_index, patch = divmod(best, normals.shape[1])
        normal_row, normal_col = divmod(patch, self.grid[1])
        nearest = NearestNormalPatch(
            normal_index=normal_index,
            patch=(normal_row, normal_col),
            box=maps.patch_box(bank.geometries[normal_index], self.grid, normal_row, normal_col),
            similarity=float(similarity[best]),
            layer=self.blocks[-1],
        )
        return Explanation(patch=(row, col), value=float(result.raw_map[row, col]), query_box=query_box, nearest=nearest)
