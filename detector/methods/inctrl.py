"""InCTRL: in-context residual learning with few-shot normal prompts.

Port of the official implementation (github.com/mala-lab/InCTRL, CVPR 2024, "Toward Generalist
Anomaly Detection via In-context Residual Learning with Few-shot Sample Prompts"). A query is
compared with k normal images ("sample prompts") at three levels:

* **patch residual** (paper Eq. 2-3): every query patch token against every normal patch token of
  the same ViT layer; the residual of a patch is its smallest ``0.5 * (1 - cos)``; the map ``M`` is
  the mean over the three layers of these per-layer minima;
* **image residual** (Eq. 4): normal prototype minus query of the adapted CLIP image embeddings,
  scored by ``diff_head_ref``;
* **text prior** (Eq. 5): CLIP zero-shot probability of "abnormal" from WinCLIP-style prompts.

The holistic map ``M + text_score + image_residual_score`` goes through ``diff_head``; the final
score is the mean of that head's output and ``max(M)`` (Eq. 6-7).

Module and parameter names follow the official ``open_clip/model.py`` (``adapter.fc.0``,
``diff_head.projection1``, ``diff_head_ref.bn2``, ...) so the released checkpoints load as they
are. Differences from the official code, all deliberate: each query is scored on its own (the
official forward mixes queries, layers and shots when the batch is larger than 1); text features
are computed once per class name instead of once per query; the patch residual is one batched
matrix product; unused computations (attention maps) are skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import maps
from ..backbone import Backbone
from ..base import BackboneChoice, Detector, MethodOutput, PreparedBatch, ProgressCallback
from ..calibration import Calibration
from ..checkpoints import check_keys, read_header, read_state_dict, state_keys
from ..errors import CheckpointError
from ..geometry import Geometry
from ..registry import register_method
from ..results import Box, DetectionResult, Explanation, NearestNormalPatch
from ..spec import MethodSpec, Option

#: Official backbone: open_clip model name and pretrained tag.
DEFAULT_BACKBONE = "ViT-B-16-plus-240"
DEFAULT_WEIGHTS = "laion400m_e32"
#: Official input side in pixels.
OFFICIAL_IMAGE_SIZE = 240
#: Official 0-based vision blocks whose outputs give the patch tokens (``out_layers=[7, 9, 11]``
#: with a 1-based counter) on the official 12-block model.
OFFICIAL_BLOCKS = (6, 8, 10)
OFFICIAL_NUM_BLOCKS = 12
#: Gaussian sigma of ``anomaly_map`` in pixels at 240-px input scale (project choice).
DEFAULT_SIGMA_240 = 4.0
#: Temperature of the text prior, hard-coded in the official code (no ``logit_scale``).
TEXT_TEMPERATURE = 100.0
#: Key prefixes of the learned parts inside an official checkpoint.
HEAD_PREFIXES = ("adapter.", "diff_head.", "diff_head_ref.")
HEADS_OPTIONS = ("auto", "trained", "training-free")

# -- text prompts (official ``state_level`` / ``template_level`` / ``get_texts``) -------------

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
#: The 22 templates in the official order (WinCLIP's compositional ensemble). Each pair is
#: "a ... photo of {a|the} {}." in the order the official list has them; the order only
#: affects the float rounding of the mean.
_TEMPLATE_PAIRS = (
    ("a cropped photo of {} {{}}.", ("the", "a")),
    ("a close-up photo of {} {{}}.", ("a", "the")),
    ("a bright photo of {} {{}}.", ("a", "the")),
    ("a dark photo of {} {{}}.", ("a", "the")),
    ("a jpeg corrupted photo of {} {{}}.", ("a", "the")),
    ("a blurry photo of {} {{}}.", ("the", "a")),
    ("a photo of {} {{}}.", ("the", "a")),
    ("a photo of {} {{}}.", ("a small", "the small")),
    ("a photo of {} {{}}.", ("a large", "the large")),
    ("a photo of {} {{}} for visual inspection.", ("a", "the")),
    ("a photo of {} {{}} for anomaly detection.", ("a", "the")),
)
TEMPLATES = tuple(pattern.format(article) for pattern, articles in _TEMPLATE_PAIRS for article in articles)
#: Class names that get the single-prompt branch (CIFAR-10 names and "animal").
SINGLE_PROMPT_CLASSES = frozenset(
    ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck", "animal")
)


def prompt_texts(class_name: str) -> tuple[list[str], list[str]]:
    """Normal and abnormal prompts for ``class_name`` (underscores become spaces).

    Default: 7 normal and 4 abnormal states x 22 templates, states outer, templates inner
    (154 + 88 prompts). CIFAR-10 class names and "animal": one prompt per side.
    """
    name = class_name.replace("_", " ")
    if name in SINGLE_PROMPT_CLASSES:
        return [f"a photo of {name} for anomaly detection."], [f"a photo without {name} for anomaly detection."]
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(name)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal


def encode_texts(backbone: Backbone, texts: Sequence[str]) -> torch.Tensor:
    """CLIP text embeddings ``(T, E)``, not normalised (EOT pooling -> ``ln_final`` -> projection)."""
    return backbone.model.encode_text(backbone.tokenize(texts), normalize=False)


@functools.lru_cache(maxsize=64)
def text_prior_features(backbone: Backbone, class_name: str) -> torch.Tensor:
    """The two text prototypes ``(2, E)`` (row 0 normal, row 1 abnormal), L2-normalised.

    Per side: normalise each prompt embedding, average, normalise again. Cached per
    (backbone, class name): the prompts depend on nothing else.
    """
    rows = []
    with torch.no_grad():
        for texts in prompt_texts(class_name):
            features = encode_texts(backbone, texts).float()
            features = features / features.norm(dim=-1, keepdim=True)
            mean = features.mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows).detach()


def text_prior_score(image_embeddings: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``text_score`` ``(B,)``: ``softmax(100 * [cos(img, t_normal), cos(img, t_abnormal)])[1]``.

    Args:
        image_embeddings: ``(B, E)`` unnormalised CLIP image embeddings.
        text_features: ``(2, E)`` from ``text_prior_features``.
    """
    image = image_embeddings / image_embeddings.norm(dim=-1, keepdim=True)
    logits = TEXT_TEMPERATURE * image @ text_features.to(image).T
    return logits.softmax(dim=-1)[:, 1]


