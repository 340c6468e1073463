"""Turning rewards into learning signal: group-relative advantages and the DAPO reward shapers.

Rows are group-contiguous: rows [g*G:(g+1)*G] are the G sampled completions of prompt g.
"""

import torch

from keel.errors import KeelError


def _grouped(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """View the rewards as (num_groups, group_size), checking the layout."""
    if group_size < 2:
        raise KeelError(
            f"group size must be >= 2 (advantages compare samples within a group), got {group_size}; "
            "sample at least 2 completions per prompt"
        )
    assert rewards_B.dim() == 1, f"rewards must be 1-D, got shape {tuple(rewards_B.shape)}"
    assert rewards_B.numel() % group_size == 0, (
        f"{rewards_B.numel()} rewards do not split into groups of {group_size}"
    )
    return rewards_B.view(-1, group_size)


def group_advantages(
    rewards_B: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages.

    GRPO (DeepSeekMath): (r - group mean) / (group std + eps). The std uses Bessel's correction
    (torch.std's default, the same as TRL), so a group of two rewards {0, 1} has std 0.707.
    Dr. GRPO (scale_by_std=False): r - group mean; dividing by the std up-weights groups that are
    nearly all right or all wrong, which Dr. GRPO identifies as a bias.
    A group whose rewards are all equal gets zero advantage either way.
    """
    rewards_GN = _grouped(rewards_B.float(), group_size)
    adv_GN = rewards_GN - rewards_GN.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv_GN = adv_GN / (rewards_GN.std(dim=1, keepdim=True) + eps)
    return adv_GN.reshape(-1)


def groups_with_signal(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: True for the groups whose rewards are not all equal.

    An all-equal group has zero advantage for every sample, so it contributes no gradient and
    only dilutes the batch; DAPO filters such groups out and samples more prompts instead.
    """
    rewards_GN = _grouped(rewards_B, group_size)
    return (rewards_GN != rewards_GN[:, :1]).any(dim=1)


def overlong_penalty(lengths_B: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the task reward.

    With L the completion length:  0                                  if L <= max_len - cache_len
                                   ((max_len - cache_len) - L) / cache_len  if within the last cache_len
                                   -1                                 if L > max_len
    The ramp reaches -1 at L == max_len, so the penalty is continuous.
    """
    if not 0 < cache_len <= max_len:
        raise KeelError(
            f"overlong cache length must be in (0, max_len={max_len}], got {cache_len}; "
            "set it to a fraction of the generation budget (DAPO uses 4096 of 20480)"
        )
    lengths_B = lengths_B.float()
    free_len = max_len - cache_len
    ramp_B = (free_len - lengths_B) / cache_len
    penalty_B = torch.where(lengths_B <= free_len, torch.zeros_like(ramp_B), ramp_B)
    return torch.where(lengths_B > max_len, torch.full_like(ramp_B, -1.0), penalty_B)
