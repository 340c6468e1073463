"""Per-token log-probabilities and entropies of next-token distributions, in fp32.

Shared by the sampler (which records the sampling policy's log-probs), the scorer and the RL
trainer (which recompute them with gradients).
"""

from __future__ import annotations

import torch

from keel.errors import KeelError


def token_logprobs(
    logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log_softmax(logits / temperature) at the given tokens, in fp32.

    Computed as logit[token] - logsumexp(logits), one sequence at a time, so the fp32 copy of the
    (often bf16) logits exists for one row of T x V at a time instead of the whole batch.
    The temperature must match the one used for sampling, or the ratios are off from the start.
    """
    if temperature <= 0:
        raise KeelError(f"temperature must be > 0 to score tokens, got {temperature}; use the sampling temperature")
    rows = []
    for logits_TV, tokens_T in zip(logits_BTV, tokens_BT):
        logits_TV = logits_TV.float() / temperature
        picked_T = logits_TV.gather(-1, tokens_T.long().unsqueeze(-1)).squeeze(-1)
        rows.append(picked_T - torch.logsumexp(logits_TV, dim=-1))
    return torch.stack(rows)


def entropy_BT(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution, in fp32 (one sequence at a time, as above)."""
    rows = []
    for logits_TV in logits_BTV:
        logp_TV = torch.log_softmax(logits_TV.float(), dim=-1)
        rows.append(-(logp_TV.exp() * logp_TV).sum(dim=-1))
    return torch.stack(rows)
