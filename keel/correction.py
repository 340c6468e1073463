"""Off-policy correction for rollouts sampled by another engine than the trainer, as pure math.

When the sampler (policy mu: another device, dtype or runtime) is not the trainer's own model
(pi_old, the same weights as computed by PyTorch), the sampled tokens come from mu while the loss
assumes pi_old. Each token's loss is weighted by an importance weight built from the ratio
pi_old / mu (Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training";
verl's rollout correction, slime's --use-tis, SkyRL, TRL's vllm_importance_sampling_correction):

- tis       token-level truncated importance sampling: w = min(ratio, cap) (cap 2 by default);
- icepop    w = ratio where low <= ratio <= high (0.5 and 5 by default), else 0 (the token drops out);
- seq_mask  w = 1 for every token of a sequence whose geometric-mean ratio is at most `cap`,
            0 for every token of one whose ratio exceeds it;
- none      w = 1.

seq_mask uses the geometric mean, exp(mean token log-ratio), not the product of the token
ratios: the product of T ratios each a little above 1 grows like r^T, so a fixed threshold would
drop long sequences for being long rather than for being off-policy; the geometric mean is on
the same scale for every length (as GSPO's sequence ratio is, keel/rl/losses.py).

Everything takes `log_ratio_BT` = log pi_old - log mu of the sampled tokens and `mask_BT` (real
completion tokens); padded positions may hold garbage and never matter. The weights are
constants (no gradient flows through them).
"""

from __future__ import annotations

import torch

from keel.config import CORRECTIONS


def correction_weights(log_ratio_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, *, cap: float = 2.0,
                       low: float = 0.5, high: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_BT, corrected_BT): each token's loss weight, 0 at padding, and whether the mode
    changed that token's weight away from its ratio (tis: truncated at `cap`; icepop and
    seq_mask: dropped). Both are detached."""
    assert mode in CORRECTIONS and mode != "auto", mode
    mask_BT = mask_BT.bool()
    log_ratio_BT = torch.where(mask_BT, log_ratio_BT.detach().float(), 0.0)
    ratio_BT = log_ratio_BT.exp()
    if mode == "none":
        weight_BT, corrected_BT = torch.ones_like(ratio_BT), torch.zeros_like(mask_BT)
    elif mode == "tis":
        corrected_BT = ratio_BT > cap
        weight_BT = ratio_BT.clamp(max=cap)
    elif mode == "icepop":
        corrected_BT = (ratio_BT < low) | (ratio_BT > high)
        weight_BT = torch.where(corrected_BT, 0.0, ratio_BT)
    else:  # seq_mask
        seq_log_ratio_B1 = log_ratio_BT.sum(1, keepdim=True) / mask_BT.sum(1, keepdim=True).clamp(min=1)
        corrected_BT = (seq_log_ratio_B1.exp() > cap).expand_as(mask_BT)
        weight_BT = torch.where(corrected_BT, 0.0, 1.0)
    return torch.where(mask_BT, weight_BT, 0.0), corrected_BT & mask_BT


def mismatch_stats(log_ratio_N: torch.Tensor, weight_N: torch.Tensor, corrected_N: torch.Tensor) -> dict[str, float]:
    """Logged per step, over the N real tokens of a batch (flattened, padding removed):

    mismatch_kl   mean of log mu - log pi_old: the plain (k1) estimate of KL(mu || pi_old), since the
                  tokens were drawn from mu. Unbiased but noisy; it can come out negative on a
                  small batch.
    mismatch_k3   mean of (r - 1) - log r with r = pi_old / mu: Schulman's k3 estimate of the same
                  KL, also unbiased, >= 0 for every token and of lower variance, so a small batch
                  cannot show a negative mismatch. Both are logged; k3 is the one to watch.
    correction_share  share of tokens truncated (tis) or dropped (icepop, seq_mask).
    ess           normalised effective sample size of the weights the loss applies,
                  (sum w)^2 / (N sum w^2): 1 when all weights are equal, towards 1/N when one
                  token carries them all; 0 when every token was dropped."""
    log_ratio_N, weight_N = log_ratio_N.detach().double(), weight_N.detach().double()
    n = log_ratio_N.numel()
    if n == 0:
        return {"mismatch_kl": 0.0, "mismatch_k3": 0.0, "correction_share": 0.0, "ess": 1.0}
    square_sum = (weight_N ** 2).sum()
    return {
        "mismatch_kl": (-log_ratio_N).mean().item(),
        "mismatch_k3": (log_ratio_N.exp() - 1 - log_ratio_N).mean().item(),
        "correction_share": corrected_N.double().mean().item(),
        "ess": 0.0 if square_sum == 0 else (weight_N.sum() ** 2 / (n * square_sum)).item(),
    }


def resolve_correction(mode: str, sampler_is_trainer: bool, async_steps: int = 0) -> str:
    """`auto` is tis whenever the sampler is not the trainer itself, or samples `async_steps` (1)
    steps behind it: those rollouts come from the weights before the last update, off-policy even
    when the sampler computes exactly what the trainer does. Else none; other modes as set."""
    if mode != "auto":
        return mode
    return "none" if sampler_is_trainer and not async_steps else "tis"
