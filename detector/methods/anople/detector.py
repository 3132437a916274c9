"""The ``Detector`` adapter of AnoPLe, registered as ``"anople"``.

AnoPLe (Lee, Jang and Yoon, arXiv 2408.13516) has no released code; this is a
reconstruction from its abstract and figure captions (``docs/anople.md``). Every
fitted detector says so in ``describe()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...base import BackboneChoice, Detector, MethodOutput, PreparedBatch, ProgressCallback
from ...checkpoints import check_keys, read_header, read_state_dict, save_safetensors
from ...errors import CheckpointError
from ...preprocess import preprocess
from ...maps import patch_box
from ...registry import register_method
from ...results import Box, DetectionResult, Explanation, NearestNormalPatch
from ...runtime import ImagePath
from ...spec import MethodSpec, Option, RelativeCost
from .config import COUPLINGS, PRESETS, SCORINGS, AnoPLeConfig, block_layout, preset_config
from .decoder import GLOBAL_VIEW, LOCAL_VIEW
from .encoders import PromptedCLIP
from .fitting import FitReport, NormalImage, fit_anople
from .image_path import AnoPLeImagePath, output_names, path_name, split_outputs
from .model import CONTEXT_INIT, AnoPLe, QueryFeatures, fused_outputs, prompt_texts

DEFAULT_BACKBONE = "ViT-B-16"
DEFAULT_WEIGHTS = "openai"
#: Gaussian smoothing of the anomaly map, pixels on the model-input grid (docs/anople.md §4).
DEFAULT_SIGMA = 4.0
#: Registered name (the ``method`` field of learned-state headers).
METHOD_NAME = "anople"
#: ``format`` field of the learned-state header.
STATE_FORMAT = "anople-learned-state"
STATE_VERSION = 1
RECONSTRUCTION_NOTE = (
    "AnoPLe has no released code: this is a reconstruction from the paper's abstract and figure "
    "captions; the coupling form, decoder, losses, memory bank and schedule are our own choices."
)


@dataclass(frozen=True)
class LearnedStateFile:
    """A learned-state file and its JSON header (``AnoPLeDetector.save``)."""

    path: Path
    header: dict[str, Any]


@dataclass(frozen=True)
class NearestEvidence:
    """Per query patch, on the ``(rows, cols)`` grid: the memory-bank row of its nearest
    normal patch in the deepest memory layer and their cosine (for ``explain``)."""

    bank_rows: np.ndarray
    similarity: np.ndarray


@register_method("AnoPLe")
class AnoPLeDetector(Detector):
    """AnoPLe: prompts learned on the k normal images at ``fit``, scored with the prompt
    logits, a multi-view decoder and a visual memory bank.

    Options (docs: README "AnoPLe"): ``preset`` ("fast" | "faithful" | "text_only"),
    ``steps`` (None = the preset's), ``scoring`` ("full" | "prompt" | "memory"),
    ``multiview_tta`` (bool), ``coupling`` (None = the preset's, "bidirectional" | "none").
    ``score`` and the maps lie in [0, 1] for every scoring ("full": arithmetic means of the
    parts, docs/anople.md §4.2).
    """

    spec = MethodSpec(
        display_name="AnoPLe",
        default_backbone=DEFAULT_BACKBONE,
        default_weights=DEFAULT_WEIGHTS,
        resize="squash",
        default_sigma=DEFAULT_SIGMA,
        needs_normals=True,
        options={
            "preset": Option("fast", PRESETS, help="fast (default), faithful or text_only", label="AnoPLe preset"),
            "steps": Option(
                None, kind=int, help="prompt-learning steps (default: the preset's)", label="AnoPLe fit steps (empty or 0 = the preset's)"
            ),
            "scoring": Option("full", SCORINGS, help="full fusion, prompt logits only, or memory bank only"),
            "multiview_tta": Option(False, (False, True), kind=bool, help="also decode the four quadrants"),
            "coupling": Option(None, (None, *COUPLINGS), help="bidirectional or none (default: the preset's)"),
        },
        colour=(0, 200, 255),
        cost=RelativeCost(predict=0.7, fit_per_normal=8.0),
        app_options=("preset", "steps"),
        quick_options={"steps": 3},
    )

    # -- construction hooks ---------------------------------------------------------------
    def _validate(self) -> None:
        options = self.options
        self.scoring = options["scoring"]
        self.multiview_tta = bool(options["multiview_tta"])
        self.config: AnoPLeConfig = preset_config(options["preset"], steps=options["steps"], coupling=options["coupling"])

    def _read_checkpoint(self, path: Path) -> LearnedStateFile:
        header = read_header(path)
        if header.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path.name} is not an AnoPLe learned-state file (no '{STATE_FORMAT}' header)")
        self.config = AnoPLeConfig.from_dict(dict(header.get("config", {})))
        self.class_name = str(header.get("class_name", self.class_name))
        return LearnedStateFile(path, header)

    def _backbone_choice(
        self, backbone: str | None, backbone_weights: str | None, artefact: LearnedStateFile | None
    ) -> BackboneChoice:
        if artefact is not None:
            fitted_on = artefact.header.get("backbone")
            if backbone is not None and backbone != fitted_on:
                raise CheckpointError(f"{artefact.path.name} was fitted on backbone {fitted_on!r}, not {backbone!r}")
            backbone = fitted_on
            if backbone_weights is None:
                backbone_weights = artefact.header.get("backbone_weights")
        return super()._backbone_choice(backbone, backbone_weights, artefact)

    def _build(self, artefact: LearnedStateFile | None) -> None:
        self.clip = PromptedCLIP(self.backbone.model)
        self.module: AnoPLe | None = None
        self.training_log: list[tuple[int, float, float, float, float]] = []
        #: Seconds of the last fit per stage ("encode", "train", "memory", "total").
        self.fit_timings: dict[str, float] = {}
        if artefact is not None:
            self._load_state(artefact.path, artefact.header)

    def _new_module(self) -> AnoPLe:
        generator = torch.Generator().manual_seed(self.seed)
        token_ids = self.backbone.tokenize(prompt_texts(self.class_name, self.config.n_text))
        context_ids = self.backbone.tokenize([CONTEXT_INIT])[0]
        return AnoPLe(self.clip, token_ids, context_ids, self.config, generator).to(self.device)

    def _to_input(self, pixels: np.ndarray) -> torch.Tensor:
        tensor, _ = preprocess(pixels, self.preprocess_spec)
        return tensor

    # ------------------------------------------------------------------ fit
    def _fit(self, normals: PreparedBatch, progress: ProgressCallback | None) -> None:
        start = time.perf_counter()
        items = [NormalImage(rgb=image.rgb, global_input=normals.pixels[i]) for i, image in enumerate(normals.images)]
        self.module = self._new_module()
        report: FitReport = fit_anople(
            self.module,
            items,
            image_size=self.image_size,
            patch_size=self.backbone.patch_size,
            to_input=self._to_input,
            seed=self.seed,
            progress=progress,
        )
        self.training_log = report.log
        self.fit_timings = dict(report.timings)
        self.fit_timings["total"] = time.perf_counter() - start
        self.checkpoint = None
        self.last_fit_report = report

    # ------------------------------------------------------------------ predict
    def _path_module(self) -> AnoPLeImagePath:
        """The prompted pass of this preset's block layout as a module (no learned state)."""
        layout = block_layout(self.config, self.clip.num_vision_blocks, self.clip.num_text_blocks)
        return AnoPLeImagePath(self.clip, layout, self.config.n_visual)

    def _image_path(self) -> ImagePath:
        """The prompted vision pass (``image_path.py``); the learned visual prompts are
        inputs, so every fit of this preset on this backbone runs the same model."""
        module = self._path_module()
        return self.declare_image_path(path_name(module.layout), module, output_names(module.layout), module.inputs())

    def _encode_views(self, pixels: torch.Tensor) -> QueryFeatures:
        """The fitted prompted pass over ``pixels`` ``(B, 3, S, S)`` in the runtime in use."""
        _, visual_prompts = self.module.effective_prompts()
        layout = self.module.layout
        prompts = tuple(visual_prompts[j] for j in layout.visual_blocks)
        return split_outputs(layout, self.run_image_path(pixels, *prompts))

    def _encode(self, batch: PreparedBatch) -> QueryFeatures:
        return self._encode_views(batch.pixels)

    def _quadrant_decoder_map(self, rgb: np.ndarray) -> torch.Tensor:
        """Multi-view test-time augmentation: M_dec of the four quadrants (local view),
        stitched and average-pooled back to the patch grid ``(N,)``."""
        height, width = rgb.shape[:2]
        gh, gw = self.grid
        rows = []
        for top, bottom in ((0, height // 2), (height // 2, height)):
            cols = []
            for left, right in ((0, width // 2), (width // 2, width)):
                crop = rgb[top:bottom, left:right]
                if crop.shape[0] < 1 or crop.shape[1] < 1:
                    crop = rgb
                features = self._encode_views(self._to_input(np.ascontiguousarray(crop))[None].to(self.device))
                cols.append(self.module.decode(features, LOCAL_VIEW)[0].reshape(gh, gw))
            rows.append(torch.cat(cols, dim=1))
        stitched = torch.cat(rows, dim=0)[None, None]
        return torch.nn.functional.avg_pool2d(stitched, 2)[0, 0].reshape(-1)

    def _score(self, encoded: Any, batch: PreparedBatch) -> list[MethodOutput]:
        module = self.module
        features = encoded
        with batch.stopwatch("decode"):
            p_text = module.global_logits(features).softmax(dim=-1)[:, 1]
            decoder_map = module.decode(features, GLOBAL_VIEW)
            if self.multiview_tta:
                quadrants = torch.stack([self._quadrant_decoder_map(image.rgb) for image in batch.images])
                decoder_map = 0.5 * (decoder_map + quadrants)
        with batch.stopwatch("memory"):
            memory_map, nearest, similarity = module.memory_scores(features.memory)
        score, raw = fused_outputs(p_text, decoder_map, memory_map, self.scoring)
        gh, gw = self.grid

        def grid_array(values: torch.Tensor, dtype: type) -> np.ndarray:
            return values.reshape(gh, gw).cpu().numpy().astype(dtype)

        outputs = []
        for i in range(len(batch)):
            extras = {
                "text_score": float(p_text[i]),
                "memory_max": float(memory_map[i].max()),
                "decoder_max": float(decoder_map[i].max()),
                "decoder_map": grid_array(decoder_map[i], np.float32),
                "memory_map": grid_array(memory_map[i], np.float32),
                "scoring": self.scoring,
            }
            evidence = NearestEvidence(grid_array(nearest[i], np.int64), grid_array(similarity[i], np.float32))
            outputs.append(MethodOutput(float(score[i]), grid_array(raw[i], np.float32), extras, evidence))
        return outputs

    def _result_warnings(self) -> tuple[str, ...]:
        """Parts that carry no signal on this fit (``health.py``), on every result."""
        return self.module.health.warnings() if self.module is not None else ()

    # ------------------------------------------------------------------ calibration / inspection
    def _leave_one_out(self, progress: ProgressCallback | None = None) -> list[MethodOutput] | None:
        """Each fitted normal scored against a memory bank without its own patches
        (prompts not refitted)."""
        self._check_ready()
        k = self.num_normals
        if k < 2:
            return None
        module = self.module
        num_patches = self.clip.num_patches
        out = []
        for index in range(k):
            rows = slice(index * num_patches, (index + 1) * num_patches)
            memory = {l: module.memory_bank(l)[rows].unsqueeze(0) for l in module.layout.memory_levels}
            memory_map, _, _ = module.memory_scores(memory, exclude=[index])
            score, raw = fused_outputs(
                module.normal_text_scores[index : index + 1],
                module.normal_decoder_maps[index : index + 1],
                memory_map,
                self.scoring,
            )
            out.append(MethodOutput(float(score[0]), raw[0].reshape(self.grid).cpu().numpy().astype(np.float32)))
        return out

    def _explain_patch(self, result: DetectionResult, row: int, col: int, query_box: Box) -> Explanation:
        """The nearest normal patch in the deepest memory layer (``normal_index``, ``box``
        in that normal's original pixels, cosine ``similarity``; ties -> lowest index)."""
        evidence: NearestEvidence = result.evidence
        normal_index, patch_index = divmod(int(evidence.bank_rows[row, col]), self.clip.num_patches)
        normal_row, normal_col = divmod(patch_index, self.grid[1])
        nearest = NearestNormalPatch(
            normal_index=int(normal_index),
            patch=(int(normal_row), int(normal_col)),
            box=tuple(int(v) for v in patch_box(self.normal_geometries[normal_index], self.grid, normal_row, normal_col)),
            similarity=float(evidence.similarity[row, col]),
            layer=int(max(self.module.layout.memory_levels)),
        )
        parts = {
            "decoder_value": float(result.extras["decoder_map"][row, col]),
            "memory_value": float(result.extras["memory_map"][row, col]),
        }
        return Explanation(
            patch=(row, col), value=float(result.raw_map[row, col]), query_box=query_box, nearest=nearest, parts=parts
        )

    # ------------------------------------------------------------------ state files
    def save(self, path: str | Path) -> Path:
        """Write the learned state (prompts, coupling, decoder, view tokens, memory bank,
        text features) to one safetensors file with a JSON header."""
        self._check_ready()
        module = self.module
        layout = module.layout
        header = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "method": METHOD_NAME,
            "preset": self.config.preset,
            "config": self.config.to_dict(),
            "layout": layout.to_dict(),
            "class_name": self.class_name,
            "backbone": self.backbone.spec.model_name,
            "backbone_weights": self.backbone.spec.weights,
            "image_size": self.image_size,
            "k": self.num_normals,
            "normal_sizes": [list(g.original) for g in self.normal_geometries],
            "seed": self.seed,
            "steps": self.config.steps,
            "final_loss": self.training_log[-1][1] if self.training_log else None,
            "training_log": [list(entry) for entry in self.training_log],
            "fit_seconds": self.fit_timings,
            "reconstruction": True,
        }
        return save_safetensors(path, module.state_dict(), header)

    def _load_state(self, path: Path, header: dict[str, Any]) -> None:
        state = read_state_dict(path)
        module = self._new_module()
        module.resize_buffers_for(state)
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        check_keys(state, expected, what=f"AnoPLe ({self.config.preset} preset) on {self.backbone.spec.model_name}")
        sizes = [tuple(int(v) for v in s) for s in header.get("normal_sizes", [])]
        k = int(header.get("k", len(sizes)))
        num_patches = self.clip.num_patches
        bank_rows = {int(state[f"memory_{l}"].shape[0]) for l in module.layout.memory_levels}
        if len(sizes) != k or k < 1 or bank_rows != {k * num_patches} or state["normal_text_scores"].shape[0] != k:
            raise CheckpointError(
                f"{path.name}: the memory bank ({sorted(bank_rows)} rows) does not match k={k} normal images "
                f"of {num_patches} patches"
            )
        module.load_state_dict({k_: v.to(self.device) for k_, v in state.items()}, strict=True)
        self.module = module
        self.normal_geometries = tuple(self.geometry_of(height, width) for height, width in sizes)
        self._num_normals = k
        self._fitted = True
        self.training_log = [tuple(entry) for entry in header.get("training_log", [])]
        self.fit_timings = dict(header.get("fit_seconds", {}))
        self.checkpoint = str(path)

    # ------------------------------------------------------------------ description
    @property
    def is_trained(self) -> bool:
        return bool(self.is_fitted)

    @property
    def mode(self) -> str:
        return self.config.preset

    def _details(self) -> dict[str, Any]:
        config = self.config
        layout = self.module.layout if self.module is not None else None
        if layout is None:
            layout = block_layout(config, self.clip.num_vision_blocks, self.clip.num_text_blocks)
        coupling = config.coupling if layout.coupled else "none"
        info: dict[str, Any] = {
            "reconstruction": True,
            "note": RECONSTRUCTION_NOTE,
            "preset": config.preset,
            "text_blocks": list(layout.text_blocks),
            "visual_blocks": list(layout.visual_blocks),
            "coupled_blocks": [list(p) for p in layout.coupled],
            "coupling": coupling,
            "text_context": config.n_text,
            "visual_context": config.n_visual,
            "steps": config.steps,
            "final_loss": self.training_log[-1][1] if self.training_log else None,
            "k": self.num_normals,
            "scoring": self.scoring,
            "multiview_tta": self.multiview_tta,
            "fit_seconds": dict(self.fit_timings),
            # parts constant over the clean fit views (health.py); named in each result's warnings
            "degenerate_parts": list(self.module.health.degenerate) if self.module is not None else [],
        }
        if not layout.visual_blocks:
            info["coupling_note"] = "text_only preset: no visual prompts, so the bidirectional coupling (the method's main idea) is off"
        return info