# -- patch residual ---------------------------------------------------------------------------


def l2_normalize(tokens: torch.Tensor) -> torch.Tensor:
    """Plain L2 normalisation along the last axis (``x / ||x||``, as the official code)."""
    return tokens / tokens.norm(dim=-1, keepdim=True)


def patch_residual(query_tokens: torch.Tensor, normal_tokens: torch.Tensor) -> torch.Tensor:
    """Per-layer patch residuals ``d(l, p) = min_n 0.5 * (1 - cos(q_lp, n_ln))`` (paper Eq. 2-3).

    The minimum runs over all normal patches of the same layer, pooled across shots and
    positions. One batched matrix product covers every layer.

    Args:
        query_tokens: ``(B, L, N, D)`` L2-normalised query patch tokens (L layers, N patches).
        normal_tokens: ``(L, M, D)`` L2-normalised normal patch tokens (M = k * N).

    Returns:
        ``(B, L, N)`` residuals in [0, 1]. The map ``M`` is its mean over ``L``.
    """
    batch, layers, patches, width = query_tokens.shape
    queries = query_tokens.permute(1, 0, 2, 3).reshape(layers, batch * patches, width)
    similarity = torch.bmm(queries, normal_tokens.transpose(1, 2))  # (L, B*N, M)
    residual = (0.5 * (1.0 - similarity)).min(dim=-1).values  # (L, B*N)
    return residual.reshape(layers, batch, patches).permute(1, 0, 2)


