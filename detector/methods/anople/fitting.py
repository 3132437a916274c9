"""AnoPLe's ``fit``: views, pseudo anomalies, the cached pool and the optimisation loop
(docs/anople.md §3.1-§3.4).

The fast preset encodes a fixed pool of views once up to the cache boundary (exact,
because nothing before it is learned) and trains only the prompted suffix; the faithful
preset draws fresh views each step and runs the full prompted forward. Both share the
loss, the latent anomalies and the memory-bank construction.

Fast preset (docs/anople.md §4.2-§4.3, §5: the fit for k = 4 costs at
most 40 image-encoder forwards): visual prompts in block 12 only, the cache boundary and
the latent anomalies after block 11, a pool of clamp(4k, 16, 32) views (half clean: each
normal's global view, then local crops; half pixel-anomalous) encoded once in batches,
12 AdamW steps of batch 4 at lr 4e-3 (prompts) / 2e-3 (decoder). Measured split and the
former numbers: README, AnoPLe section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ...timing import Stopwatch
from .anomalies import latent_noise, latent_patch_mask
from .config import AnoPLeConfig
from .decoder import GLOBAL_VIEW
from .health import assess_parts
from .losses import anople_loss, anomaly_probability
from .model import AnoPLe
from .views import EncodedPool, NormalImage, Progress, ViewBatch, ViewMaker, pool_items, pool_size

__all__ = ["FitReport", "NormalImage", "build_fitted_state", "encode_pool", "fit_anople", "pool_decoder_probabilities"]

#: The progress message's loss is the mean total loss of the last this many steps.
RUNNING_LOSS_WINDOW = 5
#: Views per batch when the pool is encoded (the normals' own global views go one by one).
POOL_ENCODE_BATCH = 4


def encode_pool(module: AnoPLe, batch: ViewBatch, progress: Progress | None, start: float, end: float) -> EncodedPool:
    """Frozen prefix of every view up to the cache boundary.

    A normal's clean global view is its own query input: it is encoded alone (the same
    computation a query of that image gets, so the memory bank matches queries exactly) and
    only once, however often the pool repeats it (k < 4). The other views go in batches of
    ``POOL_ENCODE_BATCH`` (a little faster per view on CPU)."""
    layout = module.layout
    keep = sorted(l for l in set(layout.decoder_levels) | set(layout.memory_levels) if l < layout.boundary)
    count = batch.images.shape[0]
    first_global: dict[int, int] = {}
    source = list(range(count))  # pool index whose encoding each view reuses
    for index in range(count):
        if int(batch.labels[index]) == 0 and int(batch.views[index]) == GLOBAL_VIEW:
            source[index] = first_global.setdefault(batch.shots[index], index)
    singles = sorted(set(first_global.values()))
    others = [i for i in range(count) if i not in first_global.values() and source[i] == i]
    chunks = [[i] for i in singles] + [others[i : i + POOL_ENCODE_BATCH] for i in range(0, len(others), POOL_ENCODE_BATCH)]
    tokens: dict[int, torch.Tensor] = {}
    levels: dict[int, dict[int, torch.Tensor]] = {l: {} for l in keep}
    done = 0
    with torch.inference_mode():
        for chunk in chunks:
            boundary, kept = module.clip.encode_prefix(batch.images[chunk], layout.boundary, keep=keep)
            for row, index in enumerate(chunk):
                tokens[index] = boundary[row]
                for l in keep:
                    levels[l][index] = kept[l][row, 1:]
            done += len(chunk)
            if progress is not None:
                progress(start + (end - start) * done / (len(singles) + len(others)), f"encoding view {done}/{len(singles) + len(others)}")
    return EncodedPool(
        images=batch.images,
        labels=batch.labels,
        targets=batch.targets,
        views=batch.views,
        shots=batch.shots,
        boundary_tokens=torch.stack([tokens[source[i]] for i in range(count)]).clone(),
        levels={l: torch.stack([v[source[i]] for i in range(count)]).clone() for l, v in levels.items()},
    )


def channel_std(tokens: torch.Tensor) -> torch.Tensor:
    """Per-channel std ``(D,)`` of patch tokens ``(P, 1 + N, D)`` (CLS excluded)."""
    return tokens[:, 1:].reshape(-1, tokens.shape[-1]).std(dim=0)


class StratifiedSampler:
    """Batches with equal numbers of clean and pixel-anomalous pool views (the pool's own
    50/50 split, as DRAEM's 50% no-anomaly draw), each half walked through in reshuffled
    epochs so every view is seen equally often [choice: steadier losses than i.i.d. draws
    of 4 from 16]."""

    def __init__(self, labels: torch.Tensor, generator: torch.Generator) -> None:
        self.groups = [torch.nonzero(labels == value).squeeze(1) for value in (0, 1)]
        self.groups = [g for g in self.groups if g.numel()]
        self.generator = generator
        self.queues: list[list[int]] = [[] for _ in self.groups]

    def _take(self, group: int, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if not self.queues[group]:
                order = torch.randperm(self.groups[group].numel(), generator=self.generator)
                self.queues[group] = self.groups[group][order].tolist()
            out.append(self.queues[group].pop(0))
        return out

    def next_batch(self, size: int) -> torch.Tensor:
        counts = [size // len(self.groups)] * len(self.groups)
        counts[-1] += size - sum(counts)
        return torch.tensor([i for g, c in enumerate(counts) for i in self._take(g, c)], dtype=torch.long)


def learning_rate_factor(step: int, total: int, config: AnoPLeConfig) -> float | None:
    """Multiplier of the base lr at 0-based ``step``; ``None`` = use ``config.warmup_lr``.

    Cosine from 1 to 0 over the steps after a constant warm-up of
    ``warmup_fraction * total`` steps (MaPLe/Dassl: 1 warm-up epoch of 5 at 1e-5).
    """
    warmup = int(round(config.warmup_fraction * total))
    if step < warmup:
        return None
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


def make_optimizer(module: AnoPLe, config: AnoPLeConfig) -> torch.optim.Optimizer:
    groups = [
        {"params": list(module.learner.parameters()), "lr": config.lr_prompts, "base_lr": config.lr_prompts},
        {"params": list(module.decoder.parameters()), "lr": config.lr_decoder, "base_lr": config.lr_decoder},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=False)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


@dataclass
class FitReport:
    """What one fit did: per-step losses, timings and (optionally) the encoded pool."""

    log: list[tuple[int, float, float, float, float]]
    timings: dict[str, float]
    steps: int
    pool: EncodedPool | None = None


def fit_anople(
    module: AnoPLe,
    normals: list[NormalImage],
    *,
    image_size: int,
    patch_size: int,
    to_input: Callable[[np.ndarray], torch.Tensor],
    seed: int,
    progress: Progress | None = None,
    keep_pool: bool = False,
) -> FitReport:
    """Train ``module``'s prompts and decoder on ``normals`` and store its fitted state.

    Randomness: one ``numpy.random.Generator`` and one ``torch.Generator`` seeded from
    ``seed``; nothing global is used. Progress: 0-0.10 views, 0.10-0.30 encoding,
    0.30-0.95 steps ("learning prompts, step i/N, loss L" with L the running mean of the
    last ``RUNNING_LOSS_WINDOW`` total losses), 0.95-0.99 memory bank.
    """
    config, layout = module.config, module.layout
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(int(seed))
    watch = Stopwatch()
    k = len(normals)
    maker = ViewMaker(normals, image_size, patch_size, to_input, rng, resized_crop=config.resized_crop, local_fraction=config.local_crop_fraction)
    device = next(module.decoder.parameters()).device

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(float(min(max(fraction, 0.0), 1.0)), message)

    pool: EncodedPool | None = None
    with watch("encode"):
        if config.cached_pool:
            items = pool_items(k, pool_size(k, config))
            views = []
            for index, item in enumerate(items):
                views.append(maker.batch([item]))
                report(0.10 * (index + 1) / len(items), f"building view {index + 1}/{len(items)}")
            batch = ViewBatch(
                images=torch.cat([v.images for v in views]).to(device),
                labels=torch.cat([v.labels for v in views]).to(device),
                targets=torch.cat([v.targets for v in views]).to(device),
                views=torch.cat([v.views for v in views]).to(device),
                shots=[s for v in views for s in v.shots],
            )
            pool = encode_pool(module, batch, progress, 0.10, 0.30)
            clean = pool.labels == 0
            noise_std = channel_std(pool.boundary_tokens[clean])
        else:
            # Noise scale from frozen-CLIP tokens of clean global and local views.
            clean_items = [(shot, local, False) for shot in range(k) for local in (False, True)]
            report(0.10, "building views")
            batch = maker.batch(clean_items)
            collected = []
            with torch.inference_mode():
                for index in range(batch.images.shape[0]):
                    tokens, _ = module.clip.encode_prefix(batch.images[index : index + 1].to(device), layout.latent_block)
                    collected.append(tokens)
                    report(0.10 + 0.20 * (index + 1) / batch.images.shape[0], f"encoding view {index + 1}/{batch.images.shape[0]}")
            noise_std = channel_std(torch.cat(collected)).clone()

    optimizer = make_optimizer(module, config)
    sampler = StratifiedSampler(pool.labels.cpu(), generator) if pool is not None else None
    log: list[tuple[int, float, float, float, float]] = []
    steps = config.steps
    module.decoder.train()
    with watch("train"):
        for step in range(steps):
            factor = learning_rate_factor(step, steps, config)
            for group in optimizer.param_groups:
                group["lr"] = config.warmup_lr if factor is None else group["base_lr"] * factor
            if pool is not None:
                index = sampler.next_batch(config.batch_size).to(device)
                labels = pool.labels[index].clone()
                targets = pool.targets[index].clone()
                views = pool.views[index]
                tokens = pool.boundary_tokens[index]
                levels = {l: v[index] for l, v in pool.levels.items()}
                images = None
            else:
                items = [
                    (int(rng.integers(0, k)), bool(rng.random() < 0.5), bool(rng.random() < 0.5))
                    for _ in range(config.batch_size)
                ]
                fresh = maker.batch(items)
                labels, targets, views = fresh.labels.to(device), fresh.targets.to(device), fresh.views.to(device)
                images, tokens, levels = fresh.images.to(device), None, {}
            # Latent anomalies on a third of the clean samples (docs/anople.md §3.1).
            grid = image_size // patch_size
            latent = np.zeros((labels.shape[0], grid * grid), dtype=bool)
            for b in range(labels.shape[0]):
                if int(labels[b]) == 0 and rng.random() < config.latent_probability:
                    latent[b] = latent_patch_mask(grid, image_size, rng).reshape(-1)
            latent_mask = torch.from_numpy(latent).to(device)
            has_latent = latent_mask.any(dim=1)
            labels = torch.where(has_latent, torch.ones_like(labels), labels)
            targets = torch.where(has_latent[:, None], latent_mask.float(), targets)

            def add_noise(t: torch.Tensor) -> torch.Tensor:
                return latent_noise(t, latent_mask, noise_std, config.sigma_latent, generator)

            text_prompts, visual_prompts = module.effective_prompts()
            text_features = module.encode_text(text_prompts)
            hook = add_noise if bool(has_latent.any()) else None
            if tokens is not None and layout.latent_block <= layout.boundary:
                if hook is not None:
                    tokens = add_noise(tokens)
                hook = None
            features = module.encode_views(
                images, visual_prompts=visual_prompts, cached_tokens=tokens, cached_levels=levels, hook=hook
            )
            patch_logits = module.decode_logits(features, views, text_features)
            logits = module.global_logits(features, text_features)
            terms = anople_loss(logits, labels, patch_logits, targets, gamma=config.focal_gamma, align_weight=config.align_weight)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()
            entry = (step + 1, terms.total.item(), terms.glob.item(), terms.local.item(), terms.align.item())
            log.append(entry)
            running = float(np.mean([e[1] for e in log[-RUNNING_LOSS_WINDOW:]]))
            report(0.30 + 0.65 * (step + 1) / steps, f"learning prompts, step {step + 1}/{steps}, loss {running:.3f}")
    module.decoder.eval()

    with watch("memory"):
        build_fitted_state(module, normals, pool)
    report(0.99, "memory bank built")
    return FitReport(log=log, timings=dict(watch.timings), steps=steps, pool=pool if keep_pool else None)


def clean_view_indices(pool: EncodedPool) -> list[int]:
    """Pool indices of the distinct clean views: every clean local view, and one clean
    global view per shot (the pool repeats a shot's global view when k < 4)."""
    seen: set[int] = set()
    indices = []
    for index in range(pool.labels.shape[0]):
        if int(pool.labels[index]) != 0:
            continue
        if int(pool.views[index]) == GLOBAL_VIEW:
            if pool.shots[index] in seen:
                continue
            seen.add(pool.shots[index])
        indices.append(index)
    return indices


def build_fitted_state(module: AnoPLe, normals: list[NormalImage], pool: EncodedPool | None) -> None:
    """Cache t_n / t_a, then encode each normal's global view with the learned prompts
    (from the pool's cache when there is one): memory banks, each normal's own p_text and
    M_dec for leave-one-out, and the parts' spreads over the clean fit views (``health``:
    the pool's distinct clean views in the fast preset, the normals' global views otherwise)."""
    device = next(module.decoder.parameters()).device
    with torch.inference_mode():
        text_features = module.encode_text()
        module.text_features = text_features.clone()
        banks: dict[int, list[torch.Tensor]] = {l: [] for l in module.layout.memory_levels}
        scores, maps = [], []
        for shot, normal in enumerate(normals):
            features = encode_normal(module, normal, shot, pool, device)
            for l in banks:
                banks[l].append(features.memory[l][0])
            scores.append(module.global_logits(features, text_features).softmax(dim=-1)[0, 1])
            maps.append(module.decode(features, GLOBAL_VIEW, text_features)[0])
        normal_scores, normal_maps = torch.stack(scores), torch.stack(maps)
        clean_scores, clean_maps = normal_scores, normal_maps
        if pool is not None:
            local = [i for i in clean_view_indices(pool) if int(pool.views[i]) != GLOBAL_VIEW]
            if local:
                index = torch.tensor(local, dtype=torch.long, device=pool.boundary_tokens.device)
                features = module.encode_views(
                    cached_tokens=pool.boundary_tokens[index], cached_levels={l: v[index] for l, v in pool.levels.items()}
                )
                clean_scores = torch.cat([normal_scores, module.global_logits(features, text_features).softmax(dim=-1)[:, 1]])
                clean_maps = torch.cat([normal_maps, module.decode(features, GLOBAL_VIEW, text_features)])
        module.set_fitted_state(text_features, {l: torch.cat(v) for l, v in banks.items()}, normal_scores, normal_maps)
        health = assess_parts(clean_maps, clean_scores, module.leave_one_out_memory_maps())
        module.set_health(health)


def encode_normal(module: AnoPLe, normal: NormalImage, shot: int, pool: EncodedPool | None, device: torch.device):
    """Prompted features of one normal's global view; reuses the pool's cached prefix of
    that view when the pool has it (identical to encoding it afresh)."""
    if pool is not None:
        for index in range(pool.labels.shape[0]):
            if pool.shots[index] == shot and int(pool.labels[index]) == 0 and int(pool.views[index]) == GLOBAL_VIEW:
                return module.encode_views(
                    cached_tokens=pool.boundary_tokens[index : index + 1],
                    cached_levels={l: v[index : index + 1] for l, v in pool.levels.items()},
                )
    return module.encode_views(normal.global_input.unsqueeze(0).to(device))


def pool_decoder_probabilities(module: AnoPLe, pool: EncodedPool) -> torch.Tensor:
    """Decoder a ``(P, N)`` of every pool view with the current prompts (for inspection
    and tests)."""
    with torch.inference_mode():
        text_features = module.encode_text()
        features = module.encode_views(cached_tokens=pool.boundary_tokens, cached_levels=pool.levels)
        return anomaly_probability(
            module.decoder([features.patches[l] for l in module.layout.decoder_levels], pool.views), text_features, module.tau
        )
