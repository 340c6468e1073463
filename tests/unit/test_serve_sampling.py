"""`sample_next` is numerically safe for every value the OpenAI schema admits (issue 17 item 1), and
unchanged, bit for bit, for ordinary temperatures and top_p (rollouts and their determinism
tests depend on it)."""

import pytest
import torch

from keel.engine.sampler import SamplingParams, sample_next


def logits(B=3, V=50, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 4


def landed_sample_next(logits_BV, params, generator):
    """The sampler as it was before the fix, for ordinary values: the reference to match exactly."""
    logits_BV = logits_BV.float()
    temperature = params.temperature if params.temperature > 0 else 1.0
    logp_BV = torch.log_softmax(logits_BV / temperature, dim=-1)
    if params.temperature == 0:
        tok_B = logits_BV.argmax(-1)
    else:
        probs_BV = logp_BV.exp()
        if params.top_p < 1.0:
            sorted_BV, idx_BV = probs_BV.sort(dim=-1, descending=True)
            drop_BV = (sorted_BV.cumsum(-1) - sorted_BV) >= params.top_p
            sorted_BV = sorted_BV.masked_fill(drop_BV, 0.0)
            probs_BV = torch.zeros_like(probs_BV).scatter(-1, idx_BV, sorted_BV)
        tok_B = torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
    return tok_B, logp_BV.gather(-1, tok_B.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [5e-324, 1e-45, 1e-39, 1e-30, 1e-6])
def test_tiny_temperature_is_greedy_and_finite(temperature):
    """logits / 1e-39 overflowed to inf, the softmax to NaN, and multinomial raised."""
    x = logits()
    tok, logp = sample_next(x, SamplingParams(temperature, 1.0, 4), torch.Generator().manual_seed(0))
    assert torch.equal(tok, x.argmax(-1))
    # that sharp a policy puts all its mass on the argmax: log-prob 0 (these logits have no ties)
    assert torch.equal(logp, torch.zeros(3))


def test_temperature_0_still_reports_logp_at_temperature_1():
    x = logits()
    tok, logp = sample_next(x, SamplingParams(0.0, 1.0, 4), None)
    assert torch.equal(tok, x.argmax(-1))
    assert torch.equal(logp, torch.log_softmax(x, -1).gather(-1, tok[:, None])[:, 0])


@pytest.mark.parametrize("top_p", [1e-46, 1e-45, 1e-30, 1e-9])
def test_tiny_top_p_keeps_the_top_token(top_p):
    x = logits()
    for seed in range(5):
        tok, logp = sample_next(x, SamplingParams(1.0, top_p, 4), torch.Generator().manual_seed(seed))
        assert torch.equal(tok, x.argmax(-1)) and torch.isfinite(logp).all()


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (0.6, 0.95), (2.0, 0.5),
                                                (1e-4, 1.0), (0.0, 1.0)])
def test_ordinary_values_sample_exactly_as_before(temperature, top_p):
    x = logits(B=8, V=200, seed=1)
    params = SamplingParams(temperature, top_p, 4)
    g_new, g_old = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(20):
        new, old = sample_next(x, params, g_new), landed_sample_next(x, params, g_old)
        assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