def patch_residual_map(query_tokens: torch.Tensor, normal_tokens: torch.Tensor) -> torch.Tensor:
    """``M`` ``(B, N)``: the mean over layers of ``patch_residual`` (a mean of minima)."""
    return patch_residual(query_tokens, normal_tokens).mean(dim=1)


# -- learned modules (official names) ---------------------------------------------------------


class Adapter(nn.Module):
    """Official ``Adapter(c_in, reduction)``: two bias-free linear layers, each followed by ReLU.

    ``fc.0``: ``Linear(c_in, c_in // reduction)``, ``fc.2``: ``Linear(c_in // reduction, c_in)``.
    The output replaces the input (no residual mix) and is non-negative. ``(..., c_in) -> (..., c_in)``.
    """

    def __init__(self, c_in: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = c_in // reduction
        self.fc = nn.Sequential(
            nn.Linear(c_in, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, c_in, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class TransformerBasicHead(nn.Module):
    """Official scoring head: ``(B, dim_in) -> (B, num_classes)`` probabilities.

    ``projection1 -> ReLU -> bn2 -> projection2 -> ReLU -> bn3 -> projection3 -> sigmoid``
    (batch norm after the ReLU). ``bn1`` exists in the official module, and therefore in its
    checkpoints, but is never applied.
    """

    def __init__(self, dim_in: int, num_classes: int = 1) -> None:
        super().__init__()
        self.projection1 = nn.Linear(dim_in, 128, bias=True)
        self.projection2 = nn.Linear(128, 64, bias=True)
        self.projection3 = nn.Linear(64, num_classes, bias=True)
        self.bn1 = nn.BatchNorm1d(dim_in)
        self.bn2 = nn.BatchNorm1d(128)
        self.bn3 = nn.BatchNorm1d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(F.relu(self.projection1(x)))
        x = self.bn3(F.relu(self.projection2(x)))
        return torch.sigmoid(self.projection3(x))


@dataclass
class InCTRLScores:
    """Per-query outputs of ``InCTRLHeads`` (all ``(B,)`` except ``holistic_map`` ``(B, N)``)."""

    score: torch.Tensor
    text_score: torch.Tensor
    image_residual_score: torch.Tensor
    holistic_score: torch.Tensor
    max_patch_residual: torch.Tensor
    holistic_map: torch.Tensor


class InCTRLHeads(nn.Module):
    """The learned parts of InCTRL: ``adapter``, ``diff_head`` and ``diff_head_ref``.

    Their ``state_dict`` has exactly the 44 head keys of an official checkpoint. Sizes come
    from the backbone: ``embed_dim`` (640 on ViT-B-16-plus-240) and ``num_patches`` (225).
    """

    def __init__(self, embed_dim: int, num_patches: int, reduction: int = 4) -> None:
        super().__init__()
        self.adapter = Adapter(embed_dim, reduction)
        self.diff_head = TransformerBasicHead(num_patches, 1)
        self.diff_head_ref = TransformerBasicHead(embed_dim, 1)

    def image_residual_score(self, query_embeddings: torch.Tensor, normal_embeddings: torch.Tensor) -> torch.Tensor:
        """``diff_head_ref(mean_k adapter(normal_k) - adapter(query))`` ``(B,)`` (Eq. 4).

        Args:
            query_embeddings: ``(B, E)`` unnormalised CLIP image embeddings.
            normal_embeddings: ``(B, k, E)`` the normals of each query.
        """
        prototype = self.adapter(normal_embeddings).mean(dim=1)  # (B, E)
        residual = prototype - self.adapter(query_embeddings)  # normal prototype minus query
        return self.diff_head_ref(residual).squeeze(1)

    def forward(
        self,
        query_embeddings: torch.Tensor,
        normal_embeddings: torch.Tensor,
        patch_map: torch.Tensor,
        text_score: torch.Tensor,
    ) -> InCTRLScores:
        """Official scoring of a batch of independent queries.

        Args:
            query_embeddings: ``(B, E)``.
            normal_embeddings: ``(B, k, E)``.
            patch_map: ``(B, N)`` patch residual map ``M``.
            text_score: ``(B,)``.

        Returns:
            ``holistic_map = M + text_score + image_residual_score`` ``(B, N)``,
            ``holistic_score = diff_head(holistic_map)``, ``max_patch_residual = max(M)``
            and ``score = (holistic_score + max_patch_residual) / 2``.
        """
        image_residual = self.image_residual_score(query_embeddings, normal_embeddings)
        holistic_map = text_score[:, None] + image_residual[:, None] + patch_map
        holistic_score = self.diff_head(holistic_map).squeeze(1)
        max_patch = patch_map.max(dim=1).values
        return InCTRLScores(
            score=(holistic_score + max_patch) / 2,
            text_score=text_score,
            image_residual_score=image_residual,
            holistic_score=holistic_score,
            max_patch_residual=max_patch,
            holistic_map=holistic_map,
        )


def training_free_score(text_score: torch.Tensor, max_patch_residual: torch.Tensor) -> torch.Tensor:
    """Score without trained heads (api.md Decisions): ``(text_score + max(M)) / 2``."""
    return (text_score + max_patch_residual) / 2


# -- encoding ---------------------------------------------------------------------------------


def block_indices(backbone: Backbone) -> tuple[int, ...]:
    """The official blocks 6, 8, 10 (0-based) mapped onto ``backbone``'s depth."""
    return tuple(backbone.map_block_index(i, OFFICIAL_NUM_BLOCKS) for i in OFFICIAL_BLOCKS)


def encode_images(backbone: Backbone, images: torch.Tensor, blocks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One vision forward: patch tokens of ``blocks`` and the image embedding.

    Args:
        images: ``(B, 3, S, S)`` normalised input.

    Returns:
        ``(tokens (B, L, N, D) L2-normalised, embeddings (B, E) unnormalised)`` with L =
        len(blocks), N patches in row-major order, D the vision width.
    """
    out = backbone.intermediate_tokens(images, blocks)
    tokens = torch.stack([t.float() for t in out["patch_tokens"]], dim=1)
    return l2_normalize(tokens), out["image_features"].float()


def head_state_shapes(heads: InCTRLHeads) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in heads.state_dict().items()}


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(head keys, other keys)`` of a checkpoint state dict."""
    heads = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    others = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    return heads, others


def checkpoint_header(
    *, backbone: str, shots: int, epoch: int, calibration: Calibration | None = None, **extra: Any
) -> dict[str, Any]:
    """JSON header of our own InCTRL training output."""
    header: dict[str, Any] = {"method": "inctrl", "backbone": backbone, "shots": int(shots), "epoch": int(epoch)}
    if calibration is not None:
        header["calibration"] = calibration.to_dict()
    header.update(extra)
    return header


# -- the registered method --------------------------------------------------------------------


@dataclass
class _NormalBank:
    """Cached features of the fitted normal images.

    ``tokens``: ``(k, L, N, D)`` L2-normalised; ``pooled``: ``(L, k*N, D)`` (shot-major);
    ``embeddings``: ``(k, E)``; ``geometries``: one per normal.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    embeddings: torch.Tensor
    geometries: tuple[Geometry, ...]


@dataclass(frozen=True)
class InCTRLCheckpoint:
    """What an InCTRL checkpoint holds: its header, the 44 head tensors, and whether the
    file also carries CLIP weights (the official full files do)."""

    path: Path
    header: dict[str, Any]
    head_state: dict[str, torch.Tensor]
    carries_clip: bool


@dataclass(frozen=True)
class PatchEvidence:
    """The query's deepest-layer patch tokens ``(N, D)``, L2-normalised (for ``explain``)."""

    tokens: np.ndarray


def _pool_normals(tokens: torch.Tensor) -> torch.Tensor:
    """``(k, L, N, D) -> (L, k*N, D)``, shot-major along the pooled axis."""
    shots, layers, patches, width = tokens.shape
    return tokens.permute(1, 0, 2, 3).reshape(layers, shots * patches, width)


@register_method("InCTRL")
class InCTRLDetector(Detector):
    """InCTRL (CVPR 2024) on open_clip ``ViT-B-16-plus-240`` / ``laion400m_e32``.

    Options: ``heads`` = ``"auto"`` (trained when a checkpoint is loaded), ``"trained"``
    (requires one) or ``"training-free"`` (``score = (text_score + max(M)) / 2``).
    ``checkpoint`` accepts the official full 345-key ``.pyth`` (raw or ``{"model_state": ...}``;
    its CLIP weights replace ``backbone_weights``), the 44 head keys alone, or our own
    safetensors training output.
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
        training_module="detector.training.inctrl",
        options={
            "heads": Option("auto", HEADS_OPTIONS, help="trained heads (auto = when a checkpoint is loaded) or the training-free score"),
        },
        batch_size=8,
    )

    # -- construction hooks ---------------------------------------------------------------
    def _validate(self) -> None:
        if self.options["heads"] == "trained" and self.checkpoint is None:
            raise ValueError("heads='trained' needs a checkpoint with InCTRL's heads (checkpoint=PATH)")

    def _read_checkpoint(self, path: Path) -> InCTRLCheckpoint:
        header = read_header(path)
        if header and header.get("method", self.name) != self.name:
            raise CheckpointError(f"{path.name} was written for method {header.get('method')!r}, not {self.name!r}")
        head_state, clip_state = split_checkpoint(read_state_dict(path))
        if not head_state:
            shown = ", ".join(sorted(clip_state)[:10])
            raise CheckpointError(
                f"{path.name} holds no InCTRL head keys (adapter.*, diff_head.*, diff_head_ref.*); "
                f"found {len(clip_state)} other keys: {shown}"
            )
        if "calibration" in header:
            self.stored_calibration = Calibration(**{**header["calibration"], "source": "stored"})
        return InCTRLCheckpoint(path, header, head_state, carries_clip=bool(clip_state))

    def _backbone_choice(
        self, backbone: str | None, backbone_weights: str | None, artefact: InCTRLCheckpoint | None
    ) -> BackboneChoice:
        model_name = backbone or (artefact.header.get("backbone") if artefact else None) or DEFAULT_BACKBONE
        if artefact is not None and artefact.carries_clip:
            return BackboneChoice(
                model_name, str(artefact.path), ignore_prefixes=HEAD_PREFIXES, description=f"from checkpoint {self.checkpoint}"
            )
        return super()._backbone_choice(model_name, backbone_weights, artefact)

    @classmethod
    def checkpoint_supplies_backbone(cls, path: str | Path) -> bool:
        """True for files with keys outside the heads (the official full checkpoints)."""
        return any(not key.startswith(HEAD_PREFIXES) for key in state_keys(path))

    def _build(self, artefact: InCTRLCheckpoint | None) -> None:
        self.header: dict[str, Any] = artefact.header if artefact else {}
        self.clip_from_checkpoint = bool(artefact and artefact.carries_clip)
        self.blocks = block_indices(self.backbone)
        rows, cols = self.grid
        with torch.random.fork_rng(devices=[]):
            # Initial head weights from ``seed`` (training starts from them), without touching
            # the caller's global random state.
            torch.manual_seed(self.seed)
            self.heads = InCTRLHeads(self.backbone.embed_dim, rows * cols)
        self.has_trained_heads = artefact is not None
        if artefact is not None:
            check_keys(artefact.head_state, head_state_shapes(self.heads), what="InCTRL's heads (adapter, diff_head, diff_head_ref)")
            self.heads.load_state_dict({k: v.float() for k, v in artefact.head_state.items()}, strict=True)
        self.heads.to(self.device).eval().requires_grad_(False)
        self.use_heads = self.has_trained_heads and self.options["heads"] != "training-free"
        self._bank: _NormalBank | None = None

    # -- facts ------------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self.use_heads

    def _details(self) -> dict[str, Any]:
        return {"heads": self.options["heads"], "blocks": list(self.blocks), "checkpoint_shots": self.header.get("shots")}

    def _result_warnings(self) -> tuple[str, ...]:
        shots = self.header.get("shots")
        if shots is not None and int(shots) != self.num_normals:
            return (
                f"the InCTRL checkpoint was trained with {int(shots)} normal images per query, "
                f"{self.num_normals} are fitted",
            )
        return ()

    # -- fit / predict hooks ----------------------------------------------------------------
    def _fit(self, normals: PreparedBatch, progress: ProgressCallback | None) -> None:
        if progress is not None:
            progress(0.1, "encoding normal images")
        with torch.inference_mode():
            tokens, embeddings = self._encode(normals)
            text_prior_features(self.backbone, self.class_name)
        self._bank = _NormalBank(tokens=tokens, pooled=_pool_normals(tokens), embeddings=embeddings, geometries=normals.geometries)

    def _encode(self, batch: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (B, L, N, D), embeddings (B, E))`` from one vision forward."""
        return encode_images(self.backbone, batch.pixels, self.blocks)

    def _scores(
        self, tokens: torch.Tensor, embeddings: torch.Tensor, normal_pooled: torch.Tensor, normal_embeddings: torch.Tensor
    ) -> tuple[InCTRLScores | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(head outputs or None, M (B, N), text_score (B,), score (B,))`` for independent queries."""
        patch_map = patch_residual_map(tokens, normal_pooled)
        text_score = text_prior_score(embeddings, text_prior_features(self.backbone, self.class_name))
        if self.use_heads:
            normals = normal_embeddings.unsqueeze(0).expand(len(embeddings), -1, -1)
            outputs = self.heads(embeddings, normals, patch_map, text_score)
            return outputs, patch_map, text_score, outputs.score
        return None, patch_map, text_score, training_free_score(text_score, patch_map.max(dim=1).values)

    def _score(self, encoded: tuple[torch.Tensor, torch.Tensor], batch: PreparedBatch) -> list[MethodOutput]:
        assert self._bank is not None
        tokens, embeddings = encoded
        outputs, patch_map, text_score, score = self._scores(tokens, embeddings, self._bank.pooled, self._bank.embeddings)
        results = []
        for i in range(len(batch)):
            raw_map = patch_map[i].reshape(self.grid).cpu().numpy().astype(np.float32)
            results.append(
                MethodOutput(
                    score=float(score[i]),
                    raw_map=raw_map,
                    extras=self._extras(i, outputs, text_score, raw_map),
                    evidence=PatchEvidence(tokens[i, -1].cpu().numpy().astype(np.float32)),
                )
            )
        return results

    def _extras(self, i: int, outputs: InCTRLScores | None, text_score: torch.Tensor, raw_map: np.ndarray) -> dict[str, Any]:
        extras: dict[str, Any] = {"text_score": float(text_score[i]), "max_patch_residual": float(raw_map.max())}
        if outputs is not None:
            extras["image_residual_score"] = float(outputs.image_residual_score[i])
            extras["holistic_score"] = float(outputs.holistic_score[i])
            extras["holistic_map"] = outputs.holistic_map[i].reshape(self.grid).cpu().numpy().astype(np.float32)
        else:
            # Without trained heads there is no image residual: the map is M + text_score.
            extras["holistic_map"] = (raw_map + np.float32(text_score[i])).astype(np.float32)
        return extras

    # -- calibration and explanations ---------------------------------------------------------
    def _leave_one_out(self) -> list[MethodOutput] | None:
        """Each fitted normal scored against the other ones, from cached features."""
        bank = self._bank
        if bank is None or len(bank.geometries) < 2:
            return None
        out = []
        for i in range(len(bank.geometries)):
            others = [j for j in range(len(bank.geometries)) if j != i]
            _, patch_map, _, score = self._scores(
                bank.tokens[i : i + 1], bank.embeddings[i : i + 1], _pool_normals(bank.tokens[others]), bank.embeddings[others]
            )
            out.append(MethodOutput(float(score[0]), patch_map[0].reshape(self.grid).cpu().numpy().astype(np.float32)))
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
