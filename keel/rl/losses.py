"""The clipped policy-gradient loss of the GRPO family, as pure math.

Every loss shares one PPO-style surrogate, -min(ratio * A, clip(ratio, 1-eps_low, 1+eps_high) * A).
A `LossSpec` (keel/config.py, one per loss) picks
  (a) the level of the importance ratio: per token, or per sequence (GSPO's geometric mean), and
  (b) how per-token losses are aggregated into one number;
the functions for both live here, keyed by the spec's names.
"""

from typing import Callable

import torch

from keel.config import AGGREGATIONS, RATIO_LEVELS, LossSpec
from keel.errors import KeelError


# ---- aggregation: per-token losses (B, T) -> scalar --------------------------------------------
# Each takes (loss_BT, mask_BT, norm_len); loss_BT is already zero at padded positions.


def _mean_per_sequence(loss_BT, mask_BT, norm_len):
    """Mean over each sequence's own tokens, then over sequences (GRPO; long answers weigh less per token)."""
    per_seq_B = loss_BT.sum(dim=1) / mask_BT.sum(dim=1).clamp(min=1)
    return per_seq_B.mean()


def _mean_over_tokens(loss_BT, mask_BT, norm_len):
    """Mean over every real token of the batch (DAPO token-level loss)."""
    return loss_BT.sum() / mask_BT.sum().clamp(min=1)


def _sum_over_budget(loss_BT, mask_BT, norm_len):
    """Sum over real tokens / (B * generation budget): a constant normaliser, free of length bias (Dr. GRPO)."""
    if norm_len is None:
        raise KeelError("the budget aggregation (dr_grpo) needs norm_len, the generation budget (max new tokens)",
                        field="norm_len")
    return loss_BT.sum() / (loss_BT.shape[0] * norm_len)


# ---- the ratio: per token or per sequence -----------------------------------------------------


def _token_log_ratio(log_ratio_BT, mask_BT):
    return log_ratio_BT


def _sequence_log_ratio(log_ratio_BT, mask_BT):
    """GSPO: the mean token log-ratio, i.e. the log of the geometric mean of the token ratios (B, 1)."""
    return log_ratio_BT.sum(dim=1, keepdim=True) / mask_BT.sum(dim=1, keepdim=True).clamp(min=1)


Aggregate = Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]

_RATIO_LEVEL: dict[str, Callable] = {"token": _token_log_ratio, "sequence": _sequence_log_ratio}
_AGGREGATE: dict[str, Aggregate] = {
    "sequence_mean": _mean_per_sequence,  # GSPO's loss_i is constant over its tokens: a sequence mean
    "token_mean": _mean_over_tokens,
    "budget": _sum_over_budget,
}
assert tuple(_RATIO_LEVEL) == RATIO_LEVELS and tuple(_AGGREGATE) == AGGREGATIONS


def batch_units(spec: LossSpec, lengths_B) -> float:
    """How many units the loss averages over, given each sequence's number of real tokens: tokens
    for a token mean, sequences otherwise. A rank (or a micro-batch) that weighs its loss by its
    share of the whole batch's units contributes exactly its part of the loss over the whole batch."""
    return float(sum(lengths_B)) if spec.aggregation == "token_mean" else float(len(lengths_B))


def rows_with_gradient(adv_B: torch.Tensor, beta: float) -> list[int]:
    """The rows whose loss has a gradient: every row with a KL term (beta > 0), else the rows whose
    advantage is not exactly 0. Without the KL term each token's loss is
    -min(ratio * A, clip(ratio) * A) * w, which is 0 for A == 0 whatever the policy, at either ratio
    level and whatever correction weight w: such a row's gradient is exactly 0, so its forward and
    backward can be skipped. Its tokens and sequences still count in the normalisers (`batch_units`
    of the whole batch), so the loss and the gradient are the unskipped ones to float rounding."""
    if beta > 0:
        return list(range(adv_B.shape[0]))
    return torch.nonzero(adv_B != 0).flatten().tolist()


