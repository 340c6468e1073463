"""Optimizer and learning-rate schedule shared by the training stages."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine", floor: float = 0.1) -> float:
    """Multiplier on the peak learning rate at `step` (0-based): linear warm-up over `warmup`
    steps, then constant or cosine decay to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad (with LoRA: the adapters only, so frozen base
    weights get no moments), decay on matrices only (norms and biases are not decayed), betas as
    in most LLM recipes."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
