"""The ``Detector`` adapter of AnoPLe, registered as ``"anople"``.

AnoPLe (Lee, Jang and Yoon, arXiv 2408.13516) has no released code; this is a
reconstruction from its abstract and figure captions (``shared/specs/anople.md``). Every
fitted detector says so in ``describe()``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...api import Calibration, CheckpointError, DetectionResult, Detector, ProgressCallback, Stopwatch
from ...backbone import load_backbone, resolve_weights
from ...checkpoints import check_keys, read_header, read_state_dict, resolve_path, save_safetensors
from ...geometry import Geometry, input_geometry
from ...registry import register_method
from .config import PRESETS, SCORINGS, AnoPLeConfig, preset_config
from .decoder import GLOBAL_VIEW, LOCAL_VIEW
from .encoders import PromptedCLIP
from .fitting import FitReport, NormalImage, fit_anople
from .model import CONTEXT_INIT, AnoPLe, fused_outputs, prompt_texts

DEFAULT_BACKBONE = "ViT-B-16"
DEFAULT_WEIGHTS = "openai"
#: Gaussian smoothing of the anomaly map, pixels on the model-input grid (anople.md §4).
DEFAULT_SIGMA = 4.0
#: ``format`` field of the learned-state header.
STATE_FORMAT = "anople-learned-state"
STATE_VERSION = 1
RECONSTRUCTION_NOTE = (
    "AnoPLe has no released code: this is a reconstruction from the paper's abstract and figure "
    "captions; the coupling form, decoder, losses, memory bank and schedule are our own choices."
)


@register_method("AnoPLe")
class AnoPLeDetector(Detector):
    """AnoPLe: prompts learned on the k normal images at ``fit``, scored with the prompt
    logits, a multi-view decoder and a visual memory bank.

    Options (anople.md §3.3, §4): ``preset`` ("fast" | "faithful" | "text_only"),
    ``steps`` (None = the preset's), ``scoring`` ("full" | "prompt" | "memory"),
    ``multiview_tta`` (bool), ``coupling`` (None = the preset's, "bidirectional" | "none").
    ``score`` and the maps lie in [0, 1] for every scoring ("full": arithmetic means of the
    parts, anople.md "Decisions 2026-12-01").
    """

    display_name = "AnoPLe"
    requires_fit = True
    method_options = {"preset": "fast", "steps": None, "scoring": "full", "multiview_tta": False, "coupling": None}

    def __init__(
        self,
        *,
        backbone: str | None = None,
        backbone_weights: str | None = None,
        checkpoint: str | None = None,
        device: str = "cpu",
        class_name: str = "object",
        sigma: float | None = None,
        seed: int = 0,
        preset: str = "fast",
        steps: int | None = None,
        scoring: str = "full",
        multiview_tta: bool = False,
        coupling: str | None = None,
    ) -> None:
        super().__init__(device=device, class_name=class_name, sigma=sigma, seed=seed)
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        self.scoring = scoring
        self.multiview_tta = bool(multiview_tta)
        self.checkpoint: str | None = None
        header: dict[str, Any] | None = None
        path: Path | None = None
        if checkpoint is not None:
            path = resolve_path(checkpoint)
            header = read_header(path)
            if header.get("format") != STATE_FORMAT:
                raise CheckpointError(f"{path.name} is not an AnoPLe learned-state file (no '{STATE_FORMAT}' header)")
            if backbone is not None and backbone != header.get("backbone"):
                raise CheckpointError(
                    f"{path.name} was fitted on backbone {header.get('backbone')!r}, not {backbone!r}"
                )
            self.config = AnoPLeConfig.from_dict(dict(header.get("config", {})))
            self.class_name = str(header.get("class_name", self.class_name))
            backbone = header.get("backbone")
            if backbone_weights is None:
                backbone_weights = header.get("backbone_weights")
        else:
            self.config = preset_config(preset, steps=steps, coupling=coupling)
        model_name = backbone or DEFAULT_BACKBONE
        weights = resolve_weights(model_name, backbone_weights, default_model=DEFAULT_BACKBONE, default_weights=DEFAULT_WEIGHTS)
        self.backbone = load_backbone(model_name, weights, device=device)
        self.clip = PromptedCLIP(self.backbone.model)
        from ...images import Preprocess

        self.preprocess_spec = Preprocess(self.backbone.image_size, "squash")
        self.module: AnoPLe | None = None
        self.training_log: list[tuple[int, float, float, float, float]] = []
        #: Seconds of the last fit per stage ("encode", "train", "memory", "total").
        self.fit_timings: dict[str, float] = {}
        self._normal_sizes: list[tuple[int, int]] = []
        if header is not None and path is not None:
            self._load_state(path, header)

    # ------------------------------------------------------------------ building
    @property
    def grid(self) -> tuple[int, int]:
        return self.backbone.grid_size

    def _new_module(self) -> AnoPLe:
        generator = torch.Generator().manual_seed(self.seed)
        token_ids = self.backbone.tokenize(prompt_texts(self.class_name, self.config.n_text))
        context_ids = self.backbone.tokenize([CONTEXT_INIT])[0]
        return AnoPLe(self.clip, token_ids, context_ids, self.config, generator).to(self.device)

    def _to_input(self, pixels: np.ndarray) -> torch.Tensor:
        from ...images import preprocess

        tensor, _ = preprocess(pixels, self.preprocess_spec)
        return tensor

    def _normal_geometry(self, index: int) -> Geometry:
        height, width = self._normal_sizes[index]
        return input_geometry(height, width, self.backbone.image_size, "squash")

    # ------------------------------------------------------------------ fit
    def _fit(self, images: list, progress: ProgressCallback | None) -> None:
        from ...images import preprocess

        start = time.perf_counter()
        normals = [NormalImage(rgb=img.rgb, global_input=preprocess(img, self.preprocess_spec)[0]) for img in images]
        self.module = self._new_module()
        report: FitReport = fit_anople(
            self.module,
            normals,
            image_size=self.backbone.image_size,
            patch_size=self.backbone.patch_size,
            to_input=self._to_input,
            seed=self.seed,
            progress=progress,
        )
        self.training_log = report.log
        self.fit_timings = dict(report.timings)
        self.fit_timings["total"] = time.perf_counter() - start
        self._normal_sizes = [tuple(int(s) for s in img.rgb.shape[:2]) for img in images]
        self.checkpoint = None
        self.last_fit_report = report

    # ------------------------------------------------------------------ predict
    def _encode(self, pixels_or_image) -> tuple[Any, Geometry]:
        from ...images import preprocess

        tensor, geometry = preprocess(pixels_or_image, self.preprocess_spec)
        return self.module.encode_views(tensor.unsqueeze(0).to(self.device)), geometry

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
                features, _ = self._encode(np.ascontiguousarray(crop))
                cols.append(self.module.decode(features, LOCAL_VIEW)[0].reshape(gh, gw))
            rows.append(torch.cat(cols, dim=1))
        stitched = torch.cat(rows, dim=0)[None, None]
        return torch.nn.functional.avg_pool2d(stitched, 2)[0, 0].reshape(-1)

    def _predict(self, image) -> DetectionResult:
        from ...maps import upsample_map

        module = self.module
        watch = Stopwatch()
        with torch.inference_mode():
            with watch("encode"):
                features, geometry = self._encode(image)
            with watch("decode"):
                p_text = module.global_logits(features).softmax(dim=-1)[:, 1]
                decoder_map = module.decode(features, GLOBAL_VIEW)
                if self.multiview_tta:
                    decoder_map = 0.5 * (decoder_map + self._quadrant_decoder_map(image.rgb)[None])
            with watch("memory"):
                memory_map, nearest, similarity = module.memory_scores(features.memory)
            score, raw = fused_outputs(p_text, decoder_map, memory_map, self.scoring)
        gh, gw = self.grid
        raw_map = raw[0].reshape(gh, gw).float().cpu().numpy().astype(np.float32)
        with watch("post"):
            anomaly_map = upsample_map(raw_map, geometry, sigma=self._sigma()).astype(np.float32)
        extras = {
            "text_score": float(p_text[0]),
            "memory_max": float(memory_map[0].max()),
            "decoder_max": float(decoder_map[0].max()),
            "decoder_map": decoder_map[0].reshape(gh, gw).cpu().numpy().astype(np.float32),
            "memory_map": memory_map[0].reshape(gh, gw).cpu().numpy().astype(np.float32),
            "scoring": self.scoring,
            "_geometry": geometry,
            "_nearest_row": nearest[0].reshape(gh, gw).cpu().numpy().astype(np.int64),
            "_nearest_similarity": similarity[0].reshape(gh, gw).cpu().numpy().astype(np.float32),
        }
        return DetectionResult(
            method=self.name,
            score=float(score[0]),
            anomaly_map=anomaly_map,
            raw_map=raw_map,
            timings=dict(watch.timings),
            extras=extras,
            warnings=tuple(getattr(image, "warnings", ()) or ()) + module.health.warnings(),
        )

    def _sigma(self) -> float:
        return DEFAULT_SIGMA if self.sigma is None else float(self.sigma)

    # ------------------------------------------------------------------ calibration / inspection
    def default_calibration(self) -> Calibration:
        """Scores and maps lie in [0, 1] for every scoring: range 0..1, threshold 0.5."""
        from ...calibration import fixed_calibration

        return fixed_calibration(0.0, 1.0, 0.5)

    def leave_one_out(self) -> list[tuple[float, np.ndarray]] | None:
        """Each fitted normal scored against a memory bank without its own patches
        (prompts not refitted); maps at the normal's original size."""
        from ...maps import upsample_map

        self._check_ready()
        k = self.num_normals
        if k < 2:
            return None
        module = self.module
        num_patches = self.clip.num_patches
        gh, gw = self.grid
        out = []
        with torch.inference_mode():
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
                raw_map = raw[0].reshape(gh, gw).cpu().numpy().astype(np.float32)
                out.append((float(score[0]), upsample_map(raw_map, self._normal_geometry(index), sigma=self._sigma()).astype(np.float32)))
        return out

    def explain(self, result: DetectionResult, x: int, y: int) -> dict[str, Any]:
        """The patch under (x, y), its raw value, and its nearest normal patch in the
        deepest memory layer (``normal_index``, ``box`` in that normal's original pixels,
        cosine ``similarity``; ties -> lowest index)."""
        from ...maps import patch_box, pixel_to_patch

        self._check_ready()
        geometry: Geometry = result.extras["_geometry"]
        row, col = pixel_to_patch(geometry, self.grid, x, y)
        num_patches = self.clip.num_patches
        bank_row = int(result.extras["_nearest_row"][row, col])
        normal_index, patch_index = divmod(bank_row, num_patches)
        normal_row, normal_col = divmod(patch_index, self.grid[1])
        return {
            "patch": (int(row), int(col)),
            "value": float(result.raw_map[row, col]),
            "decoder_value": float(result.extras["decoder_map"][row, col]),
            "memory_value": float(result.extras["memory_map"][row, col]),
            "layer": int(max(self.module.layout.memory_levels)),
            "normal_index": int(normal_index),
            "normal_patch": (int(normal_row), int(normal_col)),
            "box": tuple(int(v) for v in patch_box(self._normal_geometry(normal_index), self.grid, normal_row, normal_col)),
            "similarity": float(result.extras["_nearest_similarity"][row, col]),
        }

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
            "method": "anople",
            "preset": self.config.preset,
            "config": self.config.to_dict(),
            "layout": layout.to_dict(),
            "class_name": self.class_name,
            "backbone": self.backbone.spec.model_name,
            "backbone_weights": self.backbone.spec.weights,
            "image_size": self.backbone.image_size,
            "k": self.num_normals,
            "normal_sizes": [list(s) for s in self._normal_sizes],
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
        self._normal_sizes = sizes
        self._num_normals = k
        self._fitted = True
        self.training_log = [tuple(entry) for entry in header.get("training_log", [])]
        self.fit_timings = dict(header.get("fit_seconds", {}))
        self.checkpoint = str(path)

    # ------------------------------------------------------------------ description
    def describe(self) -> dict[str, Any]:
        config = self.config
        layout = self.module.layout if self.module is not None else None
        if layout is None:
            from .config import block_layout

            layout = block_layout(config, self.clip.num_vision_blocks, self.clip.num_text_blocks)
        coupling = config.coupling if layout.coupled else "none"
        info: dict[str, Any] = {
            "method": self.name,
            "backbone": self.backbone.spec.model_name,
            "backbone_weights": self.backbone.weights_description,
            "image_size": self.backbone.image_size,
            "checkpoint": self.checkpoint,
            "trained": bool(self.is_fitted),
            "mode": config.preset,
            "reconstruction": True,
            "note": RECONSTRUCTION_NOTE,
            "preset": config.preset,
            "class_name": self.class_name,
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
