"""Per-token log-probabilities and entropies of next-token distributions, in fp32.

Shared by the sampler (which records the sampling policy's log-probs), the scorer and the RL
trainer (which recompute them with gradients).
"""

from __future__ import annotations

import contextlib

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


# ----------------------------------------------------------------------------- from hidden states


def hidden_logprobs(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    tokens_N: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk: int = 1024,
    with_entropy: bool = False,
    bias_V: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of next-token distributions straight from the last hidden states,
    through the LM head, without ever holding the [N, V] logits.

    Why it exists: a Qwen3 vocabulary has 151,936 tokens, so the fp32 logits of 8 completions x
    1,024 tokens take 5 GB, and autograd through `token_logprobs` keeps several such copies. Here
    the logits exist `chunk` positions at a time: the forward keeps only its inputs and three fp32
    scalars per position (the log-softmax normaliser as max and log-sum, the entropy); the
    backward recomputes each chunk's logits and turns them into grad_hidden, grad_weight and
    grad_bias at once. Peak memory grows with chunk x V, not N x V, at the price of a second
    LM-head matmul in the backward.

    Returns (logp_N, entropy_N), both fp32 (fp64 for fp64 inputs) and differentiable with respect
    to hidden, weight and bias: logp_N[i] = log_softmax(z_i)[tokens_N[i]] and
    entropy_N[i] = -sum_v p_iv log p_iv, with z_i = (hidden_NH[i] @ weight_VH.T + bias_V) / temperature
    and p_i = softmax(z_i).
    entropy_N is None unless `with_entropy`. Flatten [B, T, H] to [B*T, H] (and tokens to [B*T])
    first; padded positions need a valid token id (mask them in the loss, as with token_logprobs).

    Same numerics as `token_logprobs`/`entropy_BT` on the materialised logits: the matmul runs in
    the inputs' dtype (bf16 on accelerators; under torch.autocast, in the autocast dtype, as
    F.linear would), the softmax math in fp32. The temperature must be the sampling temperature.

    On CUDA, Liger-Kernel's fused linear cross-entropy (LigerFusedLinearCrossEntropyFunction,
    Triton) would serve for the logp part (logp = -cross-entropy, reduction "none"): it is
    faster, but computes its gradients inside the forward for the cross-entropy it returns and
    has no entropy output, so a loss with an entropy term still needs this path. Not a dependency.
    """
    if not temperature > 0:  # `not >` also catches NaN
        raise KeelError(f"temperature must be > 0 to score tokens, got {temperature}; use the sampling temperature", "temperature")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise KeelError(f"chunk must be an integer >= 1 (positions per LM-head matmul), got {chunk!r}; e.g. chunk=1024", "chunk")
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2 or hidden_NH.shape[1] != weight_VH.shape[1]:
        raise KeelError(
            f"hidden_NH must be [N, H] and weight_VH [V, H] with the same H, got {tuple(hidden_NH.shape)} and "
            f"{tuple(weight_VH.shape)}; flatten [B, T, H] hidden states with .reshape(-1, H)"
        )
    if tokens_N.shape != hidden_NH.shape[:1]:
        raise KeelError(f"tokens_N must be [N] = [{hidden_NH.shape[0]}], got {tuple(tokens_N.shape)}; flatten it like the hidden states")
    if bias_V is not None and bias_V.shape != weight_VH.shape[:1]:
        raise KeelError(f"bias_V must be [V] = [{weight_VH.shape[0]}], got {tuple(bias_V.shape)}")
    mm_dtype = _matmul_dtype(hidden_NH, weight_VH, bias_V)
    logp_N, entropy_N = _HiddenLogprobs.apply(
        hidden_NH, weight_VH, bias_V, tokens_N.long(), float(temperature), chunk, bool(with_entropy), mm_dtype
    )
    return logp_N, (entropy_N if with_entropy else None)


def _matmul_dtype(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None) -> torch.dtype:
    """The dtype F.linear would compute the logits in: the autocast dtype inside torch.autocast
    (which leaves float64 alone), else the inputs' own dtype, which must then agree."""
    device_type = hidden_NH.device.type
    dtypes = {hidden_NH.dtype, weight_VH.dtype} | ({bias_V.dtype} if bias_V is not None else set())
    if torch.is_autocast_enabled(device_type) and torch.float64 not in dtypes:
        return torch.get_autocast_dtype(device_type)
    if len(dtypes) != 1:
        raise KeelError(f"hidden, weight and bias must share a dtype outside autocast, got {sorted(map(str, dtypes))}; cast them first")
    return hidden_NH.dtype


