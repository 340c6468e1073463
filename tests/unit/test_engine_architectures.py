"""Every architecture on the torch engine (issue 13 item 1): sliding-window (Mistral) and
sliding-window + soft-capped (Gemma 2 and 3) models give, batched, what transformers' own generate()
gives each prompt alone, on the continuous-batching engine, the RL rollout sampler and `keel serve`.

The engine used to hand the model a cache built from its config, which trims sliding layers to
their window: rows of different lengths then no longer joined (`torch.cat` failed, and the
request failed with a 500)."""

import httpx
import pytest
import torch
import transformers

from keel.config import ServeConfig
from keel.engine.backends import TorchBackend
from keel.engine.batching import Engine, Request
from keel.engine.sampler import SamplingParams
from keel.completions import generate as rollout_generate
from keel.errors import KeelError
from keel.models import build_tokenizer, vocab_extent
from keel.serve.app import background_server, create_app, make_served

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 16
PROMPT_LENGTHS = (3, 11, 6)  # every prompt + completion runs well past the window of 4
ARCHITECTURES = {
    "qwen3": (transformers.Qwen3Config, {}),
    "mistral": (transformers.MistralConfig, dict(sliding_window=4)),
    # Gemma 2 alternates sliding and full layers and soft-caps attention scores and final logits
    # (caps small enough to change the scores of this tiny model).
    "gemma2": (transformers.Gemma2Config, dict(sliding_window=4, attn_logit_softcapping=2.0,
                                               final_logit_softcapping=3.0)),
    # Gemma 3: five sliding layers to one full (here both layers are sliding), its own RoPE base
    # for them, soft-capped final logits.
    "gemma3": (transformers.Gemma3TextConfig, dict(sliding_window=4, final_logit_softcapping=3.0)),
}


def tiny(name, **override):
    config_cls, extra = ARCHITECTURES[name]
    tok = build_tokenizer()
    config = config_cls(vocab_size=vocab_extent(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **{**extra, **override})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval(), tok


def prompts(tok):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_extent(tok), (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(model, tok, prompt):
    """transformers' generate() for one prompt alone: its own cache, no padding anywhere."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=NEW, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    return out[0, len(prompt):].tolist()  # ends at EOS, as the engines' tokens do


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def case(request):
    model, tok = tiny(request.param)
    ps = prompts(tok)
    return request.param, model, tok, ps, [hf_greedy(model, tok, p) for p in ps]


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_the_window_changes_these_completions(name):
    """Guards the tests below: the same weights without the window complete some prompt
    differently, so matching the reference means the window was applied."""
    model, tok = tiny(name)
    unwindowed, _ = tiny(name, sliding_window=64)
    unwindowed.load_state_dict(model.state_dict())
    ps = prompts(tok)
    assert [hf_greedy(unwindowed, tok, p) for p in ps] != [hf_greedy(model, tok, p) for p in ps]


def test_continuous_batching_matches_generate_per_prompt(case):
    """Rows of different lengths join a running batch (left-padded into its cache), decode
    together and leave it, and each row still gets exactly its own greedy completion."""
    name, model, tok, ps, expected = case
    engine = Engine(TorchBackend(model, "cpu"), eos_id=tok.eos_token_id, max_batch=8)
    params = SamplingParams(temperature=0, max_new_tokens=NEW)
    first = engine.submit(Request(ps[0], params, None))
    for _ in range(5):  # the first row decodes past the window before the others join
        engine.step()
    later = [engine.submit(Request(p, params, None)) for p in ps[1:]]
    engine.run_until_idle()
    reqs = [first, *later]
    assert [r.error for r in reqs] == [None] * len(ps)
    assert engine.stats.max_batch_seen == len(ps)
    assert [r.tokens for r in reqs] == expected


def test_rollout_sampler_matches_generate_per_prompt(case):
    """The RL sampler: the same engine over the model itself, every prompt prefilled in one
    left-padded batch."""
    name, model, tok, ps, expected = case
    rollout = rollout_generate(model, ps, SamplingParams(temperature=0, max_new_tokens=NEW),
                               eos_id=tok.eos_token_id)
    assert rollout.tokens == expected


def test_serve_answers_different_length_prompts_to_a_sliding_window_model():
    """Before: one of the two prompts failed in the engine and the request got a 500."""
    model, tok = tiny("mistral")
    ps = prompts(tok)[:2]
    cfg = ServeConfig(max_batch=4)
    served = make_served(TorchBackend(model, "cpu"), tok, cfg, "mistral")
    with background_server(create_app(served, cfg)) as url:
        r = httpx.post(url + "/v1/completions", timeout=30,
                       json={"model": "mistral", "prompt": ps, "max_tokens": NEW, "temperature": 0})
    assert r.status_code == 200, r.text
    assert [c["finish_reason"] in ("stop", "length") for c in r.json()["choices"]] == [True, True]
    assert served.engine.stats.max_batch_seen == 2 and served.engine.stats.failed == 0


def test_chunked_attention_is_refused_in_one_line():
    """A full cache with a chunked mask would be silently wrong: chunks start at absolute cache
    columns, which the engine's left padding shifts. Llama 4's chunked layers are refused."""
    config = transformers.Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, num_local_experts=2, attention_chunk_size=4)
    with pytest.raises(KeelError) as e:
        TorchBackend(transformers.AutoModelForCausalLM.from_config(config), "cpu")
    assert "chunked_attention" in str(e.value) and "\n" not in str(e.value) and e.value.field == "model"
