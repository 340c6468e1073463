"""The trainer's and the scorer's LM head in chunks (past the logits budget) computes what the
one-piece head computes, and the packed (padding-free) scorer what the padded one computes:
log-probs, entropies and gradients to fp32 rounding; a head sharded by FSDP2 runs in chunks too."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from keel.distributed.sync import shard_layers
from keel.engine.head import SHARDED_METHOD, chunked_head, output_head
from keel.engine.sampler import completion_logprobs, packed_completion_logprobs
from keel.models import init_model, special_ids
from keel.tasks import get_task
from keel.train.sft import IGNORE, completion_loss, encode_traces, pack


def ragged(seed: int):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 60, (int(n),), generator=g).tolist() for n in (3, 7, 5, 2)]
    completions = [torch.randint(5, 60, (int(n),), generator=g).tolist() for n in (4, 1, 6, 9)]
    return prompts, completions


def grads(model) -> list:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_scorer_equals_the_one_piece_scorer(temperature):
    model, _ = init_model("qwen3", layers=2, hidden=64, seed=0)
    prompts, completions = ragged(0)
    out = {}
    for budget in (None, 0):  # 0: every batch is over budget
        model.zero_grad()
        logp, mask, entropy = completion_logprobs(model, prompts, completions, pad_id=0, temperature=temperature,
                                                  with_entropy=True, logits_budget=budget)
        (logp * mask * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        out[budget] = (logp * mask, entropy * mask, grads(model))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = out[None], out[0]
    assert lp_a.abs().max() > 1  # real numbers, not zeros on both sides
    assert torch.allclose(lp_a, lp_b, atol=2e-6) and torch.allclose(ent_a, ent_b, atol=2e-6)
    assert len(g_a) == len(g_b) and all(torch.allclose(x, y, atol=2e-6, rtol=1e-5) for x, y in zip(g_a, g_b))


def test_chunked_sft_loss_equals_the_one_piece_loss():
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
    batch = pack(encode_traces(tok, get_task("arithmetic", digits=2).examples("train", 8, seed=0)), 64,
                 special_ids(tok)[1])
    out = {}
    for budget in (1 << 40, 0):
        model.zero_grad()
        loss, n = completion_loss(model, batch, logits_budget=budget)
        loss.backward()
        out[budget] = (loss.item(), n, grads(model))
    (loss_a, n_a, g_a), (loss_b, n_b, g_b) = out[1 << 40], out[0]
    assert n_a == n_b == int((batch.labels_BT != IGNORE).sum()) and loss_a > 1
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert all(torch.allclose(x, y, atol=2e-6, rtol=1e-5) for x, y in zip(g_a, g_b))


def test_models_that_transform_their_logits_keep_the_models_own_head():
    model, _ = init_model("qwen3", layers=1, hidden=32, seed=0)
    assert output_head(model) is not None
    model.config.final_logit_softcapping = 30.0  # Gemma 2 style: logits = 30 * tanh(logits / 30)
    assert output_head(model) is None
    prompts, completions = ragged(1)
    logp, mask, _ = completion_logprobs(model, prompts, completions, pad_id=0, logits_budget=0)  # falls back
    assert torch.isfinite(logp[mask.bool()]).all()


@pytest.mark.parametrize("budget", [None, 0])
def test_packed_scorer_equals_the_padded_scorer(budget):
    """One row, positions restarting per sequence: a sequence that attended to its neighbours in
    the row would be far off, not 1e-6."""
    model, _ = init_model("qwen3", layers=2, hidden=64, seed=0)
    prompts, completions = ragged(2)
    out = {}
    for packed in (False, True):
        model.zero_grad()
        if packed:
            logp, mask, entropy = packed_completion_logprobs(model, prompts, completions, temperature=0.8,
                                                             with_entropy=True, logits_budget=budget)
        else:
            logp, mask, entropy = completion_logprobs(model, prompts, completions, pad_id=0, temperature=0.8,
                                                      with_entropy=True)
        (logp * mask * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        out[packed] = (logp * mask, mask, entropy * mask, grads(model))
    (lp_a, m_a, ent_a, g_a), (lp_b, m_b, ent_b, g_b) = out[False], out[True]
    assert torch.equal(m_a, m_b) and lp_a.abs().max() > 1
    assert torch.allclose(lp_a, lp_b, atol=2e-6) and torch.allclose(ent_a, ent_b, atol=2e-6)
    assert all(torch.allclose(x, y, atol=3e-6, rtol=1e-5) for x, y in zip(g_a, g_b))


@pytest.fixture
def one_rank_group():
    """A process group of this process alone: FSDP2 shards over it as over many (every parameter
    a DTensor, gathered for each forward)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def untied_model():
    model, _ = init_model("qwen3", layers=2, hidden=64, seed=0)
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("tied", [True, False])
def test_a_head_sharded_by_fsdp_runs_in_chunks_with_the_unsharded_gradients(tied):
    """It used to be refused (FSDP gathers the head's weight in the root's forward only) and the
    sharded model built whole logits; now it runs in chunks as a forward method of the root."""
    plain = init_model("qwen3", layers=2, hidden=64, seed=0)[0] if tied else untied_model()
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied
    sharded = copy.deepcopy(plain)
    shard_layers(sharded, torch.device("cpu"))
    assert isinstance(output_head(sharded)[0], DTensor) and chunked_head(sharded, 1, 0)
    whole = []
    sharded.get_output_embeddings().register_forward_hook(lambda *_: whole.append(1))
    prompts, completions = ragged(3)
    out = []
    for model in (plain, sharded):
        logp, mask, entropy = completion_logprobs(model, prompts, completions, pad_id=0, temperature=0.9,
                                                  with_entropy=True, logits_budget=0)
        (logp * mask * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        out.append((logp * mask, entropy * mask, {n: p.grad for n, p in model.named_parameters()}))
    assert not whole and SHARDED_METHOD in vars(sharded) and SHARDED_METHOD not in vars(plain)
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = out
    assert lp_a.abs().max() > 1 and torch.equal(lp_a, lp_b) and torch.equal(ent_a, ent_b)
    assert g_a.keys() == g_b.keys() and plain.lm_head.weight.grad.abs().max() > 0
    # One rank: FSDP's reduce-scatter of the gathered gradient is the gradient itself.
    assert all(torch.equal(g_a[n], g_b[n].full_tensor()) for n in g_a)