class _HiddenLogprobs(torch.autograd.Function):
    """The chunked LM head + log-softmax. Forward saves inputs and per-position scalars only:
    the row max m, the log of the shifted sum s = log(sum exp(z - m)) and the entropy.
    logp = (z - m) - s, as log_softmax computes it: z - logsumexp(z) loses a rounding of the
    logsumexp to every entry of the row, which tripled the error of the entropy's gradient.

    Backward, per chunk, with z the fp32 logits / temperature, logp = (z - m) - s, p = exp(logp):
      d logp[t] / dz = onehot(t) - p
      d entropy / dz = -p * (logp + entropy)
      grad_z = onehot(t) * g_logp - p * (g_logp + g_entropy * (logp + entropy))
    then grad_logits = grad_z / temperature (in the matmul dtype), grad_hidden = grad_logits @ W,
    grad_weight += grad_logits.T @ hidden, grad_bias += grad_logits.sum(0); the last two are
    accumulated over chunks in at least fp32 and rounded to the parameter's dtype once.
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, tokens_N, temperature, chunk, with_entropy, mm_dtype):
        N, device = hidden_NH.shape[0], hidden_NH.device
        f_dtype = torch.promote_types(mm_dtype, torch.float32)
        logp_N = torch.empty(N, dtype=f_dtype, device=device)
        max_N = torch.empty(N, dtype=f_dtype, device=device)
        logsum_N = torch.empty(N, dtype=f_dtype, device=device)
        entropy_N = torch.empty(N if with_entropy else 0, dtype=f_dtype, device=device)
        with _no_autocast(device.type):
            w_VH, b_V = _cast(weight_VH, mm_dtype), _cast(bias_V, mm_dtype)
            for s in range(0, N, chunk):
                e = min(s + chunk, N)
                z_nV = _logits(hidden_NH[s:e], w_VH, b_V, mm_dtype, temperature)
                max_N[s:e] = z_nV.amax(dim=-1)
                z_nV.sub_(max_N[s:e].unsqueeze(-1))
                logsum_N[s:e] = z_nV.exp().sum(dim=-1).log()
                logp_nV = z_nV.sub_(logsum_N[s:e].unsqueeze(-1))
                logp_N[s:e] = logp_nV.gather(-1, tokens_N[s:e].unsqueeze(-1)).squeeze(-1)
                if with_entropy:
                    entropy_N[s:e] = logp_nV.exp().mul_(logp_nV).sum(dim=-1).neg_()
                del z_nV, logp_nV
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V, tokens_N, max_N, logsum_N, entropy_N)
        ctx.temperature, ctx.chunk, ctx.with_entropy, ctx.mm_dtype = temperature, chunk, with_entropy, mm_dtype
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy_N)
        return logp_N, entropy_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp_N, g_entropy_N):
        hidden_NH, weight_VH, bias_V, tokens_N, max_N, logsum_N, entropy_N = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not ctx.with_entropy:
            g_entropy_N = None
        if (g_logp_N is None and g_entropy_N is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None, None
        N, temperature, mm_dtype = hidden_NH.shape[0], ctx.temperature, ctx.mm_dtype
        grad_h_NH = torch.zeros_like(hidden_NH) if need_h else None
        grad_w_VH = torch.zeros_like(weight_VH, dtype=torch.promote_types(weight_VH.dtype, torch.float32)) if need_w else None
        grad_b_V = torch.zeros_like(bias_V, dtype=torch.promote_types(bias_V.dtype, torch.float32)) if need_b else None
        with _no_autocast(hidden_NH.device.type):
            w_VH, b_V = _cast(weight_VH, mm_dtype), _cast(bias_V, mm_dtype)
            for s in range(0, N, ctx.chunk):
                e = min(s + ctx.chunk, N)
                h_nH = _cast(hidden_NH[s:e], mm_dtype)
                logp_nV = _logits(h_nH, w_VH, b_V, mm_dtype, temperature)
                logp_nV.sub_(max_N[s:e].unsqueeze(-1)).sub_(logsum_N[s:e].unsqueeze(-1))
                g_lp_n = g_logp_N[s:e].unsqueeze(-1) if g_logp_N is not None else None
                # One name per [n, V] buffer, so that `del` frees it before the next chunk's logits.
                if g_entropy_N is not None:  # two buffers: p, then coef = g_logp + g_entropy * (logp + entropy)
                    grad_nV = logp_nV.exp()
                    logp_nV.add_(entropy_N[s:e].unsqueeze(-1)).mul_(g_entropy_N[s:e].unsqueeze(-1))
                    if g_lp_n is not None:
                        logp_nV.add_(g_lp_n)
                    grad_nV.mul_(logp_nV).neg_()
                else:  # one buffer: p overwrites logp
                    grad_nV = logp_nV.exp_().mul_(g_lp_n).neg_()
                del logp_nV
                if g_lp_n is not None:
                    grad_nV.scatter_add_(-1, tokens_N[s:e].unsqueeze(-1), g_lp_n)
                if temperature != 1.0:
                    grad_nV.div_(temperature)
                grad_nV = grad_nV.to(mm_dtype)  # what autograd does through `.float()`
                if need_h:
                    grad_h_NH[s:e] = grad_nV @ w_VH
                if need_w and grad_w_VH.dtype == mm_dtype:
                    grad_w_VH.addmm_(grad_nV.T, h_nH)  # no [V, H] temporary
                elif need_w:
                    grad_w_VH.add_(grad_nV.T @ h_nH)
                if need_b:
                    grad_b_V.add_(grad_nV.sum(dim=0))
                del grad_nV
        grad_w_VH = grad_w_VH.to(weight_VH.dtype) if need_w else None
        grad_b_V = grad_b_V.to(bias_V.dtype) if need_b else None
        return grad_h_NH, grad_w_VH, grad_b_V, None, None, None, None, None


def _logits(h_nH, w_VH, b_V, mm_dtype, temperature) -> torch.Tensor:
    """One chunk's logits / temperature in fp32 (fp64 for fp64 inputs): a fresh tensor (linear's
    output, or its fp32 copy), free to modify in place."""
    z_nV = torch.nn.functional.linear(_cast(h_nH, mm_dtype), w_VH, b_V)
    z_nV = z_nV.to(torch.promote_types(z_nV.dtype, torch.float32))
    return z_nV.div_(temperature) if temperature != 1.0 else z_nV


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _no_autocast(device_type: str):
    """The chunks cast to the matmul dtype themselves (the weight once, not once per chunk)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