def policy_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    spec: LossSpec,
    norm_len: int | None = None,
    ref_logp_BT: torch.Tensor | None = None,
    beta: float = 0.0,
    is_weight_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss (to minimise) and detached stats.

    logp_BT: current policy log-probs of the sampled tokens (carries the gradient).
    old_logp_BT: log-probs under the policy that sampled them; ref_logp_BT: under a frozen reference.
    Both are treated as constants. mask_BT marks real completion tokens (float or bool).
    With a reference, beta * k3 KL (exp(ref - logp) - (ref - logp) - 1, unbiased and >= 0) is added
    per token before aggregation. Sequences without real tokens contribute zero, never NaN.

    norm_len is the generation budget (max new tokens), which the "budget" aggregation divides by.

    is_weight_BT: each token's off-policy correction weight (keel/correction.py: the sampler was
    not the trainer), a constant multiplying its policy-gradient term (not the KL term). A dropped
    token (weight 0) still counts in the normaliser. None: no weighting, and exactly 1 gives the
    unweighted numbers bit for bit (x * 1.0 == x).

    stats: clip_frac (share of tokens, or of sequences for a sequence-level ratio, where the clipped term is the one
    the min picks: ratio above 1+eps_high with A > 0 or below 1-eps_low with A < 0), kl (mean k3
    over real tokens; 0.0 without a reference), ratio_mean (over real tokens, or sequences).
    """
    if beta > 0 and ref_logp_BT is None:
        raise KeelError(f"a KL penalty (beta={beta}) needs reference log-probs; pass ref_logp_BT or set beta=0")
    assert logp_BT.shape == old_logp_BT.shape == mask_BT.shape, (logp_BT.shape, old_logp_BT.shape, mask_BT.shape)
    assert adv_B.shape == logp_BT.shape[:1], (adv_B.shape, logp_BT.shape)
    log_ratio_level, aggregate = _RATIO_LEVEL[spec.ratio], _AGGREGATE[spec.aggregation]
    eps_low, eps_high = spec.eps_low, spec.eps_high

    mask_BT = mask_BT.bool()
    fmask_BT = mask_BT.float()
    # where() rather than multiplying by the mask: padded positions may hold inf/NaN garbage, and
    # exp() of garbage must not leak NaN into the loss or its gradient.
    log_ratio_BT = torch.where(mask_BT, logp_BT - old_logp_BT.detach(), 0.0)
    ratio = log_ratio_level(log_ratio_BT, fmask_BT).exp()  # (B, T) or (B, 1)
    adv = adv_B.detach().float().unsqueeze(1)  # (B, 1), broadcasts over tokens
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    pg = -torch.min(ratio * adv, clipped_ratio * adv)
    if is_weight_BT is not None:
        pg = pg * is_weight_BT.detach()
    loss_BT = pg.expand_as(logp_BT)

    kl_BT = None
    if ref_logp_BT is not None:
        delta_BT = torch.where(mask_BT, ref_logp_BT.detach() - logp_BT, 0.0)
        kl_BT = delta_BT.exp() - delta_BT - 1
        if beta != 0:
            loss_BT = loss_BT + beta * kl_BT
    loss = aggregate(torch.where(mask_BT, loss_BT, 0.0), fmask_BT, norm_len)

    with torch.no_grad():
        # Weights for the ratio-level stats: real tokens, or sequences that have any real token.
        weight = fmask_BT if ratio.shape == mask_BT.shape else (fmask_BT.sum(1, keepdim=True) > 0).float()
        clipped = ((ratio > 1 + eps_high) & (adv > 0)) | ((ratio < 1 - eps_low) & (adv < 0))
        n = weight.sum().clamp(min=1)
        stats = {
            "clip_frac": ((clipped.float() * weight).sum() / n).item(),
            "kl": 0.0 if kl_BT is None else ((kl_BT * fmask_BT).sum() / fmask_BT.sum().clamp(min=1)).item(),
            "ratio_mean": ((ratio * weight).sum() / n).item(),
        }
    return loss, stats
