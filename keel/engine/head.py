"""The LM head in chunks: log-probs of chosen tokens from the decoder's last hidden states without
ever building the [positions, vocabulary] logits (a Qwen3 vocabulary makes them 0.6 MB per position
in fp32). The RL scorer (engine/sampler.py) and the SFT loss (train/sft.py) both go through here.

Under FSDP2 (distributed/sync.shard_layers) the root module holds the embeddings, the final norm
and the head, and FSDP gathers their shards in the root's `forward` only; the chunked head runs the
decoder and the head apart from that forward, so it runs as a second forward method of the root
(torch's `register_fsdp_forward_method`): the same gathering before, gradients reduce-scattered
after the backward, the head's weight used whole between.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from keel.logprobs import hidden_logprobs

# [positions x vocabulary] logits up to this many elements are materialised in one piece (one
# fused matmul: fastest, and what small models have always done); past it, the head runs in
# chunks of HEAD_CHUNK positions and never holds more than one chunk's logits (keel/logprobs.py).
# A Qwen3 vocabulary crosses it at 441 positions.
LOGITS_BUDGET = 1 << 26  # 256 MB of fp32
HEAD_CHUNK = 1024
# Config fields of models that do more to their logits than hidden @ W.T + b: those keep the
# plain path, which runs the model's own head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
# The chunked head as a method of a sharded model's own instance (not of its transformers class).
SHARDED_METHOD = "keel_head_logprobs"


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
    A head sharded by FSDP2 qualifies when `model` is the FSDP root, which holds it (keel shards the
    root last, over the embeddings, final norm and head: distributed/sync.shard_layers)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 0
    head = output_head(model) if positions * vocab > logits_budget else None
    return head is not None and (not isinstance(head[0], DTensor) or isinstance(model, FSDPModule))


def head_logprobs(model, forward: dict, select_BT: Tensor, tokens_N: Tensor, temperature: float,
                  with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """log p(tokens_N) (and entropies) at the positions `select_BT` marks, from the decoder's last
    hidden states through the LM head in chunks: differentiable, and the [N, V] logits never exist.
    On an FSDP2 root, through the root's registered forward method (registered on first use)."""
    if not isinstance(model, FSDPModule):
        return decoder_head_logprobs(model, forward, select_BT, tokens_N, temperature, with_entropy)
    if SHARDED_METHOD not in vars(model):
        setattr(model, SHARDED_METHOD, types.MethodType(decoder_head_logprobs, model))
        register_fsdp_forward_method(model, SHARDED_METHOD)
    return getattr(model, SHARDED_METHOD)(forward, select_BT, tokens_N, temperature, with_entropy)


def decoder_head_logprobs(model, forward: dict, select_BT: Tensor, tokens_N: Tensor, temperature: float,
                          with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """`head_logprobs` on weights that are all there: a plain model's, or a sharded root's inside
    its forward (where its head's weight is the gathered tensor)."""
    weight_VH, bias_V = output_head(model)
    hidden_BTH = model.get_decoder()(**forward).last_hidden_state
    return hidden_logprobs(hidden_BTH[select_BT], weight_VH, tokens_N, temperature=temperature, chunk=HEAD_CHUNK,
                           with_entropy=with_entropy, bias_V=bias_V)
