"""Train InCTRL's heads (adapter, diff_head, diff_head_ref) on an auxiliary anomaly dataset.

Follows the official recipe (``main.py`` / ``engine_IC.py`` of github.com/mala-lab/InCTRL):

* per category, every ``train/good`` **and** ``test/good`` image is a normal (label 0) and every
  test defect image an anomaly (label 1); the category name is the prompt's object word;
* each query comes with k normals drawn at random (``random.sample``) from the normals of its
  own category (a normal query may draw itself); no augmentation, the test transform;
* balanced batches (half normal, half anomalous; 8 + 8 by default) from endless shuffled
  streams, ``--steps-per-epoch`` steps (100) for ``--epochs`` epochs (10);
* loss: ``BinaryFocalLoss(alpha=1, gamma=2, logits=True)`` on the final score plus the same loss
  on ``image_residual_score``. Both are probabilities, so ``logits=True`` applies a second
  sigmoid inside the loss: this is the official behaviour and our default
  (``--no-focal-on-probabilities`` uses the plain probability form instead);
* ``AdamW(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)``, no schedule, batch norm in train
  mode; the CLIP towers stay frozen.

Deliberate difference: every query is scored against its own normals. The official forward
mixes queries, layers and shots when the batch is larger than 1 (see ``docs/inctrl.md`` §3).
Since the backbone is frozen and there is no augmentation, each image is encoded once and its
features are kept in a bounded in-memory cache (``--feature-cache-mb``).

Output: one safetensors file per epoch (``<out stem>.epoch-NN.safetensors``, loadable by
``create_detector("inctrl", checkpoint=...)``) with its optimizer state beside it
(``<out stem>.epoch-NN.optim.safetensors``), and ``--out`` itself holding the last epoch.
``--resume`` continues after the last complete epoch file.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ... import datasets
from ...backbone import Backbone
from ...checkpoints import read_header, save_safetensors
from ...cli import add_common_arguments
from ...limits import MAX_NORMAL_IMAGES, MIN_NORMAL_IMAGES
from .checkpoint import checkpoint_header
from .detector import InCTRLDetector
from .model import InCTRLModel, InCTRLScores, pool_normals, text_prior_features, text_prior_score

#: Official recipe defaults.
EPOCHS = 10
STEPS_PER_EPOCH = 100
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
FOCAL_ALPHA = 1.0
FOCAL_GAMMA = 2.0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m detector.train inctrl``."""
    add_common_arguments(parser, method=False)
    parser.add_argument("--dataset", required=True, choices=datasets.KINDS, help="layout of the auxiliary dataset")
    parser.add_argument("--root", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--categories", nargs="+", default=None, help="train on these categories only (default: all)")
    parser.add_argument(
        "--shots", type=int, default=2, help="normal images per query, k (official models: 2, 4 or 8; default 2)"
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"default {EPOCHS}")
    parser.add_argument("--steps-per-epoch", type=int, default=STEPS_PER_EPOCH, help=f"default {STEPS_PER_EPOCH}")
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"even; half normal, half anomalous (default {BATCH_SIZE})"
    )
    parser.add_argument("--lr", type=float, default=LEARNING_RATE, help=f"AdamW learning rate (default {LEARNING_RATE})")
    parser.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help=f"AdamW weight decay (default {WEIGHT_DECAY})")
    parser.add_argument(
        "--focal-on-probabilities",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="official quirk: the focal loss treats the probability scores as logits (default on)",
    )
    parser.add_argument("--resume", action="store_true", help="continue after the last saved epoch of --out")
    parser.add_argument(
        "--feature-cache-mb", type=float, default=4096.0, help="memory for cached image features (default 4096)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def binary_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, *, logits: bool = True) -> torch.Tensor:
    """Official ``BinaryFocalLoss(alpha=1, gamma=2, logits, reduce=True)``: the mean of
    ``alpha * (1 - p_t)**gamma * BCE`` with ``p_t = exp(-BCE)``; ``logits=True`` computes the BCE
    with a sigmoid applied to ``inputs``."""
    if logits:
        bce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    else:
        bce = F.binary_cross_entropy(inputs.clamp(1e-7, 1 - 1e-7), targets, reduction="none")
    p_t = torch.exp(-bce)
    return (FOCAL_ALPHA * (1 - p_t) ** FOCAL_GAMMA * bce).mean()


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingItem:
    image: Path
    label: int
    category: str


@dataclass
class TrainingData:
    """Queries by label and the normal pool of each category."""

    normals: list[TrainingItem]
    anomalies: list[TrainingItem]
    pools: dict[str, list[Path]]


def collect_training_data(kind: str, root: Path, categories: Sequence[str] | None = None) -> TrainingData:
    """Official auxiliary data: train/good + test/good as normals, test defects as anomalies."""
    names = list(categories) if categories else datasets.list_categories(kind, root)
    normals: list[TrainingItem] = []
    anomalies: list[TrainingItem] = []
    pools: dict[str, list[Path]] = {}
    for category in names:
        category_arg = None if kind == "folder" else category
        samples = datasets.test_samples(kind, root, category_arg)
        pool = {p.resolve(): p for p in datasets.train_normals(kind, root, category_arg)}
        for sample in samples:
            if sample.label == 0:
                pool.setdefault(sample.image.resolve(), sample.image)
            else:
                anomalies.append(TrainingItem(sample.image, 1, category))
        pools[category] = sorted(pool.values())
        normals.extend(TrainingItem(p, 0, category) for p in pools[category])
    if not normals or not anomalies:
        raise datasets.DatasetError(
            f"training needs normal and anomalous images; found {len(normals)} normal and {len(anomalies)} anomalous "
            f"in {root}"
        )
    return TrainingData(normals=normals, anomalies=anomalies, pools=pools)


def endless(items: Sequence[TrainingItem], rng: random.Random) -> Iterator[TrainingItem]:
    """Shuffled passes over ``items``, forever (the official balanced sampler's streams)."""
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


class FeatureCache:
    """Features of each image, computed once (the backbone is frozen, no augmentation).

    Holds ``(tokens (L, N, D), embedding (E,))`` per path, least recently used first out
    once ``max_bytes`` is exceeded.
    """

    def __init__(self, detector: InCTRLDetector, max_bytes: float) -> None:
        self.detector = detector
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[Path, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (B, L, N, D), embeddings (B, E))`` for ``paths``, encoding the missing ones."""
        from ...images import load_image

        for path in dict.fromkeys(p for p in paths if p not in self.entries):
            # One image per forward, as at inference (the detector's own encoder hook): the
            # features do not depend on which other images are encoded at the same time.
            with torch.no_grad():
                tokens, embeddings = self.detector._encode(self.detector.prepare([load_image(path)]))
            self.entries[path] = (tokens[0].clone(), embeddings[0].clone())
            self.bytes += (tokens.numel() + embeddings.numel()) * tokens.element_size()
        out = [self.entries[p] for p in paths]
        for path in paths:
            self.entries.move_to_end(path)
        while self.bytes > self.max_bytes and len(self.entries) > len(set(paths)):
            _, (t, e) = self.entries.popitem(last=False)
            self.bytes -= (t.numel() + e.numel()) * t.element_size()
        return torch.stack([t for t, _ in out]), torch.stack([e for _, e in out])


# -- one step ---------------------------------------------------------------------------------------


def batch_scores(
    model: InCTRLModel,
    backbone: Backbone,
    cache: FeatureCache,
    queries: Sequence[TrainingItem],
    shots: Sequence[Sequence[Path]],
) -> InCTRLScores:
    """``InCTRLModel``'s forward (the one inference runs) on a batch of independent queries,
    each against its own k normals and with its own category's text prior."""
    query_tokens, query_embeddings = cache.get([q.image for q in queries])
    k = len(shots[0])
    normal_tokens, normal_embeddings = cache.get([p for group in shots for p in group])
    batch = len(queries)
    normal_tokens = pool_normals(normal_tokens.reshape(batch, k, *normal_tokens.shape[1:]))  # (B, L, k*N, D)
    with torch.no_grad():
        text_score = torch.cat(
            [text_prior_score(query_embeddings[i : i + 1], text_prior_features(backbone, q.category)) for i, q in enumerate(queries)]
        )
    return model(query_tokens, query_embeddings, normal_tokens, normal_embeddings.reshape(batch, k, -1), text_score)


def batch_loss(scores: InCTRLScores, labels: torch.Tensor, *, focal_on_probabilities: bool = True) -> torch.Tensor:
    """The official loss: focal loss on the final score plus focal loss on the image residual score."""
    if scores.image_residual_score is None:
        raise ValueError("training needs the heads in use (heads='trained' or 'auto')")
    return binary_focal_loss(scores.score, labels, logits=focal_on_probabilities) + binary_focal_loss(
        scores.image_residual_score, labels, logits=focal_on_probabilities
    )


# -- checkpoint files -------------------------------------------------------------------------------


def epoch_file(out: Path, epoch: int) -> Path:
    return out.with_name(f"{out.stem}.epoch-{epoch:02d}.safetensors")


def optimizer_file(out: Path, epoch: int) -> Path:
    return out.with_name(f"{out.stem}.epoch-{epoch:02d}.optim.safetensors")


def last_complete_epoch(out: Path) -> int:
    """Highest epoch with both its heads file and its optimizer file, 0 if none."""
    pattern = re.compile(re.escape(out.stem) + r"\.epoch-(\d+)\.safetensors$")
    epochs = [int(m.group(1)) for p in out.parent.glob(f"{out.stem}.epoch-*.safetensors") if (m := pattern.match(p.name))]
    complete = [e for e in epochs if optimizer_file(out, e).is_file()]
    return max(complete, default=0)


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer, rng: random.Random, losses: list[float]) -> None:
    """Optimizer tensors as safetensors; hyper-parameters, sampler RNG and losses in the header."""
    state = optimizer.state_dict()
    tensors = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            tensors[f"state.{index}.{name}"] = torch.as_tensor(value).clone()
    version, internal, gauss = rng.getstate()
    header = {"param_groups": state["param_groups"], "rng": [version, list(internal), gauss], "losses": losses}
    save_safetensors(path, tensors, header)


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, rng: random.Random) -> list[float]:
    from safetensors.torch import load_file

    header = read_header(path)
    tensors = load_file(str(path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    version, internal, gauss = header["rng"]
    rng.setstate((version, tuple(internal), gauss))
    return list(header.get("losses", []))


# -- the command ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Path:
    """Train and write the heads; returns the path of ``--out``."""
    from tqdm import tqdm

    from ... import create_detector

    if not MIN_NORMAL_IMAGES <= args.shots <= MAX_NORMAL_IMAGES:
        raise ValueError(f"--shots must be between {MIN_NORMAL_IMAGES} and {MAX_NORMAL_IMAGES}, got {args.shots}")
    if args.batch_size < 2 or args.batch_size % 2:
        raise ValueError(f"--batch-size must be even and >= 2 (half normal, half anomalous), got {args.batch_size}")
    out = Path(args.out or ".")
    if out.is_dir() or str(args.out or "").endswith(("/", "\\")) or args.out is None:
        out = out / f"inctrl_{args.dataset}_{args.shots}shot.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    detector = create_detector(
        InCTRLDetector.name,
        backbone=args.backbone,
        backbone_weights=args.backbone_weights,
        checkpoint=args.checkpoint,
        device=args.device,
        seed=args.seed,
        runtime="torch",  # training stays in PyTorch, features included
    )
    heads = detector.heads
    heads.requires_grad_(True).train()
    model = InCTRLModel(heads, use_heads=True)  # the inference forward, with the heads being trained
    optimizer = torch.optim.AdamW(heads.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)

    data = collect_training_data(args.dataset, args.root, args.categories)
    for category, pool in data.pools.items():
        if len(pool) < args.shots:
            raise datasets.DatasetError(f"category {category} has {len(pool)} normal images, fewer than --shots {args.shots}")

    losses: list[float] = []
    start_epoch = 1
    if args.resume:
        done = last_complete_epoch(out)
        if done:
            from ...checkpoints import read_state_dict

            heads.load_state_dict(read_state_dict(epoch_file(out, done)))
            losses = load_optimizer(optimizer_file(out, done), optimizer, rng)
            start_epoch = done + 1

    backbone_name = detector.backbone.spec.model_name
    backbone_weights = detector.describe()["backbone_weights"]
    cache = FeatureCache(detector, args.feature_cache_mb * 2**20)
    half = args.batch_size // 2
    for epoch in range(start_epoch, args.epochs + 1):
        # Streams restart each epoch from the saved RNG, so a resumed run draws the same batches.
        normal_stream, anomaly_stream = endless(data.normals, rng), endless(data.anomalies, rng)
        total = 0.0
        bar = tqdm(range(args.steps_per_epoch), desc=f"InCTRL epoch {epoch}/{args.epochs}", disable=args.no_progress)
        for step in bar:
            queries = [next(normal_stream) for _ in range(half)] + [next(anomaly_stream) for _ in range(half)]
            shots = [rng.sample(data.pools[q.category], args.shots) for q in queries]
            labels = torch.tensor([float(q.label) for q in queries])
            loss = batch_loss(batch_scores(model, detector.backbone, cache, queries, shots), labels, focal_on_probabilities=args.focal_on_probabilities)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            bar.set_postfix(loss=f"{total / (step + 1):.4f}")
        losses.append(total / max(args.steps_per_epoch, 1))
        header = checkpoint_header(
            backbone=backbone_name,
            shots=args.shots,
            epoch=epoch,
            backbone_weights=backbone_weights,
            dataset=args.dataset,
            categories=list(data.pools),
            steps_per_epoch=args.steps_per_epoch,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            focal_on_probabilities=bool(args.focal_on_probabilities),
            seed=args.seed,
            losses=losses,
        )
        save_safetensors(epoch_file(out, epoch), heads.state_dict(), header)
        save_optimizer(optimizer_file(out, epoch), optimizer, rng, losses)

    final = last_complete_epoch(out)
    if final == 0:
        raise RuntimeError("no epoch was trained (check --epochs)")
    shutil.copyfile(epoch_file(out, final), out)
    heads.eval().requires_grad_(False)
    return out
