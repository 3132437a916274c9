"""Train FAPrompt's prompt learner on an auxiliary anomaly dataset (official recipe).

Follows ``train.py`` / ``train.sh`` of github.com/mala-lab/FAPrompt (docs/faprompt.md §8):

* data: the **test split** of the auxiliary dataset, with its masks (normal images get an empty
  mask); images preprocessed as at test time (squash resize to the input size, no
  augmentation); masks resized bilinearly to the input size and thresholded at 0.5;
* CLIP frozen; only the prompt learner (context tokens, deep prompts, prior network) is
  optimised with ``Adam(lr=1e-3, betas=(0.5, 0.999))``, seed 111, 15 epochs of batches of 8
  (shuffled; the last batch may be smaller);
* loss ``L_seg + L_img + L_img2 + 0.1 * L_ab + L_bias`` where
  ``L_seg = Focal(map1, gt) + Dice(map1[ab], gt) + Dice(map1[n], 1 - gt) + 0.5 * (same on map2)``
  on the upsampled pass-1 / pass-2 probability maps, ``L_img`` = cross-entropy of the global
  feature against the pass-2 class features (temperature 0.07), ``L_img2`` = binary focal loss
  with ``logits=True`` applied to the image score, which is already a probability (official
  quirk, kept), ``L_ab`` = sum of |cos| over the 45 pairs of pass-1 abnormal prompt features,
  ``L_bias`` = sum over normal images of ``MSE(bias, 0)``.

Since the backbone is frozen and there is no augmentation, each image's vision features are
computed once and kept in memory within ``--feature-cache-mb`` (the numbers do not change).

Output: ``--out`` (safetensors; the official key names, so it loads with
``create_detector("faprompt", checkpoint=...)``) rewritten after every epoch, with a JSON header
(backbone, input size, epoch, per-epoch mean losses) and the optimizer state beside it
(``<out>.optim.safetensors``). ``--resume`` continues after the last completed epoch.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ... import datasets
from ...backbone import load_backbone
from ...checkpoints import read_header, read_state_dict, save_safetensors
from ...cli import add_common_arguments
from ...weights import resolve_default_weights
from . import config as fp_config
from .detector import FAPromptDetector
from .encoders import method_image_size, quick_gelu_for
from .learner import FAPromptLearner, load_learner_state
from .model import FAPromptModel

#: Official recipe defaults (train.sh / train.py).
EPOCHS = 15
BATCH_SIZE = 8
LEARNING_RATE = 1e-3
BETAS = (0.5, 0.999)
SEED = 111
AB_WEIGHT = 0.1
PASS2_WEIGHT = 0.5
FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5
DICE_SMOOTH = 1.0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m detector.train faprompt``."""
    add_common_arguments(parser, method=False)
    for action in parser._actions:
        if action.dest == "seed":
            action.default = SEED
            action.help = f"random seed (default: {SEED}, the official one)"
        elif action.dest == "checkpoint":
            action.help = "start from this prompt-learner file (official .pth or ours) instead of a random init"
        elif action.dest == "out":
            action.help = "output file, or a folder for faprompt_<dataset>.safetensors"
    parser.add_argument("--dataset", required=True, choices=datasets.KINDS, help="layout of the auxiliary dataset")
    parser.add_argument("--root", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--categories", nargs="+", default=None, help="train on these categories only (default: all)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"default {EPOCHS}")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"default {BATCH_SIZE}")
    parser.add_argument(
        "--image-size", type=int, default=None,
        help="input side in pixels (default: the method's size for the backbone, 518 for ViT-L-14-336)",
    )
    parser.add_argument("--lr", type=float, default=LEARNING_RATE, help=f"Adam learning rate (default {LEARNING_RATE})")
    parser.add_argument("--resume", action="store_true", help="continue after the last saved epoch of --out")
    parser.add_argument(
        "--feature-cache-mb", type=float, default=2048.0, help="memory for cached image features (default 2048)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# -- losses (official loss.py semantics) ---------------------------------------------------------


def focal_loss(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official ``FocalLoss()`` on probability maps: uniform alpha, gamma 2, label smoothing 1e-5.

    Args:
        probabilities: ``(B, 2, H, W)`` softmax outputs [normal, abnormal].
        target: ``(B, H, W)`` with values 0/1.
    """
    classes = probabilities.shape[1]
    flat = probabilities.permute(0, 2, 3, 1).reshape(-1, classes)
    one_hot = F.one_hot(target.reshape(-1).long(), classes).to(flat.dtype)
    one_hot = one_hot.clamp(FOCAL_SMOOTH / (classes - 1), 1.0 - FOCAL_SMOOTH)
    pt = (one_hot * flat).sum(1) + FOCAL_SMOOTH
    return (-((1 - pt) ** FOCAL_GAMMA) * pt.log()).mean()


def dice_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official ``BinaryDiceLoss``: ``1 - mean_b (2 |p t| + 1) / (|p| + |t| + 1)``; ``(B, H, W)``."""
    batch = target.shape[0]
    p = prediction.reshape(batch, -1)
    t = target.reshape(batch, -1)
    dice = (2 * (p * t).sum(1) + DICE_SMOOTH) / (p.sum(1) + t.sum(1) + DICE_SMOOTH)
    return 1 - dice.sum() / batch


def binary_focal_loss_logits(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Official ``BinaryFocalLoss(alpha=1, gamma=2, logits=True)``: a sigmoid is applied to
    ``inputs`` inside the BCE even though the image score is already in [0, 1] (quirk)."""
    bce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return ((1 - torch.exp(-bce)) ** FOCAL_GAMMA * bce).mean()


def abnormal_diversity_loss(abnormal: torch.Tensor) -> torch.Tensor:
    """``L_ab``: sum over pairs k < m of ``|cos(f_k, f_m)|`` of raw abnormal features ``(10, E)``."""
    normalised = F.normalize(abnormal, dim=-1)
    cosines = normalised @ normalised.T
    upper = torch.triu(torch.ones_like(cosines, dtype=torch.bool), diagonal=1)
    return cosines[upper].abs().sum()


def segmentation_loss(probabilities: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``Focal(map, gt) + Dice(map[ab], gt) + Dice(map[n], 1 - gt)`` for ``(B, 2, H, W)`` maps."""
    return focal_loss(probabilities, gt) + dice_loss(probabilities[:, 1], gt) + dice_loss(probabilities[:, 0], 1 - gt)


def probability_maps(probabilities: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Patch probabilities ``(B, 1 + N, 2)`` -> bilinear ``(B, 2, size, size)`` (CLS dropped)."""
    batch = probabilities.shape[0]
    maps = probabilities[:, 1:].reshape(batch, grid[0], grid[1], 2).permute(0, 3, 1, 2)
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingItem:
    image: Path
    label: int
    sample: datasets.Sample


def collect_items(kind: str, root: Path, categories: Sequence[str] | None) -> list[TrainingItem]:
    """Every test image of the chosen categories (official: ``meta.json["test"]``)."""
    names = list(categories) if categories else datasets.list_categories(kind, root)
    items = []
    for category in names:
        for sample in datasets.test_samples(kind, root, None if kind == "folder" else category):
            items.append(TrainingItem(sample.image, int(sample.label), sample))
    if not items:
        raise datasets.DatasetError(f"no test images found in {root}")
    return items


def mask_tensor(item: TrainingItem, size: int) -> torch.Tensor:
    """Ground truth ``(size, size)`` float 0/1: mask as 0/255, bilinear resize, ``> 0.5``."""
    if item.label == 0 or item.sample.mask is None:
        return torch.zeros(size, size)
    mask = datasets.read_mask(item.sample)
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize((size, size), Image.BILINEAR)
    return torch.from_numpy((np.asarray(image, dtype=np.float32) / 255.0 > 0.5).astype(np.float32))


class FeatureCache:
    """Vision features per image, computed once (the backbone is frozen), within a byte budget."""

    def __init__(self, model: FAPromptModel, spec, device: torch.device, budget_mb: float) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self.entries: dict[Path, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        from ...images import load_image
        from ...preprocess import preprocess

        missing = [p for p in paths if p not in self.entries]
        computed: dict[Path, tuple[torch.Tensor, torch.Tensor]] = {}
        if missing:
            batch = torch.stack([preprocess(load_image(p), self.spec)[0] for p in missing]).to(self.device)
            with torch.no_grad():
                global_features, patches = self.model.encode_images(batch)
            for i, path in enumerate(missing):
                entry = (global_features[i].detach(), patches[i].detach())
                computed[path] = entry
                size = entry[0].numel() * 4 + entry[1].numel() * 4
                if self.used + size <= self.budget:
                    self.entries[path] = entry
                    self.used += size
        rows = [self.entries.get(p) or computed[p] for p in paths]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


# -- checkpoint files -------------------------------------------------------------------------------


def optimizer_file(out: Path) -> Path:
    return out.with_name(out.name + ".optim.safetensors")


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer, header: dict) -> None:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().clone()
    if not tensors:
        tensors["empty"] = torch.zeros(1)
    save_safetensors(path, tensors, header)


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    tensors = read_state_dict(path)
    state = optimizer.state_dict()
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name == "empty":
            continue
        index, key = name.split(".", 1)
        restored.setdefault(int(index), {})[key] = value
    state["state"] = restored
    optimizer.load_state_dict(state)


# -- training -----------------------------------------------------------------------------------


def batch_loss(
    model: FAPromptModel,
    global_features: torch.Tensor,
    patches: torch.Tensor,
    labels: torch.Tensor,
    gt: torch.Tensor,
    size: int,
    grid: tuple[int, int],
) -> tuple[torch.Tensor, dict[str, float]]:
    """The official training loss of one batch (see the module docstring)."""
    state = model.text_state()
    loss_ab = abnormal_diversity_loss(state.abnormal)
    out = model.score_features(global_features, patches, state)
    map1 = probability_maps(out["pass1"], grid, size)
    map2 = probability_maps(out["pass2"], grid, size)
    loss_seg = segmentation_loss(map1, gt) + PASS2_WEIGHT * segmentation_loss(map2, gt)
    loss_img = F.cross_entropy(out["text_logits"], labels.long())
    loss_img2 = binary_focal_loss_logits(out["score"], labels.float())
    bias = out["bias"]
    normal = labels == 0
    loss_bias = (bias[normal] ** 2).mean(dim=1).sum() if normal.any() else bias.sum() * 0
    total = loss_seg + loss_img + loss_img2 + AB_WEIGHT * loss_ab + loss_bias
    parts = {
        "seg": float(loss_seg.detach()),
        "img": float(loss_img.detach()),
        "img2": float(loss_img2.detach()),
        "ab": float(loss_ab.detach()),
        "bias": float(loss_bias.detach()),
    }
    return total, parts


def run(args: argparse.Namespace) -> Path:
    """Train and write the checkpoint; returns its path."""
    from tqdm import tqdm

    from ...preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess

    seed = int(args.seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_name = args.backbone or fp_config.DEFAULT_BACKBONE
    weights = resolve_default_weights(model_name, args.backbone_weights, default_model=fp_config.DEFAULT_BACKBONE, default_weights=fp_config.DEFAULT_WEIGHTS)
    size = int(args.image_size or method_image_size(model_name))
    backbone = load_backbone(model_name, weights, image_size=size, device=args.device, quick_gelu=quick_gelu_for(model_name))
    grid = backbone.grid_size
    default_name = f"faprompt_{args.dataset}.safetensors"
    out = Path(args.out) if args.out else Path(default_name)
    if out.is_dir():
        out = out / default_name

    learner = FAPromptLearner.for_backbone(backbone).initialize(backbone, seed=seed).to(backbone.device)
    model = FAPromptModel(backbone, learner)
    optimizer = torch.optim.Adam(learner.parameters(), lr=args.lr, betas=BETAS)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if args.checkpoint and not (args.resume and out.is_file()):
        load_learner_state(learner, args.checkpoint, what="the FAPrompt prompt learner to start from")
    if args.resume and out.is_file():
        header = read_header(out)
        load_learner_state(learner, out, what="the FAPrompt prompt learner being resumed")
        if optimizer_file(out).is_file():
            load_optimizer(optimizer_file(out), optimizer)
        start_epoch = int(header.get("epoch", 0))
        history = list(header.get("history", []))

    items = collect_items(args.dataset, Path(args.root), args.categories)
    spec = Preprocess(size, "squash", OPENAI_MEAN, OPENAI_STD)
    cache = FeatureCache(model, spec, backbone.device, args.feature_cache_mb)
    masks: dict[Path, torch.Tensor] = {}
    base_header = {
        "method": FAPromptDetector.name,
        "format": 1,
        "backbone": model_name,
        "backbone_weights": backbone.weights_description,
        "image_size": size,
        "dataset": args.dataset,
        "root": str(args.root),
        "categories": args.categories,
        "images": len(items),
        "epochs": int(args.epochs),
        "batch_size": int(args.batch_size),
        "lr": float(args.lr),
        "seed": seed,
        "initial_checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "recipe": "official FAPrompt train.py (test split, Adam betas (0.5, 0.999), focal+dice, CE, focal-on-score, 0.1 L_ab, L_bias)",
    }
    learner.train()
    for epoch in range(start_epoch, int(args.epochs)):
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        totals: dict[str, float] = {}
        progress = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress, leave=False)
        for batch_indices in progress:
            batch = [items[i] for i in batch_indices]
            global_features, patches = cache.get([item.image for item in batch])
            for item in batch:
                if item.image not in masks:
                    masks[item.image] = mask_tensor(item, size)
            gt = torch.stack([masks[item.image] for item in batch]).to(backbone.device)
            labels = torch.tensor([item.label for item in batch], device=backbone.device)
            loss, parts = batch_loss(model, global_features, patches, labels, gt, size, grid)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            parts["loss"] = float(loss.detach())
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            progress.set_postfix(loss=f"{float(loss.detach()):.4f}")
        means = {key: value / max(1, len(batches)) for key, value in totals.items()}
        history.append(means)
        header = dict(base_header, epoch=epoch + 1, history=history)
        save_safetensors(out, learner.state_dict(), header)
        save_optimizer(optimizer_file(out), optimizer, {"epoch": epoch + 1})
        if not args.no_progress:
            tqdm.write(f"epoch {epoch + 1}/{args.epochs}: " + json.dumps({k: round(v, 4) for k, v in means.items()}))
    learner.eval()
    return out
