"""Train one small GPT per arm on the same data order and compare held-out loss.

An *arm* is a loss: the full cross-entropy, CGGR (some scoring/selection at a ratio with the
curriculum), or random selection at the same ratio schedule (the control). Used by
``cggr demo`` and by ``bench/quality.py``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..loss import CGGRLoss
from .data import sample_batch
from .model import GPT, GPTConfig


@dataclass(frozen=True)
class Arm:
    name: str
    ratio: float = 1.0
    scoring: str = "gradnorm"
    selection: str = "importance"
    full: bool = False  # the plain F.cross_entropy baseline


@dataclass
class TrainConfig:
    steps: int = 300
    batch: int = 16
    lr: float = 3e-3
    lr_warmup_fraction: float = 0.05
    curriculum_fraction: float = 0.25  # CGGRLoss warmup_steps = this x steps
    eval_every: int = 25
    eval_batches: int = 8
    device: str = "cpu"


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak, fully within the run."""
    warmup = max(1, int(config.lr_warmup_fraction * config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: GPT, batches, frequent: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Full-token held-out loss; with ``frequent`` (bool [V]) also split by target frequency."""
    model.eval()
    losses, is_frequent = [], []
    for inputs, targets in batches:
        with _autocast(inputs.device):
            logits = model.head(model(inputs))
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none"))
        if frequent is not None:
            is_frequent.append(frequent[targets.flatten()])
    model.train()
    all_losses = torch.cat(losses)
    result = {"loss": all_losses.mean().item()}
    if frequent is not None:
        mask = torch.cat(is_frequent)
        result["loss_frequent"] = all_losses[mask].mean().item()
        result["loss_rare"] = all_losses[~mask].mean().item()
    return result


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)


def train_arm(arm: Arm, model_config: GPTConfig, train_stream: torch.Tensor, eval_batches, config: TrainConfig,
              seed: int, frequent: Optional[torch.Tensor] = None, progress=None) -> Dict:
    """Train a fresh model with ``arm``'s loss; returns curves and summary numbers."""
    device = torch.device(config.device)
    torch.manual_seed(seed)
    model = GPT(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data_order = torch.Generator().manual_seed(seed)  # the same batches for every arm
    criterion = None
    if not arm.full:
        criterion = CGGRLoss(min_tokens_ratio=arm.ratio, warmup_steps=int(config.curriculum_fraction * config.steps),
                             scoring=arm.scoring, selection=arm.selection, check_targets=False, return_info=True,
                             generator=torch.Generator(device=device).manual_seed(seed + 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    curve: List[Dict] = []
    train_seconds = loss_seconds = 0.0
    tokens_carried = torch.zeros((), dtype=torch.int64, device=device)  # read once, at the end
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        inputs, targets = sample_batch(train_stream, config.batch, model_config.seq_len, data_order, device)
        _sync(device)
        start = time.perf_counter()
        with _autocast(device):
            logits = model.head(model(inputs))
        _sync(device)
        loss_start = time.perf_counter()
        if criterion is None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            tokens_carried += targets.numel()
        else:
            loss, info = criterion(logits, targets)
            tokens_carried += info.n_selected
        # Two-stage backward, so the loss's own forward+backward can be timed on its own.
        (grad_logits,) = torch.autograd.grad(loss, logits)
        _sync(device)
        if step > 0:  # the first step pays one-time kernel compilation: not counted
            loss_seconds += time.perf_counter() - loss_start
        logits.backward(grad_logits)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if criterion is not None:
            criterion.step()
        _sync(device)
        if step > 0:
            train_seconds += time.perf_counter() - start
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            point = {"step": step + 1, "seconds": train_seconds, **evaluate(model, eval_batches, frequent)}
            curve.append(point)
            if progress is not None:
                progress(point)
    final = curve[-1]
    return {
        "arm": asdict(arm),
        "seed": seed,
        "curve": curve,
        "held_out_loss": final["loss"],
        "perplexity": math.exp(min(final["loss"], 50.0)),
        **{key: final[key] for key in ("loss_frequent", "loss_rare") if key in final},
        "tokens_carried_loss": int(tokens_carried),
        "tokens_seen": config.steps * config.batch * model_config.seq_len,
        "step_ms": 1e3 * train_seconds / max(1, config.steps - 1),  # first step excluded
        "loss_ms": 1e3 * loss_seconds / max(1, config.steps - 1),
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def fixed_batches(stream: torch.Tensor, count: int, batch: int, seq_len: int, seed: int, device) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [sample_batch(stream, batch, seq_len, generator, device) for _ in range(count)]
