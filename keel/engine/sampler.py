"""How the next token is drawn, and the teacher-forced scorer, over any Hugging Face causal LM.

Token ids in, token ids out: there is no tokenizer here.

- `sample_next` picks each row's next token from its logits (temperature, top-p, greedy) and
  returns its log-prob under the sampling policy (before top-p truncation): RL losses need exactly
  these "old policy" log-probs. The one sampling engine (keel/engine/batching.py: RL rollouts,
  eval, label, parity and serve) draws every token through it; `SamplingParams` and `Rollout`
  are its inputs and offline output.
- `completion_logprobs` (and `packed_completion_logprobs`, padding-free) re-score given
  completions with one forward pass (with grad) so the trainer can compute the new policy's
  log-probs for the same tokens.

Layout. The scorer LEFT-pads the prompts to the longest one, so every completion starts in the
same column and the logits that predict the completions are one contiguous slice `[P-1, P+C-1)`
of the sequence; the engine's prefill left-pads the same way. Pads are masked out with a 2-D
attention mask.

position_ids. We pass them explicitly, counting from each row's first real token, so a row's
positions are the same whether it is alone or next to longer prompts, and the same in the engine
and the scorer. With absolute position embeddings this is needed for correctness; with RoPE
(attention sees only position differences) it keeps the rounding identical and keeps padding
from using up the position range. Either way the log-probs the sampler records match the
scorer's to float rounding, which the RL importance ratios assume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from keel.errors import KeelError
from keel.engine import head
from keel.logprobs import entropy_BT, token_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy (argmax)."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling, in (0, 1]
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # `not >=` also catches NaN
            raise KeelError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}; pass e.g. temperature=1.0")
        if not 0 < self.top_p <= 1:
            raise KeelError(f"top_p must be in (0, 1], got {self.top_p}; pass top_p=1.0 to disable nucleus sampling")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise KeelError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}; pass e.g. max_new_tokens=64")


@dataclass
class Rollout:
    """Sampled completions, one entry per prompt, in prompt order."""

    tokens: list[list[int]]  # each completion's ids, EOS (or stop id) included when produced, nothing after it
    logprobs: list[list[float]]  # per token: log_softmax(logits / temperature) (temperature 1 if greedy), fp32
    finished: list[bool]  # True when EOS (or a stop id) was produced within max_new_tokens


# ----------------------------------------------------------------------------- helpers


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_ids(model: torch.nn.Module, ids: Tensor, what: str) -> None:
    """Out-of-range ids would index past the embedding table (a crash, or garbage on some devices)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    V = getattr(emb, "num_embeddings", None)
    if V is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise KeelError(f"{what} contain a token id outside [0, {V}); check the tokenizer (and pad_id) match the model")


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad to the longest prompt. Returns ids_BP, mask_BP (long 0/1) and position ids that count
    from each row's first real token (pads get 0; they are masked anyway)."""
    P = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids_BP[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask_BP[i, P - len(p) :] = 1
    pos_BP = (mask_BP.cumsum(-1) - 1).clamp(min=0)
    return ids_BP.to(device), mask_BP.to(device), pos_BP.to(device)


# Temperatures below this sample as greedy (vLLM's _SAMPLING_EPS): logits / 1e-39 overflow fp32 to
# inf and the softmax to NaN, and a distribution that sharp is the argmax anyway.
GREEDY_BELOW = 1e-5


def sample_next(logits_BV: Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Pick the next token per row. Returns (tokens_B, logp_B), logp under the untruncated policy.

    Safe for every temperature in [0, inf) and top_p in (0, 1]: a temperature under GREEDY_BELOW
    samples greedily (its logp is taken in log space, the logits shifted to a max of 0 before the
    division, so nothing overflows; temperature 0 reports logp at temperature 1, as always), and
    top_p always keeps the top token, even one so small it rounds to 0 in fp32."""
    logits_BV = logits_BV.float()
    greedy = params.temperature < GREEDY_BELOW
    if params.temperature == 0:
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
    elif greedy:
        shifted_BV = logits_BV - logits_BV.max(-1, keepdim=True).values  # <= 0: / tiny gives -inf, never NaN
        # (a temperature under fp32's smallest normal would round to 0 in the division: 0 / 0)
        logp_BV = torch.log_softmax(shifted_BV / max(params.temperature, torch.finfo(torch.float32).tiny), dim=-1)
    else:
        logp_BV = torch.log_softmax(logits_BV / params.temperature, dim=-1)
    if greedy:
        tok_B = logits_BV.argmax(-1)
    else:
        probs_BV = logp_BV.exp()
        if params.top_p < 1.0:
            sorted_BV, idx_BV = probs_BV.sort(dim=-1, descending=True)
            # Drop a token when the mass strictly before it already reaches top_p. The top token
            # has zero mass before it, but a top_p that is 0 in fp32 would still drop it: keep it.
            drop_BV = (sorted_BV.cumsum(-1) - sorted_BV) >= params.top_p
            drop_BV[..., 0] = False
            sorted_BV = sorted_BV.masked_fill(drop_BV, 0.0)
            probs_BV = torch.zeros_like(probs_BV).scatter(-1, idx_BV, sorted_BV)
        tok_B = torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
    return tok_B, logp_BV.gather(-1, tok_B.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- scoring


def completion_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    pad_id: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    logits_budget: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Teacher-forced log-probs of `completions` given `prompts`, one forward pass with grad.
    Past `logits_budget` elements of logits (default LOGITS_BUDGET) the LM head runs in chunks.

    Returns (logp_BC, mask_BC, entropy_BC) with C the longest completion:
    logp_BC[i, j] = log p(completions[i][j] | prompts[i] + completions[i][:j]) under
    log_softmax(logits / temperature), fp32, differentiable; mask_BC is 1.0 at real completion
    positions and 0.0 at padding (where logp is garbage but finite); entropy_BC is the detached
    per-position entropy of the same distribution when `with_entropy`, else None.
    The model's train/eval mode is left as it is (the caller decides about dropout).
    """
    if len(prompts) != len(completions):
        raise KeelError(f"got {len(prompts)} prompts but {len(completions)} completions; pass one completion per prompt")
    if not prompts:
        raise KeelError("completion_logprobs() got no prompts; pass at least one prompt/completion pair")
    if any(len(p) == 0 for p in prompts):
        raise KeelError("completion_logprobs() got an empty prompt; every prompt needs at least one token (e.g. BOS)")
    if not temperature > 0:
        raise KeelError(f"temperature must be > 0 for scoring, got {temperature}; use 1.0 for greedy rollouts")

    device = _device(model)
    B, C = len(prompts), max(len(c) for c in completions)
    # [left pad | prompt | completion | right pad]: every completion starts at column P.
    ids_BP, mask_BP, pos_BP = _left_pad(prompts, pad_id, device)
    P = ids_BP.shape[1]
    comp_BC = torch.full((B, C), pad_id, dtype=torch.long)
    mask_BC = torch.zeros((B, C), dtype=torch.long)
    for i, c in enumerate(completions):
        comp_BC[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask_BC[i, : len(c)] = 1
    comp_BC, mask_BC = comp_BC.to(device), mask_BC.to(device)
    # Completion positions continue from the prompt's last position (right pads too; they are masked).
    pos_BC = pos_BP[:, -1:] + torch.arange(1, C + 1, device=device)

    ids_BT = torch.cat([ids_BP, comp_BC], dim=1)
    attn_BT = torch.cat([mask_BP, mask_BC], dim=1)
    pos_BT = torch.cat([pos_BP, pos_BC], dim=1)
    _check_ids(model, ids_BT, "prompts/completions (or pad_id)")
    forward = dict(input_ids=ids_BT, attention_mask=attn_BT, position_ids=pos_BT, use_cache=False)
    if head.chunked_head(model, B * C, head.LOGITS_BUDGET if logits_budget is None else logits_budget):
        # Columns [P-1, P+C-1) predict the completion tokens.
        predicts_BT = torch.zeros_like(ids_BT, dtype=torch.bool)
        predicts_BT[:, P - 1:P + C - 1] = True
        logp_N, entropy_N = head.head_logprobs(model, forward, predicts_BT, comp_BC.flatten(), temperature, with_entropy)
        entropy_BC = None if entropy_N is None else entropy_N.detach().view(B, C)
        return logp_N.view(B, C), mask_BC.float(), entropy_BC
    # Logits at columns [P-1, P+C-1) predict the completion tokens. Keeping the last C+1 columns
    # and dropping the final one keeps the lm_head (and the [B, T, V] memory) to C positions.
    out = model(**forward, logits_to_keep=C + 1)
    logits_BCV = out.logits[:, :C, :]
    assert logits_BCV.shape[1] == C and ids_BT.shape[1] == P + C

    logp_BC = token_logprobs(logits_BCV, comp_BC, temperature)
    entropy_BC = None
    if with_entropy:
        with torch.no_grad():
            entropy_BC = entropy_BT(logits_BCV / temperature)
    return logp_BC, mask_BC.float(), entropy_BC


def packed_completion_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    logits_budget: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """`completion_logprobs` without padding: every prompt + completion laid end to end in one row,
    position ids restarting at each sequence (transformers then masks attention block-diagonally,
    as in SFT), so ragged completions cost their real length. Same outputs and layout as
    `completion_logprobs` ([B, C], mask, detached entropy), equal to it to float rounding."""
    if len(prompts) != len(completions) or not prompts or any(len(p) == 0 for p in prompts):
        raise KeelError("packed_completion_logprobs() needs one non-empty prompt per completion, at least one pair")
    if not temperature > 0:
        raise KeelError(f"temperature must be > 0 for scoring, got {temperature}; use 1.0 for greedy rollouts")
    device = _device(model)
    B, C = len(prompts), max(len(c) for c in completions)
    ids, positions, predicts, targets = [], [], [], []
    for p, c in zip(prompts, completions):
        start = len(ids) + len(p) - 1  # the position that predicts the first completion token
        predicts += range(start, start + len(c))
        targets += c
        ids += p + c
        positions += range(len(p) + len(c))
    ids_1T = torch.tensor([ids], dtype=torch.long, device=device)
    _check_ids(model, ids_1T, "prompts/completions")
    forward = dict(input_ids=ids_1T, position_ids=torch.tensor([positions], device=device), use_cache=False)
    predicts_T = torch.tensor(predicts, dtype=torch.long, device=device)
    tokens_N = torch.tensor(targets, dtype=torch.long, device=device)
    if head.chunked_head(model, len(predicts), head.LOGITS_BUDGET if logits_budget is None else logits_budget):
        select_1T = torch.zeros_like(ids_1T, dtype=torch.bool)
        select_1T[0, predicts_T] = True  # predicts is increasing: the selection keeps its order
        logp_N, entropy_N = head.head_logprobs(model, forward, select_1T, tokens_N, temperature, with_entropy)
        entropy_N = None if entropy_N is None else entropy_N.detach()
    else:
        logits_1NV = model(**forward).logits[:, predicts_T]
        logp_N = token_logprobs(logits_1NV, tokens_N[None], temperature)[0]
        entropy_N = None
        if with_entropy:
            with torch.no_grad():
                entropy_N = entropy_BT(logits_1NV / temperature)[0]
    # Back to completion_logprobs' [B, C] layout, zeros past each completion's end.
    mask_BC = torch.zeros((B, C), device=device)
    for i, c in enumerate(completions):
        mask_BC[i, :len(c)] = 1.0
    fill = mask_BC.bool()
    logp_BC = torch.zeros((B, C), device=device, dtype=logp_N.dtype).masked_scatter(fill, logp_N)
    entropy_BC = None if entropy_N is None else torch.zeros_like(mask_BC).masked_scatter(fill, entropy_N)
    return logp_BC, mask_BC, entropy_BC
