"""Batched sampling engine and teacher-forced scorer over any Hugging Face causal LM.

Token ids in, token ids out: there is no tokenizer here. Two functions:

- `generate` samples completions for a batch of prompts with a KV cache preallocated for the
  whole rollout (keel/engine/kvcache.py; optionally with the decode step compiled) and records,
  for each sampled token, its log-prob under the sampling policy (before top-p truncation). RL
  losses need exactly these "old policy" log-probs.
- `completion_logprobs` re-scores given completions with one forward pass (with grad) so the
  trainer can compute the new policy's log-probs for the same tokens.

Layout. Both functions LEFT-pad the prompts to the longest one, so every row's prompt ends in the
same column: in `generate` each decode step appends one column for the whole batch, and in
`completion_logprobs` every completion starts in the same column, so the logits that predict
the completions are one contiguous slice `[P-1, P+C-1)` of the sequence. Pads are masked out with
a 2-D attention mask.

position_ids. We pass them explicitly, counting from each row's first real token, so a row's
positions are the same whether it is alone or next to longer prompts, and the same in `generate`
and `completion_logprobs`. With absolute position embeddings this is needed for correctness; with
RoPE (attention sees only position differences) it keeps the rounding identical and keeps padding
from using up the position range. Either way the log-probs the sampler records match the
scorer's to float rounding, which the RL importance ratios assume.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from keel.errors import KeelError
from keel.engine.kvcache import cache_kwarg, preallocated_cache
from keel.logprobs import entropy_BT, hidden_logprobs, token_logprobs


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


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    stop_ids: Collection[int] = (),
    compile: bool = False,
) -> Rollout:
    """Sample one completion per prompt, all prompts in one batch, with a KV cache.

    `generator` drives the sampling; create it on the model's device
    (`torch.Generator(device=device).manual_seed(seed)`), as `torch.multinomial` requires. With
    temperature 0 (greedy) it is unused. `stop_ids` end a row like `eos_id`. The model is put in
    eval mode for the call and restored to its previous mode afterwards.

    `compile=True` runs the decode steps through `torch.compile` (opt-in: the first call per model
    class compiles, tens of seconds on a CPU, then one graph serves every batch and prompt length;
    forward hooks do not see compiled steps). If compiling fails, the rollout is redone eagerly
    from the same generator state, with a warning, and that model class stays eager.
    """
    if not prompts:
        raise KeelError("generate() got no prompts; pass at least one list of token ids")
    if any(len(p) == 0 for p in prompts):
        raise KeelError("generate() got an empty prompt; every prompt needs at least one token (e.g. BOS)")
    device = _device(model)
    if generator is not None and generator.device.type != device.type:
        raise KeelError(
            f"generator is on {generator.device} but the model is on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )

    was_training = model.training
    model.eval()
    try:
        forward = _compiled_forward(model) if compile else None
        if forward is not None:
            state = generator.get_state() if generator is not None else None
            try:
                return _generate(model, prompts, params, eos_id, pad_id, generator, stop_ids, device, forward)
            except KeelError:
                raise
            except Exception as e:  # no C++ compiler, an op inductor cannot lower, ...
                _COMPILED[type(model)] = None
                reason = (str(e).strip().splitlines() or [""])[0]
                warnings.warn(f"torch.compile failed for {type(model).__name__} ({type(e).__name__}: {reason}); "
                              "decoding eagerly", stacklevel=3)
                if state is not None:
                    generator.set_state(state)
        return _generate(model, prompts, params, eos_id, pad_id, generator, stop_ids, device, model)
    finally:
        model.train(was_training)


# One compiled forward per model class (None: compiling failed). The function is compiled unbound
# so the cache holds no model alive; dynamic=True gives one graph for all batch sizes and lengths.
_COMPILED: dict[type, object] = {}


def _compiled_forward(model: torch.nn.Module):
    cls = type(model)
    if cls not in _COMPILED:
        _COMPILED[cls] = torch.compile(cls.forward, dynamic=True)
    fn = _COMPILED[cls]
    return None if fn is None else functools.partial(fn, model)


def _generate(model, prompts, params, eos_id, pad_id, generator, stop_ids, device, forward) -> Rollout:
    """The rollout loop; `forward` runs the decode steps (the model itself, or its compiled forward)."""
    B, N = len(prompts), params.max_new_tokens
    ids_BP, mask_BP, pos_BP = _left_pad(prompts, pad_id, device)
    _check_ids(model, ids_BP, "prompts (or pad_id)")
    P = ids_BP.shape[1]
    stop_S = torch.tensor(sorted({eos_id, *stop_ids}), dtype=torch.long, device=device)
    cache_kw = cache_kwarg(model)

    # Everything the steps need is made once and sliced per step: the mask of all P + N columns
    # (new tokens are real, so ones), each row's positions for the new tokens, the outputs, and
    # the KV cache (None: the model builds its own, e.g. for sliding-window layers).
    mask_BT = torch.cat([mask_BP, mask_BP.new_ones(B, N)], dim=1)
    pos_BN = pos_BP[:, -1:] + torch.arange(1, N + 1, device=device)
    toks_BN = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    logp_BN = torch.zeros((B, N), dtype=torch.float32, device=device)
    cache = preallocated_cache(model, P + N)

    # Prefill once; only the last column's logits are needed (logits_to_keep=1 spares a [B, P, V]).
    out = model(input_ids=ids_BP, attention_mask=mask_BP, position_ids=pos_BP, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    cache = out.cache if cache_kw == "cache" else out.past_key_values

    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    length_B = torch.zeros(B, dtype=torch.long, device=device)  # tokens kept per row
    for step in range(N):
        tok_B, logp_B = sample_next(out.logits[:, -1, :], params, generator)
        length_B += ~done_B  # rows finished earlier keep their length
        tok_B = tok_B.masked_fill(done_B, pad_id)  # what we feed finished rows; never returned
        toks_BN[:, step] = tok_B
        logp_BN[:, step] = logp_B
        done_B |= torch.isin(tok_B, stop_S)
        if step == N - 1 or bool(done_B.all()):
            break
        # One decode step for the whole batch: one new column.
        out = forward(
            input_ids=tok_B[:, None],
            attention_mask=mask_BT[:, : P + step + 1],
            position_ids=pos_BN[:, step : step + 1],
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: cache},
        )

    lengths = length_B.tolist()
    return Rollout(
        tokens=[row[:n] for row, n in zip(toks_BN.tolist(), lengths)],
        logprobs=[row[:n] for row, n in zip(logp_BN.tolist(), lengths)],
        finished=done_B.tolist(),
    )


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
    if chunked_head(model, B * C, LOGITS_BUDGET if logits_budget is None else logits_budget):
        # Columns [P-1, P+C-1) predict the completion tokens.
        predicts_BT = torch.zeros_like(ids_BT, dtype=torch.bool)
        predicts_BT[:, P - 1:P + C - 1] = True
        logp_N, entropy_N = head_logprobs(model, forward, predicts_BT, comp_BC.flatten(), temperature, with_entropy)
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
    if chunked_head(model, len(predicts), LOGITS_BUDGET if logits_budget is None else logits_budget):
        select_1T = torch.zeros_like(ids_1T, dtype=torch.bool)
        select_1T[0, predicts_T] = True  # predicts is increasing: the selection keeps its order
        logp_N, entropy_N = head_logprobs(model, forward, select_1T, tokens_N, temperature, with_entropy)
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


# ----------------------------------------------------------------------------- the LM head in chunks

# [positions x vocabulary] logits up to this many elements are materialised in one piece (one
# fused matmul: fastest, and what small models have always done); past it, the head runs in
# chunks of HEAD_CHUNK positions and never holds more than one chunk's logits (keel/logprobs.py).
# A Qwen3 vocabulary crosses it at 441 positions.
LOGITS_BUDGET = 1 << 26  # 256 MB of fp32
HEAD_CHUNK = 1024
# Config fields of models that do more to their logits than hidden @ W.T + b: those keep the
# plain path, which runs the model's own head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model) -> tuple[Tensor, Tensor | None] | None:
    """(weight_VH, bias_V) of the model's LM head when its logits are exactly the last hidden
    state through that Linear; None otherwise (soft-capped or scaled logits, an adapted head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or not hasattr(model, "get_decoder"):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head.weight, head.bias


def chunked_head(model, positions: int, logits_budget: int) -> bool:
    """Whether `positions` positions' logits are over the budget and the model's head can be chunked.
    Not a head sharded by FSDP2: FSDP gathers the root's weights (embeddings, final norm, head) in
    the model's own forward, and the chunked head runs the decoder and the head apart from it; a
    sharded model computes whole logits (the micro-batch size bounds them)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 0
    head = output_head(model) if positions * vocab > logits_budget else None
    return head is not None and not isinstance(head[0], DTensor)


def head_logprobs(model, forward: dict, select_BT: Tensor, tokens_N: Tensor, temperature: float,
                  with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """log p(tokens_N) (and entropies) at the positions `select_BT` marks, from the decoder's last
    hidden states through the LM head in chunks: differentiable, and the [N, V] logits never exist."""
    weight_VH, bias_V = output_head(model)
    hidden_BTH = model.get_decoder()(**forward).last_hidden_state
    return hidden_logprobs(hidden_BTH[select_BT], weight_VH, tokens_N, temperature=temperature, chunk=HEAD_CHUNK,
                           with_entropy=with_entropy, bias_V=bias_V)
